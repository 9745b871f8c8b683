"""The server's glue to the library: validated requests in, engine calls, response bodies out.

``prepare_*`` renders and tokenizes a request and checks the limits that depend on the model;
``submit`` hands it to the server's running batch (``dmoe.server.scheduler``); ``generate`` waits
for the result; ``TokenStream`` hands its text to the event loop piece by piece (SSE) as the batch
commits tokens. Routes call these and nothing deeper.

This module knows nothing about HTTP routing, authentication or the wire format of SSE.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from dmoe.engine.attribution import spans, token_texts
from dmoe.engine.batch import Request
from dmoe.engine.decode import DecodeConfig, Generation, TokenRecord, stop_index
from dmoe.engine.triggers import make_trigger
from dmoe.prompts import encode_text, format_chat
from dmoe.routing.base import Router
from dmoe.routing.simple import RandomRouter
from dmoe.server.scheduler import GenerationCancelled, Ticket
from dmoe.server.schemas import (
    Attribution,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DmoeOptions,
    SpanOut,
    TokenOut,
    Usage,
)
from dmoe.server.state import ServerState


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.code = code
        self.headers = headers


@dataclass(frozen=True)
class Prepared:
    """A request turned into engine inputs (validated against the model's limits)."""

    request_id: str
    created: int
    input_ids: list[int]
    task_input: str
    decode: DecodeConfig
    options: DmoeOptions


# -- preparing requests ----------------------------------------------------------------------------

def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> Prepared:
    """Chat messages -> prompt through the chat template; the router's task input is the last
    user message (or ``task_input``)."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise ApiError(400, "messages must include at least one user message", "messages")
    text = format_chat(state.lm.tokenizer, messages)
    task_input = req.task_input if req.task_input is not None else users[-1]
    return _prepare(state, "chatcmpl-", text, task_input, req, req.requested_max_tokens(),
                    "messages")


def prepare_completion(state: ServerState, req: CompletionRequest) -> Prepared:
    """A raw prompt, tokenized as given; the router's task input is the prompt (or ``task_input``)."""
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    task_input = req.task_input if req.task_input is not None else prompt
    return _prepare(state, "cmpl-", prompt, task_input, req, req.requested_max_tokens(), "prompt")


def _prepare(state: ServerState, id_prefix: str, text: str, task_input: str,
             req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
             prompt_param: str) -> Prepared:
    cfg = state.config
    char_limit = state.max_prompt_chars
    if char_limit is not None and len(text) > char_limit:  # cannot fit: refuse before tokenizing
        raise ApiError(400, f"the prompt is {len(text)} characters; no prompt over {char_limit} "
                            f"characters fits this server's limit of {state.max_prompt_tokens} "
                            f"tokens", prompt_param, code="context_length_exceeded")
    ids = encode_text(state.lm.tokenizer, text)
    if not text or not ids:
        raise ApiError(400, "the prompt is empty", prompt_param)
    limit = state.max_prompt_tokens
    if limit is not None and len(ids) > limit:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {limit}",
                       prompt_param, code="context_length_exceeded")
    n = max_tokens if max_tokens is not None else cfg.default_max_tokens
    if not 1 <= n <= cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be between 1 and {cfg.max_tokens_limit}, got {n}",
                       "max_tokens")
    ctx = state.context_length
    if ctx is not None and len(ids) + n > ctx:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({n}) exceeds the model's "
                            f"context length ({ctx})", "max_tokens", code="context_length_exceeded")
    if req.experts and req.method == "base":
        raise ApiError(400, "experts can only be pinned with method 'dmoe'", "experts")
    check_experts(state, req.experts)
    options = DmoeOptions.model_validate(req.model_dump(include=set(DmoeOptions.model_fields)))
    decode = DecodeConfig(max_new_tokens=n, top_k=req.top_k, stop_strings=req.stop_strings(),
                          min_score=req.min_score, min_relevance=req.min_relevance,
                          route_at_start=req.route_at_start, composition=req.composition,
                          composition_scale=req.composition_scale,
                          no_repeat_ngram=req.no_repeat_ngram)
    return Prepared(request_id=id_prefix + uuid.uuid4().hex[:24], created=int(time.time()),
                    input_ids=ids, task_input=task_input, decode=decode, options=options)


def check_experts(state: ServerState, expert_ids: list[str]) -> None:
    unknown = [e for e in expert_ids if not state.kb.bank.exists(e)]
    if unknown:
        raise ApiError(400, f"unknown expert id(s): {', '.join(map(repr, unknown))}", "experts",
                       code="expert_not_found")


# -- running generations ---------------------------------------------------------------------------

def _router(state: ServerState, opts: DmoeOptions) -> Router | None:
    if opts.method == "base":
        return None
    if opts.router == "random":
        ids = state.kb.bank.ids()
        return RandomRouter(ids, seed=opts.seed or 0) if ids else None
    return state.bm25


def submit(state: ServerState, p: Prepared, on_token: Callable[[TokenRecord], None] | None = None,
           on_done: Callable[[Ticket], None] | None = None) -> Ticket:
    """Queue one generation in the running batch; ``on_done(ticket)`` follows its end (metrics
    are recorded first)."""
    opts = p.options
    router = _router(state, opts)
    request = Request(torch.tensor([p.input_ids]), p.task_input, p.decode,
                      initial_experts=opts.experts, routing=router is not None, router=router,
                      trigger=make_trigger(opts.trigger, opts.tau, opts.trigger_rate, opts.seed or 0),
                      on_token=on_token)
    t0 = time.perf_counter()

    def done(ticket: Ticket) -> None:
        seconds = time.perf_counter() - t0
        gen = ticket.result
        if gen is not None:
            state.metrics.observe_generation(len(p.input_ids), len(gen.token_ids),
                                             gen.n_triggers, gen.finish_reason, seconds)
        elif isinstance(ticket.error, GenerationCancelled):
            state.metrics.observe_generation(len(p.input_ids), 0, 0, "cancelled", seconds)
        if on_done is not None:
            on_done(ticket)

    # a pinned expert may have been deleted while the request waited
    return state.scheduler.submit(request, lambda: check_experts(state, opts.experts), done)


def generate(state: ServerState, p: Prepared) -> Generation:
    """Run one generation in the batch and wait for it (blocking: call from a worker thread)."""
    return submit(state, p).wait()


class TextDeltas:
    """Incremental detokenisation for streaming: never emits half a character, nor text that may
    turn out to be (the start of) a stop string; ``finish`` emits the rest of the final text."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        safe = len(text.rstrip("\ufffd")) - self.holdback
        cut = stop_index(text, self.stops)
        if cut is not None:
            safe = min(safe, cut)
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):safe]
        self.sent += delta
        return delta

    def finish(self, final_text: str) -> str:
        if not final_text.startswith(self.sent):  # a tokenizer that rewrites earlier text
            return ""
        delta = final_text[len(self.sent):]
        self.sent = final_text
        return delta


class TokenStream:
    """One generation in the running batch; ``deltas()`` yields its text pieces, then the
    ``Generation``. The caller must have admitted it (``state.admit()``); its end releases it."""

    def __init__(self, state: ServerState, prepared: Prepared) -> None:
        self.state = state
        self.prepared = prepared
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.ticket = submit(state, prepared, self._on_token, self._on_done)

    def _put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.ticket.cancel()

    def _on_token(self, record: TokenRecord) -> None:
        self._put("token", record.token_id)

    def _on_done(self, ticket: Ticket) -> None:
        try:
            if ticket.error is not None:
                self._put("error", ticket.error)  # handed to the event loop, re-raised there
            else:
                self._put("done", ticket.result)
        finally:
            self.state.release()

    def cancel(self) -> None:
        """Free the generation's row before the next step (the client went away)."""
        self.ticket.cancel()

    async def deltas(self) -> AsyncIterator[str | Generation]:
        text = TextDeltas(self.state.lm.tokenizer, self.prepared.decode.stop_strings)
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "token":
                    delta = text.push(value)
                    if delta:
                        yield delta
                elif kind == "error":
                    raise value
                else:
                    rest = text.finish(value.text)
                    if rest:
                        yield rest
                    yield value
                    return
        finally:
            self.cancel()


# -- response bodies -------------------------------------------------------------------------------

def finish_reason(gen: Generation) -> str:
    return "length" if gen.finish_reason == "length" else "stop"


def usage(p: Prepared, gen: Generation) -> Usage:
    n = len(gen.token_ids)
    return Usage(prompt_tokens=len(p.input_ids), completion_tokens=n,
                 total_tokens=len(p.input_ids) + n)


def attribution(state: ServerState, gen: Generation) -> Attribution:
    out = [SpanOut(start=s.start, end=s.end, text=s.text, experts=list(s.experts),
                   triggered=s.triggered) for s in spans(gen, state.lm.tokenizer)]
    titles: dict[str, str] = {}
    for span in out:
        for expert_id in span.experts:
            if expert_id not in titles:
                try:
                    titles[expert_id] = state.kb.bank.info(expert_id).title
                except KeyError:  # deleted since
                    titles[expert_id] = ""
    tokens = [TokenOut(text=t, entropy=round(r.entropy, 4)) for t, r in
              zip(token_texts(gen.token_ids, state.lm.tokenizer), gen.records, strict=True)]
    return Attribution(spans=out, tokens=tokens, triggers=gen.n_triggers, experts=titles)


def chat_completion(state: ServerState, p: Prepared, gen: Generation, model: str) -> ChatCompletion:
    choice = ChatChoice(message=ChatMessageOut(content=gen.text),
                        finish_reason=finish_reason(gen))  # type: ignore[arg-type]
    return ChatCompletion(id=p.request_id, created=p.created, model=model, choices=[choice],
                          usage=usage(p, gen), attribution=attribution(state, gen))


def completion(state: ServerState, p: Prepared, gen: Generation, model: str) -> Completion:
    choice = CompletionChoice(text=gen.text, finish_reason=finish_reason(gen))  # type: ignore[arg-type]
    return Completion(id=p.request_id, created=p.created, model=model, choices=[choice],
                      usage=usage(p, gen), attribution=attribution(state, gen))
