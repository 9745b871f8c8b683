"""The FastAPI application: lifespan (load once), error envelopes, request metrics, routes.

``create_app(state)`` serves an already built ``ServerState`` (tests, embedding);
``create_app(load=fn)`` calls ``fn()`` once at startup, in a worker thread, to build it (the CLI).
Every error leaves as OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``:
a bad body is a 400 naming the field, an oversize body 413, a full queue 503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dmoe import __version__
from dmoe.errors import BankLockedError, DmoeError, redact
from dmoe.server.page import page
from dmoe.server.routes import admin, user
from dmoe.server.schemas import error_payload
from dmoe.server.service import ApiError
from dmoe.server.state import ServerBusy, ServerState

log = logging.getLogger("dmoe.server")


def create_app(state: ServerState | None = None, *,
               load: Callable[[], ServerState] | None = None) -> FastAPI:
    """The app serving ``state``, or the one ``load()`` returns at startup (closed at shutdown)."""
    if (state is None) == (load is None):
        raise ValueError("give exactly one of state= or load=")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = state if state is not None else await anyio.to_thread.run_sync(load)  # type: ignore[arg-type]
        app.state.dmoe = st
        st.start()
        try:
            yield
        finally:
            if state is None:  # we built it, we close it
                await anyio.to_thread.run_sync(st.close)
            else:
                await anyio.to_thread.run_sync(st.stop)

    # The schema is served by the routes, behind the API key; no /docs (its assets need a CDN).
    app = FastAPI(title="dmoe", version=__version__, lifespan=lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None,
                  description="Decoupled final-layer LoRA experts behind an OpenAI-compatible API.")
    if state is not None:
        app.state.dmoe = state
    app.include_router(page)
    app.include_router(user)
    app.include_router(admin)
    _install_error_handlers(app)
    app.add_middleware(ObserveMiddleware)
    return app


def _clean(text: str | None) -> str | None:
    """Valid UTF-8, no server paths: what any error text must be before it leaves."""
    if text is None:
        return None
    return redact(text.encode("utf-8", errors="replace").decode("utf-8"))


def _error(status: int, message: str, type_: str, param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(_clean(message) or "", type_, _clean(param), code),
                        status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        first = e.errors()[0].get("loc", ()) if e.errors() else ()
        param = ".".join(str(x) for x in first[1:]) or None
        return _error(400, "invalid request: " + "; ".join(problems), "invalid_request_error",
                      param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None))

    @app.exception_handler(ServerBusy)
    async def busy(request: Request, e: ServerBusy) -> JSONResponse:
        return _error(503, str(e), "server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(DmoeError)
    async def dmoe_error(request: Request, e: DmoeError) -> JSONResponse:
        log.error("%s: %s", type(e).__name__, e)
        if isinstance(e, BankLockedError):
            return _error(503, str(e), "server_busy", headers={"Retry-After": "5"})
        return _error(500, f"{type(e).__name__}: {e}", "server_error")

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); see the server log",
                      "server_error")


class ObserveMiddleware:
    """Counts requests and their latency to the last byte (streams included) by route template,
    and refuses bodies larger than ``max_body_bytes`` (413): by Content-Length before reading
    them, else (chunked uploads) as soon as the bytes read pass the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: ServerState = scope["app"].state.dmoe
        t0 = time.perf_counter()
        status = [500]
        recorded = [False]

        def record() -> None:
            if not recorded[0]:
                recorded[0] = True
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                state.metrics.observe_request(route, scope["method"], status[0],
                                              time.perf_counter() - t0)

        limit = state.config.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            status[0] = 413
            response = _error(413, f"request body is {length} bytes; the limit is {limit}",
                              "invalid_request_error")
            await response(scope, receive, send)
            record()
            return
        received = [0]

        async def limited_receive() -> Message:  # chunked bodies carry no Content-Length
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise StarletteHTTPException(413, f"request body exceeds the limit of "
                                                      f"{limit} bytes")
            return message

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            record()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

