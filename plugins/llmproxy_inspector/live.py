"""The live side: flows in flight, the recent list, and the event hub the UI's SSE stream
reads.

A flow's summary (:func:`summarize`) is the shape ``GET /admin/api/flows`` returns and other
tools (``llmproxy top``) rely on. Everything here runs on the event loop and costs a few
dictionary operations per flow: summaries are built once when a flow starts and once when it
ends, and nothing runs per streamed event.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from llmproxy.flow import Flow

SUBSCRIBER_BACKLOG = 256  # events a slow browser may fall behind by before it is dropped


def summarize(flow: "Flow", active: bool) -> dict[str, Any]:
    """One row of the flow list (see docs/admin-api.md for the fields)."""
    started = time.time() - (time.monotonic() - flow.started)
    attempts = flow.attempts
    target = flow.target
    last = attempts[-1] if attempts else None
    requested = flow.raw_request.get("model") if isinstance(flow.raw_request, dict) else None
    session = flow.session.id if flow.sessions is not None and _has_session(flow) else None
    usage = None
    if not active and flow.has_response and not flow.response_pending:
        response = flow.response  # already decoded: reading it costs nothing
        usage = response.usage if response is not None else None
    return {
        "id": flow.id,
        "started": round(started, 3),
        "client": flow.client.key_name or flow.client.address,
        "user_agent": flow.client.user_agent,
        "session": session,
        "frontend": flow.frontend,
        "model": requested if isinstance(requested, str) else (flow.model or None),
        "backend": last.backend if last else (target.backend if target else None),
        "upstream_model": last.model if last else (target.model if target else None),
        "attempts": len(attempts),
        "status": flow.status,
        "error": flow.error.message if flow.error is not None else None,
        "stream": flow.stream,
        "tokens_in": usage.input_tokens if usage is not None else None,
        "tokens_out": usage.output_tokens if usage is not None else None,
        "latency_ms": round((flow.ended - flow.started) * 1000, 1) if flow.ended is not None else None,
        "ttft_ms": round((flow.first_token_at - flow.started) * 1000, 1) if flow.first_token_at is not None else None,
        "active": active,
    }


def _has_session(flow: "Flow") -> bool:
    # Identifying the session is cheap (headers, one body field) but not free: flows that
    # were refused before their body was read have none.
    return bool(flow.raw_request) or flow.client.key_name is not None


class Hub:
    """Browsers listening to ``/admin/api/events``: each gets a bounded queue of encoded
    SSE frames; one that falls ``SUBSCRIBER_BACKLOG`` events behind is dropped (its
    EventSource reconnects and reloads the list) rather than holding memory."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[bytes | None]] = set()

    @property
    def watched(self) -> bool:
        return bool(self.subscribers)

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.subscribers.discard(queue)

    def publish(self, kind: str, data: Any) -> None:
        if not self.subscribers:
            return
        frame = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.subscribers.discard(queue)
                _end(queue)

    def close(self) -> None:
        for queue in list(self.subscribers):
            _end(queue)
        self.subscribers.clear()


def _end(queue: asyncio.Queue[bytes | None]) -> None:
    """Tell a subscriber's stream to finish, making room for the marker if need be."""
    while True:
        try:
            queue.put_nowait(None)
            return
        except asyncio.QueueFull:
            queue.get_nowait()


class LiveFlows:
    """Flows in flight (by id) and the newest finished summaries, newest last."""

    def __init__(self, recent: int, hub: Hub, details: int = 0) -> None:
        self.limit = recent
        self.hub = hub
        self.active: dict[str, "Flow"] = {}
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # the newest finished flows themselves, for details built when asked for
        self.details_limit = details
        self.details: OrderedDict[str, Any] = OrderedDict()

    def keep(self, flow_id: str, pending: Any) -> None:
        self.details[flow_id] = pending
        while len(self.details) > self.details_limit:
            self.details.popitem(last=False)

    def started(self, flow: "Flow") -> None:
        self.active[flow.id] = flow
        if self.hub.subscribers:
            self.hub.publish("flow", summarize(flow, active=True))

    def finished(self, flow: "Flow") -> dict[str, Any]:
        self.active.pop(flow.id, None)
        summary = summarize(flow, active=False)
        self.recent[flow.id] = summary
        while len(self.recent) > self.limit:
            self.recent.popitem(last=False)
        self.hub.publish("flow", summary)
        return summary

    def update(self, flow_id: str, fields: dict[str, Any]) -> None:
        """Fill in what was learned off the loop (tokens from a decoded answer)."""
        summary = self.recent.get(flow_id)
        if summary is not None:
            summary.update(fields)
            self.hub.publish("flow", summary)

    def list(self, limit: int) -> list[dict[str, Any]]:
        """Newest first, flows in flight included."""
        rows = [summarize(flow, active=True) for flow in self.active.values()]
        rows.extend(reversed(self.recent.values()))
        rows.sort(key=lambda row: row["started"], reverse=True)
        return rows[:limit]

    def find(self, flow_id: str) -> dict[str, Any] | None:
        flow = self.active.get(flow_id)
        if flow is not None:
            return summarize(flow, active=True)
        return self.recent.get(flow_id)
