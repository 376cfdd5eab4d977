"""The Flow: one mutable object per proxied call, and the control surface for plugins.

Hooks read and change it: rewrite ``flow.request``, answer by setting ``flow.response``
(the backend is then never called), block by raising :class:`~llmproxy.errors.ProxyError`,
leave notes in ``flow.metadata``. ``flow.trace`` records what each plugin did, for
captures and the inspector.

Change tracing. A plugin that shows what other plugins did (the inspector) calls
:meth:`Flow.trace_changes` early in the ``request`` chain (``tryfirst=True``). From then on
the core snapshots the flow's state around each implementation of the ``request`` and
``response`` chains and appends ``(hook, plugin, before, after)`` to ``flow.changes`` for each
one that changed it. A snapshot is :meth:`Flow.snapshot`: ``{"model": …, "request": …}`` or
``{"response": …}``, the canonical object serialised to JSON bytes (``None`` while it is
still undecoded, that is, exactly as the client or backend sent it). Untraced flows
(``flow.changes is None``, the default) cost one attribute test per chain call.
"""

from __future__ import annotations

import itertools
import time

import orjson
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .canonical import Request, Response
from .errors import ProxyError
from .sessions import Session, SessionStore

if TYPE_CHECKING:
    from .router import Target

_ids = itertools.count(1)


CREDENTIAL_HEADERS = frozenset(("authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie"))


class ClientHeaders(Mapping[str, str]):
    """The client's request headers, case-insensitive, without its credentials: plugins
    that log, capture or store headers can never write a client key down."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self._headers = headers if headers is not None else {}

    def __getitem__(self, name: str) -> str:
        if name.lower() in CREDENTIAL_HEADERS:
            raise KeyError(name)
        return self._headers[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._headers if name.lower() not in CREDENTIAL_HEADERS)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"ClientHeaders({dict(self)!r})"


@dataclass(slots=True)
class ClientInfo:
    """Who called: the matched client key's name (None without auth), address, user agent,
    and the request headers (case-insensitive, credentials left out) for plugins that
    identify sessions or clients."""

    key_name: str | None = None
    address: str | None = None
    user_agent: str = ""
    headers: ClientHeaders = field(default_factory=ClientHeaders)


@dataclass(slots=True)
class UpstreamRequest:
    """The HTTP request a provider is about to send; ``upstream_request`` hooks may edit it."""

    method: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any] | None = None


@dataclass(slots=True)
class Attempt:
    """One try at one target: what was sent, how it ended.

    When the flow records the wire (:meth:`Flow.record_wire`), an HTTP provider also keeps
    the ``request`` it sent (its headers hold the backend key: mask them before showing
    them anywhere), the backend's ``response_headers``, and its answer as it arrived:
    ``response_body`` (a complete answer, or an error's body) or ``response_chunks`` (a
    stream's reads, each ``(time.monotonic(), bytes)``).
    """

    backend: str
    model: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    status: int | None = None
    error: str | None = None
    key_name: str | None = None
    request: UpstreamRequest | None = field(default=None, repr=False)
    response_headers: dict[str, str] | None = field(default=None, repr=False)
    response_body: bytes | None = field(default=None, repr=False)
    response_chunks: list[tuple[float, bytes]] | None = field(default=None, repr=False)


class Flow:
    """One client call, from the decoded request to the written response."""

    __slots__ = (
        "id",
        "client",
        "frontend",
        "raw_request",
        "model",
        "stream",
        "raw_body",
        "context",
        "disabled_plugins",
        "sessions",
        "_session",
        "metadata",
        "routing",
        "trace",
        "changes",
        "target",
        "attempts",
        "error",
        "started",
        "first_token_at",
        "ended",
        "status",
        "sent",
        "_request",
        "_request_decoder",
        "_response",
        "_response_decoder",
    )

    def __init__(
        self,
        frontend: str,
        raw_request: dict[str, Any],
        model: str,
        stream: bool,
        client: ClientInfo | None = None,
        request_decoder: Callable[[dict[str, Any]], Request] | None = None,
    ) -> None:
        self.id = f"{next(_ids):x}-{int(time.time() * 1000) & 0xFFFFFF:06x}"
        self.client = client or ClientInfo()
        self.frontend = frontend
        self.raw_request = raw_request
        self.model = model
        self.stream = stream
        self.raw_body = b""  # the request body as received (a cheap place to look for markers)
        self.context: Any = None  # the ProxyContext serving this flow (plugins read settings there)
        self.disabled_plugins: frozenset[str] = frozenset()  # switched off for this session
        self.sessions: SessionStore | None = None  # set by the pipeline
        self._session: Session | None = None
        self.metadata: dict[str, Any] = {}
        self.routing: dict[str, Any] | None = None  # the core's failover state (targets left out, rate windows counted)
        self.trace: list[dict[str, Any]] = []
        # (hook, plugin, before, after) per implementation that changed the flow, when traced
        self.changes: list[tuple[str, str, dict[str, Any], dict[str, Any]]] | None = None
        self.target: Target | None = None
        self.attempts: list[Attempt] = []
        self.error: ProxyError | None = None
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.ended: float | None = None
        self.status: int | None = None
        # What was written to the client, ``(time.monotonic(), bytes)`` per write, when
        # recording (see record_wire); None otherwise, which costs nothing.
        self.sent: list[tuple[float, bytes]] | None = None
        self._request: Request | None = None
        self._request_decoder = request_decoder
        self._response: Response | None = None
        self._response_decoder: Callable[[], Response] | None = None

    # The canonical request is decoded on first use: a flow that no plugin reads and whose
    # backend speaks the client's protocol is forwarded from the wire body, untouched.
    @property
    def request(self) -> Request:
        if self._request is None:
            if self._request_decoder is None:
                # embeddings, legacy completions, images: forwarded as they are
                raise ProxyError(400, f"{self.frontend} requests have no canonical chat request", code="not_a_chat_request")
            try:
                self._request = self._request_decoder(self.raw_request)
            except (TypeError, AttributeError, KeyError, ValueError) as error:
                # The codecs name the field for the mistakes clients make; anything else of
                # the wrong shape is still the client's 400, never our 500.
                raise ProxyError(400, f"the request body does not have the shape the {self.frontend} API expects ({type(error).__name__}: {error})") from None
            self._request.model = self.model
        return self._request

    @request.setter
    def request(self, value: Request) -> None:
        self._request = value
        self.model = value.model

    @property
    def session(self) -> Session:
        """This conversation's :class:`~llmproxy.sessions.Session`, identified on first use
        (see llmproxy/sessions.py for how)."""
        if self._session is None:
            if self.sessions is None:
                self.sessions = SessionStore()
            self._session = self.sessions.for_flow(self)
        return self._session

    @property
    def request_decoded(self) -> bool:
        """True once anyone has read ``flow.request`` (so the wire body may be stale)."""
        return self._request is not None

    # Likewise the response: a pass-through answer is decoded only if someone reads it.
    @property
    def response(self) -> Response | None:
        if self._response is None and self._response_decoder is not None:
            decoder, self._response_decoder = self._response_decoder, None
            try:
                self._response = decoder()
            except ProxyError:
                self._response = None
        return self._response

    @response.setter
    def response(self, value: Response | None) -> None:
        self._response = value
        self._response_decoder = None

    def set_lazy_response(self, decoder: Callable[[], Response]) -> None:
        self._response = None
        self._response_decoder = decoder

    @property
    def response_pending(self) -> bool:
        """True while a backend's answer waits undecoded (nobody has read ``flow.response``)."""
        return self._response_decoder is not None

    @property
    def has_response(self) -> bool:
        return self._response is not None or self._response_decoder is not None

    def record_wire(self) -> None:
        """Keep this flow's raw bytes, for captures: each HTTP attempt's request and answer on
        ``flow.attempts`` (see :class:`Attempt`) and every write to the client in
        ``flow.sent``. Call it from ``request`` (before a backend is called); flows nobody
        records pay nothing."""
        if self.sent is None:
            self.sent = []

    @property
    def recording(self) -> bool:
        """True when :meth:`record_wire` was called for this flow."""
        return self.sent is not None

    def trace_changes(self) -> None:
        """Have the core record what each ``request`` and ``response`` implementation
        changes, in ``flow.changes`` (see the module docstring). Call it from ``request``
        with ``tryfirst=True`` so the implementations after yours are traced."""
        if self.changes is None:
            self.changes = []

    def snapshot(self, hook: str) -> dict[str, Any]:
        """The part of the flow ``hook``'s implementations change, as immutable JSON bytes
        (None while undecoded: decoding it here would change how the flow is forwarded)."""
        if hook == "response":
            return {"response": _json(self._response)}
        return {"model": self.model, "request": _json(self._request)}

    def note(self, plugin: str, what: str, **details: Any) -> None:
        """Record that ``plugin`` did ``what`` to this flow (shown in captures and the UI)."""
        self.trace.append({"plugin": plugin, "what": what, "at": time.monotonic() - self.started, **details})

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def __repr__(self) -> str:
        return f"<Flow {self.id} {self.frontend} model={self.model!r} stream={self.stream}>"


def _json(value: Any) -> bytes | None:
    if value is None:
        return None
    return orjson.dumps(value, default=repr, option=orjson.OPT_NON_STR_KEYS)
