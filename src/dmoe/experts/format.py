"""One expert on disk: a single safetensors file, inspectable without dmoe.

Tensors are named ``layers.{L}.mlp.{proj}.lora_{A|B}`` (see ``lora.weight_key``); the safetensors
header metadata (all strings) records::

    format = "dmoe-expert"   version = "1"   id   rank   alpha   n_layers
    base_fingerprint         dtype ("float32" | "float16" | "bfloat16")

Writes go to a temporary file in the same directory and are ``os.replace``d into place, so a crash
never leaves a half-written expert visible. This module knows nothing about banks or indexes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dmoe.errors import ExpertFormatError
from dmoe.experts.lora import Expert, LoraSpec

FORMAT = "dmoe-expert"
VERSION = "1"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_expert(path: str | Path, expert: Expert, base_fingerprint: str,
                dtype: str = "float32") -> int:
    """Write ``expert`` atomically in ``dtype``; return the file size in bytes."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    path = Path(path)
    tensors = {k: v.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous()
               for k, v in expert.weights.items()}
    meta = {"format": FORMAT, "version": VERSION, "id": expert.id,
            "rank": str(expert.spec.rank), "alpha": repr(expert.spec.alpha),
            "n_layers": str(expert.spec.n_layers), "base_fingerprint": base_fingerprint,
            "dtype": dtype}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def read_expert_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of an expert file, validated for format and version."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ExpertFormatError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ExpertFormatError(f"{path}: not a dmoe expert (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ExpertFormatError(f"{path}: expert format version {meta.get('version')!r}, "
                                f"this dmoe reads version {VERSION}")
    return meta


def load_expert(path: str | Path, expected_fingerprint: str | None = None) -> Expert:
    """Read an expert file; refuse one trained for another base model when a fingerprint is given."""
    meta = read_expert_metadata(path)
    if expected_fingerprint is not None and meta["base_fingerprint"] != expected_fingerprint:
        raise ExpertFormatError(f"{path}: expert {meta['id']!r} was trained for base model "
                                f"{meta['base_fingerprint']}, not {expected_fingerprint}")
    spec = LoraSpec(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                    n_layers=int(meta["n_layers"]))
    return Expert(id=meta["id"], spec=spec, weights=load_file(str(path)))
