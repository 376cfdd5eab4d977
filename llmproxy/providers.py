"""What a provider (backend type) implements, and a base class for HTTP providers.

A provider plugin registers a :class:`Provider` subclass under a type name through the
``register_providers`` hook. One instance exists per configured backend. It answers a flow
for one :class:`~llmproxy.router.Target` either as a complete reply or as a stream — in its
wire protocol (``protocol``, bytes the pipeline decodes with that protocol's codec only when
it must) or directly as canonical objects (for providers that do not speak HTTP).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, ClassVar

import aiohttp
import yarl

from .canonical import Request, Response, StreamEvent
from .codecs import get_codec
from .codecs.base import dumps, loads
from .config import BackendConfig
from .errors import ProxyError, retry_after_seconds
from .flow import Attempt, Flow, UpstreamRequest
from .manager import call_chain
from .redact import mask_literals
from .scheduling import ModelScheduler
from .toolnames import METADATA_KEY as TOOL_NAMES
from .toolnames import renamed, renames

if TYPE_CHECKING:
    from .discovery import BackendPoller

if TYPE_CHECKING:
    from .context import ProxyContext
    from .router import Target

log = logging.getLogger("llmproxy.providers")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can serve, declared by each provider type (shown by tooling; the
    router tries targets in order and does not consult it yet)."""

    tools: bool = True
    streaming: bool = True
    vision: bool = True
    reasoning: bool = False
    json_schema: bool = True
    max_context: int | None = None


@dataclass(slots=True)
class UpstreamReply:
    """A complete answer: wire ``body`` in ``protocol``, or an already canonical ``response``."""

    protocol: str
    body: bytes | None = None
    response: Response | None = None
    data: Any = None  # ``body`` parsed, once the pipeline has checked it is JSON


class UpstreamStream:
    """A streamed answer: wire ``chunks`` in ``protocol`` or canonical event ``batches``.

    The pipeline reads exactly one of them (or re-streams ``whole``) and always calls :meth:`close` (which must
    release the connection at once: that is how a client disconnect cancels the upstream).
    Wire chunks may instead be given as ``read``: a coroutine function returning the next
    chunk, ``b""`` at the end. A provider reading a socket passes its read there, so that no
    iterator stands between each read and the pipeline; ``chunks`` (any async iterator of
    bytes) is adapted to it.
    """

    def __init__(
        self,
        protocol: str,
        chunks: AsyncIterator[bytes] | None = None,
        batches: AsyncIterator[list[StreamEvent]] | None = None,
        on_close: Any = None,
        whole: bytes | None = None,
        read: Callable[[], Awaitable[bytes]] | None = None,
        secrets: tuple[bytes, ...] = (),
    ) -> None:
        self.protocol = protocol
        self.read = read if read is not None or chunks is None else read_from(chunks)
        self.batches = batches
        self.whole = whole  # the backend ignored "stream" and sent one complete body
        # The credentials the backend was asked with: some servers quote the key they got in
        # an error event, and what the pipeline forwards unparsed must not carry it on.
        self.secrets = secrets
        self._on_close = on_close

    def mask(self, data: bytes) -> bytes:
        """``data`` (whole frames) with :attr:`secrets` blanked out."""
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, _KEY_LABEL.encode())
        return data

    def also_on_close(self, callback: Any) -> None:
        """Run ``callback()`` (plain, not a coroutine) when the stream is closed, after what
        was registered before."""
        first = self._on_close
        if first is None:
            self._on_close = callback
            return

        def both() -> Any:
            try:
                result = first()
            finally:
                callback()
            return result

        self._on_close = both

    async def close(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            result = on_close()
            if asyncio.iscoroutine(result):
                await result


def read_from(items: AsyncIterator[Any]) -> Callable[[], Awaitable[Any]]:
    """``items`` as a coroutine function returning the next non-empty one, ``b""`` once
    they are exhausted (how the pipeline reads a stream)."""
    iterator = items.__aiter__()

    async def read() -> Any:
        async for item in iterator:
            if item:
                return item
        return b""

    return read


class Provider:
    """Base class of every backend type.

    Subclasses set ``protocol`` (a codec name, or "canonical"), may narrow ``Settings``
    (a :class:`~llmproxy.config.BackendConfig` subclass validating the backend's section),
    and implement :meth:`complete` and :meth:`stream`.
    """

    protocol: ClassVar[str] = "canonical"
    Settings: ClassVar[type[BackendConfig]] = BackendConfig
    default_base_url: ClassVar[str | None] = None
    default_models: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[Capabilities] = Capabilities()
    # The environment variable whose presence adds a backend of this type (named after the
    # type) when llmproxy runs without a config file.
    env_key: ClassVar[str | None] = None
    # Non-chat endpoints this backend serves as they are (path under base_url).
    endpoints: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, settings: BackendConfig, context: "ProxyContext") -> None:
        self.name = name
        self.settings = settings
        self.context = context
        # Model-affinity queue (scheduling.py); None without max_concurrency, which is
        # all the pipeline tests for.
        self.scheduler: ModelScheduler | None = None
        if settings.max_concurrency is not None:
            self.scheduler = ModelScheduler(name, settings.max_concurrency, settings.model_switch_after, settings.max_queue, settings.queue_timeout)
        # From model-list polling (discovery.py): None until a poll has decided (or when
        # discovery is off), True after a successful poll, False after unhealthy_after
        # failed polls in a row. A plain attribute: routing may read it per request.
        self.healthy: bool | None = None
        self.discovered_models: list[str] | None = None  # the last successful poll's list
        self.discovery: BackendPoller | None = None

    @property
    def models(self) -> list[str]:
        """Models this backend serves: the configured list, else the discovered one, else the
        type's defaults; empty means it passes any name through."""
        return list(self.settings.models or self.discovered_models or self.default_models)

    def accepts_model(self, model: str) -> bool:
        # Only a configured list restricts: a polled list may lag (a model pulled a moment
        # ago) and must not make routing flip with each poll; the backend's own 404 answers.
        return not self.settings.models or model in self.settings.models

    def status(self) -> dict[str, Any]:
        """What this backend is and how it fares, JSON-ready (for ``/readyz``-like views, the
        admin API, metrics): never a key value."""
        caps = self.capabilities
        status: dict[str, Any] = {
            "type": self.settings.type,
            "protocol": self.protocol,
            "models": self.models,
            "capabilities": {name: getattr(caps, name) for name in caps.__dataclass_fields__},
            "healthy": self.healthy,
        }
        if self.discovery is not None:
            status["discovery"] = self.discovery.status()
        if self.scheduler is not None:
            status["scheduler"] = self.scheduler.status()
        return status

    async def start(self) -> None:
        """Open connection pools; called once before the server accepts connections."""

    async def close(self) -> None:
        """Release connection pools; called once at shutdown."""

    async def complete(self, flow: Flow, target: "Target") -> UpstreamReply:
        raise NotImplementedError

    async def stream(self, flow: Flow, target: "Target", passthrough: bool) -> UpstreamStream:
        """Begin a stream: an :class:`UpstreamStream` of wire chunks in this provider's protocol
        (``read=``, one call per socket read, or ``chunks=``, any async iterator) or of
        canonical event ``batches``. ``passthrough`` means the wire chunks go to the client
        as they are (no decoding), so the request should not add anything the client did
        not ask for."""
        raise NotImplementedError

    async def forward(self, flow: Flow, target: "Target", endpoint: str, stream: bool) -> "UpstreamReply | UpstreamStream":
        """Serve a non-chat OpenAI endpoint (``embeddings``, ``completions``,
        ``images/generations``) with the client's body in ``flow.raw_request``."""
        raise ProxyError(
            400,
            f"backend {self.name!r} (type {type(self).__name__}) does not serve /v1/{endpoint}; "
            "route this model to an OpenAI-compatible backend",
            code="unsupported_endpoint",
        )

    async def count_tokens(self, flow: Flow, target: "Target") -> int | None:
        """The backend's own count of the request's input tokens, or None when it has no
        counting endpoint (llmproxy then counts locally)."""
        return None

    async def probe(self) -> tuple[bool, str]:
        """(reachable, what was found), for ``/readyz``. A backend that answers by itself
        (offline, replay) is always reachable."""
        return True, "local"


class HTTPProvider(Provider):
    """A provider that POSTs JSON to ``base_url + path`` with one aiohttp session per backend."""

    path: ClassVar[str] = ""

    def __init__(self, name: str, settings: BackendConfig, context: "ProxyContext") -> None:
        super().__init__(name, settings, context)
        self.session: aiohttp.ClientSession | None = None
        self.base_url = (settings.base_url or self.default_base_url or "").rstrip("/")
        # Keys stay references; what is kept here is only their names and rest times.
        count = len(settings.api_keys)
        self.key_names: tuple[str, ...] = tuple(ref.label or f"{name}#{i}" for i, ref in enumerate(settings.api_keys))
        self.key_resting_until: list[float] = [0.0] * count  # time.monotonic() a key rests until (429)
        self._key_turn = 0  # key_strategy round_robin: where the next request starts
        self._probe_cache: tuple[float, tuple[bool, str]] | None = None
        self._probing: asyncio.Future[tuple[bool, str]] | None = None

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        status = super().status()
        status["base_url"] = self.base_url
        status["keys"] = [
            {"name": name, "resting_for": max(0.0, round(until - now, 3))}
            for name, until in zip(self.key_names, self.key_resting_until)
        ]
        return status

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.settings.timeout.connect, sock_read=self.settings.timeout.read
        )
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections, ttl_dns_cache=300)
        # auto_decompress stays on; we never forward the backend's content-encoding header.
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, json_serialize=lambda o: dumps(o).decode())
        if self.settings.discovery is not None:
            from .discovery import BackendPoller

            self.discovery = BackendPoller(self, self.settings.discovery)
            self.discovery.start()  # in the background: start-up never waits for a backend

    async def close(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self._probing is not None:
            self._probing.cancel()
        if self.session is not None:
            await self.session.close()
            self.session = None

    # Seconds a /readyz probe result is kept, and how long its TCP connect may take.
    probe_ttl: ClassVar[float] = 5.0
    probe_timeout: ClassVar[float] = 2.0

    async def probe(self) -> tuple[bool, str]:
        """A TCP connect to ``base_url``'s host and port (no request is sent), cached for
        ``probe_ttl`` seconds; concurrent callers share one connect."""
        now = time.monotonic()
        cached = self._probe_cache
        if cached is not None and now - cached[0] < self.probe_ttl:
            return cached[1]
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._connect())
            self._probing.add_done_callback(self._probed)
        # shielded: a /readyz caller that goes away does not cancel the others' connect
        return await asyncio.shield(self._probing)

    def _probed(self, task: "asyncio.Future[tuple[bool, str]]") -> None:
        self._probing = None
        if not task.cancelled() and task.exception() is None:
            self._probe_cache = (time.monotonic(), task.result())

    async def _connect(self) -> tuple[bool, str]:
        url = yarl.URL(self.base_url) if self.base_url else None
        if url is None or not url.host:
            return False, "no base_url"
        port = url.port or (443 if url.scheme == "https" else 80)
        where = f"{url.host}:{port}"
        limit = min(self.probe_timeout, self.settings.timeout.connect)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(url.host, port), limit)
        except asyncio.TimeoutError:
            return False, f"{where}: no connection within {limit:g}s"
        except (OSError, ValueError) as error:  # refused, unresolvable, a malformed host
            return False, f"{where}: {getattr(error, 'strerror', None) or type(error).__name__}"
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True, where

    # -- the model list (discovery, `llmproxy doctor`, `providers check`) -------------------
    def models_url(self) -> str:
        """Where the backend lists its models (OpenAI-compatible: ``base_url/models``)."""
        return self.base_url + "/models"

    def models_headers(self, key: str | None) -> dict[str, str]:
        """The headers of a model-list request carrying ``key``."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        headers.update(self.settings.headers)
        return headers

    def model_names(self, data: Any) -> list[str]:
        """Model names from a list answer: OpenAI's and Anthropic's ``data[].id``, Gemini's
        ``models[].name`` (without ``models/``). ValueError when it is neither."""
        if isinstance(data, dict):
            if isinstance(data.get("data"), list):
                return [str(m["id"]) for m in data["data"] if isinstance(m, dict) and "id" in m]
            if isinstance(data.get("models"), list):
                return [str(m["name"]).removeprefix("models/") for m in data["models"] if isinstance(m, dict) and "name" in m]
        raise ValueError("not a model list")

    async def list_models(self, key_index: int | None = None) -> list[str]:
        """GET the backend's model list with key ``key_index`` (default: the first key that
        resolves) and return the names. Failures are ProxyErrors: the backend's status and
        message (401/403: the key was rejected), 502 unreachable or unreadable, 504 timeout."""
        assert self.session is not None, "provider not started"
        keys = self.settings.api_keys
        if key_index is not None:
            key = keys[key_index].get()
        else:
            key = next((value for value in (ref.get() for ref in keys) if value), None)
        if keys and not key:
            missing = keys if key_index is None else [keys[key_index]]
            raise ProxyError(500, f"backend {self.name!r} has no usable API key: set {', '.join(k.describe() for k in missing)}", kind="configuration_error")
        url = self.models_url()
        try:
            async with self.session.get(url, headers=self.models_headers(key), allow_redirects=False) as response:
                payload = await response.read()
                status = response.status
                location = response.headers.get("Location")
        except asyncio.TimeoutError:
            raise ProxyError(504, f"backend {self.name!r} did not list its models in time", kind="timeout_error") from None
        except aiohttp.ClientError as error:
            raise ProxyError(502, f"backend {self.name!r} is unreachable: {type(error).__name__}", kind="upstream_unreachable") from None
        if status >= 400:
            raise self.upstream_error(status, payload)
        if status >= 300:
            raise self.redirect_error(status, location)
        try:
            return self.model_names(loads(payload))
        except ValueError:
            raise ProxyError(502, f"backend {self.name!r} answered {url} with something that is not a model list") from None

    # -- what subclasses adapt -------------------------------------------------------------
    def api_key(self) -> tuple[str | None, str | None]:
        """(key, key name for logs) for the next request (see :meth:`choose_key`)."""
        index, value = self.choose_key()
        return value, (self.key_names[index] if index >= 0 else None)

    def choose_key(self, tried: int = 0, rested_only: bool = False) -> tuple[int, str | None]:
        """(index, value) of the key the next request uses: with ``key_strategy`` fill_first
        the first key that resolves and is not resting after a 429, with round_robin the
        next such key after the one used last. When every key rests, the one whose rest ends
        first (a backend is never refused here; the 429 it may answer hands over to the
        next target). ``tried`` is a bit mask of keys this request has used already, which
        are left out; with ``rested_only`` a resting key is not chosen either, and (-1, None)
        says no key is left. (-1, None) as well for a backend without keys."""
        keys = self.settings.api_keys
        count = len(keys)
        if not count:
            return -1, None
        rotate = self.settings.key_strategy == "round_robin"
        start = self._key_turn % count if rotate else 0
        now = time.monotonic()
        resting = self.key_resting_until
        fallback, fallback_value, fallback_until = -1, None, 0.0
        for step in range(count):
            index = start + step
            if index >= count:
                index -= count
            if tried >> index & 1:
                continue
            value = keys[index].get()
            if not value:
                continue
            until = resting[index]
            if until <= now:
                if rotate:
                    self._key_turn = index + 1
                return index, value
            if fallback < 0 or until < fallback_until:
                fallback, fallback_value, fallback_until = index, value, until
        if fallback >= 0 and not rested_only:
            return fallback, fallback_value
        if tried or fallback >= 0:
            return -1, None
        raise ProxyError(
            500,
            f"backend {self.name!r} has no usable API key: set {', '.join(k.describe() for k in keys)}",
            kind="configuration_error",
        )

    def rest_key(self, index: int, retry_after: str | None) -> float:
        """Rest key ``index`` after a 429: for the answer's ``Retry-After`` (seconds or an
        HTTP date) when it has one, else for ``key_cooldown``. Returns the seconds."""
        seconds = retry_after_seconds(retry_after)
        if seconds is None:
            seconds = self.settings.key_cooldown
        self.key_resting_until[index] = max(self.key_resting_until[index], time.monotonic() + seconds)
        return seconds

    def headers(self, key: str | None, flow: Flow) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        headers.update(self.settings.headers)
        return headers

    def url(self, target: "Target", stream: bool) -> str:
        return self.base_url + self.path

    def body(self, flow: Flow, target: "Target", stream: bool, passthrough: bool) -> dict[str, Any]:
        """The wire body: the client's own body when it speaks our protocol and nothing
        read the canonical request (so every unknown field passes untouched)."""
        if flow.frontend == self.protocol and not flow.request_decoded:
            body = dict(flow.raw_request)
            body["model"] = target.model
            if not stream and body.get("stream"):  # a stream asked without streaming (stream_fallback)
                body["stream"] = False
                body.pop("stream_options", None)
            return body
        flow.request.stream = stream
        self.check_one_choice(flow)
        return get_codec(self.protocol).encode_request(self.wire_request(flow), target.model)

    def wire_request(self, flow: Flow) -> Request:
        """The canonical request as this backend may be sent it: tool names its API would
        refuse renamed (see llmproxy/toolnames.py); the flow remembers how to name the calls
        of this attempt's answer back."""
        request = flow.request
        mapping = renames(request, self.protocol) if request.tools and flow.frontend != self.protocol else {}
        if not mapping:
            return request  # (dispatch clears an earlier attempt's mapping before each attempt)
        flow.metadata[TOOL_NAMES] = {safe: name for name, safe in mapping.items()}
        return renamed(request, mapping)

    def check_one_choice(self, flow: Flow) -> None:
        """The canonical answer holds one choice: asked for more across protocols, the
        others would be lost on the way back, so the client hears it."""
        n = flow.request.params.get("n")
        if n not in (None, 1) and flow.frontend != self.protocol:
            raise ProxyError(400, f"n={n}: llmproxy translates one choice between protocols, and backend {self.name!r} speaks "
                                  f"{self.protocol}: ask for one, or route the model to a backend of the client's protocol", param="n")

    def error_message(self, status: int, payload: bytes) -> str:
        """The backend's own error message, for the client's error."""
        try:
            data = loads(payload)
        except ValueError:
            # Not an API error body (a plain "404: Not Found" from a server without the
            # endpoint, a gateway's HTML page): say whose answer it is.
            text = " ".join(payload.decode(errors="replace").split())[:500]
            return f"backend {self.name!r} answered HTTP {status}" + (f": {text}" if text else "")
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict):
                return str(err.get("message") or err)[:2000]
            return str(err)[:2000]
        return str(data)[:2000]

    def upstream_error(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> ProxyError:
        """The backend's error as the client's: its status and message, and its error
        ``code`` when it has one (clients act on codes like ``context_length_exceeded``)."""
        code = param = None
        try:
            data = loads(payload)
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                if isinstance(err.get("code"), str):
                    code = err["code"]
                if isinstance(err.get("param"), str):  # the request field it refused (OpenAI)
                    param = err["param"]
        except ValueError:
            pass
        return ProxyError(status, self.redact(self.error_message(status, payload)), kind=_kind_for(status), param=param, code=code, headers=headers)

    def redirect_error(self, status: int, location: str | None) -> ProxyError:
        """A 3xx, never followed: the backend's key would go wherever ``Location`` points
        (aiohttp drops only ``Authorization`` on a redirect to another host, not
        ``x-api-key`` or ``x-goog-api-key``). Where it points is named, without its query."""
        where = location.split("?", 1)[0][:300] if location else "nowhere"
        return ProxyError(502, f"backend {self.name!r} answered HTTP {status}, a redirect to {where}: llmproxy does not follow redirects "
                               "(the backend's key would go along); set the backend's base_url to where it points", kind="upstream_error")

    def redact(self, text: str) -> str:
        """``text`` with this backend's keys blanked out: some servers echo the credential
        they were sent in their error messages, which go to the client and the log."""
        return mask_literals(text, self.key_values(), _KEY_LABEL)

    def key_values(self) -> list[str]:
        """This backend's keys, resolved now (unset ones left out): what never leaves llmproxy."""
        return [value for value in (ref.get() for ref in self.settings.api_keys) if value]

    # -- the exchange ----------------------------------------------------------------------
    async def _send(
        self, flow: Flow, target: "Target", stream: bool, passthrough: bool, url: str | None = None, body: dict[str, Any] | None = None
    ) -> aiohttp.ClientResponse:
        """Send the request and return the backend's answer once it has headers; an error
        status raises ProxyError. A 429 rests the key it was sent with and, while the
        backend has a key that is not resting, sends again at once with that key."""
        pinned = target.key_index
        if pinned is None:
            index, key = self.choose_key()
        else:  # the alias target names its key: that one only, resting or not
            index, key = pinned, self.settings.api_keys[pinned].get()
            if not key:
                raise ProxyError(500, f"backend {self.name!r}: {self.settings.api_keys[pinned].describe()} (key {self.key_names[pinned]}) is not set", kind="configuration_error")
        tried = 0
        while True:
            if body is None or tried:
                # Each try gets its own body: upstream_request hooks may change it in place.
                sent = self.body(flow, target, stream, passthrough) if body is None else dict(body)
            else:
                sent = body
            try:
                return await self._exchange(flow, target, stream, url, sent, key, self.key_names[index] if index >= 0 else None)
            except ProxyError as error:
                if error.status != 429 or index < 0:
                    raise
                seconds = self.rest_key(index, error.headers.get("Retry-After"))
                if pinned is not None:
                    raise
                tried |= 1 << index
                rested = self.key_names[index]
                index, key = self.choose_key(tried, rested_only=True)
                if index < 0:
                    raise
                log.info("backend %s: key %s was rate-limited (resting %.1fs); trying key %s", self.name, rested, seconds, self.key_names[index])

    async def _exchange(
        self, flow: Flow, target: "Target", stream: bool, url: str | None, body: dict[str, Any], key: str | None, key_name: str | None
    ) -> aiohttp.ClientResponse:
        """One request with one key: an attempt of its own in ``flow.attempts``."""
        assert self.session is not None, "provider not started"
        upstream = UpstreamRequest("POST", url or self.url(target, stream), self.headers(key, flow), body)
        chain = self.context.chains.of(flow).upstream_request
        if chain:
            await call_chain(chain, skip=flow.disabled_plugins, flow=flow, upstream=upstream)
        attempt = Attempt(backend=self.name, model=target.model, key_name=key_name)
        flow.attempts.append(attempt)
        recording = flow.sent is not None
        if recording:
            attempt.request = upstream
        try:
            response = await self.session.request(upstream.method, upstream.url, headers=upstream.headers, data=dumps(upstream.body), allow_redirects=False)
        except asyncio.TimeoutError:
            attempt.error = "timeout"
            attempt.ended = time.monotonic()
            raise ProxyError(504, f"backend {self.name!r} did not answer in time", kind="timeout_error") from None
        except aiohttp.ClientError as error:
            attempt.error = type(error).__name__
            attempt.ended = time.monotonic()
            raise ProxyError(502, f"backend {self.name!r} is unreachable: {type(error).__name__}", kind="upstream_unreachable") from None
        attempt.status = response.status
        if recording:
            attempt.response_headers = dict(response.headers)
        if response.status >= 400:
            try:
                payload = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                payload = b""
            finally:
                response.release()
            attempt.error = f"HTTP {response.status}"
            attempt.ended = time.monotonic()
            if recording:
                attempt.response_body = payload
            headers = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else None
            raise self.upstream_error(response.status, payload, headers)
        if response.status >= 300:
            response.release()
            attempt.error = f"HTTP {response.status}"
            attempt.ended = time.monotonic()
            raise self.redirect_error(response.status, response.headers.get("Location"))
        return response

    async def send_json(self, flow: Flow, target: "Target", url: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``url`` for ``flow`` (a token count, an embedding …) as an attempt
        like any other — ``upstream_request`` hooks, recording, errors as ProxyError — and
        return the parsed JSON answer."""
        response = await self._send(flow, target, False, True, url=url, body=body)
        reply = await self._reply(response, flow.attempts[-1])
        try:
            return loads(reply.body or b"")
        except ValueError:
            raise ProxyError(502, f"backend {self.name!r} sent a body that is not JSON") from None

    async def forward(self, flow: Flow, target: "Target", endpoint: str, stream: bool) -> "UpstreamReply | UpstreamStream":
        if endpoint not in self.endpoints:
            return await super().forward(flow, target, endpoint, stream)
        response = await self._send(flow, target, stream, True, url=f"{self.base_url}/{endpoint}", body={**flow.raw_request, "model": target.model})
        attempt = flow.attempts[-1]
        return await (self._stream(response, attempt) if stream else self._reply(response, attempt))

    async def complete(self, flow: Flow, target: "Target") -> UpstreamReply:
        response = await self._send(flow, target, False, False)
        reply = await self._reply(response, flow.attempts[-1])
        try:  # parsed here, inside the attempt: a body that is not JSON fails over like a 502
            reply.data = loads(reply.body or b"")
        except ValueError:
            flow.attempts[-1].error = "malformed JSON"
            raise ProxyError(502, f"backend {self.name!r} sent a body that is not JSON", kind="upstream_unreachable") from None
        data = reply.data
        if isinstance(data, dict) and data.get("error") and not any(key in data for key in _ANSWER_KEYS):
            # An error with status 200, as some gateways send one: a failed attempt (which
            # may fail over), with the backend's message, not an answer missing its parts.
            flow.attempts[-1].error = "an error with HTTP 200"
            raise self.upstream_error(502, reply.body or b"")
        return reply

    async def _reply(self, response: aiohttp.ClientResponse, attempt: Attempt | None = None) -> UpstreamReply:
        try:
            body = await response.read()
        except asyncio.TimeoutError:
            raise ProxyError(504, f"backend {self.name!r} stopped answering", kind="timeout_error") from None
        except aiohttp.ClientError as error:
            raise _network(ProxyError(502, f"backend {self.name!r} broke off its answer: {type(error).__name__}")) from None
        finally:
            response.release()
            if attempt is not None:
                attempt.ended = time.monotonic()
        if attempt is not None and attempt.request is not None:  # the request is kept only when recording
            attempt.response_body = body
        return UpstreamReply(self.protocol, body=body)

    async def stream(self, flow: Flow, target: "Target", passthrough: bool) -> UpstreamStream:
        response = await self._send(flow, target, True, passthrough)
        return await self._stream(response, flow.attempts[-1])

    async def _stream(self, response: aiohttp.ClientResponse, attempt: Attempt | None = None) -> UpstreamStream:
        recording = attempt is not None and attempt.request is not None  # kept only when recording
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("text/html"):
            # A sign-in page, a web UI at base_url, a gateway's page: no stream will come.
            try:
                page = await response.content.read(2048)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                page = b""
            finally:
                response.close()
                if attempt is not None:
                    attempt.ended = time.monotonic()
            text = " ".join(page.decode(errors="replace").split())[:200]
            raise ProxyError(502, f"backend {self.name!r} answered the stream with a web page (HTTP {response.status}, text/html): {self.redact(text)}",
                             kind="upstream_error")
        if "json" in content_type and "event-stream" not in content_type:
            # Some servers ignore stream: true; the pipeline re-streams the full answer.
            try:
                body = await response.read()
            finally:
                response.release()
                if attempt is not None:
                    attempt.ended = time.monotonic()
            if recording:
                attempt.response_body = body  # type: ignore[union-attr]
            return UpstreamStream(self.protocol, whole=body)
        record: list[tuple[float, bytes]] | None = None
        if recording:
            record = attempt.response_chunks = []  # type: ignore[union-attr]
        # The first bytes are read here, inside the attempt: a backend that answers 200 and
        # then goes silent or hangs up before sending anything fails over like one that
        # refused, since nothing has reached the client yet.
        try:
            first = await response.content.readany()
        except asyncio.TimeoutError:
            response.close()
            raise _broken(ProxyError(504, f"backend {self.name!r} went silent before its first event", kind="timeout_error")) from None
        except aiohttp.ClientError as error:
            response.close()
            raise _broken(ProxyError(502, f"backend {self.name!r} broke off the stream before its first event: {type(error).__name__}", kind="upstream_unreachable")) from None
        if not first:
            response.close()
            raise _broken(ProxyError(502, f"backend {self.name!r} ended the stream without sending anything", kind="upstream_unreachable"))
        if record is not None:
            record.append((time.monotonic(), first))
        unread = [first]
        readany = response.content.readany

        async def read() -> bytes:
            # One call per read of the socket and no iterator around it: a paced stream
            # pays whatever stands between the socket and the pipeline once per event.
            if unread:
                return unread.pop()
            try:
                chunk = await readany()
            except asyncio.TimeoutError:
                raise ProxyError(504, f"backend {self.name!r} went silent mid-stream", kind="timeout_error") from None
            except aiohttp.ClientError as error:
                raise _network(ProxyError(502, f"backend {self.name!r} broke off the stream: {type(error).__name__}")) from None
            if not chunk:
                if attempt is not None and attempt.ended is None:
                    attempt.ended = time.monotonic()
            elif record is not None:
                record.append((time.monotonic(), chunk))
            return chunk

        def close() -> None:
            # The pipeline may stop reading before the stream ends (a stop event, a
            # disconnect): the attempt ends here then, if its last read did not end it.
            if attempt is not None and attempt.ended is None:
                attempt.ended = time.monotonic()
            # close(), not release(): dropping the connection is what tells the backend to stop.
            response.close()

        return UpstreamStream(self.protocol, read=read, on_close=close, secrets=tuple(value.encode() for value in self.key_values()))


_KEY_LABEL = "[backend key]"  # what stands where a backend quoted its key
# What holds the answer in each protocol's response body (Chat, Responses, Anthropic, Gemini).
_ANSWER_KEYS = ("choices", "output", "content", "candidates")


def _network(error: ProxyError) -> ProxyError:
    """Mark a failure of the connection rather than of the backend's answer (for breakers)."""
    error.network = True  # type: ignore[attr-defined]
    return error


def _broken(error: ProxyError) -> ProxyError:
    """Mark a stream that failed after its headers (see ``BackendConfig.stream_fallback``)."""
    error.stream_broken = True  # type: ignore[attr-defined]
    return error


def _kind_for(status: int) -> str:
    from .errors import KIND_BY_STATUS

    return KIND_BY_STATUS.get(status, "upstream_error")
