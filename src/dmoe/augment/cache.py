"""On-disk augmentation cache: an append-only JSONL file, so reruns never generate twice.

One line per augmented unit::

    {"format": 1, "key": "<sha256>", "unit_id": "...", "content_hash": "...",
     "settings": {...augmenter settings...}, "augmentation": {"paraphrase": "...",
     "qa": [{"question": "...", "answer": "...", "full_answer": "..."}], "source": "...",
     "meta": {...}}}

``key = sha256(unit.content_hash + canonical JSON of augmenter.settings)``: the same text augmented
by the same augmenter (model fingerprint, prompt version, decoding parameters) is a hit whatever the
unit's id; anything that changes the output changes the key. Lines are appended and fsynced a batch
at a time, so a crash loses at most the batch in flight. On open, lines that do not parse (a line
truncated by a crash) are reported in ``repaired`` and the file is rewritten without them
(atomically), so the next append starts on a clean line. The last line for a key wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dmoe.augment.llm import Augmenter
from dmoe.augment.types import Augmentation, QAPair
from dmoe.corpus.units import KnowledgeUnit
from dmoe.errors import AugmentError

CACHE_FORMAT = 1


def cache_key(unit: KnowledgeUnit, settings: dict[str, Any]) -> str:
    blob = unit.content_hash + json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def augmentation_to_dict(aug: Augmentation) -> dict[str, Any]:
    return {"paraphrase": aug.paraphrase,
            "qa": [{"question": q.question, "answer": q.answer, "full_answer": q.full_answer}
                   for q in aug.qa],
            "source": aug.source, "meta": dict(aug.meta)}


def augmentation_from_dict(d: dict[str, Any]) -> Augmentation:
    return Augmentation(paraphrase=d["paraphrase"],
                        qa=tuple(QAPair(q["question"], q["answer"], q.get("full_answer", ""))
                                 for q in d["qa"]),
                        source=d.get("source", ""), meta=dict(d.get("meta", {})))


class AugmentationCache:
    """The JSONL cache file at ``path`` (created on first write); see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, Augmentation] = {}
        self.repaired: list[int] = []  # 1-based numbers of the unreadable lines dropped on open
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good: list[bytes] = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.entries[rec["key"]] = augmentation_from_dict(rec["augmentation"])
                good.append(line)
            except (ValueError, KeyError, TypeError):
                self.repaired.append(lineno)
        if self.repaired or (raw and not raw.endswith(b"\n")):
            self._rewrite(good)

    def _rewrite(self, lines: list[bytes]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(line + b"\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> Augmentation | None:
        return self.entries.get(key)

    def put_many(self, rows: Sequence[tuple[str, KnowledgeUnit, dict[str, Any], Augmentation]]
                 ) -> None:
        """Append ``(key, unit, settings, augmentation)`` rows; one write + fsync."""
        if not rows:
            return
        lines = [json.dumps({"format": CACHE_FORMAT, "key": key, "unit_id": unit.id,
                             "content_hash": unit.content_hash, "settings": settings,
                             "augmentation": augmentation_to_dict(aug)}, ensure_ascii=False)
                 for key, unit, settings, aug in rows]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise AugmentError(f"cannot write augmentation cache {self.path}: {e}") from e
        for key, _, _, aug in rows:
            self.entries[key] = aug


AugmentRunner = Callable[[Sequence[Sequence[KnowledgeUnit]]],
                         Iterator[tuple[int, list[Augmentation]]]]


def augment_cached(units: Sequence[KnowledgeUnit], augmenter: Augmenter,
                   cache: AugmentationCache | str | Path | None = None, *, chunk_size: int = 32,
                   on_progress: Callable[[int, int], None] | None = None,
                   run_chunks: AugmentRunner | None = None) -> list[Augmentation]:
    """Augment ``units`` (same order), generating only for those not in ``cache``.

    Missing units go to ``augmenter.augment`` ``chunk_size`` at a time and each chunk is saved
    as soon as it is done. Units with identical content are generated once. ``on_progress(done,
    total)`` is called after each chunk (e.g. to drive a progress bar). ``run_chunks(chunks)``
    augments the chunks elsewhere (an augmenter with the same ``settings``) and yields ``(index,
    augmentations)`` as they finish, in any order; this process stays the cache's one writer.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if cache is not None and not isinstance(cache, AugmentationCache):
        cache = AugmentationCache(cache)
    settings = augmenter.settings
    keys = [cache_key(u, settings) for u in units]
    found: dict[str, Augmentation] = {}
    if cache is not None:
        found = {k: a for k in set(keys) if (a := cache.get(k)) is not None}
    todo: dict[str, KnowledgeUnit] = {}
    for k, u in zip(keys, units, strict=True):
        if k not in found:
            todo.setdefault(k, u)
    pending = list(todo.items())
    chunks = [pending[start:start + chunk_size] for start in range(0, len(pending), chunk_size)]
    if run_chunks is None:
        def run_chunks(unit_chunks: Sequence[Sequence[KnowledgeUnit]]
                       ) -> Iterator[tuple[int, list[Augmentation]]]:
            for i, chunk_units in enumerate(unit_chunks):
                yield i, augmenter.augment(list(chunk_units))
    done = 0
    for i, augs in run_chunks([[u for _, u in chunk] for chunk in chunks]):
        chunk = chunks[i]
        assert len(augs) == len(chunk), f"augmenter returned {len(augs)} for {len(chunk)} units"
        if cache is not None:
            cache.put_many([(k, u, settings, a) for (k, u), a in zip(chunk, augs, strict=True)])
        found.update((k, a) for (k, _), a in zip(chunk, augs, strict=True))
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, len(pending))
    return [found[k] for k in keys]
