"""The output head over a candidate vocabulary: the large-vocabulary part of expert training, cut.

In the one-layer fast path (``dmoe.training.experts.train_fast``) a step computes, for every
supervised position, the logits over the whole vocabulary and their input-gradient: 2 · V · d
multiply-adds per position and step, against ~6 · d · ffn for the expert's MLP. On Gemma 3 (V = 262,144) the head is
nearly all of an expert's training time. An expert moves the last hidden state a little, so at each
position nearly all probability stays on few tokens. The candidate head keeps per expert the set
U of tokens that matter and holds the rest of the vocabulary at the frozen model's mass::

    U       = the expert's target tokens ∪ the frozen model's top-K tokens at each of its positions
    tail_t  = logsumexp_{v ∉ U} z0_t[v]                       frozen (no expert), once per position
    loss_t  = logsumexp([z_t[U], tail_t]) − z_t[y_t]          z_t[U] = W[U] · norm(h_t), trained

At initialisation (B = 0, so z = z0) ``loss_t`` is exactly the full cross-entropy. Its gradient
leaves out only what the expert does to tokens outside U: their logits move with the hidden state
but are held at the frozen values. With K ≥ V the set is the whole vocabulary, the tail is empty,
and training equals the full head up to summation order (tested).

Cost per position and step: |U| · d instead of V · d (|U| ~ a few thousand), plus one frozen
full-vocabulary pass per position, once. Only for heads that are a bias-free linear map of the
final norm's output (no logit soft-capping): Llama, Qwen2, Gemma 3 and the like.

This module knows nothing about optimisers, examples or files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dmoe.training.trunk import SupervisedStates, head_hidden, last_layer_parts


def check_head(model: Any) -> None:
    """Refuse a head the candidate loss would get wrong: a bias, or soft-capped logits."""
    _, _, _, lm_head = last_layer_parts(model)
    if not isinstance(lm_head, torch.nn.Linear) or lm_head.bias is not None:
        raise ValueError("head_vocab needs an output head that is a Linear without a bias; "
                         "train this model with head_vocab=0 (the full head)")
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, key, None) not in (None, 1.0):
            raise ValueError(f"head_vocab does not model {key}={getattr(model.config, key)}; "
                             f"train this model with head_vocab=0 (the full head)")


@torch.no_grad()
def candidate_sets(model: Any, states: Sequence[Sequence[SupervisedStates]], k: int,
                   progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Each expert's candidate ids (sorted, (U,)) from its examples' trunk states; sets every
    state's ``tail`` (P,) and ``target_pos`` (P,), the index of its target in those ids.
    (Corpus-wide LoRAs: one "expert" per unit, whose examples then use the unit's ids.)
    ``progress(n)``: called after each expert with its n examples. One frozen full-vocabulary
    pass per position, so on a large vocabulary this costs about as much as the trunk pass."""
    check_head(model)
    lm_head = last_layer_parts(model)[3]
    device = lm_head.weight.device
    out = []
    for expert_states in states:
        h_mid = torch.cat([s.h_mid for s in expert_states]).to(device)  # (P, d), all its positions
        z0 = lm_head(head_hidden(model, h_mid[None], None, 0.0)[0]).float()  # (P, V)
        targets = torch.cat([s.targets for s in expert_states]).to(device)  # (P,)
        top = z0.topk(min(k, z0.shape[-1]), dim=-1).indices  # (P, K)
        ids = torch.cat([top.flatten(), targets]).unique()  # (U,) sorted
        z0[:, ids] = float("-inf")
        tail = z0.logsumexp(-1)  # (P,), -inf when U is the whole vocabulary
        pos = torch.searchsorted(ids, targets)  # (P,)
        lo = 0
        for s in expert_states:
            hi = lo + len(s.targets)
            s.tail, s.target_pos = tail[lo:hi], pos[lo:hi]
            lo = hi
        out.append(ids)
        if progress is not None:
            progress(len(expert_states))
    return out


def candidate_ce(model: Any, hidden: torch.Tensor, valid: torch.Tensor,
                 ids: Sequence[torch.Tensor], rows: Sequence[SupervisedStates]) -> torch.Tensor:
    """Per-position loss (N,) of the module docstring, for n experts side by side.

    ``hidden``: (n, P, d) final-norm outputs, expert i's positions in row i, right-padded;
    ``valid``: (n, P) bool; ``ids[i]``: expert i's candidates; ``rows[i]``: its current example,
    with ``tail`` and ``target_pos`` set by ``candidate_sets``. Row-major order, as ``valid``.
    """
    tails, poss = [r.tail for r in rows], [r.target_pos for r in rows]
    if any(t is None for t in tails) or any(p is None for p in poss):
        raise ValueError("candidate_ce needs the states' tail and target_pos: candidate_sets first")
    weight = last_layer_parts(model)[3].weight  # (V, d)
    w = torch.nn.utils.rnn.pad_sequence([weight[i] for i in ids], batch_first=True)  # (n, U, d)
    sizes = torch.tensor([len(i) for i in ids], device=hidden.device)
    real = torch.arange(w.shape[1], device=hidden.device)[None, :] < sizes[:, None]  # (n, U)
    z = torch.bmm(hidden, w.mT).float()  # (n, P, U)
    z = z.masked_fill(~real[:, None, :], float("-inf"))[valid]  # (N, U)
    tail = torch.cat(tails).to(z.device)  # type: ignore[arg-type]  # (N,)
    pos = torch.cat(poss).to(z.device)  # type: ignore[arg-type]  # (N,)
    lse = torch.cat([z, tail[:, None]], dim=-1).logsumexp(-1)  # (N,)
    return lse - z.gather(1, pos[:, None])[:, 0]
