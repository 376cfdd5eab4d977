"""The way of one request: wire body → Flow → hook chains → backend → hook chains → wire.

:func:`handle` is what every front-end route calls with its protocol's codec. Errors at any
step become the client's protocol's error (JSON before the response began, an SSE error
frame after); ``flow_done`` sees every flow, failed ones included.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from .canonical import EventKind, Response, ResponseBuilder, StreamEvent, response_events
from .codecs import get_codec
from .codecs.base import Codec, complete_frames_end, dumps, loads
from .context import CONTEXT, ProxyContext
from .errors import MAX_STREAM_RETRIES, ProxyError, RetryStream
from .flow import ClientHeaders, ClientInfo, Flow
from .manager import call_chain, call_chain_logged
from .providers import UpstreamReply, UpstreamStream

log = logging.getLogger("llmproxy.flow")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON_TYPE = "application/json"
_TERMINAL = (EventKind.STOP, EventKind.ERROR)
# Errors worth trying the next target for; anything else is the request's own fault.
RETRYABLE = frozenset((408, 409, 429, 500, 502, 503, 504, 529))
_background: set[asyncio.Task[Any]] = set()


def authenticate(request: web.Request, ctx: ProxyContext) -> ClientInfo:
    headers = request.headers
    client = ClientInfo(address=request.remote, user_agent=headers.get("User-Agent", ""), headers=ClientHeaders(headers))
    keys = ctx.client_keys
    if not keys:
        return client
    presented = headers.get("Authorization", "")
    if presented[:7].lower() == "bearer ":
        presented = presented[7:].strip()
    else:
        presented = headers.get("x-api-key") or headers.get("x-goog-api-key") or request.query.get("key", "")
    given = presented.encode()
    matched = None
    for name, key in keys:  # compare against every key: the time taken says nothing
        if hmac.compare_digest(given, key) and matched is None:
            matched = name
    if matched is None:
        raise ProxyError(401, "invalid or missing API key: send it as 'Authorization: Bearer <key>', 'x-api-key: <key>' or 'x-goog-api-key: <key>'")
    client.key_name = matched
    return client


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        # aiohttp's exception does not keep the limit; the request does.
        raise ProxyError(413, f"request body is larger than the limit of {request.client_max_size} bytes (proxy.max_body_bytes)") from None
    if not raw:
        raise ProxyError(400, "request body is empty; expected a JSON object")
    try:
        body = loads(raw)
    except ValueError as error:
        raise ProxyError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    return body


Runner = Callable[[Flow, ProxyContext, "Writer"], Awaitable[None]]


async def handle(
    request: web.Request, codec: Codec, inject: dict[str, Any] | None = None, run: Runner | None = None, frontend: str | None = None
) -> web.StreamResponse:
    """Serve one client call in ``codec``'s protocol: authenticate, read the body, run the
    flow, and whatever happens answer in that protocol and let ``flow_done`` see it.

    ``inject`` adds fields the protocol carries outside the body (Gemini's model and stream
    flag are in the URL). ``run`` replaces the chat flow for the other kinds of call
    (token counts, embeddings …); it gets a flow with the body read and sets model and stream
    itself. ``frontend`` names such a flow when it is not chat (then it has no canonical
    request)."""
    ctx = request.app[CONTEXT]
    task = asyncio.current_task()
    if task is not None:  # aiohttp runs each request in its own task; shutdown drains them
        ctx.inflight.add(task)
        task.add_done_callback(ctx.inflight.discard)
    flow = Flow(frontend or codec.protocol, {}, "", False, request_decoder=None if frontend else codec.decode_request)
    flow.context = ctx  # set first: flow_done sees refused flows (bad key, bad JSON) too
    writer = Writer(request, codec, flow)
    try:
        flow.client = authenticate(request, ctx)
        flow.raw_request = await read_json(request)
        flow.raw_body = await request.read()  # aiohttp keeps the bytes it read: no copy
        flow.sessions = ctx.sessions
        if ctx.sessions.plugin_switches:
            flow.disabled_plugins = flow.session.disabled_plugins()
        if inject:
            flow.raw_request.update(inject)
        if run is None:
            flow.model, flow.stream = codec.peek(flow.raw_request)
            await _run(flow, ctx, writer)
        else:
            await run(flow, ctx, writer)
    except ProxyError as error:
        await _fail(flow, ctx, writer, error)
    except asyncio.CancelledError:
        if ctx.stopping:
            # Cut by the shutdown drain, not by the client: say so in the stream's protocol.
            flow.error = ProxyError(503, "llmproxy is shutting down")
            if writer.started:
                try:
                    await asyncio.wait_for(writer.stream_error(flow.error), 1.0)
                except BaseException:  # noqa: BLE001 - best effort while being cancelled
                    pass
            _spawn(_done(flow, ctx))
            raise
        # The client went away; the upstream was closed on the way out. Finish the books
        # in the background: this task may not await anything any more.
        flow.error = ProxyError(499, "client disconnected")
        flow.status = flow.status or 499
        _spawn(_done(flow, ctx))
        raise
    except ConnectionError:
        # A write found the client gone before the cancellation did.
        flow.error = ProxyError(499, "client disconnected")
        flow.status = flow.status or 499
    except Exception as error:
        plugin = getattr(error, "llmproxy_plugin", None)
        log.exception("flow %s failed%s", flow.id, f" in plugin {plugin}" if plugin else "")
        where = f"plugin {plugin!r} failed" if plugin else "internal error"
        await _fail(flow, ctx, writer, ProxyError(500, f"{where} ({type(error).__name__}); see the proxy log, flow {flow.id}"))
    await _done(flow, ctx)
    return writer.response


async def _run(flow: Flow, ctx: ProxyContext, writer: "Writer") -> None:
    chains = ctx.chains
    if chains.request:
        await call_chain(chains.request, stop=lambda: flow.has_response, skip=flow.disabled_plugins, flow=flow)
    if flow.stream:
        processors = _stream_processors(flow, ctx) if chains.stream_start else []
        if flow.has_response:
            await writer.stream_events(_once(response_events(flow.response)), processors)  # type: ignore[arg-type]
            return
        for retry in range(MAX_STREAM_RETRIES + 1):
            upstream = await dispatch(flow, ctx, processors)
            try:
                await writer.relay(upstream, processors)
                return
            except RetryStream:
                # A processor wants the backend asked again; only while nothing reached the client.
                if flow.first_token_at is not None or retry == MAX_STREAM_RETRIES:
                    raise
                log.info("flow %s: a stream processor asked for the answer again", flow.id)
            finally:
                await upstream.close()
            processors = _stream_processors(flow, ctx) if chains.stream_start else []
        return
    raw: bytes | None = None
    if not flow.has_response:
        reply = await dispatch(flow, ctx, None)
        if reply.response is not None:
            flow.response = reply.response
        else:
            raw = reply.body or b""
            try:
                data = loads(raw)
            except ValueError:
                raise ProxyError(502, f"backend {flow.target.backend!r} sent a body that is not JSON") from None  # type: ignore[union-attr]
            upstream_codec = get_codec(reply.protocol)
            if reply.protocol == flow.frontend:
                # Decoded only if a hook reads it: an answer nobody looked at goes out
                # exactly as the backend sent it.
                flow.set_lazy_response(lambda: upstream_codec.decode_response(data))
            else:
                flow.response = upstream_codec.decode_response(data)
    if chains.response:
        await call_chain(chains.response, skip=flow.disabled_plugins, flow=flow)
    if flow.response_pending and raw is not None:
        await writer.json(raw, raw=True)
        return
    if flow.response is None:
        raise ProxyError(502, "the backend's answer could not be read in its own protocol")
    await writer.json(dumps(writer.codec.encode_response(flow.response, flow.request if flow.request_decoded else None)))


def _stream_processors(flow: Flow, ctx: ProxyContext) -> list[tuple[str, Any]]:
    processors = []
    for impl in ctx.chains.stream_start:
        if impl.plugin in flow.disabled_plugins:
            continue
        try:
            processor = impl.function(*[{"flow": flow}[name] for name in impl.argnames])
        except Exception as error:
            error.llmproxy_plugin = impl.plugin  # type: ignore[attr-defined]
            raise
        if processor is not None:
            processors.append((impl.plugin, processor))
    return processors


async def dispatch(flow: Flow, ctx: ProxyContext, processors: list[Any] | None) -> Any:
    """Try each target in order; fail over on errors that another target may not have."""

    async def attempt(target: Any) -> Any:
        if processors is None:
            return await target.provider.complete(flow, target)
        passthrough = not processors and target.provider.protocol == flow.frontend
        return await target.provider.stream(flow, target, passthrough)

    return await failover(flow, ctx, attempt)


async def failover(flow: Flow, ctx: ProxyContext, attempt: Callable[[Any], Awaitable[Any]]) -> Any:
    """``attempt(target)`` for each of the flow's targets in order until one succeeds; the
    next target is tried only for errors another backend may not have (``RETRYABLE``)."""
    router = ctx.router
    targets = router.route(flow.model)  # the alias's strategy picks the first
    last = len(targets) - 1
    for i, target in enumerate(targets):
        flow.target = target
        router.begin(target)  # in flight until the answer is read (a stream: until closed)
        try:
            result = await attempt(target)
        except BaseException as error:
            router.end(target)
            if not isinstance(error, ProxyError) or error.status not in RETRYABLE or i == last:
                raise
            log.warning("flow %s: %s failed (%s %s); trying the next target", flow.id, target.label, error.status, error.message)
            continue
        if isinstance(result, UpstreamStream) and result.whole is None:
            result.also_on_close(lambda target=target: router.end(target))
        else:
            router.end(target)
        return result
    raise AssertionError("unreachable")


async def _fail(flow: Flow, ctx: ProxyContext, writer: "Writer", error: ProxyError) -> None:
    # A response already on the flow (say, a backend answer a response hook refused) is not
    # an answer from an error hook; a different one, or a cleared error, is.
    refused = None if writer.started else flow.response
    flow.error = error
    if ctx.chains.error:
        await call_chain_logged(ctx.chains.error, skip=flow.disabled_plugins, flow=flow)
    if writer.started:
        flow.error = flow.error or error
        await writer.stream_error(flow.error)
    elif flow.has_response and (flow.error is None or flow.response is not refused):
        # an error hook answered instead, in the form the client asked for
        flow.error = None
        if flow.stream:
            await writer.stream_events(_once(response_events(flow.response)), [])  # type: ignore[arg-type]
        else:
            await writer.json(dumps(writer.codec.encode_response(flow.response, None)))  # type: ignore[arg-type]
    else:
        flow.error = flow.error or error
        await writer.error(flow.error)


async def _done(flow: Flow, ctx: ProxyContext) -> None:
    flow.ended = time.monotonic()
    if ctx.chains.flow_done:
        await call_chain_logged(ctx.chains.flow_done, skip=flow.disabled_plugins, flow=flow)
    if log.isEnabledFor(logging.INFO):
        target = flow.target.label if flow.target else "-"
        outcome = f"{flow.status}" + (f" {flow.error.message}" if flow.error else "")
        log.info("%s %s %s → %s %s %.0fms", flow.id, flow.frontend, flow.model or "-", target, outcome, (flow.ended - flow.started) * 1000)


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _once(events: list[StreamEvent]) -> Any:
    yield events


def _apply(processors: list[tuple[str, Any]], events: list[StreamEvent]) -> list[StreamEvent]:
    for name, processor in processors:
        out: list[StreamEvent] = []
        try:
            for event in events:
                result = processor(event)
                if result is None:
                    continue
                if result.__class__ is StreamEvent:
                    out.append(result)
                else:
                    out.extend(result)
        except Exception as error:
            error.llmproxy_plugin = name  # type: ignore[attr-defined]
            raise
        events = out
    return events


def _flush(processors: list[tuple[str, Any]]) -> list[StreamEvent]:
    """Ask each processor for what it held; what one releases passes through the rest."""
    events: list[StreamEvent] = []
    for i, (name, processor) in enumerate(processors):
        if events:
            events = _apply(processors[i : i + 1], events)
        try:
            held = processor(None)
        except Exception as error:
            error.llmproxy_plugin = name  # type: ignore[attr-defined]
            raise
        if held:
            events.extend([held] if held.__class__ is StreamEvent else held)
    return events


def stamp_routing_headers(response: web.StreamResponse, flow: Flow) -> None:
    """``proxy.response_headers``: which backend, model and key (its name, never the key)
    served the flow, and how many upstream requests it took."""
    attempts = flow.attempts
    headers = response.headers
    headers["x-llmproxy-attempts"] = str(len(attempts))
    if attempts:
        last = attempts[-1]
        headers["x-llmproxy-backend"] = last.backend
        headers["x-llmproxy-model"] = last.model
        if last.key_name:
            headers["x-llmproxy-key"] = last.key_name
    elif flow.target is not None:
        headers["x-llmproxy-backend"] = flow.target.backend
        headers["x-llmproxy-model"] = flow.target.model


class Writer:
    """Writes the client's answer once: JSON, or an SSE stream begun on first use."""

    __slots__ = ("request", "codec", "flow", "response", "started", "encoder")

    def __init__(self, request: web.Request, codec: Codec, flow: Flow) -> None:
        self.request = request
        self.codec = codec
        self.flow = flow
        self.response: web.StreamResponse = web.Response(status=500)
        self.started = False
        self.encoder: Any = None  # set once a stream is re-encoded; it knows the framing state

    async def json(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None, raw: bool = False) -> None:
        response = web.Response(body=body, status=status, content_type=JSON_TYPE, headers=headers)
        # Sent now, so flow_done runs after the client has its answer.
        await self._prepare(response)
        await response.write_eof()
        self.response = response
        self.flow.status = status
        if self.flow.sent is not None:
            self.flow.sent.append((time.monotonic(), body))
        self.flow.first_token_at = self.flow.first_token_at or time.monotonic()

    async def _prepare(self, response: web.StreamResponse) -> None:
        """Send the status and headers: every answer (JSON or stream) goes through here."""
        flow = self.flow
        context = flow.context
        if context is not None and context.config.proxy.response_headers:
            stamp_routing_headers(response, flow)
        await response.prepare(self.request)

    async def error(self, error: ProxyError) -> None:
        await self.json(dumps(self.codec.error_body(error)), status=error.status, headers=error.headers or None)

    async def _begin(self) -> web.StreamResponse:
        headers = SSE_HEADERS if self.codec.content_type_stream == "text/event-stream" else {**SSE_HEADERS, "Content-Type": self.codec.content_type_stream}
        response = web.StreamResponse(status=200, headers=headers)
        await self._prepare(response)
        self.response = response
        self.started = True
        self.flow.status = 200
        return response

    async def relay_bytes(self, upstream: UpstreamStream) -> None:
        """Forward a stream llmproxy does not model (legacy completions …) as it arrives."""
        try:
            response = await self._begin()
            async for chunk in upstream.chunks:  # type: ignore[union-attr]
                if self.flow.first_token_at is None:
                    self.flow.first_token_at = time.monotonic()
                if self.flow.sent is not None:
                    self.flow.sent.append((time.monotonic(), chunk))
                await response.write(chunk)
        finally:
            await upstream.close()
        await response.write_eof()

    async def stream_error(self, error: ProxyError) -> None:
        if self.encoder is not None:
            data = self.encoder.encode([StreamEvent(EventKind.ERROR, error=error)])
        else:
            data = self.codec.error_event(error)
        if self.flow.sent is not None:
            self.flow.sent.append((time.monotonic(), data))
        try:
            await self.response.write(data)
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            pass

    async def relay(self, upstream: UpstreamStream, processors: list[Any]) -> None:
        flow = self.flow
        if upstream.whole is not None:
            codec = get_codec(upstream.protocol)
            try:
                response = codec.decode_response(loads(upstream.whole))
            except ValueError:
                raise ProxyError(502, "backend sent a body that is neither a stream nor JSON") from None
            await self.stream_events(_once(response_events(response)), processors)
            return
        if upstream.batches is not None:
            await self.stream_events(upstream.batches, processors)
            return
        assert upstream.chunks is not None
        if not processors and upstream.protocol == self.codec.protocol:
            await self._passthrough(upstream)
            return
        decoder = get_codec(upstream.protocol).stream_decoder()

        async def batches() -> Any:
            async for chunk in upstream.chunks:  # type: ignore[union-attr]
                events = decoder.feed(chunk)
                if events:
                    yield events
            tail = decoder.close()
            if tail:
                yield tail

        await self.stream_events(batches(), processors, terminal_last=True)

    async def _passthrough(self, upstream: UpstreamStream) -> None:
        """Same protocol, nobody watching the events: forward whole frames as they arrive."""
        flow = self.flow
        response = self.response if self.started else await self._begin()  # begun: a retried stream
        received: list[bytes] = []
        pending = b""
        protocol = upstream.protocol
        sent = flow.sent
        async for chunk in upstream.chunks:  # type: ignore[union-attr]
            received.append(chunk)
            pending += chunk
            end = complete_frames_end(pending)
            if end:
                if flow.first_token_at is None:
                    flow.first_token_at = time.monotonic()
                if sent is not None:
                    sent.append((time.monotonic(), pending[:end]))
                await response.write(pending[:end])
                pending = pending[end:]
        if pending.strip():
            tail_frame = pending if pending.endswith(b"\n\n") else pending + b"\n\n"
            if sent is not None:
                sent.append((time.monotonic(), tail_frame))
            await response.write(tail_frame)
        tail = b"".join(chunk[-80:] for chunk in received[-2:])[-80:]
        model = flow.model  # the closure must not hold the flow: a cycle keeps streams alive
        if not get_codec(protocol).stream_complete(tail):
            try:
                _fold(protocol, received, model)  # raises ProxyError when the stream was cut short
            except ProxyError as error:
                if not error.in_stream:
                    raise
                # The backend's own error event has reached the client already, in its
                # protocol: a second error frame from us would be off-protocol.
                flow.error = error
                await response.write_eof()
                return
        flow.set_lazy_response(lambda: _fold(protocol, received, model))
        await response.write_eof()

    async def stream_events(self, batches: Any, processors: list[Any], terminal_last: bool = False) -> None:
        """Encode and write ``batches`` of canonical events, through ``processors``, until a
        terminal event. ``terminal_last``: the source puts a terminal event only at the end
        of a batch (a stream decoder's promise), so without processors no batch is searched
        for one."""
        flow = self.flow
        # The encoder writes what the client asked for (include_usage, echoed fields); it
        # reads them from the flow without forcing the request to be decoded.
        encoder = self.encoder = self.codec.stream_encoder(flow)
        response = self.response if self.started else await self._begin()
        # What the client was sent, folded into flow.response only if someone reads it: most
        # flows have nobody who does, and folding as we go cost as much as encoding. The
        # events are not copied: once encoded and written, nothing changes them.
        sent: list[StreamEvent] = []
        model = flow.model
        ended = False
        try:
            async for events in batches:
                if not events:
                    continue
                terminal = None
                if events[-1].kind in _TERMINAL:
                    terminal = events.pop()
                if processors:
                    events = _apply(processors, events)
                    if terminal is not None:
                        events.extend(_flush(processors))
                        events.extend(_apply(processors, [terminal]))
                elif terminal is not None:
                    events.append(terminal)
                if terminal_last and not processors:
                    ended = terminal is not None
                else:
                    for i, event in enumerate(events):
                        if event.kind in _TERMINAL:
                            del events[i + 1 :]
                            ended = True
                            break
                sent.extend(events)
                if events:
                    data = encoder.encode(events)
                    if data:
                        if flow.first_token_at is None:
                            flow.first_token_at = time.monotonic()
                        if flow.sent is not None:
                            flow.sent.append((time.monotonic(), data))
                        await response.write(data)
                if ended:
                    last = events[-1]
                    if last.kind == EventKind.ERROR:
                        flow.error = last.error if isinstance(last.error, ProxyError) else ProxyError(500, str(last.error))
                    break
        finally:
            # The closure holds the events and the model, not the flow (a cycle would keep
            # every stream alive until a garbage collection).
            flow.set_lazy_response(lambda: _fold_events(sent, model))
        if not ended:
            raise ProxyError(502, "backend stream ended before the response was complete")
        await response.write_eof()


def _fold_events(events: list[StreamEvent], model: str) -> Response:
    """A streamed response, from the canonical events the client was sent."""
    builder = ResponseBuilder(model, protocol="")
    for event in events:
        builder.add(event)
    return builder.build()


def _fold(protocol: str, chunks: list[bytes], model: str) -> Any:
    decoder = get_codec(protocol).stream_decoder()
    builder = ResponseBuilder(model, protocol=protocol)
    for chunk in chunks:
        for event in decoder.feed(chunk):
            builder.add(event)
    for event in decoder.close():
        builder.add(event)
    return builder.build()
