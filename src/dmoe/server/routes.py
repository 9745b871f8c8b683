"""HTTP endpoints: authentication, then a call into ``dmoe.server.service`` or the knowledge base.

==========================  ======  ============================================================
endpoint                    key     what
==========================  ======  ============================================================
GET  /                      none    the playground page (static; it calls the API with the
                                    keys typed into it)
GET  /health                user    liveness + model and bank size
GET  /metrics               user    Prometheus text
GET  /v1/models             user    the one served model (OpenAI shape)
GET  /openapi.json          user    the OpenAPI schema of all of this
POST /v1/chat/completions   user    OpenAI chat completion, ``stream`` for SSE; + ``attribution``
POST /v1/completions        user    OpenAI text completion, ``stream`` for SSE; + ``attribution``
GET  /v1/experts            user    the bank's experts
GET  /v1/experts/{id}       user    one expert (404 if unknown)
DELETE /v1/experts/{id}     admin   remove an expert (index first, then bank)
DELETE /v1/documents/{id}   admin   remove every expert of a document (one transaction)
POST /v1/knowledge          admin   documents -> a background build job (202 + job)
GET  /v1/jobs/{id}          admin   a job's status and progress
==========================  ======  ============================================================

Keys arrive as ``Authorization: Bearer KEY`` (what OpenAI clients send) or ``X-API-Key``. With no
``api_key`` configured, "user" endpoints are open; with no ``admin_key``, "admin" endpoints take the
user key (or are open when there is none).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from dmoe.engine.decode import Generation
from dmoe.errors import BankError
from dmoe.server import service
from dmoe.server.schemas import (
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ExpertList,
    ExpertOut,
    JobOut,
    KnowledgeRequest,
    ModelList,
    ModelOut,
    error_payload,
)
from dmoe.server.service import ApiError
from dmoe.server.state import ServerState

MAX_PAGE = 10_000  # experts per page of GET /v1/experts?limit=


def get_state(request: Request) -> ServerState:
    return request.app.state.dmoe  # type: ignore[no-any-return]


# -- authentication --------------------------------------------------------------------------------

def _given_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _matches(given: str | None, expected: str | None) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(
        given.encode(), expected.encode())


def _unauthorized() -> ApiError:
    return ApiError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                    type_="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def require_user(request: Request) -> None:
    cfg = get_state(request).config
    key = _given_key(request)
    if cfg.api_key is None or _matches(key, cfg.api_key) or _matches(key, cfg.admin_key):
        return
    raise _unauthorized()


def require_admin(request: Request) -> None:
    cfg = get_state(request).config
    if cfg.admin_key is None:
        return require_user(request)
    key = _given_key(request)
    if _matches(key, cfg.admin_key):
        return None
    if _matches(key, cfg.api_key):
        raise ApiError(403, "this endpoint needs the admin key", type_="permission_error",
                       code="admin_key_required")
    raise _unauthorized()


user = APIRouter(dependencies=[Depends(require_user)])
admin = APIRouter(dependencies=[Depends(require_admin)])


# -- service endpoints -----------------------------------------------------------------------------

@user.get("/health")
def health(request: Request) -> dict[str, Any]:
    """``status`` is ``degraded`` while some routed expert could not be loaded (``unusable`` names
    them; ``dmoe bank check --repair`` quarantines them and the next build retrains them)."""
    state = get_state(request)
    unusable = sorted(state.kb.unusable)
    return {"status": "degraded" if unusable else "ok", "model": state.model_name,
            "fingerprint": state.lm.fingerprint, "weights": state.lm.weights,
            "experts": len(state.kb),
            "bank": {"status": "degraded" if unusable else "ok", "unusable": unusable[:50],
                     "dropped": state.kb.dropped},
            "jobs": state.jobs.counts()}


@user.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    state = get_state(request)
    return PlainTextResponse(state.metrics.render(state.scraped_metrics()),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@user.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()  # type: ignore[no-any-return]


@user.get("/v1/models", response_model=ModelList)
def models(request: Request) -> ModelList:
    return ModelList(data=[ModelOut(id=get_state(request).model_name)])


# -- completions -----------------------------------------------------------------------------------

async def _answer(request: Request, body: Any, prepare: Any, chunks: Any, build: Any) -> Any:
    """One completion request, chat or text: ``prepare`` the prompt, then stream ``chunks`` or
    generate once and ``build`` the response."""
    state = get_state(request)
    model = body.model or state.model_name
    state.admit()  # counted before tokenizing: a flood of prompts waits in line, not in RAM
    streaming = False
    try:
        prepared = await anyio.to_thread.run_sync(prepare, state, body)
        if body.stream:
            response = _sse(state, prepared, chunks(state, prepared, body, model))
            streaming = True  # the stream's thread releases the admission
            return response
        gen = await anyio.to_thread.run_sync(service.generate, state, prepared)
    finally:
        if not streaming:
            state.release()
    return build(state, prepared, gen, model)


@user.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await _answer(request, body, service.prepare_chat, _chat_chunks,
                         service.chat_completion)


@user.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await _answer(request, body, service.prepare_completion, _text_chunks,
                         service.completion)


def _sse(state: ServerState, prepared: service.Prepared, chunks: Any) -> StreamingResponse:
    """Start the (admitted) generation and stream ``chunks(stream)`` as server-sent events."""
    stream = service.TokenStream(state, prepared)

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks(stream):
                yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield f"data: {_json(error_payload(e.message, e.type, e.param, e.code))}\n\n"
        except service.GenerationCancelled:
            return
        except Exception as e:  # the stream has started: report in-band, as OpenAI does
            yield f"data: {_json(error_payload(f'{type(e).__name__}: {e}', 'server_error'))}\n\n"
        finally:
            stream.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _chat_chunks(state: ServerState, p: service.Prepared, body: ChatCompletionRequest,
                 model: str) -> Any:
    def chunk(delta: ChatDelta, **extra: Any) -> ChatCompletionChunk:
        choices = [] if extra.pop("no_choices", False) else [
            ChatChunkChoice(delta=delta, finish_reason=extra.pop("finish_reason", None))]
        return ChatCompletionChunk(id=p.request_id, created=p.created, model=model,
                                   choices=choices, **extra)

    async def chunks(stream: service.TokenStream) -> AsyncIterator[BaseModel]:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for piece in stream.deltas():
            if isinstance(piece, Generation):
                yield chunk(ChatDelta(), finish_reason=service.finish_reason(piece),
                            attribution=service.attribution(state, piece))
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk(ChatDelta(), no_choices=True, usage=service.usage(p, piece))
            else:
                yield chunk(ChatDelta(content=piece))

    return chunks


def _text_chunks(state: ServerState, p: service.Prepared, body: CompletionRequest,
                 model: str) -> Any:
    def chunk(text: str, finish: str | None = None, **extra: Any) -> Completion:
        choices = [CompletionChoice(text=text, finish_reason=finish)]  # type: ignore[arg-type]
        return Completion(id=p.request_id, created=p.created, model=model,
                          choices=[] if extra.pop("no_choices", False) else choices, **extra)

    async def chunks(stream: service.TokenStream) -> AsyncIterator[BaseModel]:
        async for piece in stream.deltas():
            if isinstance(piece, Generation):
                yield chunk("", service.finish_reason(piece),
                            attribution=service.attribution(state, piece))
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk("", no_choices=True, usage=service.usage(p, piece))
            else:
                yield chunk(piece)

    return chunks


# -- knowledge -------------------------------------------------------------------------------------

def _expert_out(info: Any, text: str | None = None) -> ExpertOut:
    return ExpertOut(id=info.id, unit_id=info.unit_id, title=info.title, bytes=info.bytes,
                     dtype=info.dtype, created=info.created, updated=info.updated, text=text)


@user.get("/v1/experts", response_model=ExpertList, response_model_exclude_none=True)
def list_experts(request: Request, limit: int | None = Query(None, ge=1, le=MAX_PAGE),
                 after: str | None = None) -> ExpertList:
    """Experts in id order: all of them, or with ``limit`` one page after id ``after``
    (``has_more`` says whether to ask again with ``after`` = the last id)."""
    kb = get_state(request).kb
    if limit is None:
        return ExpertList(data=[_expert_out(i) for i in kb.list(after)])
    infos = kb.list(after, limit + 1)
    return ExpertList(data=[_expert_out(i) for i in infos[:limit]], has_more=len(infos) > limit)


@user.get("/v1/experts/{expert_id:path}", response_model=ExpertOut,
          response_model_exclude_none=True)
def get_expert(expert_id: str, request: Request) -> ExpertOut:
    """One expert, with ``text``: what the router indexes it under (its passage and more)."""
    kb = get_state(request).kb
    try:
        return _expert_out(kb.info(expert_id), kb.surrogate(expert_id))
    except (BankError, KeyError) as e:  # KeyError: deleted between the two reads
        raise ApiError(404, str(e), "expert_id", code="expert_not_found") from e


@admin.delete("/v1/experts/{expert_id:path}")
def delete_expert(expert_id: str, request: Request) -> dict[str, Any]:
    """Waits for the running generation or build (``model_lock``), so none sees it half-gone."""
    state = get_state(request)
    with state.model_lock:
        try:
            state.kb.delete(expert_id)
        except BankError as e:
            raise ApiError(404, str(e), "expert_id", code="expert_not_found") from e
    return {"id": expert_id, "object": "expert", "deleted": True}


@admin.delete("/v1/documents/{doc_id:path}")
def delete_document(doc_id: str, request: Request) -> dict[str, Any]:
    """Every passage of the document goes, in one transaction (after the running generation)."""
    state = get_state(request)
    with state.model_lock:
        try:
            change = state.kb.delete_document(doc_id)
        except BankError as e:
            raise ApiError(404, str(e), "doc_id", code="document_not_found") from e
    return {"id": doc_id, "object": "document", "deleted": True, "experts": change.removed}


@admin.post("/v1/knowledge", status_code=202, response_model=JobOut)
def add_knowledge(body: KnowledgeRequest, request: Request) -> JobOut:
    job = get_state(request).jobs.submit([d.model_dump() for d in body.documents])
    return JobOut(**job.to_dict())


@admin.get("/v1/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request) -> JobOut:
    job = get_state(request).jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", "job_id", code="job_not_found")
    return JobOut(**job.to_dict())
