"""What a finished flow adds to the metrics: one :meth:`FlowMetrics.record` per flow.

Every metric lives in the proxy's own ``CollectorRegistry`` (never prometheus_client's global
one: a process may run several proxies, tests do). The label children are looked up in a
dict keyed by the label values, built once per combination, because ``Metric.labels()``
validates its arguments and takes a lock on every call.

Cardinality. Backends, targets, key names and client key names come from the config;
statuses, front-ends and plugin names from the code. Model names come from clients, so
:class:`CappedLabel` keeps the first ``max_models`` distinct ones and folds the rest into
``"other"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from llmproxy.flow import Flow

NONE = "none"  # a flow that never reached a backend, or has no model
ANONYMOUS = "anonymous"  # no client keys configured: clients have no name
OTHER = "other"  # where label values beyond the cap go

COMMANDS_PLUGIN = "commands"  # its "ran" note lists the in-chat commands a flow ran


def _command_label(name: object) -> str:
    # Only registered commands run, so their names are bounded by the installed plugins;
    # still, a label value is never taken on trust.
    return name if isinstance(name, str) and len(name) <= 40 else OTHER


class CappedLabel:
    """Label values as they come, up to ``cap`` distinct ones; every later newcomer is ``"other"``."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return NONE
        seen = self.seen
        if value in seen:
            return value
        if len(seen) < self.cap:
            seen.add(value)
            return value
        return OTHER


class _Children:
    """``metric.labels(*values)``, remembered per values tuple."""

    __slots__ = ("metric", "children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class FlowMetrics:
    """The flow metrics of one proxy, and how a finished flow updates them."""

    def __init__(self, registry: CollectorRegistry, max_models: int, latency_buckets: list[float], ttft_buckets: list[float], stream_tokens: bool) -> None:
        self.model = CappedLabel(max_models)
        self.stream_tokens = stream_tokens
        r = registry
        self.requests = _Children(Counter(
            "llmproxy_requests", "Flows finished, by the status the client got.",
            ["frontend", "backend", "model", "client", "stream", "status"], registry=r))
        self.errors = _Children(Counter(
            "llmproxy_errors", "Flows that ended in an error; plugin is the plugin whose hook raised it (none: the core or a backend).",
            ["frontend", "backend", "model", "client", "status", "plugin"], registry=r))
        self.attempts = _Children(Counter(
            "llmproxy_attempts", "Requests sent to backends (a flow makes several on failover or key rotation), by outcome.",
            ["backend", "upstream_model", "key", "outcome"], registry=r))
        self.failovers = _Children(Counter(
            "llmproxy_failovers", "A flow moved on from one target to the next after a retryable failure.",
            ["from_target", "to_target"], registry=r))
        self.latency = _Children(Histogram(
            "llmproxy_request_duration_seconds", "Time from the request's arrival until the client had its whole answer.",
            ["backend", "model", "stream"], buckets=latency_buckets, registry=r))
        self.ttft = _Children(Histogram(
            "llmproxy_time_to_first_token_seconds", "Streams: time from the request's arrival until the first bytes of the answer were written to the client.",
            ["backend", "model"], buckets=ttft_buckets, registry=r))
        self.tokens = _Children(Counter(
            "llmproxy_tokens", "Tokens as the backend reported them: input, output, cache_read, cache_write.",
            ["backend", "model", "client", "type"], registry=r))
        self.streams_open = _Children(Gauge(
            "llmproxy_streams_open", "Streamed answers begun and not yet finished.", ["frontend"], registry=r))
        self.plugin_answers = _Children(Counter(
            "llmproxy_plugin_answers", "Flows a plugin answered itself, without a backend (the plugin of the flow's last note).",
            ["plugin"], registry=r))
        self.plugin_actions = _Children(Counter(
            "llmproxy_plugin_actions", "Notes plugins left on flows (flow.note): what they changed, blocked or repaired.",
            ["plugin"], registry=r))
        self.commands = _Children(Counter(
            "llmproxy_commands", "In-chat commands run (!/name).", ["command"], registry=r))

    def stream_opened(self, flow: "Flow") -> None:
        self.streams_open(flow.frontend).inc()

    def record(self, flow: "Flow", stream_was_open: bool) -> None:
        frontend = flow.frontend
        target = flow.target
        backend = target.backend if target is not None else NONE
        model = self.model(flow.model)
        client = flow.client.key_name or ANONYMOUS
        error = flow.error
        status = str(flow.status or (error.status if error is not None else 0))
        stream = "true" if flow.stream else "false"
        if stream_was_open:
            self.streams_open(frontend).dec()

        self.requests(frontend, backend, model, client, stream, status).inc()
        if error is not None:
            plugin = getattr(error, "llmproxy_plugin", None) or NONE
            self.errors(frontend, backend, model, client, str(error.status), plugin).inc()
        if flow.ended is not None:
            self.latency(backend, model, stream).observe(flow.ended - flow.started)
            if flow.stream and flow.first_token_at is not None:
                self.ttft(backend, model).observe(flow.first_token_at - flow.started)

        attempts = flow.attempts
        previous = None
        for attempt in attempts:
            upstream_model = self.model(attempt.model)
            if attempt.status is not None:
                outcome = str(attempt.status)
            else:
                outcome = "timeout" if attempt.error == "timeout" else "unreachable" if attempt.error else "pending"
            self.attempts(attempt.backend, upstream_model, attempt.key_name or NONE, outcome).inc()
            here = (attempt.backend, attempt.model)
            if previous is not None and here != previous:
                self.failovers(f"{previous[0]}:{self.model(previous[1])}", f"{here[0]}:{upstream_model}").inc()
            previous = here

        trace = flow.trace
        if trace:
            for note in trace:
                plugin = note.get("plugin") or NONE
                self.plugin_actions(plugin).inc()
                if plugin == COMMANDS_PLUGIN and note.get("what") == "ran":
                    for command in note.get("commands") or ():
                        self.commands(_command_label(command)).inc()
            if not attempts and error is None and flow.has_response:
                self.plugin_answers(trace[-1].get("plugin") or NONE).inc()

        self._tokens(flow, backend, model, client)

    def _tokens(self, flow: "Flow", backend: str, model: str, client: str) -> None:
        # A streamed answer forwarded untouched is folded from its bytes when first read: a
        # decode of every event. Read it only if someone already has (it is then free) or
        # the settings ask for stream tokens.
        if flow.stream and flow.response_pending and not self.stream_tokens:
            return
        if not flow.has_response:
            return
        response = flow.response
        if response is None:
            return
        usage = response.usage
        for kind, count in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cached_input_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
        ):
            if count:
                self.tokens(backend, model, client, kind).inc(count)
