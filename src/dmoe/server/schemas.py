"""Request and response bodies of the server (pydantic), OpenAI-compatible where a client expects it.

Requests forbid unknown fields, so a typo in one of dmoe's knobs is a 400 naming it rather than a
silently ignored setting; types are strict (``"4"`` or ``true`` is not a ``max_tokens``); every
string must be valid Unicode (a lone surrogate such as ``"\ud800"`` is a 400, before anything
else looks at it); every text field and list has a size limit, so no request makes the server
tokenize or store more than a bounded amount. The OpenAI fields dmoe cannot honour are accepted only at values that mean
"off" (``n=1``, ``logprobs`` unset, ``echo`` false …); decoding is greedy, so ``temperature`` and
``top_p`` are accepted and ignored. Limits that depend on the loaded model (prompt length,
``max_tokens`` cap, prompt characters per the tokenizer's longest token) are checked by
``dmoe.server.service`` before tokenizing, not here.

This module knows nothing about the engine, the knowledge base or HTTP routing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmoe.engine.decode import DecodeConfig as _D
from dmoe.engine.triggers import DEFAULT_TAU
from dmoe.experts.lora import Composition

TRIGGERS = ("entropy", "always", "never", "random")
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 64
MAX_PINNED_EXPERTS = 16
MAX_DOC_CHARS = 200_000  # the corpus reader's default max_chars
MAX_ID_CHARS = 200
MAX_TEXT_CHARS = 256_000  # one message, part or prompt (the model's context bounds it further)
MAX_QUERY_CHARS = 16_384  # task_input: the router keeps at most this much of a query
MAX_NAME_CHARS = 256  # model, user, name
MAX_MESSAGES = 256
MAX_PARTS = 64
MAX_DOCUMENTS = 256  # per knowledge request
MAX_KNOWLEDGE_CHARS = 4_000_000  # all documents of one knowledge request together


def _unicode_problem(value: Any, where: str = "body", depth: int = 0) -> str | None:
    """Where ``value`` (parsed JSON) holds a string that is not valid Unicode, if anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif depth < 32 and isinstance(value, dict):
        for k, v in value.items():
            bad = _unicode_problem(k, f"{where} (a key)") or _unicode_problem(
                v, f"{where}.{k}" if isinstance(k, str) and _unicode_problem(k) is None else where,
                depth + 1)
            if bad:
                return bad
    elif depth < 32 and isinstance(value, list):
        for i, v in enumerate(value):
            bad = _unicode_problem(v, f"{where}.{i}", depth + 1)
            if bad:
                return bad
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        bad = _unicode_problem(data)
        if bad:
            raise ValueError(f"{bad} is not valid Unicode (it holds a lone UTF-16 surrogate)")
        return data


# -- dmoe's knobs (extra body fields of both completion endpoints) ----------------------------------

class DmoeOptions(_Strict):
    """How experts are routed for one request (the extra body fields)."""

    method: Literal["dmoe", "base"] = "dmoe"  # "base": the frozen model, no experts
    trigger: Literal["entropy", "always", "never", "random"] = "entropy"  # when to re-route
    tau: float = Field(DEFAULT_TAU, ge=0.0, le=100.0)  # entropy threshold (nats), trigger="entropy"
    trigger_rate: float = Field(0.1, ge=0.0, le=1.0)  # probability per step for trigger="random"
    top_k: int = Field(_D.top_k, ge=1, le=16)  # experts per route (decoding is greedy, not top-k)
    route_at_start: bool = _D.route_at_start  # also route on the task input before the 1st token
    composition: Composition = _D.composition  # "cat": the exact sum | "softmax": λ-scaled mix
    composition_scale: float = Field(_D.composition_scale, gt=0.0, le=10.0)  # λ of "softmax"
    no_repeat_ngram: int = Field(_D.no_repeat_ngram, ge=0, le=16)  # 0 = plain greedy
    min_relevance: float = Field(_D.min_relevance, ge=0.0, le=1.0)  # gate: score / query max
    min_score: float = Field(0.0, ge=0.0)  # gate on the raw BM25 score (no hit left: base model)
    router: Literal["bm25", "random"] = "bm25"  # how experts are ranked on a trigger
    seed: int | None = None  # seeds trigger="random" and router="random"
    experts: list[Annotated[str, Field(max_length=MAX_ID_CHARS)]] = Field(
        default_factory=list, max_length=MAX_PINNED_EXPERTS)  # initial set
    task_input: str | None = Field(None, max_length=MAX_QUERY_CHARS)  # router query seed
    # (default: the last user message / the prompt)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(DmoeOptions):
    """Fields shared by chat and text completions."""

    model: str = Field("", max_length=MAX_NAME_CHARS)  # echoed back; one model is served
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # accepted, ignored (greedy)
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # accepted, ignored (greedy)
    n: int = Field(1, ge=1, le=1)  # one choice per request
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # accepted, ignored
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # accepted, ignored
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must have 1..{MAX_STOP_CHARS} characters")
        return stops

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: (Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
              | Annotated[list[TextPart], Field(max_length=MAX_PARTS)] | None) = None
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients' name for max_tokens
    logprobs: Literal[False] | None = None  # not supported

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: (Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
             | Annotated[list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]],
                         Field(max_length=MAX_PARTS)])
    echo: Literal[False] = False  # not supported
    logprobs: Literal[0] | None = None  # not supported
    suffix: None = None  # not supported
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(f"exactly one prompt per request, got {len(v)}")
            return v[0]
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# -- knowledge management ------------------------------------------------------------------------

class Document(_Strict):
    """One document to turn into experts (split into passage units like ``dmoe build`` does)."""

    id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)  # default: hash of text
    title: str = Field("", max_length=1000)  # the reader keeps titles to one line
    text: str = Field(min_length=1, max_length=MAX_DOC_CHARS)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank")
        return v

    @field_validator("id")
    @classmethod
    def _clean_id(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or any(ord(c) < 32 for c in v)):
            raise ValueError("id must not have surrounding spaces or control characters")
        return v


class KnowledgeRequest(_Strict):
    documents: list[Document] = Field(min_length=1, max_length=MAX_DOCUMENTS)

    @field_validator("documents")
    @classmethod
    def _unique_ids(cls, v: list[Document]) -> list[Document]:
        total = sum(len(d.text) + len(d.title) for d in v)
        if total > MAX_KNOWLEDGE_CHARS:
            raise ValueError(f"the documents hold {total} characters; one request may carry at "
                             f"most {MAX_KNOWLEDGE_CHARS} (split it into several)")
        ids = [d.id for d in v if d.id is not None]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate document ids: {', '.join(dupes[:5])}")
        return v


# -- responses -----------------------------------------------------------------------------------

class SpanOut(BaseModel):
    """Tokens ``[start, end)`` of the answer and the experts active while they were generated."""

    start: int
    end: int
    text: str
    experts: list[str]
    triggered: bool


class TokenOut(BaseModel):
    """One generated token: the text it added and the entropy (nats) the trigger policy saw."""

    text: str
    entropy: float


class Attribution(BaseModel):
    """The extra ``attribution`` field of every completion (the last chunk's, when streaming)."""

    spans: list[SpanOut]
    tokens: list[TokenOut]  # one per generated token; ``spans`` index into it
    triggers: int  # positions that re-routed
    experts: dict[str, str]  # every expert named in ``spans`` -> its title ("" once deleted)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    attribution: Attribution


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    attribution: Attribution | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A text completion, or (``object="text_completion"`` as OpenAI streams it) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    attribution: Attribution | None = None


class ExpertOut(BaseModel):
    id: str
    unit_id: str
    title: str
    bytes: int
    dtype: str
    created: str
    updated: str
    text: str | None = None  # what the router indexes: title, passage, paraphrase, QA pairs
    # (``GET /v1/experts/{id}`` only)


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertOut]
    has_more: bool | None = None  # set when a page was asked for (``limit``)


class JobOut(BaseModel):
    """A background build: ``queued`` -> ``running`` -> ``succeeded`` | ``failed``."""

    id: str
    object: Literal["knowledge.job"] = "knowledge.job"
    status: Literal["queued", "running", "succeeded", "failed"]
    documents: int
    stage: str  # waiting | augment | train | done
    done: int  # units augmented / experts stored in the current stage
    total: int
    created: float
    started: float | None = None
    finished: float | None = None
    expert_ids: list[str] = Field(default_factory=list)  # filled when the job succeeds
    summary: dict[str, Any] | None = None  # ``BuildSummary.to_dict()``
    error: str | None = None


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


def error_payload(message: str, type_: str, param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": ErrorBody(message=message, type=type_, param=param, code=code).model_dump()}
