"""The playground page: static HTML, CSS and JavaScript shipped in the package (``playground/``).

No build step, no CDN: the files are served as they are, with a Content-Security-Policy that
allows nothing from elsewhere. The page holds no data and needs no key; it calls the same API as
any client, with the keys typed into it.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from dmoe.server.schemas import DmoeOptions
from dmoe.server.service import ApiError

ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new dmoe version serves its own page at once
}

page = APIRouter(include_in_schema=False)


def asset(name: str) -> bytes:
    return resources.files("dmoe.server").joinpath("playground", name).read_bytes()


@page.get("/")
def index() -> Response:
    return Response(asset("index.html"), media_type=ASSETS["index.html"], headers=HEADERS)


@page.get("/playground")
def playground() -> RedirectResponse:
    return RedirectResponse("/")


@page.get("/playground/config.json")
def config(request: Request) -> dict[str, Any]:
    """The knobs' defaults and the token limits (no key: nothing here is private)."""
    limits = request.app.state.dmoe.config
    knobs = DmoeOptions.model_validate({})
    return {"tau": knobs.tau, "top_k": knobs.top_k, "min_relevance": knobs.min_relevance,
            "max_tokens": limits.default_max_tokens, "max_tokens_limit": limits.max_tokens_limit}


@page.get("/playground/{name}")
def static(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"no playground file {name!r}", "name", code="not_found")
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)
