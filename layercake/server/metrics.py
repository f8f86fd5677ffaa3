"""Counters for ``GET /metrics``, written in Prometheus' text exposition format by hand (no
client library): requests by endpoint and status, tokens generated, recent tokens/s."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
RATE_WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds


class Metrics:
    """Request counts (event loop) and token counts (engine thread)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()

    def count_request(self, path: str, status: int) -> None:
        # any other path is one label, so clients cannot grow the series without bound
        self.requests[(path if path in ENDPOINTS else "other", status)] += 1

    def count_tokens(self, generated: int, prompt: int = 0) -> None:
        """Tokens of one engine step (called by the engine thread)."""
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += generated
            self.prompt_tokens += prompt
            self._recent.append((now, generated))
            self._trim(now)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text: these counters, then ``gauges`` (name -> (help, value))."""
        out = [
            "# HELP layercake_requests_total HTTP requests answered, by endpoint and status.",
            "# TYPE layercake_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            out.append(f'layercake_requests_total{{endpoint="{path}",status="{status}"}} {n}')
        counters = {
            "layercake_generated_tokens_total": ("Tokens generated.", self.generated_tokens),
            "layercake_prompt_tokens_total": ("Prompt tokens prefilled.", self.prompt_tokens),
        }
        for kind, series in (("counter", counters), ("gauge", gauges)):
            for name, (help_, value) in series.items():
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                out.append(f"{name} {_number(value)}")
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
