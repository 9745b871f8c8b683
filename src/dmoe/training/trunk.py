"""The frozen trunk and the expert-dependent head of a decoder, split at the last attention.

A final-layer expert changes only the last layer's MLP, so a training sequence's forward pass splits
into a part that no expert can change and a small part that every expert recomputes::

    trunk:  ids -> embed -> layers[0 .. L-1] -> layers[L].attention  ->  h_mid    (frozen, shared)
    head:   h_mid + MLP_{θ+Δ}(post_attention_layernorm(h_mid)) -> norm -> lm_head -> logits

(Gemma 3 norms the MLP's input and output with its own pair: ``dmoe.experts.blocks``.)

``trunk_states`` runs the trunk once per sequence, batched (right-padded, with an attention mask),
and keeps ``h_mid`` only at the positions whose next token is supervised; sequences of one unit that
start alike (PRAG's ``passage + Q_i``) run their common prefix once, into a KV cache that the
batched suffixes extend. ``stacked_head_logits``
is the head for n experts at once, their LoRAs held as stacked tensors and applied with bmm
(``dmoe.training.candidates`` the same head over a candidate vocabulary).

This module knows nothing about optimisers, examples or files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dmoe.experts.blocks import FeedForward, feed_forward
from dmoe.experts.lora import ExpertMLP, decoder_layers
from dmoe.training.distill import TeacherTargets


@dataclass
class SupervisedStates:
    """One sequence's trunk output at its supervised positions."""

    h_mid: torch.Tensor  # (P, d) residual after the last attention at the predicting positions
    targets: torch.Tensor  # (P,) the token each of those positions must predict
    teacher: TeacherTargets | None = None  # distillation targets at those positions, if any
    tail: torch.Tensor | None = None  # (P,) frozen log-mass outside the expert's candidates
    target_pos: torch.Tensor | None = None  # (P,) each target's index among those candidates


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the last attention is needed from the trunk."""


def last_layer_parts(model: Any) -> tuple[FeedForward, Any, Any, Any]:
    """``(FeedForward, base MLP, final norm, lm_head)`` of the last decoder layer."""
    layer: Any = decoder_layers(model)[-1]
    mlp = layer.mlp.base if isinstance(layer.mlp, ExpertMLP) else layer.mlp
    return feed_forward(layer), mlp, model.model.norm, model.get_output_embeddings()


def _batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices (longest first) so that each padded batch holds <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _run_to_h_mid(model: Any, norm: Any, **inputs: Any) -> torch.Tensor:
    """One trunk pass of ``model.model(**inputs)``, stopped at the last attention; h_mid (B, T, d)."""
    captured: list[torch.Tensor] = []

    def capture(module: Any, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise _StopForward

    hook = norm.register_forward_pre_hook(capture)
    try:
        with contextlib.suppress(_StopForward):  # the hook stops the pass at h_mid
            model.model(**inputs)
    finally:
        hook.remove()
    assert len(captured) == 1, "the capture hook must fire exactly once per pass"
    return captured[0]


def _common_prefix(seqs: Sequence[torch.Tensor]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one own token."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0][:n]
    for s in seqs[1:]:
        neq = (s[:n] != first[:n]).nonzero()
        n = int(neq[0, 0]) if len(neq) else n
    return n


def _shared_prefix_batch(model: Any, norm: Any, seqs: Sequence[torch.Tensor],
                         prefix_len: int) -> list[torch.Tensor]:
    """Full-sequence h_mid (T_i, d) of sequences sharing their first ``prefix_len`` tokens: the
    prefix runs once into a KV cache, the right-padded suffixes run batched on top of it."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    h_pre = _run_to_h_mid(model, norm, input_ids=seqs[0][None, :prefix_len].to(device),
                          past_key_values=cache, use_cache=True)[0]  # (L, d)
    cache.batch_repeat_interleave(len(seqs))  # the last layer's K/V are in: written before h_mid
    s_max = max(len(s) for s in seqs) - prefix_len
    ids = torch.zeros(len(seqs), s_max, dtype=torch.long, device=device)  # (g, S)
    mask = torch.zeros(len(seqs), prefix_len + s_max, dtype=torch.long, device=device)  # (g, L+S)
    mask[:, :prefix_len] = 1
    for row, s in enumerate(seqs):
        ids[row, :len(s) - prefix_len] = s[prefix_len:].to(device)
        mask[row, prefix_len:len(s)] = 1
    h_suf = _run_to_h_mid(model, norm, input_ids=ids, attention_mask=mask, past_key_values=cache,
                          use_cache=True)  # (g, S, d)
    return [torch.cat([h_pre, h_suf[row, :len(s) - prefix_len]]) for row, s in enumerate(seqs)]


def shares_prefix(share_prefix: bool | None, device: torch.device) -> bool:
    """Whether ``trunk_states`` should share each unit's common prefix: as asked, or (``None``)
    on the CPU only. Exact either way; sharing saves FLOPs, which a CPU is short of, but costs two
    small trunk passes per unit, which on CUDA are launch-bound (500 units x 5 examples of a
    SmolLM2-135M-shaped model on an H100: 31.9 s shared, 2.1 s plain)."""
    return device.type == "cpu" if share_prefix is None else share_prefix


@torch.no_grad()
def trunk_states(model: Any, sequences: Sequence[tuple[torch.Tensor, int]],
                 max_batch_tokens: int = 8192, groups: Sequence[Hashable] | None = None,
                 min_shared: int = 32) -> list[SupervisedStates]:
    """h_mid at the supervised positions of each ``(ids (T,), start)`` sequence.

    Tokens ``ids[start:]`` are supervised, so positions ``start-1 .. T-2`` predict them.

    Sequences of the same ``groups`` key (e.g. one unit's examples) whose first ``min_shared``
    tokens agree share their common prefix: it runs once and its KV cache serves the batched
    suffixes (PRAG's ``(passage, Q_i) -> A_i`` examples repeat the passage). All other sequences
    are sorted by length and right-padded into batches of at most ``max_batch_tokens`` tokens;
    with right padding every real token keeps its position ids and never attends to a pad.
    """
    norm: Any = feed_forward(decoder_layers(model)[-1]).pre  # its input is h_mid
    device = next(model.parameters()).device
    full: list[torch.Tensor | None] = [None] * len(sequences)  # h_mid (T_i, d) per sequence
    clusters: dict[tuple[Hashable, tuple[int, ...]], list[int]] = {}
    if groups is not None:
        for i, (seq, _) in enumerate(sequences):
            if len(seq) > min_shared:
                clusters.setdefault((groups[i], tuple(seq[:min_shared].tolist())), []).append(i)
    for members in clusters.values():
        seqs = [sequences[i][0] for i in members]
        prefix_len = _common_prefix(seqs) if len(members) > 1 else 0
        if prefix_len >= min_shared:
            for i, h in zip(members, _shared_prefix_batch(model, norm, seqs, prefix_len), strict=True):
                full[i] = h
    rest = [i for i in range(len(sequences)) if full[i] is None]
    for batch in _batches([len(sequences[i][0]) for i in rest], max_batch_tokens):
        idx = [rest[b] for b in batch]
        t_max = max(len(sequences[i][0]) for i in idx)
        ids = torch.zeros(len(idx), t_max, dtype=torch.long, device=device)  # (B, T)
        mask = torch.zeros(len(idx), t_max, dtype=torch.long, device=device)  # (B, T)
        for row, i in enumerate(idx):
            seq = sequences[i][0]
            ids[row, :len(seq)] = seq.to(device)
            mask[row, :len(seq)] = 1
        h_batch = _run_to_h_mid(model, norm, input_ids=ids, attention_mask=mask, use_cache=False)
        for row, i in enumerate(idx):
            full[i] = h_batch[row, :len(sequences[i][0])]
    out = []
    for (seq, start), h_full in zip(sequences, full, strict=True):
        assert h_full is not None
        out.append(SupervisedStates(h_mid=h_full[start - 1:len(seq) - 1].clone(),
                                    targets=seq[start:].to(device)))
    return out


def head_hidden(model: Any, h_mid: torch.Tensor,
                lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                scale: float) -> torch.Tensor:
    """The final norm's output (n, P, d) for n experts side by side (``lora`` None: the frozen
    model), from ``h_mid`` (n, P, d), expert i's positions in row i. Per row i, for each projection::

        y_i = x_i @ W.T + scale * (x_i @ A_i.T) @ B_i.T        # bmm over the n rows

    with ``lora[proj] = (A (n, r, in), B (n, out, r))``, then
    ``final_norm(h_mid + ffn.output(down(act(gate) * up)))``.
    """
    ffn, mlp, final_norm, _ = last_layer_parts(model)

    def proj(name: str, x: torch.Tensor) -> torch.Tensor:
        if lora is None:
            return getattr(mlp, name)(x)
        a, b = (t.to(x.dtype) for t in lora[name])  # fp32 experts on a bf16 compute copy
        return getattr(mlp, name)(x) + torch.bmm(torch.bmm(x, a.mT), b.mT) * scale  # (n, P, out)

    x = ffn.pre(h_mid)  # (n, P, d)
    return final_norm(h_mid + ffn.output(proj("down_proj", mlp.act_fn(proj("gate_proj", x))
                                               * proj("up_proj", x))))


def stacked_head_logits(model: Any, h_mid: torch.Tensor, valid: torch.Tensor,
                        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                        scale: float) -> torch.Tensor:
    """Logits of the head for n experts side by side, at the valid positions only.

    ``h_mid``: (n, P, d), expert i's positions in row i, right-padded; ``valid``: (n, P) bool;
    ``lora`` as ``head_hidden``. Returns ``lm_head(head_hidden(...)[valid])``, shape (N, V) with
    N = valid.sum() in row-major order. The MLP and norm run on the padded block (cheap); lm_head
    (the expensive part: V ≫ d) only on real positions.
    """
    return last_layer_parts(model)[3](head_hidden(model, h_mid, lora, scale)[valid])  # (N, V)
