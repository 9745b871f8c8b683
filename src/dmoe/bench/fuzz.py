"""Request fuzzing of ``dmoe serve`` from its own OpenAPI schema: zero 5xx allowed.

Bodies are drawn from the request schemas the app publishes (``from_schema``: a small JSON Schema
-> hypothesis strategy translation covering what pydantic emits: types, ``anyOf``, ``enum`` /
``const``, bounds, lengths, required and optional properties), mixed with hostile variants: a valid body with one field replaced by arbitrary JSON (lone surrogates
included), arbitrary JSON documents, and raw bytes that are not JSON at all. Path parameters are
arbitrary text. The server is a real uvicorn on 127.0.0.1 (loopback only) over a tiny random
model, with small generation limits so a valid request costs milliseconds. Runs are derandomized
(the same cases every time) and bounded in count and time.

Needs ``hypothesis`` (the ``dev`` extra); the import fails without it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=()), max_size=40)  # surrogates too
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12)


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values valid (mostly) under a JSON schema with its references inlined."""
    if depth > 8:
        return st.none()
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, depth + 1) for s in schema[key]])
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return from_schema(schema["allOf"][0], depth + 1)
    kind = schema.get("type")
    if kind == "string":
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 60), 60)
        return st.text(min_size=lo, max_size=max(lo, hi))
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        if kind == "integer":
            return st.integers(min_value=lo if lo is None else int(lo),
                               max_value=hi if hi is None else int(hi))
        return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        lo = schema.get("minItems", 0)
        hi = max(lo, min(schema.get("maxItems", 4), 4))
        return st.lists(from_schema(schema.get("items", {}), depth + 1), min_size=lo, max_size=hi)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fields = {k: from_schema(v, depth + 1) for k, v in props.items()}
        optional = sorted(k for k in props if k not in required)
        return st.builds(
            lambda req, opt: {**req, **opt},
            st.fixed_dictionaries({k: fields[k] for k in props if k in required}),
            st.fixed_dictionaries({}, optional={k: fields[k] for k in optional}))
    return JSON_VALUES


def _inline(node: Any, components: dict[str, Any], depth: int = 0) -> Any:
    """``node`` with every ``#/components/schemas/X`` reference replaced by its schema."""
    assert depth < 20, "schema nests too deep"
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(components[node["$ref"].rsplit("/", 1)[-1]], components, depth + 1)
        return {k: _inline(v, components, depth + 1) for k, v in node.items()
                if k not in ("discriminator", "examples")}
    if isinstance(node, list):
        return [_inline(v, components, depth + 1) for v in node]
    return node


def body_schemas(openapi: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{path: JSON schema}`` of every POST endpoint with a JSON body."""
    components = openapi.get("components", {}).get("schemas", {})
    out = {}
    for path, ops in openapi["paths"].items():
        body = ops.get("post", {}).get("requestBody", {})
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            out[path] = _inline(schema, components)
    return out


def _mutated(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def mutate(pair: tuple[Any, Any]) -> Any:
        body, value = pair
        if isinstance(body, dict) and body:
            key = sorted(body)[hash(json.dumps(value, default=str)) % len(body)]
            return {**body, key: value}
        return value
    return st.tuples(valid, JSON_VALUES).map(mutate)


def _path_filler(template: str, name: str) -> Callable[[str], str]:
    def fill(text: str) -> str:
        raw = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return template.replace(name, quote(raw, safe=""))
    return fill


def requests_strategy(openapi: dict[str, Any]) -> st.SearchStrategy[tuple[str, str, bytes]]:
    """``(method, path, body bytes)`` cases for every endpoint of the schema."""
    cases = []
    for path, schema in body_schemas(openapi).items():
        valid = from_schema(schema)
        body = st.one_of(valid, valid, _mutated(valid), JSON_VALUES)
        cases.append(st.tuples(st.just("POST"), st.just(path),
                               body.map(lambda b: json.dumps(b).encode())))
        cases.append(st.tuples(st.just("POST"), st.just(path), st.binary(max_size=64)))
    for path, ops in openapi["paths"].items():
        if "{" in path:
            for method in ops:
                fill = _path_filler(path, path[path.index("{"):])
                cases.append(st.tuples(st.just(method.upper()), ANY_TEXT.map(fill), st.just(b"")))
    return st.one_of(cases)


class _Loopback:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def fuzz_server(lm: Any, work: Path, cases: int = 500, budget_s: float = 240.0) -> dict[str, Any]:
    """Send ``cases`` fuzzed requests to a fresh server on ``work/bank``; count 5xx and check that
    a normal request is answered afterwards."""
    from dmoe.bench.faults import configs
    from dmoe.knowledge import KnowledgeBase
    from dmoe.server import ServerConfig, ServerState, create_app

    build_config, train_config = configs()
    kb = KnowledgeBase.open_or_create(work / "bank", lm.fingerprint, "tiny", train_config.spec)
    config = ServerConfig(default_max_tokens=2, max_tokens_limit=4, max_prompt_tokens=256,
                          max_body_bytes=1 << 20)
    state = ServerState(lm, kb, config, build_config=build_config, train_config=train_config)
    app = create_app(state)
    openapi = app.openapi()
    server = _Loopback(app)
    seen: list[tuple[str, str, int]] = []
    deadline = time.time() + budget_s
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            @settings(max_examples=cases, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
            @given(requests_strategy(openapi))
            def one(case: tuple[str, str, bytes]) -> None:
                if time.time() > deadline:
                    return
                method, path, body = case
                r = http.request(method, path, content=body or None,
                                 headers={"content-type": "application/json"})
                seen.append((method, path.split("?")[0][:40], r.status_code))

            one()
            normal = http.post("/v1/chat/completions", json={
                "model": "t", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        server.stop()
        state.close()
    fives = [c for c in seen if c[2] >= 500]
    return {"fuzz_cases": len(seen), "fuzz_5xx": len(fives), "fuzz_5xx_examples": fives[:5],
            "fuzz_status_counts": {str(s): sum(1 for c in seen if c[2] == s)
                                   for s in sorted({c[2] for c in seen})},
            "fuzz_normal_request_after": normal.status_code}
