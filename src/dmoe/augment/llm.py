"""Augmenters: one small protocol, and the LLM augmenter shared by ``self`` and ``openai``.

Every augmenter answers ``augment(units) -> list[Augmentation]`` (one per unit, same order) and
exposes ``settings``: everything that changes its output (name, model fingerprint or name, prompt
version, decoding parameters), which keys the on-disk cache.

``LLMAugmenter`` turns the paper's two prompts into one paraphrase + three QA pairs per unit through
a ``ChatBackend`` (a batch of user messages in, completions out; ``hf.HFChatBackend`` for the base
model, ``openai_api.OpenAIChatBackend`` for an endpoint). Per unit:

1. rewrite prompt -> paraphrase (cleaned; unusable -> the extractive paraphrase);
2. QA prompt -> parsed leniently (``parse.parse_qa``); with fewer than 3 pairs, one retry for those
   units with the retry variant (an extra instruction, and the answer pre-filled with ``[{"question":
   "`` where the backend allows);
3. still fewer than 3: the pairs found are topped up from the extractive ones
   (source ``"{name}+extractive"``), or replaced by them when there are none (``"{name}->extractive"``).

``meta`` records ``qa_parsed`` (``first``/``retry``/``partial``/``failed``), ``qa_attempts``,
``qa_format`` (``json``, ``text`` for "Question:/Answer:" lines, or empty),
``paraphrase_source`` and the last raw QA output (``qa_raw``, truncated), so a cache file shows
exactly what the model said.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from dmoe.augment.extractive import ExtractiveAugmenter, extractive_paraphrase, extractive_qa
from dmoe.augment.parse import clean_paraphrase, parse_qa_detailed
from dmoe.augment.prompts import PROMPT_VERSION, QA_PREFILL, qa_prompt, rewrite_prompt
from dmoe.augment.types import Augmentation, QAPair
from dmoe.corpus.units import KnowledgeUnit

N_QA = 3
RAW_KEEP_CHARS = 2000
QA_STOP = r"\}\s*\]"  # the end of the QA JSON list


class Augmenter(Protocol):
    """Anything that augments knowledge units (extractive rules, the base model, an endpoint)."""

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable identity of everything that shapes the output (cache key)."""
        ...

    def augment(self, units: Sequence[KnowledgeUnit]) -> list[Augmentation]:
        """One augmentation per unit, in order."""
        ...


class ChatBackend(Protocol):
    """A chat LLM that completes a batch of single-turn user messages."""

    name: str  # source label, e.g. "self" or "openai:gpt-4o-mini"
    can_prefill: bool  # whether ``prefill`` is honoured (the reply is forced to start with it)

    @property
    def settings(self) -> dict[str, Any]: ...

    def generate(self, messages: Sequence[str], *, max_new_tokens: int, prefill: str = "",
                 stop_regex: str = "") -> list[str]:
        """Replies to ``messages`` (including ``prefill`` at their start when honoured); a
        backend may end a reply early once its text matches ``stop_regex`` (or ignore it)."""
        ...


class LLMAugmenter:
    """Paraphrase + QA from a chat LLM, with one retry and an extractive fallback (module doc)."""

    def __init__(self, backend: ChatBackend, *, rewrite_tokens: int = 256, qa_tokens: int = 320,
                 retry: bool = True) -> None:
        if rewrite_tokens < 1 or qa_tokens < 1:
            raise ValueError(f"token budgets must be >= 1, got rewrite_tokens={rewrite_tokens!r}, "
                             f"qa_tokens={qa_tokens!r}")
        self.backend = backend
        self.rewrite_tokens = rewrite_tokens  # max new tokens of the paraphrase
        self.qa_tokens = qa_tokens  # max new tokens of the QA list
        self.retry = retry  # one retry of the QA prompt when parsing finds fewer than 3 pairs

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def settings(self) -> dict[str, Any]:
        return {"augmenter": "llm", **self.backend.settings, "prompt_version": PROMPT_VERSION,
                "rewrite_tokens": self.rewrite_tokens, "qa_tokens": self.qa_tokens,
                "retry": self.retry}

    def augment(self, units: Sequence[KnowledgeUnit]) -> list[Augmentation]:
        if not units:
            return []
        texts = [u.text for u in units]
        rewrites = self.backend.generate([rewrite_prompt(t) for t in texts],
                                         max_new_tokens=self.rewrite_tokens)
        raw = self.backend.generate([qa_prompt(t) for t in texts], max_new_tokens=self.qa_tokens,
                                    stop_regex=QA_STOP)
        parsed = [parse_qa_detailed(r) for r in raw]
        pairs, kinds = [p for p, _ in parsed], [k for _, k in parsed]
        attempts = [1] * len(units)
        todo = [i for i, p in enumerate(pairs) if len(p) < N_QA]
        if self.retry and todo:
            prefill = QA_PREFILL if self.backend.can_prefill else ""
            again = self.backend.generate([qa_prompt(texts[i], retry=True) for i in todo],
                                          max_new_tokens=self.qa_tokens, prefill=prefill,
                                          stop_regex=QA_STOP)
            for i, r in zip(todo, again, strict=True):
                attempts[i] = 2
                retried, kind = parse_qa_detailed(r)
                if len(retried) >= len(pairs[i]):
                    pairs[i], kinds[i], raw[i] = retried, kind, r
        return [self._assemble(u, rw, p, k, r, a) for u, rw, p, k, r, a
                in zip(units, rewrites, pairs, kinds, raw, attempts, strict=True)]

    def _assemble(self, unit: KnowledgeUnit, rewrite: str, pairs: list[QAPair], kind: str,
                  raw: str, attempts: int) -> Augmentation:
        paraphrase = clean_paraphrase(rewrite, unit.text)
        meta = {"paraphrase_source": self.name if paraphrase else "extractive",
                "qa_attempts": str(attempts), "qa_format": kind, "qa_raw": raw[:RAW_KEEP_CHARS]}
        if not paraphrase:
            paraphrase = extractive_paraphrase(unit)
        if len(pairs) >= N_QA:
            meta["qa_parsed"] = "first" if attempts == 1 else "retry"
            source = self.name
        elif pairs:
            meta["qa_parsed"] = "partial"
            source = f"{self.name}+extractive"
            asked = {p.question.lower() for p in pairs}
            extra = [p for p in extractive_qa(unit) if p.question.lower() not in asked]
            pairs = (pairs + extra + extractive_qa(unit))[:N_QA]
        else:
            meta["qa_parsed"] = "failed"
            source = f"{self.name}->extractive"
            pairs = extractive_qa(unit)
        return Augmentation(paraphrase=paraphrase, qa=tuple(pairs[:N_QA]), source=source,
                            meta=meta)


def make_augmenter(name: str, *, loaded: Any = None, batch_size: int = 8,
                   **llm_kwargs: Any) -> Augmenter:
    """An augmenter by name: ``self`` (needs ``loaded``, a ``LoadedModel``), ``openai`` (endpoint
    from the environment, see ``openai_api``), ``spans`` (rule-picked answers, questions written by
    the loaded model, see ``spans``), ``extractive`` / ``none`` (no LLM)."""
    if name in ("none", "extractive"):
        return ExtractiveAugmenter()
    if name == "self":
        if loaded is None:
            raise ValueError("augmenter 'self' needs the loaded base model (loaded=LoadedModel)")
        from dmoe.augment.hf import HFChatBackend

        return LLMAugmenter(HFChatBackend.from_loaded(loaded, batch_size=batch_size),
                            **llm_kwargs)
    if name == "spans":
        if loaded is None:
            raise ValueError("augmenter 'spans' needs the loaded base model (loaded=LoadedModel)")
        from dmoe.augment.spans import SpanQuestionAugmenter

        return SpanQuestionAugmenter(loaded.model, loaded.tokenizer, batch_size=batch_size,
                                     model_id=f"{loaded.source.name}:{loaded.fingerprint}")
    if name == "openai":
        from dmoe.augment.openai_api import OpenAIChatBackend

        return LLMAugmenter(OpenAIChatBackend.from_env(max_workers=batch_size), **llm_kwargs)
    raise ValueError(f"unknown augmenter {name!r}; choose one of self, spans, openai, extractive, none")
