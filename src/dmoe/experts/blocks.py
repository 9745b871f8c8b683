"""How a decoder layer wraps its MLP, and what re-running its top layers needs.

Experts change MLPs, so the engine and the trainers recompute a layer's feed-forward part from
``h_mid``, the residual stream after the layer's attention. Two block shapes are supported::

    Llama, Qwen2, Mistral, SmolLM2:  h = h_mid + mlp(post_attention_layernorm(h_mid))
    Gemma 3:                         h = h_mid + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h_mid)))

(Gemma 3 also norms the attention output before adding it, which is all upstream of ``h_mid``.)
``FeedForward`` names the two norms once, so every recompute reads the block the same way.

Re-running layers over a whole sequence (``kv_policy="partial"``, the multi-layer trainer) needs the
attention inputs the model would give them: a causal mask, narrowed to the sliding window on a
layer whose type says so (Gemma 3 alternates five sliding layers with one full one), and the
rotary embeddings of that layer type (Gemma 3 uses a different base per type).

This module knows nothing about experts, caches or decoding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from dmoe.errors import UnsupportedModelError


@dataclass(frozen=True)
class FeedForward:
    """The norms around one layer's MLP: ``h = h_mid + post(mlp(pre(h_mid)))``."""

    pre: Any  # the norm module the MLP reads
    post: Any  # the norm module on the MLP's output (Gemma 3), None where there is none

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """What the MLP's output ``y`` adds to the residual stream."""
        return y if self.post is None else self.post(y)

    def __call__(self, h_mid: torch.Tensor, mlp: Any) -> torch.Tensor:
        """The layer's output from ``h_mid`` with ``mlp`` as its MLP."""
        return h_mid + self.output(mlp(self.pre(h_mid)))


def feed_forward(layer: Any, index: int = -1) -> FeedForward:
    """The ``FeedForward`` of a decoder layer, or ``UnsupportedModelError`` naming what is missing."""
    if hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm"):
        return FeedForward(layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)
    if hasattr(layer, "post_attention_layernorm") and not hasattr(layer, "post_feedforward_layernorm"):
        return FeedForward(layer.post_attention_layernorm, None)
    raise UnsupportedModelError(
        f"layer {index} ({type(layer).__name__}) is neither a Llama-style pre-norm block "
        "(post_attention_layernorm -> mlp) nor a Gemma 3 one (pre_/post_feedforward_layernorm)")


def layer_type(config: Any, index: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"`` for layer ``index`` (full when unstated)."""
    types = getattr(config, "layer_types", None)
    return str(types[index]) if types else "full_attention"


def attention_inputs(model: Any, h: torch.Tensor, positions: torch.Tensor,
                     layer_ids: list[int]) -> dict[int, tuple[torch.Tensor, Any]]:
    """``{layer: (additive mask (1, 1, T, T), rotary embeddings)}`` to run those layers over the
    whole sequence ``h`` (B, T, d) at ``positions`` (B, T) from 0, as the model's own forward does.

    The mask is causal, and on a sliding-window layer also hides keys ``window`` or more positions
    back; both are in ``h``'s dtype (its minimum, not -inf, so a fully hidden row stays finite).
    """
    config, inner = model.config, model.model
    t = h.shape[1]
    causal = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)
    masks = {"full_attention": causal[None, None]}
    window = getattr(config, "sliding_window", None)
    if window:
        q = torch.arange(t, device=h.device)
        too_far = (q[:, None] - q[None, :]) >= window
        masks["sliding_attention"] = causal.masked_fill(too_far, torch.finfo(h.dtype).min)[None, None]
    typed_rope = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
    ropes: dict[str, Any] = {}
    out = {}
    for i in layer_ids:
        kind = layer_type(config, i)
        if kind not in masks:
            raise UnsupportedModelError(f"layer {i} is a {kind!r} layer; dmoe re-runs full and "
                                        "sliding-window attention only")
        if kind not in ropes:
            ropes[kind] = (inner.rotary_emb(h, positions, kind) if typed_rope
                           else inner.rotary_emb(h, positions))
        out[i] = (masks[kind], ropes[kind])
    return out
