"""Corpus-wide LoRAs for the ``sft_lora`` and ``poly_prag`` comparison methods: the trainers.

Both train LoRAs of the same kind as the per-passage experts (gate/up/down of the last layer's MLP)
on the union of every unit's training examples, in shuffled minibatches, with AdamW:

- **sft_lora**: one LoRA, active for every example (and at inference for every question).
- **poly_prag** (Poly-PRAG): a pool of m latent LoRAs ``L_j = (A_j, B_j)`` and per unit p learnable
  routing logits ``z_p ∈ R^m``; unit p's examples see the mixed adapter
  ``Δ_p = Σ_j softmax(z_p)_j · s · B_j A_j`` — exactly what ``PolyPragMethod`` builds at inference
  from the stored weights ``w_p = softmax(z_p)`` (one passage: ``Σ_j w_pj · ΔL_j``).

sft_lora is the m = 1 case with all coefficients 1. One step on a minibatch of b examples (example
i from unit p_i)::

    h_i  = trunk(example i)                               # frozen, precomputed (trunk.py)
    c_i  = softmax(z_{p_i})  (poly)   |   [1]  (sft)      # (m,) mixing coefficients
    y    = x W^T + s · ((x A_cat^T) ⊙ repeat(c_i, r)) B_cat^T   for each projection, where
           A_cat = cat_j A_j (m·r, in), B_cat = cat_j B_j (out, m·r)
    loss = (1/b) Σ_i mean CE(head(h_i), targets_i)         # per-example mean, as in train.py
    AdamW on {A_j, B_j} (and z, with its own lr and no weight decay)

z is one dense tensor, so Adam's momentum keeps moving a unit's logits for a few steps after its
last example (as with dense embeddings); the mixes are stored dense (``poly_format``), the optional
top-k sparsification happens only when loading.

Trunk states (h at the supervised positions) are computed once when they fit a memory budget, on
the model's device or else on the CPU (minibatches are moved over); past both budgets they are
recomputed per chunk of the shuffled order, every epoch (``states_on``). A ``CorpusStates`` holds
them; given to both trainers, it runs the trunk once for both. ``example_losses_fast`` and
``example_losses_reference`` (full model forward through ``ExpertAdapter``) compute the same
per-example losses and are held equal by the tests.

This module knows nothing about files, banks or retrieval; ``poly_format`` stores a trained pool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dmoe.experts.lora import (
    PROJECTIONS,
    Expert,
    ExpertAdapter,
    ExpertMLP,
    LoraSpec,
    decoder_layers,
    scaled_expert,
    weight_key,
)
from dmoe.experts.poly_format import PolyPool
from dmoe.training.candidates import candidate_ce, candidate_sets
from dmoe.training.experts import (
    EncodedExample,
    Job,
    check_schedule,
    encode_example,
    init_expert,
    mlp_shapes,
    per_job,
)
from dmoe.training.experts import TrainConfig as _ExpertConfig
from dmoe.training.trunk import SupervisedStates, last_layer_parts, shares_prefix, trunk_states

# sft_lora: rank 16 (alpha 32, scale 2). One LoRA has to hold a whole corpus instead of one passage;
# 16 = 4x a per-passage expert's rank 4 = the rank budget of a default Poly pool (m=4 x rank 4), so
# sft_lora and poly_prag compare at equal parameter count.
SFT_SPEC = LoraSpec(rank=16, alpha=32.0)
# poly_prag: each latent LoRA is shaped like a per-passage expert (rank 4, alpha 16).
POLY_SPEC = LoraSpec(rank=4, alpha=16.0)
STATES_ON = ("auto", "device", "cpu", "recompute")
Progress = Callable[[int], None]  # called with the number of examples just trained on


@dataclass(frozen=True)
class CorpusTrainConfig:
    """How a corpus-wide LoRA (or pool) is trained. Defaults are sane starting points, not tuned."""

    spec: LoraSpec = field(default_factory=lambda: SFT_SPEC)  # shape of the LoRA (each pool LoRA)
    lr: float = 2e-3  # AdamW learning rate of the LoRA weights
    epochs: int = 3  # passes over the shuffled union of all units' examples
    batch_size: int = 8  # examples per optimiser step
    loss_on: str = "answer"  # "answer": target tokens only; "all": every token after the first
    weight_decay: float = 0.0  # AdamW decoupled weight decay (LoRA weights only)
    seed: int = 0  # shuffling and initialisation
    max_seq_len: int = 1024  # longer examples keep the target and the end of the prompt
    # 0: the full output head; K > 0: the candidate head (dmoe.training.candidates) over each
    # example's unit's targets and the frozen top-K at that unit's positions
    head_vocab: int = 0

    def __post_init__(self) -> None:
        check_schedule(self.lr, self.epochs, self.loss_on, self.max_seq_len)
        if self.head_vocab < 0:
            raise ValueError(f"head_vocab must be >= 0 (0: the full head), got {self.head_vocab}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class PolyTrainConfig(CorpusTrainConfig):
    """Poly-PRAG: ``pool_size`` latent LoRAs shaped like per-passage experts, learned routing."""

    spec: LoraSpec = field(default_factory=lambda: POLY_SPEC)
    pool_size: int = 4  # m latent LoRAs (Poly-PRAG's small pool; 4 = sft_lora's rank budget)
    routing_lr: float = 5e-2  # AdamW lr of the routing logits z_p (they must move O(1), not O(lr))
    routing_init_std: float = 0.01  # z_p ~ N(0, std): near-uniform mixes, symmetry broken

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {self.pool_size}")
        if not (self.routing_lr > 0 and math.isfinite(self.routing_lr)):
            raise ValueError(f"routing_lr must be a positive finite number, got {self.routing_lr}")
        if self.routing_init_std < 0:
            raise ValueError(f"routing_init_std must be >= 0, got {self.routing_init_std}")


# -- the head: mixed LoRAs on cached trunk states --------------------------------------------------

Pool = dict[str, tuple[torch.Tensor, torch.Tensor]]  # proj -> (A (m, r, in), B (m, out, r))


def mixture_example_ce(model: Any, states: Sequence[SupervisedStates], pool: Pool,
                       coef: torch.Tensor, scale: float,
                       candidates: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Mean CE of each example (n,) under its own mix ``coef[i]`` (n, m) of the pool's LoRAs.

    All examples' positions are flattened into one (N, d) block (no padding); each position
    carries its example's coefficients, spread over that LoRA's r columns (module docstring).
    With ``candidates[i]`` (example i's candidate ids; its state's tail set) the CE is the
    candidate head's (``dmoe.training.candidates``).
    """
    ffn, mlp, final_norm, lm_head = last_layer_parts(model)
    dtype = ffn.pre.weight.dtype
    lengths = torch.tensor([len(s.targets) for s in states])
    h_mid = torch.cat([s.h_mid for s in states])  # (N, d)
    row = torch.repeat_interleave(torch.arange(len(states)), lengths).to(h_mid.device)  # (N,)
    m, r = pool[PROJECTIONS[0]][0].shape[:2]
    c = coef.to(h_mid.device, dtype)[row].repeat_interleave(r, dim=1)  # (N, m·r)

    def proj(name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = pool[name]
        a_cat = a.reshape(m * r, -1).to(dtype)  # (m·r, in)
        b_cat = b.permute(1, 0, 2).reshape(b.shape[1], m * r).to(dtype)  # (out, m·r)
        return getattr(mlp, name)(x) + ((x @ a_cat.T) * c) @ b_cat.T * scale  # (N, out)

    x = ffn.pre(h_mid)  # (N, d)
    h = h_mid + ffn.output(proj("down_proj", mlp.act_fn(proj("gate_proj", x)) * proj("up_proj", x)))
    hidden = final_norm(h)  # (N, d)
    if candidates is None:
        targets = torch.cat([s.targets for s in states]).to(hidden.device)  # (N,)
        ce = F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")  # (N,)
    else:  # back to one row per example: (n, P, d), valid (n, P) in the same row-major order
        padded = torch.nn.utils.rnn.pad_sequence(hidden.split(lengths.tolist()), batch_first=True)
        valid = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).to(hidden.device)
        ce = candidate_ce(model, padded, valid, candidates, states)
    total = torch.zeros(len(states), device=ce.device).index_add_(0, row, ce)  # (n,)
    return total / lengths.to(ce.device)


def _stack(experts: Sequence[Expert], layer: int, device: torch.device) -> Pool:
    return {p: tuple(torch.stack([e.weights[weight_key(layer, p, part)] for e in experts])
                     .to(device, torch.float32) for part in "AB")  # type: ignore[misc]
            for p in PROJECTIONS}


def _unstack(pool: Pool, ids: Sequence[str], spec: LoraSpec, layer: int) -> list[Expert]:
    return [Expert(id=eid, spec=spec, weights={
        weight_key(layer, p, part): t[j].detach().float().cpu().clone()
        for p, (a, b) in pool.items() for part, t in (("A", a), ("B", b))})
        for j, eid in enumerate(ids)]


# -- trunk states within a memory budget -----------------------------------------------------------

class _States:
    """Trunk states of every example: cached on the device or the CPU, or recomputed per chunk."""

    def __init__(self, model: Any, encoded: Sequence[EncodedExample], groups: Sequence[int],
                 states_on: str, device_budget: int, cpu_budget: int,
                 trunk_batch_tokens: int, share_prefix: bool | None,
                 progress: Progress | None = None) -> None:
        if states_on not in STATES_ON:
            raise ValueError(f"states_on must be one of {STATES_ON}, got {states_on!r}")
        self.model, self.encoded, self.groups = model, encoded, groups
        self.trunk_batch_tokens = trunk_batch_tokens
        self.device = next(model.parameters()).device
        self.share_prefix = shares_prefix(share_prefix, self.device)
        itemsize = next(model.parameters()).element_size()
        need = sum(len(e.ids) - e.start for e in encoded) * model.config.hidden_size * itemsize
        if states_on == "auto":
            states_on = ("device" if need <= device_budget else
                         "cpu" if need <= cpu_budget else "recompute")
        self.mode, self.bytes = states_on, need
        self.cache: list[SupervisedStates] = []
        if self.mode != "recompute":
            keep = self.device if self.mode == "device" else torch.device("cpu")
            for lo in range(0, len(encoded), 256):  # slices bound the memory in flight
                idx = range(lo, min(lo + 256, len(encoded)))
                self.cache += [SupervisedStates(s.h_mid.to(keep), s.targets.to(keep))
                               for s in self._compute(idx)]
                if progress is not None:
                    progress(len(idx))

    def _compute(self, idx: Sequence[int]) -> list[SupervisedStates]:
        return trunk_states(self.model, [(self.encoded[i].ids, self.encoded[i].start) for i in idx],
                            self.trunk_batch_tokens,
                            groups=[self.groups[i] for i in idx] if self.share_prefix else None)

    def chunk(self, idx: Sequence[int]) -> dict[int, SupervisedStates]:
        """States of ``idx`` (computed now when recomputing); ``get`` moves them to the device."""
        if self.mode == "recompute":
            return dict(zip(idx, self._compute(idx), strict=True))
        return {i: self.cache[i] for i in idx}

    def get(self, chunk: dict[int, SupervisedStates], idx: Sequence[int]) -> list[SupervisedStates]:
        return [dataclasses.replace(chunk[i], h_mid=chunk[i].h_mid.to(self.device, non_blocking=True),
                                    targets=chunk[i].targets.to(self.device)) for i in idx]


# -- training --------------------------------------------------------------------------------------

def _encode(tokenizer: Any, jobs: Sequence[Job], config: CorpusTrainConfig
            ) -> tuple[list[EncodedExample], list[int]]:
    """Every example of every job, encoded, with the index of its job (unit)."""
    if not jobs:
        raise ValueError("the corpus is empty: no units to train on")
    encoded, unit = [], []
    for u, (unit_id, examples) in enumerate(jobs):
        if not examples:
            raise ValueError(f"unit {unit_id!r} has no training examples")
        for ex in examples:
            encoded.append(encode_example(tokenizer, ex, config.loss_on, config.max_seq_len))
            unit.append(u)
    return encoded, unit


def _init_pool(model: Any, ids: Sequence[str], config: CorpusTrainConfig) -> tuple[Pool, int]:
    """Seeded like per-passage experts (A kaiming-uniform, B zeros), one seed per pool LoRA id."""
    if config.spec.n_layers != 1:
        raise ValueError(f"corpus LoRAs sit on the last layer only (n_layers=1), got "
                         f"{config.spec.n_layers}")
    shapes = mlp_shapes(model, 1)
    layer = next(iter(shapes))[0]
    init_cfg = _ExpertConfig(spec=config.spec, seed=config.seed)
    experts = [init_expert(eid, shapes, init_cfg) for eid in ids]
    return _stack(experts, layer, next(model.parameters()).device), layer


@dataclass(frozen=True)
class Budget:
    """Where trunk states live and how much is alive at once (bytes / tokens)."""

    states_on: str = "auto"  # "auto" | "device" | "cpu" | "recompute" (module docstring)
    device_bytes: int = 4 << 30  # "auto" caches states on the model's device up to this size
    cpu_bytes: int = 32 << 30  # ... else on the CPU up to this size, else recomputes per chunk
    trunk_batch_tokens: int = 8192  # padded tokens per trunk batch
    head_batch_tokens: int = 4096  # supervised positions whose (N, V) logits are alive at once
    chunk_examples: int = 2048  # examples per recomputed chunk ("recompute" only)
    # one unit's examples run their common prefix (the passage) through the trunk once; None: on
    # the CPU only (dmoe.training.trunk.shares_prefix)
    share_prefix: bool | None = None


class CorpusStates:
    """A corpus's examples, encoded, each with its unit, and their trunk states (computed once, or
    per chunk past the budget): what one training run needs before its first step. ``progress(n)``
    follows the trunk pass when the states are cached (the examples just computed), then, with
    ``head_vocab``, the candidate sets (the examples whose unit's set is done): 2 x n_examples.

    Both trainers build one when not given one; ``build_eval_bank`` builds it once and passes it to
    both, so the frozen trunk runs over the corpus once for sft_lora and Poly-PRAG together (their
    examples are encoded alike when their configs agree on ``loss_on`` and ``max_seq_len``)."""

    def __init__(self, model: Any, tokenizer: Any, jobs: Sequence[Job],
                 config: CorpusTrainConfig | None = None, budget: Budget | None = None,
                 progress: Progress | None = None) -> None:
        config, self.budget = config or CorpusTrainConfig(), budget or Budget()
        self.encoded, self.unit = _encode(tokenizer, jobs, config)
        self.key = self._key(jobs, config)
        b = self.budget
        self.states = _States(model, self.encoded, self.unit, b.states_on, b.device_bytes,
                              b.cpu_bytes, b.trunk_batch_tokens, b.share_prefix, progress)
        self.candidates: list[torch.Tensor] | None = None  # per unit, with head_vocab
        if config.head_vocab:
            if self.states.mode == "recompute":
                raise ValueError("head_vocab needs the trunk states cached (states_on 'device' or "
                                 "'cpu' within the budget), not recomputed per chunk")
            by_unit = per_job(self.states.cache, [exs for _, exs in jobs])  # _encode's order
            self.candidates = candidate_sets(model, by_unit, config.head_vocab, progress)

    @staticmethod
    def _key(jobs: Sequence[Job], config: CorpusTrainConfig) -> tuple[Any, ...]:
        return (config.loss_on, config.max_seq_len, config.head_vocab, tuple(uid for uid, _ in jobs))

    def check(self, jobs: Sequence[Job], config: CorpusTrainConfig) -> None:
        """Raise unless these states were built for ``jobs`` under ``config``'s encoding."""
        if self.key != self._key(jobs, config):
            raise ValueError("these CorpusStates were built for other units or another encoding "
                             "(loss_on, max_seq_len, head_vocab): build them from the same jobs "
                             "and config")


def _fit(model: Any, corpus: CorpusStates, pool: Pool,
         coef_of: Callable[[list[int]], torch.Tensor], extra_groups: list[dict[str, Any]],
         config: CorpusTrainConfig, progress: Progress | None) -> list[float]:
    """The shared loop; returns the mean training loss of each epoch."""
    for t in (t for pair in pool.values() for t in pair):
        t.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [t for pair in pool.values() for t in pair],
                              "weight_decay": config.weight_decay}] + extra_groups,
                            lr=config.lr)
    encoded, unit, states, cands = corpus.encoded, corpus.unit, corpus.states, corpus.candidates
    chunk_examples, head_batch_tokens = corpus.budget.chunk_examples, corpus.budget.head_batch_tokens
    gen = torch.Generator().manual_seed(config.seed)
    # whole minibatches per chunk, so recomputing changes no step (only when states are computed)
    per_chunk = (max(1, chunk_examples // config.batch_size) * config.batch_size
                 if states.mode == "recompute" else len(encoded))
    epoch_losses = []
    for _ in range(config.epochs):
        perm = torch.randperm(len(encoded), generator=gen).tolist()
        total = 0.0
        for lo in range(0, len(perm), per_chunk):
            order = perm[lo:lo + per_chunk]
            chunk = states.chunk(order)
            for b in range(0, len(order), config.batch_size):
                batch = order[b:b + config.batch_size]
                opt.zero_grad(set_to_none=True)
                for group in _token_groups(batch, encoded, head_batch_tokens):
                    ce = mixture_example_ce(model, states.get(chunk, group), pool,
                                            coef_of([unit[i] for i in group]), config.spec.scale,
                                            None if cands is None else [cands[unit[i]] for i in group])
                    (ce.sum() / len(batch)).backward()  # sum over groups = the batch's mean
                    total += float(ce.detach().sum())
                opt.step()
                if progress:
                    progress(len(batch))
        epoch_losses.append(total / len(encoded))
    return epoch_losses


def _token_groups(batch: Sequence[int], encoded: Sequence[EncodedExample],
                  budget: int) -> list[list[int]]:
    """Split a minibatch so at most ``budget`` supervised positions (logits rows) are alive."""
    groups: list[list[int]] = [[]]
    used = 0
    for i in batch:
        n = len(encoded[i].ids) - encoded[i].start
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def train_sft_lora(model: Any, tokenizer: Any, jobs: Sequence[Job],
                   config: CorpusTrainConfig | None = None, budget: Budget | None = None,
                   progress: Progress | None = None, lora_id: str = "sft_lora",
                   states: CorpusStates | None = None) -> Expert:
    """One LoRA on the union of all units' examples (``jobs``: (unit id, examples) pairs).
    ``states``: trunk states built beforehand for these jobs (then their budget applies)."""
    config = config or CorpusTrainConfig()
    states = states or CorpusStates(model, tokenizer, jobs, config, budget)
    states.check(jobs, config)
    pool, layer = _init_pool(model, [lora_id], config)
    ones = torch.ones(1, 1)
    _fit(model, states, pool, lambda units: ones.expand(len(units), 1), [], config, progress)
    return _unstack(pool, [lora_id], config.spec, layer)[0]


def train_poly_prag(model: Any, tokenizer: Any, jobs: Sequence[Job],
                    config: PolyTrainConfig | None = None, budget: Budget | None = None,
                    progress: Progress | None = None, id_prefix: str = "poly",
                    states: CorpusStates | None = None) -> PolyPool:
    """A pool of ``config.pool_size`` latent LoRAs and one routing vector per unit, jointly.
    ``states`` as for ``train_sft_lora``."""
    config = config or PolyTrainConfig()
    states = states or CorpusStates(model, tokenizer, jobs, config, budget)
    states.check(jobs, config)
    ids = [f"{id_prefix}/{j}" for j in range(config.pool_size)]
    pool, layer = _init_pool(model, ids, config)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.seed + 1)
    z = (torch.randn(len(jobs), config.pool_size, generator=gen) * config.routing_init_std
         ).to(device).requires_grad_(True)  # (n_units, m) routing logits
    _fit(model, states, pool, lambda units: torch.softmax(z[units], dim=-1),
         [{"params": [z], "lr": config.routing_lr, "weight_decay": 0.0}], config, progress)
    weights = torch.softmax(z.detach().float(), dim=-1).cpu()
    return PolyPool(pool=_unstack(pool, ids, config.spec, layer),
                    unit_ids=[uid for uid, _ in jobs], weights=weights)


# -- the same losses two ways (for tests and sanity checks) ----------------------------------------

def _mixes(pool: Sequence[Expert], jobs: Sequence[Job],
           routing: Callable[[str], dict[int, float]] | None) -> list[dict[int, float]]:
    """Each example's {pool index: weight}: all 1 for a single LoRA, else its unit's routing."""
    return [routing(uid) if routing else {0: 1.0} for uid, exs in jobs for _ in exs]


@torch.no_grad()
def example_losses_fast(model: Any, tokenizer: Any, jobs: Sequence[Job], pool: Sequence[Expert],
                        routing: Callable[[str], dict[int, float]] | None,
                        config: CorpusTrainConfig) -> list[float]:
    """Per-example loss as training computes it: trunk states + ``mixture_example_ce``."""
    encoded, unit = _encode(tokenizer, jobs, config)
    device = next(model.parameters()).device
    stacked = _stack(pool, pool[0].layers[0], device)
    coef = torch.zeros(len(encoded), len(pool))
    for i, mix in enumerate(_mixes(pool, jobs, routing)):
        for j, w in mix.items():
            coef[i, j] = w
    states = trunk_states(model, [(e.ids, e.start) for e in encoded], groups=unit)
    return mixture_example_ce(model, states, stacked, coef, pool[0].spec.scale).tolist()


@torch.no_grad()
def example_losses_reference(model: Any, tokenizer: Any, jobs: Sequence[Job],
                             pool: Sequence[Expert],
                             routing: Callable[[str], dict[int, float]] | None,
                             config: CorpusTrainConfig) -> list[float]:
    """Per-example loss by full forward passes with the inference-time adapter attached:
    ``ExpertAdapter.activate([w_j · L_j for j])``, B scaled by the weight, as PolyPragMethod does."""
    encoded, _ = _encode(tokenizer, jobs, config)
    attached = isinstance(decoder_layers(model)[-1].mlp, ExpertMLP)  # the caller's adapter?
    adapter = ExpertAdapter(model, pool[0].spec)
    saved = {i: m.lora for i, m in adapter.mlps.items()}
    device = next(model.parameters()).device
    out = []
    try:
        for enc, mix in zip(encoded, _mixes(pool, jobs, routing), strict=True):
            adapter.activate([scaled_expert(pool[j], w) for j, w in sorted(mix.items())])
            ids = enc.ids.to(device)[None]  # (1, T)
            logits = model(input_ids=ids).logits[0]  # (T, V)
            out.append(float(F.cross_entropy(logits[enc.start - 1:-1].float(), ids[0, enc.start:])))
    finally:
        if attached:  # leave the caller's wrappers in place with their active set
            for i, m in adapter.mlps.items():
                m.lora = saved[i]
        else:
            adapter.detach()
    return out

