"""``dmoe serve``: an OpenAI-compatible HTTP server over one model and one knowledge base.

A thin adapter: ``schemas`` (request/response bodies), ``routes`` (endpoints, auth), ``service``
(requests -> engine calls), ``state`` (what the process holds, and its locks), ``jobs`` (background
builds), ``metrics`` (Prometheus text), ``app`` (the FastAPI app and its lifespan).
"""

from dmoe.server.app import create_app
from dmoe.server.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "ServerState", "create_app"]
