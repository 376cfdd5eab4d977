"""Prometheus metrics at ``/metrics``, and ``llmproxy top``, a live terminal view.

What is measured (docs/metrics.md lists every metric with its labels): flows by status,
errors (and which plugin raised them), attempts at backends, failovers, latency and
time-to-first-token histograms, tokens in and out per backend, model and client key name,
streams open, plugins' answers and actions, in-chat commands; and, read at scrape time from
``ProxyContext.backend_status()``, requests in flight per target, key rests and circuit
breakers.

Hooks. ``flow_done`` (trylast, so a plugin that folds a stream's answer has done so) does all
the counting, once per flow; ``stream_start`` counts a stream as open and returns None, so
streams stay on the pass-through path: nothing here runs per streamed event. Each proxy has
its own ``CollectorRegistry``. ``register_routes`` adds the endpoint; ``register_cli_commands``
adds ``llmproxy top`` (:mod:`llmproxy_metrics.top`).

Access: see :mod:`llmproxy_metrics.access` (open on loopback, a token beyond it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmproxy import hookimpl
from llmproxy.config import SecretRef

from .access import refusal
from .backends import BackendStatusCollector
from .recorder import FlowMetrics

if TYPE_CHECKING:
    from llmproxy.context import ProxyContext
    from llmproxy.flow import Flow

NAME = "metrics"
log = logging.getLogger("llmproxy.metrics")

__all__ = ["MetricsSettings", "NAME"]

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0]
TTFT_BUCKETS = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]


class MetricsSettings(BaseModel):
    """``plugins.metrics``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: str = Field("/metrics", description="Where the metrics are served (not under /v1, which is the protocols').")
    token: SecretRef | None = Field(
        None,
        description="Reference (${ENV}, env:NAME, keyring:service/name) to the bearer token scrapers must send. "
        "Unset: /metrics is open while llmproxy listens on loopback only, and shut (403) beyond it.",
    )
    max_models: int = Field(
        100, ge=1, description="Distinct model names kept as label values (clients choose them); later newcomers are counted as \"other\"."
    )
    stream_tokens: bool = Field(
        False,
        description="Count the tokens of streams forwarded untouched too. Their usage is only in the stream's bytes, so "
        "this decodes each such stream once after it ended (about 1 µs per event); off, their tokens are counted only "
        "when another plugin (history, capture) has decoded the answer anyway. Non-streamed and re-encoded answers are always counted.",
    )
    collect: Literal["scraped", "always"] = Field(
        "scraped",
        description="scraped: count flows from the first successful scrape of the metrics on (until then the plugin costs "
        "nothing per request; Prometheus reads the start as a counter reset); always: from start-up.",
    )
    latency_buckets: list[float] = Field(LATENCY_BUCKETS, min_length=1, description="Upper bounds, in seconds, of llmproxy_request_duration_seconds.")
    ttft_buckets: list[float] = Field(TTFT_BUCKETS, min_length=1, description="Upper bounds, in seconds, of llmproxy_time_to_first_token_seconds.")

    @field_validator("token", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> Any:
        if value is None or isinstance(value, SecretRef):
            return value
        if not isinstance(value, str):
            raise ValueError("must be a string reference such as ${LLMPROXY_METRICS_TOKEN}")
        return SecretRef(value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value.startswith(("/v1", "/anthropic", "/openai")):
            raise ValueError("must begin with / and not be under /v1, /anthropic or /openai")
        return value


@dataclass
class MetricsState:
    """What one proxy's metrics plugin keeps, in ``context.state["metrics"]``."""

    registry: CollectorRegistry
    flows: FlowMetrics
    token: bytes | None
    loopback_only: bool
    active: bool = True  # counting flows (``collect``: from start-up, or since the first scrape)


def _state(flow: "Flow") -> MetricsState | None:
    """The proxy's metrics state while it counts flows, else None."""
    context = flow.context
    state = context.state.get(NAME) if context is not None else None
    return state if state is not None and state.active else None


# -- hooks -------------------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return MetricsSettings


@hookimpl
def configure(settings: MetricsSettings, context: "ProxyContext") -> None:
    token = None
    if settings.token is not None:
        value = settings.token.get()
        if not value:
            raise ValueError(f"token: {settings.token.describe()} is not set")
        token = value.encode()
        context.add_secrets(NAME, [value])
    registry = CollectorRegistry(auto_describe=True)
    flows = FlowMetrics(registry, settings.max_models, sorted(settings.latency_buckets), sorted(settings.ttft_buckets), settings.stream_tokens)
    registry.register(BackendStatusCollector(context.backend_status))
    context.state[NAME] = MetricsState(registry, flows, token, context.config.proxy.is_loopback(), settings.collect == "always")


@hookimpl
def register_routes(register: Any, context: "ProxyContext") -> None:
    settings: MetricsSettings | None = context.settings(NAME)
    path = settings.path if settings is not None else "/metrics"

    async def metrics(request: web.Request) -> web.Response:
        state: MetricsState | None = context.state.get(NAME)
        if state is None:
            return web.json_response({"error": {"message": "metrics are not configured yet", "type": "overloaded_error"}}, status=503)
        problem = refusal(request.headers.get("Authorization", ""), state.token, state.loopback_only)
        if problem is not None:
            status, message = problem
            kind = "authentication_error" if status == 401 else "permission_error"
            headers = {"WWW-Authenticate": 'Bearer realm="llmproxy metrics"'} if status == 401 else None
            return web.json_response({"error": {"message": message, "type": kind}}, status=status, headers=headers)
        state.active = True  # someone reads them: count from now on
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(state.registry), headers={"Content-Type": content_type})

    register("GET", path, metrics)


@hookimpl
def stream_start(flow: "Flow") -> None:
    state = _state(flow)
    if state is not None and NAME not in flow.metadata:  # asked again (RetryStream): still one stream
        flow.metadata[NAME] = True
        state.flows.stream_opened(flow)
    return None


@hookimpl(trylast=True)
def flow_done(flow: "Flow") -> None:
    state = _state(flow)
    if state is not None:
        state.flows.record(flow, flow.metadata.get(NAME, False))


@hookimpl
def register_cli_commands(cli: Any) -> None:
    from .top import top  # rich is imported only when the command runs

    cli.add_command(top)
