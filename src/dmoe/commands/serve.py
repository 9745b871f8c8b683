"""``dmoe serve``: the OpenAI-compatible server over one model and one bank (see ``dmoe.server``)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from dmoe.commands.common import add_model_args

API_KEY_ENV = "DMOE_API_KEY"
ADMIN_KEY_ENV = "DMOE_ADMIN_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve an OpenAI-compatible API with live knowledge updates",
        description=(
            "Serve the model and a bank over HTTP:\n"
            "  POST /v1/chat/completions, /v1/completions  OpenAI-compatible, streaming or not;\n"
            "      extra body fields: tau, top_k, min_relevance, min_score, trigger, trigger_rate,\n"
            "      router, method, experts;\n"
            "      each response has an `attribution` field (experts behind each token span)\n"
            "  POST /v1/knowledge, GET /v1/jobs/ID        add documents (background build)\n"
            "  GET /v1/experts, DELETE /v1/experts/ID     list / remove experts\n"
            "  GET /health, GET /metrics                  liveness, Prometheus metrics\n"
            "  GET /                                      the playground page (open it in a browser)\n"
            "A missing bank is created empty, to be filled through the API. Prefer the\n"
            "environment variables to --api-key/--admin-key (command lines are visible to ps).\n\n"
            "example:\n  dmoe serve --bank runs/demo-bank --port 8000\n"
            "  curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\\n"
            "    -d '{\"model\": \"dmoe\", \"max_tokens\": 32, \"messages\": "
            "[{\"role\": \"user\", \"content\": \"Who founded Velmora?\"}]}'"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", default=os.environ.get("DMOE_BANK"),
                   help="expert bank directory, created if missing (default: $DMOE_BANK)")
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require this key on every endpoint (default: ${API_KEY_ENV})")
    g.add_argument("--admin-key", default=os.environ.get(ADMIN_KEY_ENV),
                   help=f"require this key on knowledge-management endpoints (default: "
                        f"${ADMIN_KEY_ENV}; unset: the --api-key)")
    g.add_argument("--default-max-tokens", type=int, default=64,
                   help="tokens generated when a request gives no max_tokens (default 64)")
    g.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="largest max_tokens a request may ask for (default 1024)")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: the model's context length - 1)")
    g.add_argument("--max-batch", type=int, default=8,
                   help="generations decoded together; more wait for a free row (default 8)")
    g.add_argument("--max-waiting", type=int, default=64,
                   help="generations waiting or running at most; more get 503 (default 64)")
    g.add_argument("--augmenter", default="extractive",
                   choices=["extractive", "none", "spans", "self", "openai"],
                   help="augmenter for documents posted to /v1/knowledge (default: extractive)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info",
                                                          "debug"])
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dmoe.server import ServerConfig, ServerState, create_app
    from dmoe.training.build import BuildConfig

    if not args.bank:
        raise ValueError("no bank given: pass --bank DIR or set $DMOE_BANK")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    config = ServerConfig(api_key=args.api_key or None, admin_key=args.admin_key or None,
                          default_max_tokens=args.default_max_tokens,
                          max_tokens_limit=args.max_tokens_limit,
                          max_prompt_tokens=args.max_prompt_tokens, max_batch=args.max_batch,
                          max_waiting=args.max_waiting)
    if not _is_loopback(args.host) and config.api_key is None:
        print(f"dmoe: warning: serving on {args.host} without --api-key: anyone who can reach "
              f"it can use and change the bank", file=sys.stderr)
    # Load before starting uvicorn so a bad model or bank is a one-line error, not a traceback.
    state = ServerState.load(args.bank, args.model, args.device, args.weights, config,
                             BuildConfig(augmenter=args.augmenter))
    print(f"dmoe: serving {state.model_name} with {len(state.kb)} experts from {args.bank} on "
          f"http://{args.host}:{args.port} (the playground page is at /)", file=sys.stderr,
          flush=True)
    app = create_app(load=lambda: state)  # the lifespan owns it from here: closed at shutdown
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
