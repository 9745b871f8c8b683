"""The DMoE decode loop: greedy decoding with a KV cache and uncertainty-triggered expert swaps.

Per step t: compute TU_t on the next-token logits; if the trigger policy fires, ask the router with
(task input + text generated before t, last 128 tokens), make its top-k experts that pass the
relevance gate (``min_score`` / ``min_relevance``, see ``dmoe.routing.base.gate_hits``) the active
set, and recompute the logits of position t. The new set *replaces* the old one: a trigger whose
hits all fall below the gate (or a router that finds nothing) leaves the active set EMPTY, i.e. the
base model decodes until the next trigger. With experts on the last layer only, the recompute is just::

    h_mid  = residual stream of position t after the last layer's attention   (cached by a hook)
    logits = lm_head(norm(h_mid + MLP_{θ+ΣΔ}(post_attention_layernorm(h_mid))))

(Gemma 3 wraps the MLP in its own pre/post norms: ``dmoe.experts.blocks.FeedForward``.)

No K/V depends on the last MLP, so the cache stays valid: no re-prefill. With experts on the last
N > 1 layers earlier MLPs feed later attention, so the cache *is* stale after a swap and the engine
must be told what to do (``kv_policy``): ``recompute`` re-prefills the whole sequence under the new
set (exact), ``stale`` keeps the old cache and only re-runs position t (the paper's "KV mismatch"),
``partial`` re-runs only the N expert layers over every position from the residual stream entering
the first of them, kept for the whole sequence (exact: the layers below never see an expert, so
their K/V and outputs do not change; the cost is N/L of a re-prefill, plus the stored residuals).

The engine takes token ids in and gives token ids out; it uses the tokenizer only to build router
queries, detect stop strings and decode the final text. It knows nothing about how experts are
trained, stored or ranked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from dmoe.engine.triggers import NeverTrigger, TriggerPolicy, token_entropy
from dmoe.experts.blocks import attention_inputs, feed_forward
from dmoe.experts.lora import (
    COMPOSITIONS,
    Composition,
    Expert,
    ExpertAdapter,
    composition_weights,
    decoder_layers,
)
from dmoe.routing.base import RouteHit, Router, build_query, gate_hits

KVPolicy = Literal["recompute", "stale", "partial"]
KV_POLICIES: tuple[str, ...] = ("recompute", "stale", "partial")


def stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where ``text`` is cut by the first of ``stops`` it contains, or None. A stop string counts
    only once the text has started, after its leading whitespace: a base model that opens its
    answer with a newline (Gemma 3 in the plain frame) is not cut to nothing by a "\\n" stop."""
    start = len(text) - len(text.lstrip())
    cuts = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(cuts) if cuts else None


@dataclass(frozen=True)
class DecodeConfig:
    """Knobs of one generation."""

    max_new_tokens: int = 64  # hard cap on generated tokens
    # The routing defaults below are dmoe's shipped defaults (ask, demo, eval, server and the
    # benches read them from here), chosen on dev slices: results/dev/README.md.
    top_k: int = 1  # experts per trigger (paper: 3; on a 135M model 3 summed experts loop)
    min_score: float = 0.0  # relevance gate: drop routed hits whose raw score is below this
    min_relevance: float = 0.5  # ... or whose relevance (BM25: score / query max) is below this
    # (0.5: scripts/replay_routes.py on a knowledge_conflicts dev slice, 300 passages indexed:
    # 5.7% of unrelated questions admit an expert (0.4: 22.3%), the own expert comes first for
    # 47.3% of the passages' questions (0.4: 59.3%); results/dev/README.md section 7; 0 = off, the
    # paper)
    query_max_tokens: int = 128  # router query = last this-many tokens of input + generated text
    stop_strings: tuple[str, ...] = ()  # stop once the generated text contains one of these
    # after its leading whitespace (``stop_index``)
    kv_policy: KVPolicy = "recompute"  # only matters for experts on > 1 layer (see module doc)
    route_at_start: bool = True  # also route on the task input before prefill (0 in the loop);
    # a confident (wrong) model would otherwise never trigger
    composition: Composition = "cat"  # "cat": Σ Δ_i (paper); "softmax": λ·softmax(relevance/T)-weighted Σ
    composition_temperature: float = 1.0  # T of "softmax" (inf: equal weights λ/k)
    composition_scale: float = 1.0  # λ of "softmax": the mix's overall strength
    no_repeat_ngram: int = 3  # > 0: never emit a token that repeats an n-gram of the generated
    # text (greedy picks the best other token); 0 = plain greedy (the paper). 3: oracle-routed
    # recite experts loop in 35% of answers with plain greedy, 2.5% with this, efficacy kept
    # (0.325 -> 0.35, knowledge_conflicts 500-539): results/dev/README.md
    ignore_eos: bool = False  # keep generating past EOS (benchmarks with fixed lengths)
    record_logits: bool = False  # keep each step's final logits (tests, attribution)
    profile: bool = False  # synchronise the device around timed phases (honest GPU timings)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {COMPOSITIONS}, got {self.composition!r}")
        if not (self.composition_temperature > 0 and self.composition_scale > 0):
            raise ValueError(f"composition temperature and scale must be > 0, got "
                             f"{self.composition_temperature} and {self.composition_scale}")
        if self.min_relevance < 0 or self.min_score < 0:
            raise ValueError(f"min_score and min_relevance must be >= 0, got {self.min_score} "
                             f"and {self.min_relevance}")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be >= 0 (0 = off), got {self.no_repeat_ngram}")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {self.kv_policy!r}")


def repeated_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram already in ``tokens`` (sorted; [] for n = 0)."""
    if n <= 0 or len(tokens) < n - 1:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return sorted({tokens[i + n - 1] for i in range(len(tokens) - n + 1)
                   if tuple(tokens[i:i + n - 1]) == prefix})


def greedy_token(logits: torch.Tensor, generated: Sequence[int], no_repeat_ngram: int) -> int:
    """argmax of ``logits`` (V,) over the tokens that repeat no ``no_repeat_ngram``-gram of
    ``generated`` (every token when 0)."""
    banned = repeated_ngram_tokens(generated, no_repeat_ngram)
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
    return int(logits.argmax())


@dataclass(frozen=True)
class TokenRecord:
    """What happened at one generated position."""

    token_id: int
    entropy: float  # TU of the distribution the trigger policy saw (before any swap)
    triggered: bool  # whether this position re-routed
    active: tuple[str, ...]  # expert ids active when the token was chosen


@dataclass
class Generation:
    """The output of ``Engine.generate``."""

    token_ids: list[int]
    text: str
    records: list[TokenRecord]
    finish_reason: Literal["eos", "length", "stop"]
    prefill_tokens: float  # tokens run through the full model outside single-token steps (a
    # partial recompute of N of L layers counts N/L per position)
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)  # (V,) per step
    step_s: list[float] = field(default_factory=list, repr=False)  # one-token forward times
    trigger_s: list[float] = field(default_factory=list, repr=False)  # route+load+recompute times
    prefill_s: float = 0.0

    @property
    def n_triggers(self) -> int:
        return sum(r.triggered for r in self.records)


ExpertLoader = Callable[[Sequence[str]], list[Expert]]
ActiveSet = tuple[tuple[Expert, ...], tuple[float, ...]]  # experts and their composition weights


def new_cache() -> DynamicCache:
    """An empty KV cache whose every layer keeps all its positions.

    A cache built from the config would give sliding-window layers (Gemma 3) a cache that drops
    keys older than the window. The model's masks already hide those keys, so keeping them changes
    no logit, and it keeps every layer's cache the same length: rows of a batch splice, and the
    expert layers can be re-run over every position (``kv_policy="partial"``)."""
    return DynamicCache()


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends generation: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Engine:
    """Greedy decoding over a Hugging Face causal LM with final-layer experts swapped on triggers."""

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 load_experts: ExpertLoader | None = None, router: Router | None = None,
                 trigger: TriggerPolicy | None = None) -> None:
        if router is not None and load_experts is None:
            raise ValueError("a router needs load_experts to turn expert ids into weights")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.load_experts = load_experts
        self.router = router
        self.trigger: TriggerPolicy = trigger or NeverTrigger()
        self.layers: Any = decoder_layers(model)
        self.final_norm = model.model.norm
        self.lm_head = model.get_output_embeddings()
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._h_mid: torch.Tensor | None = None  # (B, 1, d) residual after the last attention
        self._ffn = feed_forward(self.layers[-1])
        self._hook = self._ffn.pre.register_forward_pre_hook(self._capture_h_mid)  # reads h_mid
        # kv_policy "partial": the residual stream entering the first expert layer, every position
        self._first_expert_layer = min(adapter.layer_ids)
        self._residuals: list[torch.Tensor] | None = None  # None: not kept (other policies)
        self._residual_hook = self.layers[self._first_expert_layer].register_forward_pre_hook(
            self._capture_residual, with_kwargs=True)

    def _capture_h_mid(self, module: Any, args: tuple[torch.Tensor, ...]) -> None:
        self._h_mid = args[0][:, -1:, :]

    def _capture_residual(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._residuals is not None:
            self._residuals.append(args[0] if args else kwargs["hidden_states"])

    def close(self) -> None:
        """Remove the capture hooks (the adapter stays attached)."""
        self._hook.remove()
        self._residual_hook.remove()

    # -- model calls --------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run ``ids`` (B, T) through the model on top of ``cache``; next-token logits (B, V)."""
        hidden = self.model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return self.lm_head(hidden.last_hidden_state[:, -1, :])

    def _recompute_last_mlp(self, h_mid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the current position under the new active set, from ``h_mid`` (B, 1, d)
        (default: the one the last forward captured)."""
        h_mid = self._h_mid if h_mid is None else h_mid
        assert h_mid is not None, "no forward pass has run yet"
        h = self._ffn(h_mid, self.layers[-1].mlp)  # (B, 1, d)
        return self.lm_head(self.final_norm(h))[:, -1, :]  # (B, V)

    def _recompute_expert_layers(self, cache: DynamicCache) -> torch.Tensor:
        """``kv_policy="partial"``: re-run the expert layers over every position from the stored
        residual stream under the new active set, replacing their K/V; logits of the last
        position (B, V). Equal to a full re-prefill (``tests/test_engine.py``)."""
        assert self._residuals, "no forward pass has run yet"
        h = residuals = torch.cat(self._residuals, dim=1)  # (B, T, d)
        self._residuals = None  # the layer calls below are not new positions
        n = h.shape[1]
        positions = torch.arange(n, device=h.device)
        ids = list(range(self._first_expert_layer, len(self.layers)))
        inputs = attention_inputs(self.model, h, positions[None], ids)
        for i in ids:
            cache.layers[i] = type(cache.layers[i])()  # drop this layer's stale K/V
            mask, rotary = inputs[i]
            out = self.layers[i](h, attention_mask=mask, position_ids=positions[None],
                                 past_key_values=cache, cache_position=positions, use_cache=True,
                                 position_embeddings=rotary)
            h = out[0] if isinstance(out, tuple) else out
        self._residuals = [residuals]
        return self.lm_head(self.final_norm(h[:, -1:, :]))[:, -1, :]

    def _sync(self, profile: bool) -> None:
        if profile and self.model.device.type == "cuda":
            torch.cuda.synchronize()

    # -- the loop -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, task_input: str = "",
                 config: DecodeConfig | None = None, initial_experts: Sequence[str] = (),
                 on_token: Callable[[TokenRecord], None] | None = None,
                 routing: bool = True, router: Router | None = None) -> Generation:
        """Greedy-decode from ``input_ids`` (1, T). ``task_input`` seeds router queries;
        ``on_token`` is called with each committed token's record (streaming); ``routing=False``
        never asks a router (the same engine as a plain base-model arm); ``router`` replaces the
        engine's for this generation only (as ``Request.router`` does in a batch)."""
        cfg = config or DecodeConfig()
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (1, T>0), got {tuple(input_ids.shape)}")
        multi_layer = len(self.adapter.layer_ids) > 1
        seq = input_ids.to(self.model.device)
        self._residuals = [] if multi_layer and cfg.kv_policy == "partial" else None

        # 0) the initial active set: pinned experts, or a route on the task input
        router = (router or self.router) if routing else None
        self._start(task_input, cfg, initial_experts, router)
        out = Generation(token_ids=[], text="", records=[], finish_reason="length",
                         prefill_tokens=seq.shape[1])

        # 1) prefill: the prompt under the initial active set
        t0 = time.perf_counter()
        cache = new_cache()
        logits = self._forward(seq, cache)  # (1, V)
        self._sync(cfg.profile)
        out.prefill_s = time.perf_counter() - t0

        for step in range(cfg.max_new_tokens):
            # 2) uncertainty of the next-token distribution at position t
            tu = float(token_entropy(logits)[0])
            triggered = router is not None and self.trigger(step, tu)

            # 3) trigger: route, swap the active set, recompute position t (once)
            if triggered:
                t0 = time.perf_counter()
                assert router is not None
                self._activate_hits(self._route(router, task_input, out.token_ids, cfg), cfg)
                if not multi_layer:
                    logits = self._recompute_last_mlp()
                elif cfg.kv_policy == "recompute":
                    cache = new_cache()
                    logits = self._forward(seq, cache)
                    out.prefill_tokens += seq.shape[1]
                elif cfg.kv_policy == "partial":
                    logits = self._recompute_expert_layers(cache)
                    out.prefill_tokens += seq.shape[1] * len(self.adapter.layer_ids) / len(self.layers)
                else:  # "stale": keep the old K/V of earlier positions, redo position t only
                    cache.crop(-1)  # drop position t from every layer
                    logits = self._forward(seq[:, -1:], cache)
                self._sync(cfg.profile)
                out.trigger_s.append(time.perf_counter() - t0)

            # 4) commit the greedy token (among those that repeat no n-gram, if asked)
            token = greedy_token(logits[0], out.token_ids, cfg.no_repeat_ngram)
            if cfg.record_logits:
                out.logits.append(logits[0].float().cpu())
            record = TokenRecord(token, tu, triggered, self.adapter.active_ids)
            out.records.append(record)
            out.token_ids.append(token)
            if on_token is not None:
                on_token(record)
            if token in self.eos_ids and not cfg.ignore_eos:
                out.finish_reason = "eos"
                break
            if cfg.stop_strings and self._hit_stop(out.token_ids, cfg.stop_strings):
                out.finish_reason = "stop"
                break
            if step == cfg.max_new_tokens - 1:
                break

            # 5) advance one token through the cached model
            t0 = time.perf_counter()
            next_id = torch.tensor([[token]], device=seq.device)
            seq = torch.cat([seq, next_id], dim=1)
            logits = self._forward(next_id, cache)
            self._sync(cfg.profile)
            out.step_s.append(time.perf_counter() - t0)

        out.text = self._final_text(out.token_ids, cfg.stop_strings)
        self._residuals = None  # the next generation starts its own
        return out

    def _start(self, task_input: str, cfg: DecodeConfig, initial_experts: Sequence[str],
               router: Router | None) -> None:
        """Activate a generation's initial set: ``initial_experts`` if given, else (a router,
        ``route_at_start``) the route on the task input, else none."""
        if not initial_experts and cfg.route_at_start and router is not None:
            self._activate_hits(self._route(router, task_input, (), cfg), cfg)
        else:
            self._activate(list(initial_experts), [0.0] * len(initial_experts), cfg)

    def _route(self, router: Router, task_input: str, generated: Sequence[int],
               cfg: DecodeConfig) -> list[RouteHit]:
        """The gated top-k hits for the task input + the text generated so far."""
        text = self.tokenizer.decode(list(generated), skip_special_tokens=True) if generated else ""
        query = build_query(task_input, text, self.tokenizer, cfg.query_max_tokens)
        return gate_hits(router.route(query, cfg.top_k)[: cfg.top_k],
                         cfg.min_score, cfg.min_relevance)

    def _activate_hits(self, hits: Sequence[RouteHit], cfg: DecodeConfig) -> None:
        """Routed hits become the active set (``_hits_set``)."""
        self.adapter.activate(*self._hits_set(hits, cfg))

    def _hits_set(self, hits: Sequence[RouteHit], cfg: DecodeConfig) -> ActiveSet:
        """Routed hits as an active set, weighted by relevance (else raw score); no hit (nothing
        passed the gate) -> the empty set."""
        return self._load_set([h.expert_id for h in hits],
                              [h.score if h.relevance is None else h.relevance for h in hits], cfg)

    def _activate(self, expert_ids: list[str], scores: list[float], cfg: DecodeConfig) -> None:
        """Make ``expert_ids`` the active set (``_load_set``); [] restores the base model."""
        self.adapter.activate(*self._load_set(expert_ids, scores, cfg))

    def _load_set(self, expert_ids: list[str], scores: list[float],
                  cfg: DecodeConfig) -> ActiveSet:
        """Load ``expert_ids`` with their weights (from their router ``scores``, see
        ``composition_weights``)."""
        if not expert_ids:
            return (), ()
        if self.load_experts is None:
            raise ValueError("initial experts given but the engine has no expert loader")
        weight = dict(zip(expert_ids, composition_weights(
            scores, cfg.composition, cfg.composition_temperature, cfg.composition_scale), strict=True))
        experts = tuple(self.load_experts(expert_ids))
        return experts, tuple(weight[e.id] for e in experts)

    def _hit_stop(self, token_ids: list[int], stops: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(token_ids[-16:], skip_special_tokens=True)
        if not any(s and s in tail for s in stops):  # the common case, from the last tokens only
            return False
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return stop_index(text, stops) is not None

    def _final_text(self, token_ids: list[int], stops: tuple[str, ...]) -> str:
        text = str(self.tokenizer.decode(token_ids, skip_special_tokens=True))
        cut = stop_index(text, stops)
        return text if cut is None else text[:cut]
