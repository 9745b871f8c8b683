"""The ``openai`` backend: any OpenAI-compatible ``/chat/completions`` endpoint over plain HTTP.

Configuration from the environment (``OpenAIChatBackend.from_env``):

- ``DMOE_OPENAI_BASE_URL``: e.g. ``http://127.0.0.1:8000/v1`` (vLLM, llama.cpp server, Ollama) or
  ``https://api.openai.com/v1``; required.
- ``DMOE_OPENAI_MODEL``: the model name the endpoint serves; required.
- ``OPENAI_API_KEY``: sent as a Bearer token when set (local servers usually need none).

Requests use temperature 0 and run ``max_workers`` at a time; a 429 or 5xx answer is retried twice
with a short back-off, anything else raises ``AugmentError`` naming the URL, status and body. Chat
endpoints cannot be made to continue a pre-filled answer portably, so ``prefill`` is not honoured;
``stop_regex`` is ignored too (API stop strings are literal and cut the match from the reply).
This module uses only the standard library (urllib).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dmoe.errors import AugmentError

ENV_BASE_URL = "DMOE_OPENAI_BASE_URL"
ENV_MODEL = "DMOE_OPENAI_MODEL"
ENV_KEY = "OPENAI_API_KEY"
_RETRY_STATUS = {429, 500, 502, 503, 504}


class OpenAIChatBackend:
    """Chat completions from an OpenAI-compatible HTTP endpoint."""

    can_prefill = False

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 timeout_s: float = 120.0, max_workers: int = 4, retries: int = 2,
                 backoff_s: float = 1.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model name is empty")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s  # per request
        self.max_workers = max(1, max_workers)  # concurrent requests
        self.retries = retries  # extra tries on 429/5xx/connection errors
        self.backoff_s = backoff_s  # first back-off; doubles each retry
        self.name = f"openai:{model}"

    @classmethod
    def from_env(cls, **kwargs: Any) -> OpenAIChatBackend:
        """From ``DMOE_OPENAI_BASE_URL``, ``DMOE_OPENAI_MODEL``, ``OPENAI_API_KEY``."""
        base_url, model = os.environ.get(ENV_BASE_URL, ""), os.environ.get(ENV_MODEL, "")
        missing = [n for n, v in ((ENV_BASE_URL, base_url), (ENV_MODEL, model)) if not v]
        if missing:
            raise AugmentError(
                f"augmenter 'openai' needs {' and '.join(missing)} set (e.g. {ENV_BASE_URL}="
                f"http://127.0.0.1:8000/v1 {ENV_MODEL}=my-model; {ENV_KEY} if the endpoint "
                f"wants a key)")
        return cls(base_url, model, os.environ.get(ENV_KEY) or None, **kwargs)

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "openai", "url": self.url, "model": self.model, "temperature": 0.0}

    def _post(self, message: str, max_new_tokens: int) -> str:
        body = json.dumps({"model": self.model, "temperature": 0.0, "max_tokens": max_new_tokens,
                           "messages": [{"role": "user", "content": message}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", errors="replace")[:300]
                if e.code not in _RETRY_STATUS or attempt == self.retries:
                    raise AugmentError(f"{self.url}: HTTP {e.code}: {detail}") from e
            except urllib.error.URLError as e:
                if attempt == self.retries:
                    raise AugmentError(f"cannot reach {self.url}: {e.reason}") from e
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise AugmentError(f"{self.url}: unexpected response ({e!r})") from e
            time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def generate(self, messages: Sequence[str], *, max_new_tokens: int, prefill: str = "",
                 stop_regex: str = "") -> list[str]:
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda m: self._post(m, max_new_tokens), messages))
