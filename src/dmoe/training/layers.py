"""Fast training of experts on the last n > 1 layers: the frozen layers below run once.

An expert on the MLPs of layers ``L-n .. L-1`` changes nothing below layer ``L-n``, so each
training sequence's residual stream entering that layer is computed once, for every position, and
only the top n layers run per step, for all active experts side by side::

    x[i][j] = embed + layers[0 .. L-n-1] (example j of expert i)       # once, every position
    for step s in range(max_i steps_i):                                 # as train_fast
        h = x[i][s % n_i] for the active experts i, right-padded        # (n, T, d)
        h = layers[L-n .. L-1](h), row i's LoRA on each MLP             # ExpertMLP row stacks
        loss = Σ_i mean CE(lm_head(norm(h_i))[supervised positions])
        loss.backward(); masked AdamW over the active rows

Unlike the one-layer path (``train_fast``), attention sits above an expert here, so whole
sequences go through the top layers, not just the supervised positions: the cost per step is n
layers over every token, against the reference's whole model forward and backward. The causal
mask is explicit, and right padding means no real token attends to a pad. The same seeded
initialisation, example order and per-expert AdamW as ``train_reference`` give the same experts
to rounding (tested on tiny Llama and Qwen2). Cross-entropy only: the distillation objective
takes the reference path.

This module knows nothing about banks, corpora or augmentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dmoe.experts.blocks import attention_inputs
from dmoe.experts.lora import PROJECTIONS, Expert, ExpertAdapter, decoder_layers
from dmoe.training.experts import (
    EncodedExample,
    Job,
    Progress,
    StackedLora,
    TrainConfig,
    _encode_jobs,
    _row_groups,
    mlp_shapes,
    per_job,
    require_fp32_compute,
    train_stacked,
)


class _Stop(Exception):
    """Raised by the capture hook: nothing above the first expert layer is needed."""


@torch.no_grad()
def layer_inputs(model: Any, seqs: Sequence[torch.Tensor], first: int,
                 max_batch_tokens: int = 8192) -> list[torch.Tensor]:
    """The residual stream entering decoder layer ``first`` at every position, (T_i, d) per
    sequence; right-padded batches of at most ``max_batch_tokens`` tokens."""
    layer = decoder_layers(model)[first]
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(seqs)
    captured: list[torch.Tensor] = []

    def capture(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    hook = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for lo, hi in _row_groups([len(seqs[i]) for i in order], max_batch_tokens):
            idx = order[lo:hi]
            t_max = len(seqs[idx[0]])
            ids = torch.zeros(len(idx), t_max, dtype=torch.long, device=device)
            mask = torch.zeros(len(idx), t_max, dtype=torch.long, device=device)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = seqs[i].to(device)
                mask[row, :len(seqs[i])] = 1
            captured.clear()
            with contextlib.suppress(_Stop):
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            for row, i in enumerate(idx):
                out[i] = captured[0][row, :len(seqs[i])].clone()
    finally:
        hook.remove()
    return out  # type: ignore[return-value]


def _top_layers_loss(model: Any, adapter: ExpertAdapter, first: int,
                     rows: Sequence[tuple[torch.Tensor, EncodedExample]],
                     lora: StackedLora, scale: float) -> torch.Tensor:
    """Σ over rows of the mean CE of row i's example, through layers ``first ..`` with row i's
    LoRA (``lora[(layer, proj)] = (A (n, r, in), B (n, out, r))``, one row per example)."""
    inner = model.model
    layers = decoder_layers(model)
    h = torch.nn.utils.rnn.pad_sequence([x for x, _ in rows], batch_first=True)  # (n, T, d)
    n, t = h.shape[:2]
    positions = torch.arange(t, device=h.device)[None].expand(n, t)
    ids = list(range(first, len(layers)))
    inputs = attention_inputs(model, h, positions, ids)
    for i in ids:
        adapter.mlps[i].lora = {p: (lora[(i, p)][0], lora[(i, p)][1] * scale) for p in PROJECTIONS}
        mask, rope = inputs[i]
        out = layers[i](h, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        h = out[0] if isinstance(out, tuple) else out
    h = inner.norm(h)
    total = h.new_zeros(())
    for row, (_, ex) in enumerate(rows):  # positions start-1 .. T-2 predict ids[start:]
        logits = model.get_output_embeddings()(h[row, ex.start - 1:len(ex.ids) - 1])
        total = total + F.cross_entropy(logits.float(), ex.ids[ex.start:].to(h.device))
    return total


def train_fast_layers(model: Any, tokenizer: Any, jobs: Sequence[Job], config: TrainConfig,
                      trunk_batch_tokens: int = 8192, step_batch_tokens: int = 4096,
                      progress: Progress | None = None) -> list[Expert]:
    """Experts on the last ``config.spec.n_layers`` layers, all jobs side by side (see the
    module docstring). ``step_batch_tokens`` bounds the padded tokens that go through the top
    layers together (their activations are kept for the backward pass)."""
    if config.objective != "ntp":
        raise ValueError("the multi-layer fast path trains cross-entropy only; use "
                         "train_reference for the distillation objective")
    require_fp32_compute(config, "train_fast_layers")
    if not jobs:
        return []
    shapes = mlp_shapes(model, config.spec.n_layers)
    first = min(i for i, _ in shapes)
    encoded = _encode_jobs(tokenizer, jobs, config)
    states = per_job(layer_inputs(model, [ex.ids for exs in encoded for ex in exs], first,
                                  trunk_batch_tokens), encoded)
    adapter = ExpertAdapter(model, config.spec)
    saved = {i: m.lora for i, m in adapter.mlps.items()}

    def backward(cur: Sequence[tuple[int, int]], lora: StackedLora) -> None:
        rows = [(states[i][j], encoded[i][j]) for i, j in cur]
        for lo, hi in _row_groups([len(ex.ids) for _, ex in rows], step_batch_tokens):
            group = {key: (a[lo:hi], b[lo:hi]) for key, (a, b) in lora.items()}
            _top_layers_loss(model, adapter, first, rows[lo:hi], group,
                             config.spec.scale).backward()

    try:
        return train_stacked(model, jobs, [len(exs) for exs in encoded], shapes, config,
                             backward, progress)
    finally:
        for i, m in adapter.mlps.items():
            m.lora = saved[i]
