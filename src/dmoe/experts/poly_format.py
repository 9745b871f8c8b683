"""A Poly-PRAG pool on disk: a folder readable without dmoe.

::

    DIR/manifest.json        {"format": "dmoe-poly-prag", "version": "1", "base_fingerprint",
                              "pool_size", "rank", "alpha", "pool": ["pool_0.safetensors", ...],
                              "routing": "routing.json", "n_units", "config": {...}}
    DIR/pool_{j}.safetensors  latent LoRA j, an ordinary expert file (``format.py``)
    DIR/routing.json         {"format": "dmoe-poly-routing", "version": "1", "pool_size": m,
                              "weights": {unit_id: [w_0, ..., w_{m-1}]}}   (rows sum to 1)

The stored weights are dense, ``softmax(z_p)`` exactly as trained; ``load_poly(top_k=k)`` keeps
each unit's k largest and renormalises them (sparser mixes, no longer the trained adapter; the
default ``top_k=None`` keeps all m). Every file is written to a temporary name and ``os.replace``d;
the manifest goes last, so a folder whose manifest is readable is complete. This module knows
nothing about training or inference.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmoe.errors import ExpertFormatError
from dmoe.experts.format import load_expert, save_expert
from dmoe.experts.lora import Expert


@dataclass
class PolyPool:
    """A trained Poly-PRAG pool: m latent LoRAs and each unit's mixing weights over them."""

    pool: list[Expert]
    unit_ids: list[str]
    weights: torch.Tensor  # (n_units, m) softmax(z_p), rows sum to 1, float32 on CPU

    def routing(self, top_k: int | None = None) -> Callable[[str], dict[int, float]]:
        """unit id -> {pool index: weight}; ``top_k`` keeps the largest k, renormalised to 1."""
        return routing_function(self.unit_ids, self.weights, top_k)


def routing_function(unit_ids: Sequence[str], weights: torch.Tensor,
                     top_k: int | None = None) -> Callable[[str], dict[int, float]]:
    """Dense (``top_k=None``, what training used) or top-k renormalised routing; unknown -> {}."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    table: dict[str, dict[int, float]] = {}
    for uid, row in zip(unit_ids, weights.tolist(), strict=True):
        keep = sorted(range(len(row)), key=lambda j: -row[j])[:top_k or len(row)]
        total = sum(row[j] for j in keep)
        table[uid] = {j: row[j] / total for j in sorted(keep)} if top_k else dict(enumerate(row))
    return lambda uid: dict(table.get(uid, {}))


FORMAT, ROUTING_FORMAT, VERSION = "dmoe-poly-prag", "dmoe-poly-routing", "1"
MANIFEST, ROUTING = "manifest.json", "routing.json"


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_poly(path: str | Path, poly: PolyPool, base_fingerprint: str,
              config: Mapping[str, Any] | None = None) -> None:
    """Write ``poly`` into folder ``path`` (created; an existing pool there is overwritten)."""
    path = Path(path)
    m = len(poly.pool)
    if m < 1 or tuple(poly.weights.shape) != (len(poly.unit_ids), m):
        raise ValueError(f"weights {tuple(poly.weights.shape)} do not fit {len(poly.unit_ids)} "
                         f"units x a pool of {m}")
    path.mkdir(parents=True, exist_ok=True)
    names = [f"pool_{j}.safetensors" for j in range(m)]
    for name, expert in zip(names, poly.pool, strict=True):
        save_expert(path / name, expert, base_fingerprint)
    rows = poly.weights.float().tolist()
    _write_json(path / ROUTING, {"format": ROUTING_FORMAT, "version": VERSION, "pool_size": m,
                                 "weights": dict(zip(poly.unit_ids, rows, strict=True))})
    spec = poly.pool[0].spec
    _write_json(path / MANIFEST, {
        "format": FORMAT, "version": VERSION, "base_fingerprint": base_fingerprint,
        "pool_size": m, "rank": spec.rank, "alpha": spec.alpha, "n_layers": spec.n_layers,
        "pool": names, "routing": ROUTING, "n_units": len(poly.unit_ids),
        "config": dict(config or {})})


def _read_json(path: Path, fmt: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExpertFormatError(f"{path}: not a readable Poly-PRAG file ({e})") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ExpertFormatError(f"{path}: not a {fmt} file")
    if data.get("version") != VERSION:
        raise ExpertFormatError(f"{path}: format version {data.get('version')!r}, this dmoe "
                                f"reads version {VERSION}")
    return data


def read_poly(path: str | Path, expected_fingerprint: str | None = None) -> PolyPool:
    """The stored pool and dense routing weights; refuse a pool trained for another base model."""
    path = Path(path)
    manifest = _read_json(path / MANIFEST, FORMAT)
    if expected_fingerprint is not None and manifest["base_fingerprint"] != expected_fingerprint:
        raise ExpertFormatError(f"{path}: Poly-PRAG pool was trained for base model "
                                f"{manifest['base_fingerprint']}, not {expected_fingerprint}")
    pool: list[Expert] = [load_expert(path / name, expected_fingerprint)
                          for name in manifest["pool"]]
    routing = _read_json(path / manifest["routing"], ROUTING_FORMAT)
    m = len(pool)
    if routing["pool_size"] != m or manifest["pool_size"] != m:
        raise ExpertFormatError(f"{path}: pool of {m} LoRAs, manifest says "
                                f"{manifest['pool_size']}, routing says {routing['pool_size']}")
    unit_ids = list(routing["weights"])
    rows = list(routing["weights"].values())
    if any(len(r) != m for r in rows):
        raise ExpertFormatError(f"{path}: a routing row does not have {m} weights")
    weights = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), m)
    return PolyPool(pool=pool, unit_ids=unit_ids, weights=weights)


def load_poly(path: str | Path, expected_fingerprint: str | None = None, top_k: int | None = None
              ) -> tuple[list[Expert], Callable[[str], dict[int, float]]]:
    """``(pool, routing)`` for ``Resources.poly_pool`` / ``poly_routing``; unknown unit -> {}."""
    poly = read_poly(path, expected_fingerprint)
    return poly.pool, routing_function(poly.unit_ids, poly.weights, top_k)
