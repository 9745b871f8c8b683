"""Training final-layer experts: a plain reference path and a fast batched path that equals it.

Both paths train each expert on its own examples with batch size 1, in the given order, for
``epochs`` passes, with AdamW, from the same seeded initialisation (A kaiming-uniform like PEFT,
B zeros; seed derived from ``(config.seed, expert id)``). The loss of one step is the mean
next-token cross-entropy over the example's supervised tokens (the target, or the whole sequence).

``train_reference`` is the textbook way: a PEFT LoRA on the last layer's gate/up/down projections,
a full model forward and backward per step, one expert after another.

``train_fast`` uses that the frozen trunk (everything up to the last attention) does not depend on
the expert (see ``trunk.py``)::

    states[i][j] = trunk(example j of expert i)          # once, batched over all experts
    for step s in range(max_i steps_i):                  # steps_i = epochs * len(examples_i)
        active = {i : s < steps_i}                        # experts sorted so this is a prefix
        loss = Σ_{i∈active} CE(head(states[i][s % n_i]; A_i, B_i))
        loss.backward()                                   # disjoint params: grad_i = ∇ loss_i
        masked_adamw(A[:n_active], B[:n_active], step=s+1)

A: (n, r, in) and B: (n, out, r) per projection are stacked tensors and the head applies them
with bmm. AdamW is elementwise, so one update over the active rows is exactly per-expert AdamW;
rows of finished experts are not touched at all (no decay, no moment update). Valid for experts on
one layer only (``spec.n_layers == 1``); ``dmoe.training.layers`` is the fast path for more.

This module knows nothing about banks, corpora or augmentation.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dmoe.augment.training import TARGET_FORM
from dmoe.augment.types import TrainingExample
from dmoe.experts.lora import (
    PROJECTIONS,
    Expert,
    ExpertMLP,
    LoraSpec,
    check_supported,
    decoder_layers,
    weight_key,
)
from dmoe.prompts import encode_text
from dmoe.training.candidates import candidate_ce, candidate_sets
from dmoe.training.distill import (
    TeacherTargets,
    base_only,
    distill_loss,
    example_loss,
    teacher_targets,
)
from dmoe.training.trunk import head_hidden, shares_prefix, stacked_head_logits, trunk_states

LOSS_ON = ("answer", "all")
INITS = ("kaiming", "normal")
OBJECTIVES = ("ntp", "distill")
PRECISIONS = ("fp32", "bf16")


def check_schedule(lr: float, epochs: int, loss_on: str, max_seq_len: int) -> None:
    """The checks every trainer's config shares (per-passage experts and corpus-wide LoRAs)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")


@dataclass(frozen=True)
class TrainConfig:
    """How every expert of a bank is trained; ``settings_hash`` identifies it for rebuild skips."""

    spec: LoraSpec = field(default_factory=LoraSpec)  # rank / alpha / layers of each expert
    # lr / epochs: the paper's 1e-5 x 1 leaves an expert inert. With the recite_qa recipe,
    # 5e-3 x 10, 5e-3 x 5 and 2e-3 x 10 inject equally often on the oracle-routed dev sweep
    # (knowledge_conflicts 500-539: 0.325 / 0.325 / 0.35); the demo's invented facts need the 10
    # (7/8 vs 5/8 at 5 epochs): results/dev/README.md.
    lr: float = 5e-3  # AdamW learning rate
    epochs: int = 10  # passes over each expert's examples
    loss_on: str = "answer"  # "answer": target tokens only; "all": every token after the first
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    seed: int = 0  # with the expert id, seeds each expert's initialisation
    init: str = "kaiming"  # A init: "kaiming" (uniform ±1/sqrt(in), as PEFT) or "normal"
    init_std: float = 0.02  # std of A for init="normal"
    max_seq_len: int = 1024  # longer examples keep the target and the end of the prompt
    objective: str = "ntp"  # "ntp": cross-entropy; "distill": KL to the frozen model reading the
    # passage on examples with a teacher_prompt (dmoe.training.distill), cross-entropy elsewhere
    distill_temperature: float = 1.0  # T of the distillation KL
    distill_top_k: int = 32  # teacher distribution kept per position (renormalised)
    # "fp32": compute in the model's dtype. "bf16" (one-layer fast path only): the trunk and head
    # run on a bfloat16 copy of the frozen weights (AMX/AVX512-bf16 on recent x86 CPUs), while
    # each expert's weights, AdamW state and loss stay fp32 (``compute_model``)
    precision: str = "fp32"
    # 0: the full output head (exact). K > 0 (one-layer fast path, "ntp"): the candidate head of
    # dmoe.training.candidates, over each expert's targets and the frozen top-K at its positions
    head_vocab: int = 0

    def __post_init__(self) -> None:
        check_schedule(self.lr, self.epochs, self.loss_on, self.max_seq_len)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"need eps > 0 and weight_decay >= 0, got {self.eps}, {self.weight_decay}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.distill_top_k < 1:
            raise ValueError(f"distill_top_k must be >= 1, got {self.distill_top_k}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.head_vocab < 0:
            raise ValueError(f"head_vocab must be >= 0 (0: the full head), got {self.head_vocab}")
        if self.head_vocab and self.objective != "ntp":
            raise ValueError(f"head_vocab={self.head_vocab} is for objective 'ntp', "
                             f"got {self.objective!r}")

    def settings_hash(self, extra: dict[str, Any] | None = None) -> str:
        """Stable 16-hex id of these settings plus ``extra`` (what else shaped the examples, e.g.
        the recipe, and ``dmoe.augment.training.TARGET_FORM``): an expert trained otherwise must
        be retrained. Fields added since the first banks (precision, head_vocab) are left out at
        their defaults, so a field's arrival alone does not retrain a bank."""
        settings = dataclasses.asdict(self)
        for key, default in (("precision", "fp32"), ("head_vocab", 0)):
            if settings[key] == default:
                del settings[key]
        blob = json.dumps({**settings, "targets": TARGET_FORM, **(extra or {})}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EncodedExample:
    ids: torch.Tensor  # (T,) token ids of prompt + target
    start: int  # tokens ids[start:] are supervised (start >= 1)
    teacher: tuple[torch.Tensor, int] | None = None  # (teacher_prompt + target ids, start), distill


def _join(tokenizer: Any, prompt_text: str, target: list[int], max_seq_len: int) -> list[int]:
    """Prompt tokens (cut from the left to fit ``max_seq_len``) followed by ``target``; the prompt
    starts the sequence as an answer's prompt does (``dmoe.prompts.encode_text``)."""
    prompt = encode_text(tokenizer, prompt_text)
    prompt = prompt[len(prompt) - (max_seq_len - len(target)):] if len(target) < max_seq_len else []
    return prompt + target


def encode_example(tokenizer: Any, example: TrainingExample, loss_on: str, max_seq_len: int,
                   objective: str = "ntp") -> EncodedExample:
    """Tokenize prompt and target separately (exact boundary) and concatenate them. Under
    ``objective="distill"`` an example with a teacher prompt also gets the teacher's sequence,
    and only its target tokens are supervised (the positions both sequences share)."""
    target = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])[:max_seq_len]
    ids = _join(tokenizer, example.prompt, target, max_seq_len)
    distilled = objective == "distill" and bool(example.teacher_prompt)
    start = 1 if loss_on == "all" and not distilled else max(1, len(ids) - len(target))
    if len(ids) < 2 or start >= len(ids):
        raise ValueError(f"training example has no token to learn: {example!r}")
    teacher = None
    if distilled:
        t_ids = _join(tokenizer, example.teacher_prompt, target, max_seq_len)
        t_start = len(t_ids) - (len(ids) - start)
        if t_start < 1:
            raise ValueError(f"teacher prompt leaves no context for the target: {example!r}")
        teacher = (torch.tensor(t_ids, dtype=torch.long), t_start)
    return EncodedExample(ids=torch.tensor(ids, dtype=torch.long), start=start, teacher=teacher)


def expert_seed(seed: int, expert_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{expert_id}".encode()).hexdigest()[:15], 16)


def init_expert(expert_id: str, shapes: dict[tuple[int, str], tuple[int, int]],
                config: TrainConfig) -> Expert:
    """Seeded initial weights: A kaiming-uniform (bound 1/sqrt(in)) or normal, B zeros."""
    g = torch.Generator().manual_seed(expert_seed(config.seed, expert_id))
    r, weights = config.spec.rank, {}
    for (layer, proj) in sorted(shapes):
        out_f, in_f = shapes[(layer, proj)]
        if config.init == "kaiming":
            a = (torch.rand(r, in_f, generator=g) * 2 - 1) / math.sqrt(in_f)
        else:
            a = torch.randn(r, in_f, generator=g) * config.init_std
        weights[weight_key(layer, proj, "A")] = a
        weights[weight_key(layer, proj, "B")] = torch.zeros(out_f, r)
    return Expert(id=expert_id, spec=config.spec, weights=weights)


def mlp_shapes(model: Any, n_layers: int) -> dict[tuple[int, str], tuple[int, int]]:
    """``{(layer, proj): (out, in)}`` of the adapted projections, without attaching anything."""
    layers: Any = decoder_layers(model)
    shapes = {}
    for i in check_supported(model, n_layers):
        mlp = layers[i].mlp.base if isinstance(layers[i].mlp, ExpertMLP) else layers[i].mlp
        for p in PROJECTIONS:
            shapes[(i, p)] = tuple(getattr(mlp, p).weight.shape)
    return shapes  # type: ignore[return-value]


Job = tuple[str, Sequence[TrainingExample]]  # (expert id, its examples in training order)
Progress = Callable[[int], None]  # called with the number of experts just finished


def _encode_jobs(tokenizer: Any, jobs: Sequence[Job], config: TrainConfig) -> list[list[EncodedExample]]:
    encoded = []
    for expert_id, examples in jobs:
        if not examples:
            raise ValueError(f"expert {expert_id!r} has no training examples")
        encoded.append([encode_example(tokenizer, ex, config.loss_on, config.max_seq_len,
                                       config.objective) for ex in examples])
    return encoded


def require_fp32_compute(config: TrainConfig, path: str) -> None:
    """Refuse what ``path`` cannot compute: only ``train_fast`` has bf16 and the candidate head."""
    if config.precision != "fp32":
        raise ValueError(f"precision {config.precision!r} is for the one-layer fast path "
                         f"(train_fast); {path} trains with precision='fp32'")
    if config.head_vocab:
        raise ValueError(f"head_vocab={config.head_vocab} is for the one-layer fast path "
                         f"(train_fast); {path} trains with the full head (head_vocab=0)")


def _teachers(model: Any, encoded: Sequence[Sequence[EncodedExample]],
              config: TrainConfig) -> list[list[TeacherTargets | None]]:
    """The frozen model's top-K targets for every example with a teacher sequence (else None)."""
    flat = [ex.teacher for exs in encoded for ex in exs if ex.teacher is not None]
    with base_only(model):
        done = iter(teacher_targets(model, flat, config.distill_top_k, config.distill_temperature))
    return [[next(done) if ex.teacher is not None else None for ex in exs] for exs in encoded]


def train(model: Any, tokenizer: Any, jobs: Sequence[Job], config: TrainConfig,
          fast: bool = True, **fast_kwargs: Any) -> list[Expert]:
    """Train one expert per job: a fast path when one applies (``train_fast`` on one layer,
    ``dmoe.training.layers.train_fast_layers`` on more, cross-entropy), else the reference."""
    if fast and config.spec.n_layers == 1:
        return train_fast(model, tokenizer, jobs, config, **fast_kwargs)
    if fast and config.objective == "ntp":
        from dmoe.training.layers import train_fast_layers

        return train_fast_layers(model, tokenizer, jobs, config)
    return train_reference(model, tokenizer, jobs, config)


# -- reference path --------------------------------------------------------------------------------

def train_reference(model: Any, tokenizer: Any, jobs: Sequence[Job], config: TrainConfig,
                    progress: Progress | None = None) -> list[Expert]:
    """One expert at a time: PEFT LoRA, batch size 1, full forward/backward, torch AdamW."""
    from peft import LoraConfig, get_peft_model

    require_fp32_compute(config, "train_reference")
    shapes = mlp_shapes(model, config.spec.n_layers)
    layers: Any = decoder_layers(model)
    module_of = {(i, p): getattr(layers[i].mlp.base if isinstance(layers[i].mlp, ExpertMLP)
                                 else layers[i].mlp, p) for (i, p) in shapes}
    name_of = {id(m): n for n, m in model.named_modules()}
    targets = [name_of[id(m)] for m in module_of.values()]
    encoded = _encode_jobs(tokenizer, jobs, config)
    teachers = _teachers(model, encoded, config)  # before the LoRA is attached
    device = next(model.parameters()).device
    lcfg = LoraConfig(r=config.spec.rank, lora_alpha=config.spec.alpha,  # type: ignore[arg-type]
                      lora_dropout=0.0,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lcfg)
    lora_mods: dict[tuple[int, str], Any] = {key: peft_model.get_submodule(f"base_model.model.{name_of[id(m)]}")
                 for key, m in module_of.items()}
    experts = []
    try:
        for (expert_id, _), examples, targets in zip(jobs, encoded, teachers, strict=True):
            init = init_expert(expert_id, shapes, config)
            params = []
            for (i, p), mod in lora_mods.items():
                for part, lin in (("A", mod.lora_A["default"]), ("B", mod.lora_B["default"])):
                    with torch.no_grad():
                        lin.weight.copy_(init.weights[weight_key(i, p, part)])
                    params.append(lin.weight)
            opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                    weight_decay=config.weight_decay)
            for _ in range(config.epochs):
                for ex, teacher in zip(examples, targets, strict=True):
                    ids = ex.ids.to(device)[None]  # (1, T)
                    logits = peft_model(input_ids=ids).logits[0]  # (T, V)
                    seg, tgt = logits[ex.start - 1:-1], ids[0, ex.start:]
                    loss = (F.cross_entropy(seg.float(), tgt) if teacher is None
                            else distill_loss(seg, teacher, config.distill_temperature).mean())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            experts.append(Expert(id=expert_id, spec=config.spec, weights={
                weight_key(i, p, part): lin.weight.detach().float().cpu().clone()
                for (i, p), mod in lora_mods.items()
                for part, lin in (("A", mod.lora_A["default"]), ("B", mod.lora_B["default"]))}))
            if progress:
                progress(1)
    finally:
        peft_model.unload()  # puts the original Linear modules back
    return experts


# -- fast path ---------------------------------------------------------------------------------------

def masked_adamw_(params: Sequence[torch.Tensor], moments: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  n_active: int, step: int, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> None:
    """torch.optim.AdamW's update on rows ``[:n_active]`` of stacked params; other rows untouched."""
    b1, b2 = betas
    bc1, bc2_sqrt = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
    with torch.no_grad():
        for p, (m, v) in zip(params, moments, strict=True):
            assert p.grad is not None
            w, g, m_, v_ = p[:n_active], p.grad[:n_active], m[:n_active], v[:n_active]
            w.mul_(1 - lr * weight_decay)
            m_.lerp_(g, 1 - b1)
            v_.mul_(b2).addcmul_(g, g, value=1 - b2)
            w.addcdiv_(m_, (v_.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)


def train_fast(model: Any, tokenizer: Any, jobs: Sequence[Job], config: TrainConfig,
               trunk_batch_tokens: int = 8192, head_batch_tokens: int = 2048,
               share_prefix: bool | None = None, progress: Progress | None = None) -> list[Expert]:
    """All jobs side by side on cached trunk states (see the module docstring).

    ``share_prefix``: one expert's examples that start alike (passage + question_i) run their common
    prefix through the trunk once (``trunk_states``): exact, ~2.4x fewer trunk tokens for PRAG
    examples. ``None`` (default): on the CPU only (``trunk.shares_prefix``, as for the corpus
    LoRAs). On the idle 2-core CPU (``dmoe bench build``, 8 SQuAD units x 3 QA, 10 epochs) it took
    0.41 s/expert against 0.87 s without it (28.7x vs 12.6x the reference).
    ``trunk_batch_tokens`` bounds a padded trunk batch and ``head_batch_tokens`` the positions whose
    logits (N, V) are alive at once.
    """
    if config.spec.n_layers != 1:
        raise ValueError(f"the fast path needs experts on one layer (n_layers=1), got "
                         f"{config.spec.n_layers}; use train_reference")
    if not jobs:
        return []
    shapes = mlp_shapes(model, 1)
    encoded = _encode_jobs(tokenizer, jobs, config)
    compute = compute_model(model, config.precision)
    # 1) trunk once per sequence, batched across all experts
    flat = [(ex.ids, ex.start) for exs in encoded for ex in exs]
    unit = [i for i, exs in enumerate(encoded) for _ in exs]
    share = shares_prefix(share_prefix, next(model.parameters()).device)
    states_flat = trunk_states(compute, flat, trunk_batch_tokens, groups=unit if share else None)
    teachers = [t for ts in _teachers(model, encoded, config) for t in ts]
    for st, teacher in zip(states_flat, teachers, strict=True):
        st.teacher = teacher
    states = per_job(states_flat, encoded)
    candidates = candidate_sets(compute, states, config.head_vocab) if config.head_vocab else None

    # 2) + 3) every step: the head of each active expert on its current example
    def backward(cur: Sequence[tuple[int, int]], lora: StackedLora) -> None:
        rows = [states[i][j] for i, j in cur]
        ids = [candidates[i] for i, _ in cur] if candidates is not None else None
        for lo, hi in _row_groups([len(c.targets) for c in rows], head_batch_tokens):
            _head_step(compute, rows[lo:hi],
                       {p: (a[lo:hi], b[lo:hi]) for (_, p), (a, b) in lora.items()},
                       config.spec.scale, config.distill_temperature,
                       ids[lo:hi] if ids is not None else None)

    return train_stacked(model, jobs, [len(exs) for exs in encoded], shapes, config, backward,
                         progress)


StackedLora = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> A, B

_COMPUTE_COPIES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def compute_model(model: Any, precision: str) -> Any:
    """The model whose frozen weights a fast-path step computes with: ``model`` itself for "fp32"
    or when it already holds bf16; else a bfloat16 copy, made once per model and kept while the
    model lives (~2 bytes per parameter).

    A copy, not ``torch.autocast``: autocast recasts every frozen weight at every call (the 28M
    lm_head included), which on the CPU cost as much as the bf16 matmuls saved.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or next(model.parameters()).dtype == torch.bfloat16:
        return model
    if model not in _COMPUTE_COPIES:
        _COMPUTE_COPIES[model] = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    return _COMPUTE_COPIES[model]


def per_job(flat: Sequence[Any], encoded: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """A flat list over every job's examples, cut back into one list per job."""
    out, k = [], 0
    for exs in encoded:
        out.append(list(flat[k:k + len(exs)]))
        k += len(exs)
    return out


def train_stacked(model: Any, jobs: Sequence[Job], n_examples: Sequence[int],
                  shapes: dict[tuple[int, str], tuple[int, int]], config: TrainConfig,
                  backward: Callable[[Sequence[tuple[int, int]], StackedLora], None],
                  progress: Progress | None = None) -> list[Expert]:
    """The optimisation the fast paths share: every expert's LoRA in stacked tensors (longest
    schedule first), step s of expert i on its example ``s % n_i`` like the reference, masked
    AdamW over the active rows, then unstacked back to job order.

    ``backward(cur, lora)`` accumulates step s's gradients: ``cur[row] = (job, example)`` for the
    active experts in stack order, and row ``row`` of every ``lora[(layer, proj)] = (A (n, r, in),
    B (n, out, r))`` is that expert's.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    steps = [config.epochs * n for n in n_examples]
    order = sorted(range(len(jobs)), key=lambda i: -steps[i])
    inits = [init_expert(jobs[i][0], shapes, config) for i in order]
    lora: StackedLora = {
        key: (torch.stack([e.weights[weight_key(*key, "A")] for e in inits]).to(device, dtype)
              .requires_grad_(True),
              torch.stack([e.weights[weight_key(*key, "B")] for e in inits]).to(device, dtype)
              .requires_grad_(True))
        for key in sorted(shapes)}
    params = [t for pair in lora.values() for t in pair]
    moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in params]
    n_done = 0
    for s in range(max(steps)):
        n_active = sum(1 for i in order if steps[i] > s)
        if progress and n_active < len(order) - n_done:
            progress(len(order) - n_done - n_active)
            n_done = len(order) - n_active
        backward([(order[row], s % n_examples[order[row]]) for row in range(n_active)], lora)
        masked_adamw_(params, moments, n_active, s + 1, config.lr, config.betas, config.eps,
                      config.weight_decay)
        for t in params:
            t.grad = None
    if progress and n_done < len(order):
        progress(len(order) - n_done)
    experts: list[Expert | None] = [None] * len(jobs)
    for row, i in enumerate(order):
        experts[i] = Expert(id=jobs[i][0], spec=config.spec, weights={
            weight_key(layer, p, part): t[row].detach().float().cpu().clone()
            for (layer, p), (a, b) in lora.items() for part, t in (("A", a), ("B", b))})
    return experts  # type: ignore[return-value]


def _row_groups(tokens: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose padded token count (rows * max len) stays within budget."""
    groups, lo, width = [], 0, 0
    for hi, t in enumerate(tokens):
        width = max(width, t)
        if hi > lo and width * (hi - lo + 1) > budget:
            groups.append((lo, hi))
            lo, width = hi, t
    groups.append((lo, len(tokens)))
    return groups


def _head_step(model: Any, cur: Sequence[Any], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
               scale: float, temperature: float = 1.0,
               candidates: Sequence[torch.Tensor] | None = None) -> None:
    """Backward of Σ_i mean loss_i over a group of experts (row i = expert i's current example);
    the loss is CE (over row i's ``candidates[i]`` when given: ``dmoe.training.candidates``), or
    the distillation KL on rows whose states carry teacher targets."""
    lengths = torch.tensor([len(c.targets) for c in cur])
    h_mid = torch.nn.utils.rnn.pad_sequence([c.h_mid for c in cur], batch_first=True)  # (n, P, d)
    valid = (torch.arange(h_mid.shape[1])[None, :] < lengths[:, None]).to(h_mid.device)  # (n, P)
    if candidates is not None:
        ce = candidate_ce(model, head_hidden(model, h_mid, lora, scale), valid, candidates, cur)
    else:
        logits = stacked_head_logits(model, h_mid, valid, lora, scale)  # (N, V)
        ce = F.cross_entropy(logits.float(), torch.cat([c.targets for c in cur]), reduction="none")
    if any(c.teacher is not None for c in cur):  # swap in the KL on the distilled rows' spans
        bounds = [0, *torch.cumsum(lengths, 0).tolist()]
        ce = torch.cat([ce[lo:hi] if c.teacher is None else
                        example_loss(logits[lo:hi], c.targets, c.teacher, temperature)
                        for c, lo, hi in zip(cur, bounds[:-1], bounds[1:], strict=True)])
    row = torch.repeat_interleave(torch.arange(len(cur)), lengths).to(ce.device)  # (N,)
    per_expert = torch.zeros(len(cur), device=ce.device).index_add_(0, row, ce)  # (n,)
    (per_expert / lengths.to(ce.device)).sum().backward()


@torch.no_grad()
def example_losses(model: Any, tokenizer: Any, expert: Expert | None,
                   examples: Sequence[TrainingExample], config: TrainConfig) -> list[float]:
    """Mean CE of each example under ``expert`` (or the base model), by full forward passes.

    An independent check of training: it goes through ``ExpertAdapter`` like inference does.
    """
    from dmoe.experts.lora import ExpertAdapter

    attached = isinstance(decoder_layers(model)[-1].mlp, ExpertMLP)  # the caller's adapter?
    adapter = ExpertAdapter(model, config.spec)
    saved = {i: m.lora for i, m in adapter.mlps.items()}
    device = next(model.parameters()).device
    try:
        adapter.activate([expert] if expert is not None else [])
        out = []
        for ex in examples:
            enc = encode_example(tokenizer, ex, config.loss_on, config.max_seq_len)
            ids = enc.ids.to(device)[None]
            logits = model(input_ids=ids).logits[0]
            out.append(float(F.cross_entropy(logits[enc.start - 1:-1].float(), ids[0, enc.start:])))
        return out
    finally:
        if attached:  # leave the caller's wrappers in place with their active set
            for i, m in adapter.mlps.items():
                m.lora = saved[i]
        else:
            adapter.detach()
