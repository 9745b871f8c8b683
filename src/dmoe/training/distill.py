"""Context distillation targets: the frozen model *reading* the passage is the expert's teacher.

For an example with a ``teacher_prompt`` (the same question with the unit's passage in the prompt,
the RAG frame), the teacher is the frozen base model on ``teacher_prompt + target`` and the student
is base + expert on ``prompt + target`` (no passage). On every target token t the loss is::

    p_T = softmax(topk(z_T[t], K) / T)                   # teacher, top-K renormalised (K, )
    q_S = log_softmax(z_S[t] / T)[topk indices]          # student, full vocabulary at T
    loss_t = T^2 · Σ_K p_T · (log p_T − q_S)             # KL(teacher ‖ student) on the teacher's support

(Hinton's T² keeps gradient sizes comparable across temperatures.) Examples without a teacher
prompt keep the next-token cross-entropy. The teacher's top-K is computed once per example and
cached beside the trunk states, because only the last FFN trains (Caccia et al. 2025 "Deep
Context Distillation" and Padmanabhan et al. 2023 distil the same way, with full-model students).

This module knows nothing about banks, augmentation or optimisers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dmoe.experts.lora import ExpertMLP


@dataclass
class TeacherTargets:
    """The teacher's renormalised top-K next-token distribution at each target position."""

    idx: torch.Tensor  # (P, K) vocabulary ids
    logp: torch.Tensor  # (P, K) log-probabilities at temperature T, logsumexp over K = 0


def top_k_targets(logits: torch.Tensor, k: int, temperature: float) -> TeacherTargets:
    """``logits`` (P, V) -> renormalised top-``k`` at ``temperature``."""
    values, idx = logits.float().topk(min(k, logits.shape[-1]), dim=-1)  # (P, K)
    return TeacherTargets(idx=idx, logp=torch.log_softmax(values / temperature, dim=-1))


@contextmanager
def base_only(model: Any) -> Iterator[None]:
    """Run ``model`` with every attached expert set switched off (restored on exit)."""
    mlps = [m for m in model.modules() if isinstance(m, ExpertMLP)]
    saved = [m.lora for m in mlps]
    try:
        for m in mlps:
            m.lora = None
        yield
    finally:
        for m, lora in zip(mlps, saved, strict=True):
            m.lora = lora


@torch.no_grad()
def teacher_targets(model: Any, sequences: Sequence[tuple[torch.Tensor, int]], k: int,
                    temperature: float) -> list[TeacherTargets]:
    """Teacher top-K at the positions predicting ``ids[start:]`` of each ``(ids, start)``.

    One plain forward per sequence through the frozen model (run it under ``base_only``).
    """
    device = next(model.parameters()).device
    out = []
    for ids, start in sequences:
        logits = model(input_ids=ids[None].to(device)).logits[0]  # (T, V)
        out.append(top_k_targets(logits[start - 1:len(ids) - 1], k, temperature))
    return out


def distill_loss(student_logits: torch.Tensor, teacher: TeacherTargets,
                 temperature: float) -> torch.Tensor:
    """Per-position KL(teacher ‖ student) (module docstring); ``student_logits`` (P, V) -> (P,)."""
    q = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (P, V)
    q_k = q.gather(-1, teacher.idx.to(q.device))  # (P, K)
    p_log = teacher.logp.to(q.device)
    return temperature ** 2 * (p_log.exp() * (p_log - q_k)).sum(-1)


def example_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTargets | None,
                 temperature: float) -> torch.Tensor:
    """Per-position loss of one example: KL to the teacher when it has one, else CE. (P,)"""
    if teacher is None:
        return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")
    return distill_loss(logits, teacher, temperature)
