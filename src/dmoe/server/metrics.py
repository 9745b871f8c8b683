"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters and histograms are updated from any thread under one lock; gauges that mirror the state
(bank size, jobs, waiting requests) are read when ``/metrics`` is scraped and passed in by the caller.

This module knows nothing about HTTP frameworks, the engine or the knowledge base.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Mapping

# (type "gauge" | "counter", help text, {((label, value), ...): value})
Scraped = tuple[str, str, Mapping[tuple[tuple[str, str], ...], float]]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    esc = {k: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
           for k, v in pairs.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Histogram:
    """Cumulative buckets + sum + count of observed values (one label set)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: Mapping[str, str]) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(bound)})} {running}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.total)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Everything ``/metrics`` reports that is counted as it happens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (route, method, status)
        self.latency: dict[str, Histogram] = {}  # route -> request duration (to the last byte)
        self.generations: dict[str, int] = defaultdict(int)  # finish reason -> count
        self.generation_seconds = Histogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.triggers = 0

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, str(status))] += 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, triggers: int,
                           finish_reason: str, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.triggers += triggers
            self.generations[finish_reason] += 1
            self.generation_seconds.observe(seconds)

    def render(self, scraped: Mapping[str, Scraped]) -> str:
        """The exposition text, with ``scraped`` series (name -> (type, help, {labels: value}))."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("dmoe_requests_total", "counter", "HTTP requests by route, method and status.")
            for (route, method, status), n in sorted(self.requests.items()):
                labels = {"route": route, "method": method, "status": status}
                out.append(f"dmoe_requests_total{_labels(labels)} {n}")
            head("dmoe_request_duration_seconds", "histogram",
                 "HTTP request latency to the last byte (streams included), by route.")
            for route, hist in sorted(self.latency.items()):
                out.extend(hist.lines("dmoe_request_duration_seconds", {"route": route}))
            head("dmoe_generations_total", "counter", "Finished generations by finish reason.")
            for reason, n in sorted(self.generations.items()):
                out.append(f"dmoe_generations_total{_labels({'finish_reason': reason})} {n}")
            head("dmoe_generation_duration_seconds", "histogram",
                 "Time a generation held the model (prefill + decode).")
            out.extend(self.generation_seconds.lines("dmoe_generation_duration_seconds", {}))
            for name, count, text in (
                    ("dmoe_prompt_tokens_total", self.prompt_tokens, "Prompt tokens prefilled."),
                    ("dmoe_completion_tokens_total", self.completion_tokens, "Tokens generated."),
                    ("dmoe_triggers_total", self.triggers, "Decode steps that re-routed experts.")):
                head(name, "counter", text)
                out.append(f"{name} {count}")
        for name, (kind, text, series) in scraped.items():
            head(name, kind, text)
            for pairs, value in series.items():
                out.append(f"{name}{_labels(dict(pairs))} {_num(value)}")
        return "\n".join(out) + "\n"
