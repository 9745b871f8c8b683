"""Final-layer LoRA experts: the expert tensor layout, composition, and how they are applied.

An expert is a LoRA on ``gate_proj``, ``up_proj`` and ``down_proj`` of the MLP in the last
``n_layers`` decoder layers (default 1: the paper's placement). For one projection ``W: (out, in)``
an expert holds ``A: (r, in)`` and ``B: (out, r)`` and contributes ``Δ = (alpha / r) · B @ A``.

Several active experts compose exactly as one LoRA of rank ``Σ r_i`` ("cat")::

    A_cat = cat([A_1, ..., A_k], dim=0)                       # (Σr, in)
    B_cat = cat([s_1·B_1, ..., s_k·B_k], dim=1)               # (out, Σr), s_i = alpha_i / r_i
    B_cat @ A_cat = Σ_i s_i · B_i @ A_i                       # θ_eff = θ + Σ Δθ_i

Weighted composition multiplies each expert's ``s_i`` by a weight ``w_i`` (``Σ w_i Δθ_i``, still
one rank-Σr LoRA). ``composition_weights`` gives the weights of the two rules the engine offers:
``cat`` (all 1, the paper's exact sum) and ``softmax`` (``λ · softmax(score_i / T)``, a convex
mix scaled by one global λ; ``T = inf`` gives ``λ / k``). On a small model a sum of k full-strength
experts pushes the last MLP far off its training distribution; a convex mix keeps the update's size
that of one expert.

The composed pair is applied beside the frozen base weight, never merged into it:
``y = x @ W.T + (x @ A_cat.T) @ B_cat.T``. Per-row sets for batching are the same with a leading
batch dimension on ``A_cat``/``B_cat`` (``(B, Σr, in)``), i.e. a gathered bmm rather than one
``nn.Module`` per expert. ``merged_mlp_forward`` is the plain reference (base weight + Σ Δ, then the
stock MLP) that tests hold the fast path to.

This module knows nothing about where experts come from (disk, training) or when they change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.errors import ExpertFormatError, UnsupportedModelError
from dmoe.experts.blocks import feed_forward

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
Composition = Literal["cat", "softmax"]
COMPOSITIONS: tuple[str, ...] = get_args(Composition)


def weight_key(layer: int, proj: str, part: str) -> str:
    """Tensor name inside an expert: ``layers.{layer}.mlp.{proj}.lora_{A|B}``."""
    assert proj in PROJECTIONS and part in ("A", "B"), (proj, part)
    return f"layers.{layer}.mlp.{proj}.lora_{part}"


@dataclass(frozen=True)
class LoraSpec:
    """Shape of every expert in a bank."""

    rank: int = 4  # LoRA rank r per expert (paper: 4)
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / rank (paper: 16)
    n_layers: int = 1  # experts sit on the MLPs of the last n_layers decoder layers (paper: 1)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class Expert:
    """One knowledge unit's LoRA weights, keyed by ``weight_key(layer, proj, 'A'|'B')``."""

    id: str
    spec: LoraSpec
    weights: dict[str, torch.Tensor] = field(repr=False)

    @property
    def layers(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.weights})

    def pair(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights[weight_key(layer, proj, "A")], self.weights[weight_key(layer, proj, "B")]

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.weights.values())

    def validate(self, mlp_shapes: dict[tuple[int, str], tuple[int, int]]) -> None:
        """Check every tensor against ``{(layer, proj): (out, in)}``; raise ExpertFormatError."""
        expected = {weight_key(layer, proj, p) for (layer, proj) in mlp_shapes for p in "AB"}
        if set(self.weights) != expected:
            missing, extra = expected - set(self.weights), set(self.weights) - expected
            raise ExpertFormatError(f"expert {self.id!r}: missing tensors {sorted(missing)[:4]}, "
                                    f"unexpected tensors {sorted(extra)[:4]}")
        r = self.spec.rank
        for (layer, proj), (out_f, in_f) in mlp_shapes.items():
            a, b = self.pair(layer, proj)
            if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
                raise ExpertFormatError(
                    f"expert {self.id!r} {proj} of layer {layer}: A {tuple(a.shape)} / B "
                    f"{tuple(b.shape)}, expected A {(r, in_f)} / B {(out_f, r)}")


def compose(experts: Sequence[Expert], layer: int, proj: str, device: torch.device,
            dtype: torch.dtype, weights: Sequence[float] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate k experts' LoRAs of one projection into one rank-Σr pair (scale and the
    optional per-expert ``weights`` folded into B)."""
    assert experts, "compose needs at least one expert"
    w = [1.0] * len(experts) if weights is None else list(weights)
    assert len(w) == len(experts), (len(w), len(experts))
    a = torch.cat([e.pair(layer, proj)[0] for e in experts], dim=0)  # (Σr, in)
    b = torch.cat([e.pair(layer, proj)[1] * (e.spec.scale * wi)
                   for e, wi in zip(experts, w, strict=True)], dim=1)  # (out, Σr)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def composition_weights(scores: Sequence[float], rule: str = "cat", temperature: float = 1.0,
                        scale: float = 1.0) -> list[float]:
    """Per-expert weights of an active set from its router scores (module docstring)::

        cat:     w_i = 1
        softmax: w_i = scale * exp(s_i / T) / Σ_j exp(s_j / T)     (T = inf -> scale / k)
    """
    if rule not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {COMPOSITIONS}, got {rule!r}")
    if not scores or rule == "cat":
        return [1.0] * len(scores)
    if not temperature > 0:
        raise ValueError(f"composition temperature must be > 0, got {temperature}")
    t = torch.tensor([float(x) for x in scores], dtype=torch.float64)
    probs = torch.softmax(t / temperature, dim=0) if temperature != float("inf") else \
        torch.full_like(t, 1.0 / len(scores))
    return [scale * float(p) for p in probs]


class ExpertMLP(nn.Module):
    """A gate/up/down MLP plus the currently active composed LoRA (or none: the exact base MLP)."""

    def __init__(self, base: nn.Module, layer_idx: int) -> None:
        super().__init__()
        self.base: Any = base  # the stock MLP (gate_proj, up_proj, down_proj, act_fn)
        self.layer_idx = layer_idx
        # proj -> (A_cat (Σr, in) or (B, Σr, in), B_cat (out, Σr) or (B, out, Σr)), scale folded in.
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self.base, name)(x)  # (B, T, out)
        if self.lora is None:
            return y
        a, b = self.lora[name]
        return y + (x @ a.mT) @ b.mT  # (B, T, Σr) -> (B, T, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is None:
            return self.base(x)
        return self._proj("down_proj", self.base.act_fn(self._proj("gate_proj", x))
                          * self._proj("up_proj", x))


def merged_mlp_forward(mlp: Any, x: torch.Tensor, experts: Sequence[Expert],
                       layer: int, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Reference: W_eff = W + Σ_i w_i s_i B_i A_i for each projection, then the plain MLP formula."""
    ws = [1.0] * len(experts) if weights is None else list(weights)

    def linear(proj: str, h: torch.Tensor) -> torch.Tensor:
        w = getattr(mlp, proj).weight.to(torch.float64)
        for e, wi in zip(experts, ws, strict=True):
            a, b = e.pair(layer, proj)
            w = w + wi * e.spec.scale * (b.to(w) @ a.to(w))
        return F.linear(h.to(torch.float64), w)

    h = mlp.act_fn(linear("gate_proj", x)) * linear("up_proj", x)
    return linear("down_proj", h).to(x.dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of a Llama/Qwen2/Mistral/Gemma 3-style ``*ForCausalLM``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no `.model.layers`; dmoe supports "
                                    "Llama-style decoders (Llama, Qwen2, Mistral, SmolLM2) and "
                                    "Gemma 3")
    return layers


def check_supported(model: nn.Module, n_layers: int) -> list[int]:
    """Validate that the last ``n_layers`` layers have a supported MLP block; return their ids.

    The block must be one ``dmoe.experts.blocks.feed_forward`` knows (Llama-style or Gemma 3) with
    a gate/up/down MLP, because the engine recomputes exactly that on a trigger.
    """
    layers = decoder_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be in [1, {len(layers)}], got {n_layers}")
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise UnsupportedModelError("models with final-logit softcapping (Gemma 2) are not supported")
    ids = list(range(len(layers) - n_layers, len(layers)))
    for i in ids:
        layer = layers[i]
        mlp = getattr(layer, "mlp", None)
        mlp = mlp.base if isinstance(mlp, ExpertMLP) else mlp
        missing = [p for p in (*PROJECTIONS, "act_fn") if not hasattr(mlp, p)]
        if mlp is None or missing:
            raise UnsupportedModelError(
                f"layer {i} of {type(model).__name__} has no gate/up/down MLP (missing: "
                f"{missing or ['mlp']}); final-layer experts need a gated FFN")
        if not all(isinstance(getattr(mlp, p), nn.Linear) for p in PROJECTIONS):
            raise UnsupportedModelError(
                f"layer {i}'s MLP holds packed (fp16/int8) weights, and experts on the last "
                f"{n_layers} layers need float ones there: load the model with "
                f"float_mlps >= {n_layers} (or --weights fp32)")
        feed_forward(layer, i)  # raises on a block shape the engine cannot recompute
    return ids


class ExpertAdapter:
    """Attaches ``ExpertMLP`` wrappers to the last ``spec.n_layers`` layers and swaps active sets."""

    def __init__(self, model: nn.Module, spec: LoraSpec) -> None:
        self.model = model
        self.spec = spec
        self.layer_ids = check_supported(model, spec.n_layers)
        layers: Any = decoder_layers(model)
        self.mlps: dict[int, ExpertMLP] = {}
        for i in self.layer_ids:
            mlp = layers[i].mlp
            if not isinstance(mlp, ExpertMLP):
                mlp = ExpertMLP(mlp, i)
                layers[i].mlp = mlp
            self.mlps[i] = mlp
        self.active: tuple[Expert, ...] = ()
        self.weights: tuple[float, ...] = ()  # per active expert (1.0 each: the exact sum)

    @property
    def mlp_shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        """``{(layer, proj): (out_features, in_features)}`` for every adapted projection."""
        return {(i, p): tuple(getattr(m.base, p).weight.shape)  # type: ignore[misc]
                for i, m in self.mlps.items() for p in PROJECTIONS}

    @property
    def active_ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.active)

    def activate(self, experts: Sequence[Expert], weights: Sequence[float] | None = None) -> None:
        """Make ``experts`` the active set (replacing the previous one); ``[]`` = base model.
        ``weights``: one per expert (default 1.0 each, the exact sum)."""
        ws = self._checked(experts, weights, self.mlp_shapes)
        for i, mlp in self.mlps.items():
            if not experts:
                mlp.lora = None
                continue
            w = mlp.base.gate_proj.weight
            mlp.lora = {p: compose(experts, i, p, w.device, w.dtype, ws) for p in PROJECTIONS}
        self.active = tuple(experts)
        self.weights = ws

    @staticmethod
    def _checked(experts: Sequence[Expert], weights: Sequence[float] | None,
                 shapes: dict[tuple[int, str], tuple[int, int]]) -> tuple[float, ...]:
        """Validate ``experts`` against ``shapes``; their weights (default 1.0 each)."""
        for e in experts:
            e.validate(shapes)
        ws = tuple([1.0] * len(experts) if weights is None else (float(x) for x in weights))
        if len(ws) != len(experts):
            raise ValueError(f"got {len(ws)} weights for {len(experts)} experts")
        return ws

    def activate_rows(self, sets: Sequence[tuple[Sequence[Expert], Sequence[float]]]) -> None:
        """Give each row of a batch its own active set (``[(experts, weights), ...]``, one per row).

        Every projection gets a stack ``A (B, R, in)``, ``B (B, out, R)``, ``R`` = the largest
        Σr of any row; rows with fewer (or no) experts are padded with zero LoRAs, which add
        exactly 0. ``active`` is left empty: there is no single active set. With no expert in any
        row the MLPs are the exact base MLPs.

        The stacks are filled on the host and copied to the model's device once per projection:
        a trigger step on a GPU then costs 6 copies, not 6 per row (each row's compose on the
        device was a synchronous host-to-device copy per tensor).
        """
        shapes = self.mlp_shapes
        sets = [(experts, self._checked(experts, weights, shapes)) for experts, weights in sets]
        self.active, self.weights = (), ()
        rank = max((sum(e.spec.rank for e in experts) for experts, _ in sets), default=0)
        host = torch.device("cpu")
        for i, mlp in self.mlps.items():
            if rank == 0:
                mlp.lora = None
                continue
            w = mlp.base.gate_proj.weight
            mlp.lora = {}
            for p in PROJECTIONS:
                out_f, in_f = shapes[(i, p)]
                a = torch.zeros(len(sets), rank, in_f, dtype=w.dtype)
                b = torch.zeros(len(sets), out_f, rank, dtype=w.dtype)
                for row, (experts, weights) in enumerate(sets):
                    if experts:
                        a_row, b_row = compose(experts, i, p, host, w.dtype, weights)
                        a[row, : a_row.shape[0]] = a_row
                        b[row, :, : b_row.shape[1]] = b_row
                mlp.lora[p] = (a.to(w.device), b.to(w.device))

    def detach(self) -> None:
        """Put the original MLP modules back."""
        layers = decoder_layers(self.model)
        for i, mlp in self.mlps.items():
            layers[i].mlp = mlp.base
        self.mlps.clear()
        self.active = ()
        self.weights = ()


def random_expert(expert_id: str, shapes: dict[tuple[int, str], tuple[int, int]], spec: LoraSpec,
                  generator: torch.Generator, std: float = 0.02) -> Expert:
    """An expert with random A and B (B non-zero so it changes outputs); for tests and benches."""
    weights = {}
    for (layer, proj), (out_f, in_f) in shapes.items():
        weights[weight_key(layer, proj, "A")] = torch.randn(spec.rank, in_f, generator=generator) * std
        weights[weight_key(layer, proj, "B")] = torch.randn(out_f, spec.rank, generator=generator) * std
    return Expert(id=expert_id, spec=spec, weights=weights)


def scaled_expert(expert: Expert, weight: float, expert_id: str | None = None) -> Expert:
    """``weight · Δ(expert)`` as an expert (B scaled; A shared), for weighted LoRA mixtures."""
    weights = {k: (v * weight if k.endswith("lora_B") else v) for k, v in expert.weights.items()}
    return Expert(id=expert_id or f"{expert.id}*{weight:.4g}", spec=expert.spec, weights=weights)
