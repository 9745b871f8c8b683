"""Benchmark loaders: real QA sets in their standard formats -> ``Task(samples, corpus)``.

=======================  ==========================================  ========================================
name                     questions (file under the data dir)         corpus (one ``KnowledgeUnit`` each)
=======================  ==========================================  ========================================
``hotpotqa``             ``hotpotqa/hotpotqa_dev_1525_distractor``   the 10 context paragraphs of each
                         ``.jsonl`` (answer; yes/no kept as span)    evaluated question (deduplicated)
``squad``                ``squad/squad_dev_v1.1.json`` in file order  all 2,067 dev paragraphs
``strategyqa``           ``strategyqa/strategyqa_train.json`` (yes/no) the facts of each evaluated question
                                                                     as one passage + the Wikipedia vital-
                                                                     article summaries as distractors
``cwq``                  ``cwq/cwq_dev_first1000_qa_aliases.json``    the Wikipedia vital-article summaries
``knowledge_conflicts``  ``knowledge_conflicts/nq_conflicts_``        the substituted passage of each
                         ``bigbench.json``; gold = substituted answer  efficacy question
=======================  ==========================================  ========================================

``knowledge_conflicts`` has two kinds of samples, told apart by ``meta["split"]``: ``efficacy``
(examples ``offset .. offset+limit``; their substituted passages form the corpus) and ``locality``
(``n_locality`` examples, as many as the efficacy ones by default, from the end of the file,
whose passages are *not* injected; they measure whether a method's answers to unrelated questions
stay what the base model says).

The data directory is ``data_dir`` if given, else ``$DMOE_DATA_DIR``, else ``../shared/data``
relative to the repository root. Loaders select ``samples[offset : offset + limit]`` (``limit=None``
for all); corpora that depend on the evaluated questions follow that selection.

This module knows nothing about models, methods or scoring.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmoe.corpus.units import KnowledgeUnit
from dmoe.samples import Sample  # re-exported: loaders and callers use dmoe.eval.datasets.Sample

DEFAULT_LIMIT = 300  # the paper evaluates the first 300 questions of each set
REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Task:
    """A benchmark slice and the corpus its methods may retrieve from or inject."""

    name: str
    samples: list[Sample]
    corpus: list[KnowledgeUnit]

    @property
    def corpus_fingerprint(self) -> str:
        """Identity of the corpus (ids + content), 12 hex; results are only reused under the same
        corpus, since HotpotQA/StrategyQA/knowledge_conflicts corpora follow the selection."""
        h = hashlib.sha256()
        for u in sorted(self.corpus, key=lambda u: u.id):
            h.update(f"{u.id}\0{u.content_hash}\n".encode())
        return h.hexdigest()[:12]

    @property
    def metric(self) -> str:
        """Headline metric: ``acc`` when every sample is yes/no, else ``f1``."""
        return "acc" if self.samples and all(s.kind == "yesno" for s in self.samples) else "f1"


def data_dir(path: str | Path | None = None) -> Path:
    """The benchmark data folder: ``path``, ``$DMOE_DATA_DIR`` or ``<repo>/../shared/data``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("DMOE_DATA_DIR")
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path} (set --data-dir or DMOE_DATA_DIR)")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _slice(items: list[Any], offset: int, limit: int | None) -> list[Any]:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return items[offset:] if limit is None else items[offset: offset + limit]


def _unit_id(prefix: str, title: str, text: str) -> str:
    digest = hashlib.sha256(f"{title}\n{text}".encode()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def _dedupe(units: Iterable[KnowledgeUnit]) -> list[KnowledgeUnit]:
    seen: dict[str, KnowledgeUnit] = {}
    for u in units:
        seen.setdefault(u.id, u)
    return list(seen.values())


def wikipedia_pool(root: Path, limit: int | None = None) -> list[KnowledgeUnit]:
    """The vital-article lead sections (10,033) as units ``wiki-<hash>``; ``limit`` keeps the first."""
    raw = _read_json(root / "wikipedia" / "vital_articles_summaries_en.json")
    units = [KnowledgeUnit(id=_unit_id("wiki", r["title"], r["extract"]), text=r["extract"],
                           title=r["title"], meta={"topic": r.get("topic", "")})
             for r in raw.values() if r.get("extract", "").strip()]
    return _dedupe(units)[:limit] if limit is not None else _dedupe(units)


def load_hotpotqa(root: Path, offset: int = 0, limit: int | None = DEFAULT_LIMIT) -> Task:
    rows = _slice(_read_json(root / "hotpotqa" / "hotpotqa_dev_1525_distractor.jsonl"), offset, limit)
    samples, corpus = [], []
    for r in rows:
        units = [KnowledgeUnit(id=_unit_id("hotpot", p["title"], p["text"]), text=p["text"].strip(),
                               title=p["title"]) for p in r["paragraphs"]]
        gold = tuple(u.id for u, p in zip(units, r["paragraphs"], strict=True) if p.get("is_supporting"))
        corpus.extend(units)
        samples.append(Sample(id=r["id"], question=r["question"], answers=(r["answer"],),
                              gold_unit_ids=gold, meta={"type": r.get("type"), "level": r.get("level")}))
    return Task("hotpotqa", samples, _dedupe(corpus))


def load_squad(root: Path, offset: int = 0, limit: int | None = DEFAULT_LIMIT) -> Task:
    raw = _read_json(root / "squad" / "squad_dev_v1.1.json")
    samples, corpus = [], []
    for a, article in enumerate(raw["data"]):
        for p, para in enumerate(article["paragraphs"]):
            uid = f"squad-{a}-{p}"
            corpus.append(KnowledgeUnit(id=uid, text=para["context"],
                                        title=article["title"].replace("_", " ")))
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(x["text"] for x in qa["answers"]))
                samples.append(Sample(id=qa["id"], question=qa["question"], answers=answers,
                                      gold_unit_ids=(uid,)))
    return Task("squad", _slice(samples, offset, limit), corpus)


def load_strategyqa(root: Path, offset: int = 0, limit: int | None = DEFAULT_LIMIT,
                    n_distractors: int | None = None) -> Task:
    rows = _slice(_read_json(root / "strategyqa" / "strategyqa_train.json"), offset, limit)
    samples, corpus = [], []
    for r in rows:
        uid = f"sqa-{r['qid']}"
        corpus.append(KnowledgeUnit(id=uid, text=" ".join(f.strip() for f in r["facts"]),
                                    title=r.get("term", "")))
        samples.append(Sample(id=r["qid"], question=r["question"],
                              answers=("yes" if r["answer"] else "no",), kind="yesno",
                              gold_unit_ids=(uid,)))
    return Task("strategyqa", samples, corpus + wikipedia_pool(root, n_distractors))


def load_cwq(root: Path, offset: int = 0, limit: int | None = DEFAULT_LIMIT) -> Task:
    rows = _slice(_read_json(root / "cwq" / "cwq_dev_first1000_qa_aliases.json"), offset, limit)
    samples = [Sample(id=f"cwq-{r['test_id']}", question=r["question"],
                      answers=tuple(a.strip() for a in r["answer"] if a.strip()) or ("",))
               for r in rows]
    return Task("cwq", samples, wikipedia_pool(root))


def _split_conflict(example: dict[str, Any]) -> tuple[str, str]:
    """BIG-bench input ``"\\nQuestion: q\\nContext: passage"`` -> (question, passage)."""
    text = example["input"]
    head, sep, passage = text.partition("\nContext:")
    if not sep:
        raise ValueError(f"knowledge_conflicts input without a Context: {text[:80]!r}")
    return head.replace("Question:", "", 1).strip(), passage.strip()


def load_knowledge_conflicts(root: Path, offset: int = 0, limit: int | None = DEFAULT_LIMIT,
                             n_locality: int | None = None) -> Task:
    """Efficacy samples (substituted passage injected, gold = substituted answer, ``meta["original"]``
    = the real answer) and ``n_locality`` unrelated questions from the file's end (gold = original
    answer, their passages not injected); ``n_locality`` defaults to ``limit`` (100 with no
    limit)."""
    if n_locality is None:
        n_locality = limit if limit is not None else 100
    examples = _read_json(root / "knowledge_conflicts" / "nq_conflicts_bigbench.json")["examples"]
    n_loc = min(n_locality, max(0, len(examples) - offset - (limit or 0)))
    chosen = _slice(examples[: len(examples) - n_loc], offset, limit)
    samples, corpus = [], []
    for i, ex in enumerate(chosen):
        question, passage = _split_conflict(ex)
        original = [a for a, v in ex["target_scores"].items() if not v]
        uid = f"kc-{offset + i}"
        corpus.append(KnowledgeUnit(id=uid, text=passage))
        samples.append(Sample(id=uid, question=question, answers=(ex["target"],), gold_unit_ids=(uid,),
                              meta={"split": "efficacy", "original": original}))
    for j, ex in enumerate(examples[len(examples) - n_loc:]):
        question, _ = _split_conflict(ex)
        original = [a for a, v in ex["target_scores"].items() if not v] or [ex["target"]]
        samples.append(Sample(id=f"kc-loc-{len(examples) - n_loc + j}", question=question,
                              answers=tuple(original), meta={"split": "locality"}))
    return Task("knowledge_conflicts", samples, corpus)


LOADERS: dict[str, Callable[..., Task]] = {
    "hotpotqa": load_hotpotqa,
    "squad": load_squad,
    "strategyqa": load_strategyqa,
    "cwq": load_cwq,
    "knowledge_conflicts": load_knowledge_conflicts,
}


CORPUS_SCOPES = ("full", "gold")


def load_task(name: str, data: str | Path | None = None, offset: int = 0,
              limit: int | None = DEFAULT_LIMIT, corpus_scope: str = "full",
              **kwargs: Any) -> Task:
    """Load benchmark ``name`` (see the module docstring) from the data directory.

    ``corpus_scope="gold"`` keeps only the units that hold the selected questions' answers (their
    ``gold_unit_ids``): a small corpus without distractors, for cheap dev banks. Say so when
    reporting: routing and retrieval are easier than over the full corpus.
    """
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(LOADERS)}")
    if corpus_scope not in CORPUS_SCOPES:
        raise ValueError(f"corpus_scope must be one of {CORPUS_SCOPES}, got {corpus_scope!r}")
    task = LOADERS[name](data_dir(data), offset=offset, limit=limit, **kwargs)
    if corpus_scope == "gold":
        gold = {u for s in task.samples for u in s.gold_unit_ids}
        task.corpus = [u for u in task.corpus if u.id in gold]
    return task
