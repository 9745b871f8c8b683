"""When to re-route: token-uncertainty triggers for the decode loop (and the paper's ablations).

A trigger policy sees the step index and the entropy TU_t = -Σ_v p_t(v) log p_t(v) of the
next-token distribution and answers whether to route before committing token t.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dim: (B, V) -> (B,), computed in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class TriggerPolicy(Protocol):
    def __call__(self, step: int, entropy: float) -> bool: ...


DEFAULT_TAU = 2.0  # nats; the paper's τ, kept on dev data (results/dev/README.md)


@dataclass(frozen=True)
class EntropyTrigger:
    """Trigger when TU_t > tau (paper: tau = 2.0)."""

    tau: float = DEFAULT_TAU

    def __call__(self, step: int, entropy: float) -> bool:
        return entropy > self.tau


@dataclass(frozen=True)
class AlwaysTrigger:
    def __call__(self, step: int, entropy: float) -> bool:
        return True


@dataclass(frozen=True)
class NeverTrigger:
    def __call__(self, step: int, entropy: float) -> bool:
        return False


@dataclass
class RandomTrigger:
    """Trigger with probability ``rate`` per step, from a seeded generator (reset per generation)."""

    rate: float = 0.1
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        self._rng = random.Random(self.seed)

    def __call__(self, step: int, entropy: float) -> bool:
        if step == 0:
            self._rng = random.Random(self.seed)
        return self._rng.random() < self.rate


@dataclass(frozen=True)
class ScheduleTrigger:
    """Trigger exactly at the given steps (tests and controlled experiments)."""

    steps: frozenset[int]

    @classmethod
    def at(cls, steps: Iterable[int]) -> ScheduleTrigger:
        return cls(frozenset(steps))

    def __call__(self, step: int, entropy: float) -> bool:
        return step in self.steps


TRIGGERS = ("entropy", "always", "never", "random")


def make_trigger(name: str, tau: float = DEFAULT_TAU, rate: float = 0.1, seed: int = 0) -> TriggerPolicy:
    """Build a policy by name: entropy (tau), always, never, random (rate, seed)."""
    if name == "entropy":
        return EntropyTrigger(tau)
    if name == "always":
        return AlwaysTrigger()
    if name == "never":
        return NeverTrigger()
    if name == "random":
        return RandomTrigger(rate, seed)
    raise ValueError(f"unknown trigger {name!r}; choose one of {TRIGGERS}")
