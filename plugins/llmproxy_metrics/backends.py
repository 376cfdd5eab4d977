"""Backend state at scrape time: a custom collector over ``ProxyContext.backend_status()``.

Nothing is counted per request for these: each scrape reads the status the core keeps
anyway and renders what it holds — requests in flight per target, each key's rest (a
cooldown after a 429), the circuit breakers of its targets (``breakers: {"backend:model":
{"state": "closed" | "open" | "half_open", …}}``, one per target that has been tried) and the
backend's rate windows (``limits: {"rpm": {"used", "limit"}, "tpm": …}``). Missing parts
yield no samples.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

BREAKER_STATES = ("closed", "open", "half_open")


class BackendStatusCollector(Collector):
    """Yields the backend gauges from ``status()`` (``ProxyContext.backend_status``) on each scrape."""

    def __init__(self, status: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.status = status

    def describe(self) -> list[Any]:
        # Without this the registry would call collect() at registration, before the
        # backends exist.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        inflight = GaugeMetricFamily("llmproxy_backend_inflight", "Requests in flight per target (a stream: until it is closed).", labels=["backend", "target"])
        resting = GaugeMetricFamily(
            "llmproxy_backend_key_resting_seconds", "Seconds until a backend key may be used again after a 429 (0: in use).", labels=["backend", "key"]
        )
        breaker = GaugeMetricFamily(
            "llmproxy_backend_breaker_state", "1 for the state a target's circuit breaker is in (closed, open, half_open), 0 for the others.",
            labels=["backend", "target", "state"],
        )
        rate_used = GaugeMetricFamily("llmproxy_backend_rate_used", "Requests (rpm) or tokens (tpm) counted in a backend's rate window.", labels=["backend", "window"])
        rate_limit = GaugeMetricFamily("llmproxy_backend_rate_limit", "A backend's rpm or tpm limit.", labels=["backend", "window"])
        for backend, entry in self.status().items():
            for target, count in (entry.get("inflight") or {}).items():
                inflight.add_metric([backend, target], float(count))
            for key in entry.get("keys") or ():
                if isinstance(key, dict) and key.get("name") is not None:
                    resting.add_metric([backend, str(key["name"])], float(key.get("resting_for") or 0.0))
            for window, numbers in (entry.get("limits") or {}).items():
                rate_used.add_metric([backend, window], float(numbers["used"]))
                rate_limit.add_metric([backend, window], float(numbers["limit"]))
            for target, state in (entry.get("breakers") or {}).items():
                current = state.get("state") if isinstance(state, dict) else None
                if current is None:
                    continue
                for name in BREAKER_STATES:
                    breaker.add_metric([backend, target, name], 1.0 if current == name else 0.0)
        yield inflight
        yield resting
        yield breaker
        yield rate_used
        yield rate_limit
