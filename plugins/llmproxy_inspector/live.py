"""The live side: flows in flight, the recent list, and the event hub the UI's SSE stream
reads.

A flow's summary (:func:`summarize`) is the shape ``GET /admin/api/flows`` returns and other
tools (``llmproxy top``) rely on. Building one costs a few µs, so a finished flow is kept as
a :class:`Finished` (the flow, its start in wall time, its session), and its summary is built
in the history's thread with the next batch, or on the loop only when someone asks (the list,
a browser watching). Nothing here runs per streamed event.

Token counts. A summary takes them from the flow's answer only when that answer is already
decoded (a plugin read it, or llmproxy re-encoded it): decoding one just for its usage costs
about as much as the rest of the inspector (a stream's decode grows with its events). An
answer still undecoded is decoded — in the history's thread — when the history keeps details
on disk (``history_path``: the record decodes it anyway), while a browser watches, when the
flow list is asked for (``GET /admin/api/flows``, for the flows it returns that are still in
memory) and when a flow's detail is. Otherwise ``tokens_in`` and ``tokens_out`` stay null.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterable

import orjson

from . import detail

if TYPE_CHECKING:
    from llmproxy.flow import Flow

SUBSCRIBER_BACKLOG = 256  # events a slow browser may fall behind by before it is dropped


def summarize(flow: "Flow", active: bool, started: float | None = None, session: str | None = None) -> dict[str, Any]:
    """One row of the flow list (see docs/admin-api.md for the fields). ``started`` (wall
    time) and ``session`` are read from the flow unless given."""
    if started is None:
        started = wall_start(flow)
    if session is None:
        session = session_of(flow)
    attempts = flow.attempts
    target = flow.target
    last = attempts[-1] if attempts else None
    requested = flow.raw_request.get("model") if isinstance(flow.raw_request, dict) else None
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


def wall_start(flow: "Flow") -> float:
    return time.time() - (time.monotonic() - flow.started)


def session_of(flow: "Flow") -> str | None:
    # Identifying the session registers it (the Sessions tab lists it); flows refused before
    # their body was read have none.
    if flow.sessions is not None and (flow.raw_request or flow.client.key_name is not None):
        return flow.session.id
    return None


def decode_answer(flow: "Flow | None") -> None:
    """Decode a finished flow's answer if nobody has (in the history's thread: it may take
    as long as the stream was)."""
    if flow is not None and flow.response_pending:
        flow.response  # noqa: B018 — reading it decodes it


class Finished:
    """A finished flow in the recent list and the history's queue.

    It holds the flow until the history has its summary and, for the newest ``details``
    flows, until the UI may still ask for its detail; then only the summary. Made on the loop
    when the flow ends: three values, no summary (see the module docstring).
    """

    __slots__ = ("flow", "id", "started", "session", "tokens_wanted", "persist", "include_bodies", "kept", "hub", "_summary")

    def __init__(self, flow: "Flow", hub: "Hub", tokens_wanted: bool, persist: bool, include_bodies: bool) -> None:
        self.flow: "Flow | None" = flow
        self.id = flow.id
        self.started = wall_start(flow)  # now: a clock read later would be off by the wait
        self.session = session_of(flow)  # on the loop: the session store is the loop's
        self.tokens_wanted = tokens_wanted  # a browser saw it end without them: send them once known
        self.persist = persist  # its detail record goes to the history on disk
        self.include_bodies = include_bodies
        self.kept = True  # among LiveFlows.details
        self.hub = hub
        self._summary: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The summary: the history's, once written; until then built from the flow."""
        if self._summary is not None:
            return self._summary
        assert self.flow is not None  # let go only once the summary is kept
        return summarize(self.flow, False, self.started, self.session)

    @property
    def undecoded(self) -> bool:
        """Its answer waits undecoded (so its summary has no token counts yet)."""
        return self.flow is not None and self.flow.response_pending

    def build(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The summary and, with a history on disk, the detail record (in the history's thread)."""
        flow = self.flow
        assert flow is not None
        if self.persist or self.tokens_wanted:
            decode_answer(flow)
        summary = summarize(flow, False, self.started, self.session)
        return summary, detail.build(self) if self.persist else None

    def written(self, summary: dict[str, Any]) -> None:
        """The history has it (on the loop)."""
        self._summary = summary
        if not self.kept:
            self.flow = None
        if self.tokens_wanted:
            self.hub.publish("flow", summary)

    def evicted(self) -> None:
        """It left LiveFlows.details (on the loop)."""
        self.kept = False
        if self._summary is not None:
            self.flow = None

    def tokens_known(self) -> None:
        """Its answer was decoded since its summary was made (on the loop)."""
        flow = self.flow
        if self._summary is not None and flow is not None:
            response = flow.response if flow.has_response and not flow.response_pending else None
            if response is not None:
                self._summary["tokens_in"] = response.usage.input_tokens
                self._summary["tokens_out"] = response.usage.output_tokens


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
    """Flows in flight (by id) and the newest finished ones, newest last."""

    def __init__(self, recent: int, hub: Hub, details: int = 0) -> None:
        self.limit = recent
        self.hub = hub
        self.active: dict[str, "Flow"] = {}
        self.recent: OrderedDict[str, Finished] = OrderedDict()
        # the newest finished flows whose flow is kept whole, for details built when asked for
        self.details_limit = details
        self.details: OrderedDict[str, Finished] = OrderedDict()

    def started(self, flow: "Flow") -> None:
        self.active[flow.id] = flow
        if self.hub.subscribers:
            self.hub.publish("flow", summarize(flow, active=True))

    def finished(self, flow: "Flow", persist: bool, include_bodies: bool) -> Finished:
        """Move ``flow`` from in flight to the recent list (on the loop, per flow: keep it cheap)."""
        self.active.pop(flow.id, None)
        hub = self.hub
        watched = bool(hub.subscribers)
        row = Finished(flow, hub, watched and flow.response_pending, persist, include_bodies)
        flow_id = row.id
        recent = self.recent
        recent[flow_id] = row
        if len(recent) > self.limit:
            recent.popitem(last=False)
        details = self.details
        details[flow_id] = row
        if len(details) > self.details_limit:
            details.popitem(last=False)[1].evicted()
        if watched:
            hub.publish("flow", row.summary())
        return row

    def undecoded(self, rows: Iterable[dict[str, Any]]) -> list[Finished]:
        """The finished flows among ``rows`` (summaries) whose answers wait undecoded."""
        found = []
        for summary in rows:
            if summary["tokens_in"] is None and not summary["active"]:
                row = self.recent.get(summary["id"])
                if row is not None and row.undecoded:
                    found.append(row)
        return found

    def list(self, limit: int) -> list[dict[str, Any]]:
        """Newest first, flows in flight included."""
        rows = [summarize(flow, active=True) for flow in self.active.values()]
        rows.extend(row.summary() for row in reversed(self.recent.values()))
        rows.sort(key=lambda row: row["started"], reverse=True)
        return rows[:limit]

    def find(self, flow_id: str) -> dict[str, Any] | None:
        flow = self.active.get(flow_id)
        if flow is not None:
            return summarize(flow, active=True)
        row = self.recent.get(flow_id)
        return row.summary() if row is not None else None
