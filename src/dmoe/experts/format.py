"""One expert on disk: a single safetensors file, inspectable without dmoe.

Tensors are named ``layers.{L}.mlp.{proj}.lora_{A|B}`` (see ``lora.weight_key``); the safetensors
header metadata (all strings) records::

    format = "dmoe-expert"   version = "2" ("3" for int8)   id   rank   alpha   n_layers
    base_fingerprint         dtype ("float32" | "float16" | "bfloat16" | "int8")
    checksum                 sha256 of the tensors (``tensor_checksum``), hex
    record                   JSON: what the bank knows of the expert (doc id, unit id, hashes,
                             routing text, title, ...), so a lost database can be rebuilt from
                             the files alone ("{}" for a file outside a bank)

The checksum covers, for each tensor name in sorted order, ``name \\0 dtype \\0 shape \\0`` and its
raw little-endian bytes; it is computed from the file's own bytes, so ``verify_expert_file`` needs
no torch and catches a bit flip anywhere in the tensor data. Loading checks the file size (when the
caller knows it), the header, the checksum and that every weight is finite; a file that fails is
refused with ``ExpertFormatError`` and never half-used.

**int8** (version 3) stores each weight as symmetric int8 with one fp32 absmax scale per *rank
channel*: a row of ``A`` (r, in), a column of ``B`` (out, r), so ``W ≈ Q * s`` with ``s`` of shape
``(r, 1)`` or ``(1, r)``, stored beside it as ``{name}.scale`` (in general: one scale per slice
along the smaller dimension). A rank-r LoRA then carries 2r scales per projection, not one per
output row (which for ``B`` would cost as much as fp16). Loading dequantises to fp32, so the engine
never sees int8; only the bytes on disk change. Float files stay version 2, so a reader from before
int8 still reads every float bank.

Writes go to a temporary file in the same directory and are ``os.replace``d into place, so a crash
never leaves a half-written expert visible. Version-1 files (no checksum) still load outside a bank.
This module knows nothing about banks or indexes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from dmoe.errors import ExpertFormatError
from dmoe.experts.lora import Expert, LoraSpec

FORMAT = "dmoe-expert"
VERSION = "2"
INT8_VERSION = "3"  # the first version that can hold int8 weights + scales
READABLE_VERSIONS = ("1", "2", "3")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORAGE_DTYPES = (*FLOAT_DTYPES, "int8")
SCALE_SUFFIX = ".scale"  # int8: ``{name}.scale`` holds the fp32 channel scales of ``{name}``
MAX_HEADER_BYTES = 64 << 20  # a header larger than this is corruption, not an expert


@dataclass(frozen=True)
class ExpertFile:
    """A parsed expert file: its header metadata and the checksum of its tensor bytes."""

    meta: dict[str, str]
    checksum: str  # recomputed from the bytes, not read from the header
    size: int

    @property
    def record(self) -> dict[str, Any]:
        try:
            value = json.loads(self.meta.get("record", "{}"))
        except json.JSONDecodeError as e:
            raise ExpertFormatError(f"expert {self.meta.get('id')!r}: unreadable record ({e})") from e
        if not isinstance(value, dict):
            raise ExpertFormatError(f"expert {self.meta.get('id')!r}: record is not an object")
        return value


def _parse(data: bytes, name: str) -> ExpertFile:
    """Header + tensor checksum of safetensors ``data``; ``ExpertFormatError`` if malformed."""
    if len(data) < 8:
        raise ExpertFormatError(f"{name}: {len(data)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise ExpertFormatError(f"{name}: header of {n} bytes does not fit a {len(data)}-byte file "
                                f"(truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExpertFormatError(f"{name}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ExpertFormatError(f"{name}: safetensors header is not an object")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    h = hashlib.sha256()
    end = 0
    try:
        for key in sorted(header):
            t = header[key]
            lo, hi = (int(x) for x in t["data_offsets"])
            if not 0 <= lo <= hi <= len(body):
                raise ExpertFormatError(f"{name}: tensor {key!r} lies outside the file "
                                        f"(truncated?)")
            end = max(end, hi)
            h.update(f"{key}\0{t['dtype']}\0{list(t['shape'])}\0".encode())
            h.update(body[lo:hi])
    except (KeyError, TypeError, ValueError) as e:
        raise ExpertFormatError(f"{name}: malformed tensor entry in the header ({e})") from e
    if end != len(body):
        raise ExpertFormatError(f"{name}: {len(body)} data bytes, the header describes {end}")
    return ExpertFile(meta={str(k): str(v) for k, v in meta.items()}, checksum=h.hexdigest(),
                      size=len(data))


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """The checksum ``save_expert`` records for these tensors (see the module docstring)."""
    return _parse(save_bytes(dict(tensors)), "<tensors>").checksum


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 with one scale per slice along ``w``'s smaller dimension (a LoRA's
    rank channels): ``(q, s)``, ``w ≈ q * s``, ``s`` of shape ``(rows, 1)`` or ``(1, cols)``; an
    all-zero slice gets scale 1."""
    w = w.detach().to("cpu", torch.float32)
    s = w.abs().amax(dim=1 if w.shape[0] <= w.shape[1] else 0, keepdim=True) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w / s).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), s.contiguous()


def encode_weights(weights: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The tensors an expert file stores for ``weights`` in ``dtype`` (see the module docstring)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if dtype != "int8":
        return {k: v.detach().to("cpu", FLOAT_DTYPES[dtype]).contiguous()
                for k, v in weights.items()}
    out = {}
    for k, v in weights.items():
        if v.dim() != 2:
            raise ValueError(f"int8 storage needs 2-d weights, {k!r} has shape {tuple(v.shape)}")
        out[k], out[k + SCALE_SUFFIX] = quantize_int8(v)
    return out


def decode_weights(tensors: Mapping[str, torch.Tensor], name: str = "<tensors>"
                   ) -> dict[str, torch.Tensor]:
    """The weights an expert file's tensors hold: floats as stored, int8 dequantised to fp32."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        if v.dtype == torch.int8:
            s = tensors.get(k + SCALE_SUFFIX)
            if s is None or s.shape not in ((v.shape[0], 1), (1, v.shape[1])):
                raise ExpertFormatError(f"{name}: int8 tensor {k!r} has no per-channel scales")
            out[k] = v.float() * s.float()
        else:
            out[k] = v
    return out


def write_expert(path: str | Path, expert: Expert, base_fingerprint: str, dtype: str = "float32",
                 record: Mapping[str, Any] | None = None) -> ExpertFile:
    """Write ``expert`` atomically in ``dtype`` with ``record`` in its header; return the parsed
    file (size and checksum)."""
    path = Path(path)
    tensors = encode_weights(expert.weights, dtype)
    version = INT8_VERSION if dtype == "int8" else VERSION
    meta = {"format": FORMAT, "version": version, "id": expert.id,
            "rank": str(expert.spec.rank), "alpha": repr(expert.spec.alpha),
            "n_layers": str(expert.spec.n_layers), "base_fingerprint": base_fingerprint,
            "dtype": dtype, "checksum": tensor_checksum(tensors),
            "record": json.dumps(dict(record or {}), ensure_ascii=False, sort_keys=True)}
    data = save_bytes(tensors, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _parse(data, str(path))


def save_expert(path: str | Path, expert: Expert, base_fingerprint: str,
                dtype: str = "float32") -> int:
    """Write ``expert`` atomically in ``dtype``; return the file size in bytes."""
    return write_expert(path, expert, base_fingerprint, dtype).size


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ExpertFormatError(f"{Path(path).name}: unreadable ({e.strerror or e})") from e


def verify_expert_file(path: str | Path, expected_size: int | None = None,
                       expected_checksum: str | None = None, data: bytes | None = None
                       ) -> ExpertFile:
    """Parse and check an expert file without loading its tensors: size, header, format and
    version, and the checksum (against the header's and, when given, ``expected_checksum``)."""
    data = _read(path) if data is None else data
    name = Path(path).name
    if expected_size is not None and len(data) != expected_size:
        raise ExpertFormatError(f"{name}: {len(data)} bytes, the bank recorded {expected_size} "
                                f"(truncated or replaced)")
    parsed = _parse(data, name)
    meta = parsed.meta
    if meta.get("format") != FORMAT:
        raise ExpertFormatError(f"{name}: not a dmoe expert (format={meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ExpertFormatError(f"{name}: expert format version {meta.get('version')!r}, "
                                f"this dmoe reads versions {', '.join(READABLE_VERSIONS)}")
    if "checksum" in meta and meta["checksum"] != parsed.checksum:
        raise ExpertFormatError(f"{name}: tensor checksum mismatch (the data changed after it "
                                f"was written)")
    if expected_checksum is not None and parsed.checksum != expected_checksum:
        raise ExpertFormatError(f"{name}: checksum differs from the bank's record")
    return parsed


def read_expert_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of an expert file, validated for format, version and checksum."""
    return verify_expert_file(path).meta


def load_expert(path: str | Path, expected_fingerprint: str | None = None,
                expected_size: int | None = None, expected_checksum: str | None = None) -> Expert:
    """Read and verify an expert file (see ``verify_expert_file``); refuse one trained for another
    base model when a fingerprint is given, and one with a non-finite weight."""
    data = _read(path)
    meta = verify_expert_file(path, expected_size, expected_checksum, data=data).meta
    name = Path(path).name
    if expected_fingerprint is not None and meta["base_fingerprint"] != expected_fingerprint:
        raise ExpertFormatError(f"{name}: expert {meta['id']!r} was trained for base model "
                                f"{meta['base_fingerprint']}, not {expected_fingerprint}")
    try:
        spec = LoraSpec(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                        n_layers=int(meta["n_layers"]))
        weights = decode_weights(load_bytes(data), name)
    except (KeyError, ValueError, SafetensorError) as e:
        raise ExpertFormatError(f"{name}: malformed expert ({e})") from e
    bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ExpertFormatError(f"{name}: expert {meta['id']!r} has non-finite weights in "
                                f"{', '.join(sorted(bad)[:3])}")
    return Expert(id=meta["id"], spec=spec, weights=weights)
