"""Continuous batching for the DMoE decode loop: B sequences step together, each with its own
active expert set, its own trigger and its own router queries; rows join and leave between steps.

The single-sequence ``Engine.generate`` is the reference: every row here makes the same decisions
in the same order (route at start, entropy trigger, swap + last-MLP recompute, greedy commit, stop
checks), and tests hold each row's tokens and logits to it.

How rows share one model call per step:

- **Cache.** One ``DynamicCache`` for the running batch, left-padded: row b's ``n_b`` real positions
  are its last ``n_b`` columns. A 2-D attention mask hides the padding, and position ids carry each
  row's own positions, so a row attends to exactly the keys it would alone. A joining request is
  prefilled alone (batch 1: the reference's own prefill) and its K/V spliced in; a finished or
  cancelled row is dropped and columns that are padding in every row are trimmed.
- **Experts.** The last MLP gets per-row stacks ``A (B, R, in)``, ``B (B, out, R)``
  (``ExpertAdapter.activate_rows``); rows with fewer or no experts are padded with zero LoRAs. As in
  the reference, nothing before the last MLP depends on experts, so a row's swap leaves the whole
  cache valid. A trigger re-routes its own row only, and only the triggered rows' last MLP and LM
  head are recomputed, from their cached ``h_mid``.
- **Scheduling.** ``step()``: admit waiting requests up to ``max_batch`` (prefill), then every row
  commits one token, finished rows leave, and the rest advance one position in one forward.

Experts on more than the last layer would make a swap invalidate K/V (see ``dmoe.engine.decode``);
the batched engine refuses them.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from dmoe.engine.decode import (
    DecodeConfig,
    Engine,
    Generation,
    TokenRecord,
    greedy_token,
    new_cache,
)
from dmoe.engine.triggers import TriggerPolicy, token_entropy
from dmoe.experts.lora import Expert
from dmoe.routing.base import Router


@dataclass
class Request:
    """One generation for ``BatchEngine``: the arguments of ``Engine.generate``."""

    input_ids: torch.Tensor  # (1, T > 0)
    task_input: str = ""  # seeds router queries
    config: DecodeConfig = field(default_factory=DecodeConfig)
    initial_experts: Sequence[str] = ()  # pinned initial set (else route at start, if on)
    routing: bool = True  # False: never ask a router (a plain base-model row)
    router: Router | None = None  # None: the engine's
    trigger: TriggerPolicy | None = None  # None: a fresh copy of the engine's policy
    on_token: Callable[[TokenRecord], None] | None = None  # streaming: each committed token


@dataclass
class _Row:
    """A running request: its output so far and its pending position."""

    id: int
    request: Request
    router: Router | None  # None: never routes
    trigger: TriggerPolicy
    out: Generation
    logits: torch.Tensor  # (1, V): next-token logits of the pending position
    h_mid: torch.Tensor  # (1, 1, d): residual after the last attention at that position
    length: int  # real (unpadded) positions in the cache
    experts: tuple[Expert, ...] = ()
    weights: tuple[float, ...] = ()
    entropy: float = 0.0  # TU of the pending position (before any swap)
    triggered: bool = False  # whether the pending position re-routed
    done: bool = False


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (B, H, L, D) with ``n`` zero columns in front of L."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def _kv(layer: object) -> tuple[DynamicLayer, torch.Tensor, torch.Tensor]:
    """A cache layer, its keys and its values (B, H, L, D); only full-attention dynamic layers."""
    if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
        raise TypeError(f"batched decoding needs a filled dynamic (full-attention) cache, got "
                        f"{type(layer).__name__}")
    return layer, layer.keys, layer.values


class BatchEngine:
    """Continuous batching over an ``Engine`` (its model, adapter, router, loader and trigger).

    ``submit`` queues requests, ``step`` advances the batch by one token and returns the
    generations that finished, ``cancel`` drops a request; ``run`` does a closed set to the end.
    Not thread-safe: one thread drives it.
    """

    def __init__(self, engine: Engine, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if len(engine.adapter.layer_ids) > 1:
            raise ValueError("batched decoding needs experts on the last layer only (a swap would "
                             "invalidate the K/V of later layers); use Engine.generate")
        self.engine = engine
        self.max_batch = max_batch
        self._ids = itertools.count()
        self._waiting: deque[tuple[int, Request]] = deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._width = 0  # cache columns = the longest row's length
        self._stacks_stale = True  # the adapter does not hold the running rows' stacks

    # -- the queue ----------------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id (``step`` reports it with this id)."""
        ids = request.input_ids
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (1, T>0), got {tuple(ids.shape)}")
        rid = next(self._ids)
        self._waiting.append((rid, request))
        return rid

    def cancel(self, rid: int) -> bool:
        """Drop a waiting or running request (its row is freed at once); False if unknown."""
        for item in self._waiting:
            if item[0] == rid:
                self._waiting.remove(item)
                return True
        keep = [i for i, r in enumerate(self._rows) if r.id != rid]
        if len(keep) == len(self._rows):
            return False
        self._keep(keep)
        return True

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._rows)

    def run(self, requests: Iterable[Request]) -> list[Generation]:
        """Generate every request (batched, continuously refilled); outputs in input order."""
        ids = [self.submit(r) for r in requests]
        done: dict[int, Generation] = {}
        while not all(i in done for i in ids):
            done.update(self.step())
        return [done[i] for i in ids]

    # -- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[int, Generation]]:
        """Admit waiting requests, commit one token in every row, advance the survivors; returns
        ``(id, generation)`` of the rows that finished in this step."""
        self._admit()
        if not self._rows:
            return []
        self._trigger()
        finished = [r for r in self._rows if self._commit(r)]
        if finished:
            self._keep([i for i, r in enumerate(self._rows) if not r.done])
        if self._rows:
            self._advance()
        return [(r.id, r.out) for r in finished]

    def _admit(self) -> None:
        """Prefill waiting requests alone (the reference's prefill) and splice them in."""
        eng = self.engine
        while self._waiting and len(self._rows) < self.max_batch:
            rid, req = self._waiting.popleft()
            router = (req.router or eng.router) if req.routing else None
            eng._start(req.task_input, req.config, req.initial_experts, router)
            seq = req.input_ids.to(eng.model.device)
            t0 = time.perf_counter()
            cache = new_cache()
            logits = eng._forward(seq, cache)
            eng._sync(req.config.profile)
            out = Generation(token_ids=[], text="", records=[], finish_reason="length",
                             prefill_tokens=seq.shape[1], prefill_s=time.perf_counter() - t0)
            assert eng._h_mid is not None
            self._rows.append(_Row(rid, req, router, req.trigger or copy.deepcopy(eng.trigger), out,
                                   logits, eng._h_mid, seq.shape[1], eng.adapter.active,
                                   eng.adapter.weights))
            self._splice(cache, seq.shape[1])
            self._stacks_stale = True

    def _trigger(self) -> None:
        """Rows whose trigger fires re-route and get their pending logits recomputed."""
        eng = self.engine
        entropies = token_entropy(torch.cat([r.logits for r in self._rows])).tolist()
        fired: list[tuple[_Row, float]] = []
        for row, tu in zip(self._rows, entropies, strict=True):
            req = row.request
            row.entropy = tu
            row.triggered = row.router is not None and row.trigger(len(row.out.records), tu)
            if not row.triggered:
                continue
            assert row.router is not None
            t0 = time.perf_counter()
            hits = eng._route(row.router, req.task_input, row.out.token_ids, req.config)
            row.experts, row.weights = eng._hits_set(hits, req.config)
            fired.append((row, time.perf_counter() - t0))
        if not fired:
            return
        t0 = time.perf_counter()
        eng.adapter.activate_rows([(r.experts, r.weights) for r, _ in fired])
        logits = eng._recompute_last_mlp(torch.cat([r.h_mid for r, _ in fired]))
        eng._sync(any(r.request.config.profile for r, _ in fired))
        recompute_s = time.perf_counter() - t0
        self._stacks_stale = True
        for i, (row, route_s) in enumerate(fired):
            row.logits = logits[i : i + 1]
            row.out.trigger_s.append(route_s + recompute_s)

    def _commit(self, row: _Row) -> bool:
        """Commit the row's greedy token; True if the row is finished."""
        eng, cfg, out = self.engine, row.request.config, row.out
        token = greedy_token(row.logits[0], out.token_ids, cfg.no_repeat_ngram)
        if cfg.record_logits:
            out.logits.append(row.logits[0].float().cpu())
        record = TokenRecord(token, row.entropy, row.triggered, tuple(e.id for e in row.experts))
        out.records.append(record)
        out.token_ids.append(token)
        if row.request.on_token is not None:
            row.request.on_token(record)
        if token in eng.eos_ids and not cfg.ignore_eos:
            out.finish_reason = "eos"
        elif cfg.stop_strings and eng._hit_stop(out.token_ids, cfg.stop_strings):
            out.finish_reason = "stop"
        elif len(out.token_ids) < cfg.max_new_tokens:
            return False
        out.text = eng._final_text(out.token_ids, cfg.stop_strings)
        row.done = True
        return True

    def _advance(self) -> None:
        """Run every row's last token through the model in one forward."""
        eng, rows = self.engine, self._rows
        if self._stacks_stale:
            eng.adapter.activate_rows([(r.experts, r.weights) for r in rows])
            self._stacks_stale = False
        device = eng.model.device
        ids = torch.tensor([[r.out.token_ids[-1]] for r in rows], device=device)
        lengths = torch.tensor([r.length for r in rows], device=device)
        mask = torch.arange(self._width + 1, device=device)[None, :] >= (self._width - lengths)[:, None]
        t0 = time.perf_counter()
        hidden = eng.model.model(input_ids=ids, attention_mask=mask.long(),
                                 position_ids=lengths[:, None], past_key_values=self._cache,
                                 use_cache=True)
        logits = eng.lm_head(hidden.last_hidden_state[:, -1, :])  # (B, V)
        eng._sync(any(r.request.config.profile for r in rows))
        step_s = time.perf_counter() - t0
        assert eng._h_mid is not None
        for i, row in enumerate(rows):
            row.logits, row.h_mid = logits[i : i + 1], eng._h_mid[i : i + 1]
            row.length += 1
            row.out.step_s.append(step_s)
        self._width += 1

    # -- the batch cache ----------------------------------------------------------------------

    def _splice(self, cache: DynamicCache, length: int) -> None:
        """Append a prefilled row's cache (batch 1, ``length`` positions) to the batch cache."""
        if self._cache is None:
            self._cache, self._width = cache, length
            return
        width = max(self._width, length)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            (old, k0, v0), (_, k1, v1) = _kv(old_layer), _kv(new_layer)
            old.keys = torch.cat([_pad_left(k0, width - self._width), _pad_left(k1, width - length)])
            old.values = torch.cat([_pad_left(v0, width - self._width),
                                    _pad_left(v1, width - length)])
        self._width = width

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (cache rows too) and trim all-padding columns."""
        self._rows = [self._rows[i] for i in keep]
        self._stacks_stale = True
        if not self._rows:
            self._cache, self._width = None, 0
            self.engine.adapter.activate([])  # leave the base model behind
            return
        assert self._cache is not None
        index = torch.tensor(keep, device=self.engine.model.device)
        cut = self._width - max(r.length for r in self._rows)
        for cache_layer in self._cache.layers:
            layer, keys, values = _kv(cache_layer)
            layer.keys = keys.index_select(0, index)[..., cut:, :]
            layer.values = values.index_select(0, index)[..., cut:, :]
        self._width -= cut
