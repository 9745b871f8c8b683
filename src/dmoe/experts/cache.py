"""A bounded LRU of loaded experts in front of any ``id -> Expert`` loader.

Memory is bounded by ``capacity`` experts, never by the size of the bank behind the loader. With
``on_error``, an expert whose load raises one of ``skip`` (a corrupt or vanished file) is left out
of the returned list and reported to ``on_error(id, error)``: the engine decodes with the experts
that are usable instead of failing the request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from dmoe.experts.format import load_expert
from dmoe.experts.lora import Expert


class ExpertCache:
    """``cache(ids) -> [Expert]``: loads misses through ``load_one`` and keeps the newest few."""

    def __init__(self, load_one: Callable[[str], Expert], capacity: int = 64,
                 on_error: Callable[[str, Exception], None] | None = None,
                 skip: tuple[type[Exception], ...] = (KeyError,)) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.load_one = load_one
        self.capacity = capacity
        self.on_error = on_error
        self.skip = skip
        self._items: OrderedDict[str, Expert] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, ids: Sequence[str]) -> list[Expert]:
        if self.on_error is None:
            return [self.get(i) for i in ids]
        out = []
        for expert_id in ids:
            try:
                out.append(self.get(expert_id))
            except self.skip as e:
                self.on_error(expert_id, e)
        return out

    def get(self, expert_id: str) -> Expert:
        if expert_id in self._items:
            self.hits += 1
            self._items.move_to_end(expert_id)
            return self._items[expert_id]
        self.misses += 1
        expert = self.load_one(expert_id)
        if self.capacity:
            self._items[expert_id] = expert
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return expert

    def invalidate(self, expert_id: str | None = None) -> None:
        """Forget one expert (after an update or delete) or, with ``None``, all of them."""
        if expert_id is None:
            self._items.clear()
        else:
            self._items.pop(expert_id, None)

    def __len__(self) -> int:
        return len(self._items)


def directory_loader(directory: str | Path, fingerprint: str | None = None) -> Callable[[str], Expert]:
    """Loader for a flat folder of ``{id}.safetensors`` expert files."""
    root = Path(directory)

    def load_one(expert_id: str) -> Expert:
        return load_expert(root / f"{expert_id}.safetensors", expected_fingerprint=fingerprint)

    return load_one
