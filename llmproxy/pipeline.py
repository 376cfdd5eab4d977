"""The way of one request: wire body → Flow → hook chains → backend → hook chains → wire.

:func:`handle` is what every front-end route calls with its protocol's codec. Errors at any
step become the client's protocol's error (JSON before the response began, an SSE error
frame after); ``flow_done`` sees every flow, failed ones included.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import zlib
from typing import Any, Awaitable, Callable

from aiohttp import web

from .canonical import EventKind, Response, ResponseBuilder, StreamEvent, response_events
from .codecs import get_codec
from .codecs.base import Codec, complete_frames_end, dumps, loads
from .context import CONTEXT, ProxyContext
from .errors import MAX_STREAM_RETRIES, ProxyError, RetryStream, retry_after_seconds
from .flow import ClientHeaders, ClientInfo, Flow
from .manager import call_chain, call_chain_logged
from .providers import UpstreamReply, UpstreamStream, read_from
from .resilience import backoff_delay, cannot_serve, estimate_tokens, failure_kind, request_needs
from .toolnames import METADATA_KEY as TOOL_NAMES
from .toolnames import name_restorer, restore_names

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


async def read_body(request: web.Request) -> bytes:
    """The request body, decompressed if the client compressed it, never past
    ``proxy.max_body_bytes`` (llmproxy's server leaves decompressing to this function: left
    to aiohttp, a small gzip bomb filled memory before the size check said no)."""
    limit = request.client_max_size
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        # aiohttp's exception does not keep the limit; the request does.
        raise ProxyError(413, f"request body is larger than the limit of {limit} bytes (proxy.max_body_bytes)") from None
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if not raw or encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ProxyError(415, f"request Content-Encoding {encoding!r} is not supported: send the body as it is, or gzip or deflate it")
    # gzip and zlib headers are told apart by the first bytes; a deflate body without the
    # zlib header (some clients send one) is raw deflate.
    wbits = -zlib.MAX_WBITS if encoding == "deflate" and raw[0] & 0x0F != 8 else zlib.MAX_WBITS | 32
    inflater = zlib.decompressobj(wbits)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as error:
        raise ProxyError(400, f"request body is not valid {encoding} data: {error}") from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise ProxyError(413, f"request body is larger than the limit of {limit} bytes once decompressed (proxy.max_body_bytes)")
    return body


async def read_json(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    """The body's bytes and its JSON object."""
    raw = await read_body(request)
    if not raw:
        raise ProxyError(400, "request body is empty; expected a JSON object")
    try:
        body = loads(raw)
    except ValueError as error:
        raise ProxyError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    return raw, body


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
    # aiohttp runs each request in a task of its own; shutdown drains them. Left in a
    # finally rather than a done callback: one scheduled callback fewer per request.
    task = asyncio.current_task()
    inflight = ctx.inflight
    inflight.add(task)
    try:
        flow = Flow(frontend or codec.protocol, {}, "", False, request_decoder=None if frontend else codec.decode_request)
        flow.context = ctx  # set first: flow_done sees refused flows (bad key, bad JSON) too
        writer = Writer(request, codec, flow)
        try:
            flow.client = authenticate(request, ctx)
            flow.raw_body, flow.raw_request = await read_json(request)
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
            problem = ProxyError(500, f"{where} ({type(error).__name__}); see the proxy log, flow {flow.id}")
            if plugin:
                problem.llmproxy_plugin = plugin  # type: ignore[attr-defined]  # for flow_done: metrics, history
            await _fail(flow, ctx, writer, problem)
        await _done(flow, ctx)
        # Every way through the flow writes an answer; a 500 stands in should one ever not.
        return writer.response or web.Response(status=500)
    finally:
        inflight.discard(task)


async def _run(flow: Flow, ctx: ProxyContext, writer: "Writer") -> None:
    chains = ctx.chains.of(flow)
    if chains.request:
        await call_chain(chains.request, stop=lambda: flow.has_response, skip=flow.disabled_plugins, flow=flow)
    if flow.stream:
        processors = _stream_processors(flow, ctx) if chains.stream_start else []
        if flow.has_response:
            await writer.stream_events(_once(response_events(flow.response)), processors)  # type: ignore[arg-type]
            return
        for retry in range(MAX_STREAM_RETRIES + 1):
            upstream = await dispatch(flow, ctx, processors)
            client_names = flow.metadata.get(TOOL_NAMES)  # set by this attempt only (dispatch resets it)
            try:
                # tool names this backend was sent renamed go back to the client's
                await writer.relay(upstream, [("llmproxy:tool_names", name_restorer(client_names)), *processors] if client_names else processors)
                return
            except RetryStream:
                # A processor wants the backend asked again; only while nothing reached the client.
                if writer.started or retry == MAX_STREAM_RETRIES:
                    raise
                log.info("flow %s: a stream processor asked for the answer again", flow.id)
            except ProxyError as error:
                # The stream broke (garbage, an error event) before anything reached the
                # client: the next target takes over, as if this one had refused.
                # (Begun, even with no token yet, the client has headers or bytes: too late.)
                if writer.started or retry == MAX_STREAM_RETRIES or not _fail_over_stream(flow, ctx, error):
                    raise
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
            data = reply.data
            if data is None:
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
        if TOOL_NAMES in flow.metadata:  # only ever for an answer in another protocol (wire_request)
            restore_names(flow.response, flow.metadata[TOOL_NAMES])
    if chains.response:
        await call_chain(chains.response, skip=flow.disabled_plugins, flow=flow)
    if flow.response_pending and raw is not None:
        await writer.json(raw, raw=True)
        return
    if flow.response is None:
        raise ProxyError(502, "the backend's answer could not be read in its own protocol")
    await writer.json(dumps(writer.codec.encode_response(flow.response, flow.request if flow.request_decoded else None)))


def _fail_over_stream(flow: Flow, ctx: ProxyContext, error: ProxyError) -> bool:
    """Count a stream's early failure against its target and leave the target out of this
    flow's next dispatch; False when the error is the request's own or no target is left."""
    target = flow.target
    kind = failure_kind(error)
    if target is None or kind is None or error.status not in RETRYABLE:
        return False
    ctx.health.breaker(target.label, target.provider.settings.breaker).failure(kind, None, time.monotonic())
    if flow.routing is None:
        flow.routing = {}
    excluded = flow.routing.setdefault("excluded", set())
    excluded.add(target.label)
    if all(t.label in excluded for t in ctx.router.resolve(flow.model)):
        return False
    log.warning("flow %s: %s broke its stream before the first bytes (%s); trying the next target", flow.id, target.label, error.message)
    return True


def _stream_processors(flow: Flow, ctx: ProxyContext) -> list[tuple[str, Any]]:
    processors = []
    for impl in ctx.chains.of(flow).stream_start:
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
        provider = target.provider
        flow.metadata.pop(TOOL_NAMES, None)  # an earlier attempt's renaming is not this one's
        if processors is None:
            return await provider.complete(flow, target)
        if not target.streams:  # declared unable to stream: ask for the whole answer, re-stream it
            return _restream(await provider.complete(flow, target))
        passthrough = not processors and provider.protocol == flow.frontend
        try:
            return await provider.stream(flow, target, passthrough)
        except ProxyError as error:
            # The backend accepted the stream, then broke it before anything reached the
            # client: once more without streaming, before giving up on this target.
            if not getattr(error, "stream_broken", False) or not provider.settings.stream_fallback:
                raise
            log.warning("flow %s: %s broke its stream (%s); asking it again without streaming", flow.id, target.label, error.message)
            return _restream(await provider.complete(flow, target))

    return await failover(flow, ctx, attempt)


def _restream(reply: UpstreamReply) -> UpstreamStream:
    if reply.response is not None:
        return UpstreamStream(reply.protocol, batches=_batch(response_events(reply.response)))
    return UpstreamStream(reply.protocol, whole=reply.body or b"")


async def failover(flow: Flow, ctx: ProxyContext, attempt: Callable[[Any], Awaitable[Any]], scheduled: bool = True, waited_until: float | None = None) -> Any:
    """``attempt(target)`` for the flow's targets in order until one succeeds.

    Per target: skipped when the config declares it cannot serve the request, when it is
    polled unhealthy, when its circuit breaker is open, or when it is over its rpm/tpm;
    else tried, and tried again (``retry.attempts``, with backoff) after errors another
    try may not have (``RETRYABLE``), within ``timeout.attempt`` per try and
    ``proxy.total_timeout`` overall. The next target gets its turn after those. When every
    target was skipped, the client gets a 429 or 503 saying why, with a Retry-After.
    ``scheduled``: the attempt takes one of the backend's slots (``max_concurrency``);
    False for light calls (token counts) that must not queue behind generations.
    One pass over the targets, written in one function: it runs for every request.
    """
    targets = ctx.router.route(flow.model)  # the alias's strategy picks the first
    proxy = ctx.config.proxy
    deadline = flow.started + proxy.total_timeout if proxy.total_timeout is not None else None
    skipped: list[tuple[Any, str, float]] = []  # (target, why, seconds until it may serve)
    router = ctx.router
    last_error: ProxyError | None = None
    needs = None
    excluded = flow.routing.get("excluded") if flow.routing is not None else None
    for position, target in enumerate(targets):
        if excluded and target.label in excluded:
            continue  # it already broke its stream for this request
        provider = target.provider
        settings = provider.settings
        declared = target.declared
        if declared is not None:
            needs = needs or request_needs(flow)
            why = cannot_serve(declared, needs)
            if why is not None:
                skipped.append((target, why, -1.0))
                continue
        if provider.healthy is False:
            skipped.append((target, "marked unhealthy by its model-list polls", 0.0))
            continue
        breaker = ctx.health.breaker(target.label, settings.breaker)
        retry = settings.retry
        for tries in range(retry.attempts + 1):
            now = time.monotonic()
            if not breaker.allows(now):
                skipped.append((target, f"circuit breaker open ({breaker.last_kind}), retry in {breaker.retry_in(now):.1f}s", breaker.retry_in(now)))
                break
            wait = _over_limits(flow, target, now) if (target.window is not None or target.backend_window is not None) else 0.0
            if wait:
                breaker.abandoned()
                skipped.append((target, f"over its rate limit, frees up in {wait:.1f}s", wait))
                break
            release = None  # a backend slot (max_concurrency), held as long as the in-flight count
            if scheduled and provider.scheduler is not None:  # model-affinity queue (scheduling.py)
                try:
                    release = await provider.scheduler.acquire(target.model)
                except BaseException as error:
                    breaker.abandoned()  # a full queue says nothing of the backend's health
                    if not isinstance(error, ProxyError) or error.status not in RETRYABLE:
                        raise
                    last_error = error
                    break
            flow.target = target
            router.begin(target)  # in flight until the answer is read (a stream: until closed)
            try:
                limit = settings.timeout.attempt if deadline is None else _time_left(settings.timeout.attempt, deadline)
                if limit is None:
                    result = await attempt(target)
                else:
                    async with asyncio.timeout(limit):
                        result = await attempt(target)
            except BaseException as error:
                router.end(target)
                if release is not None:
                    release()
                if isinstance(error, TimeoutError) and not isinstance(error, ProxyError):
                    error = ProxyError(504, f"backend {target.backend!r} did not begin answering within {limit:g}s", kind="timeout_error")
                if not isinstance(error, ProxyError):
                    breaker.abandoned()
                    raise
                kind = failure_kind(error)
                if kind is None:
                    breaker.success()  # the request's own fault: the backend is fine
                    raise error from None
                retry_after = retry_after_seconds(error.headers.get("Retry-After")) if error.headers else None
                breaker.failure(kind, retry_after, time.monotonic())
                last_error = error
                if error.status not in RETRYABLE:
                    raise error from None
                delay = backoff_delay(tries, retry, retry_after) if tries < retry.attempts else None
                if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
                    then = "trying the next target" if position + 1 < len(targets) else "no other target is left"
                    log.warning("flow %s: %s failed (%s %s); %s", flow.id, target.label, error.status, error.message, then)
                    break
                log.info("flow %s: %s failed (%s); trying it again in %.2fs", flow.id, target.label, error.status, delay)
                await asyncio.sleep(delay)
                continue
            breaker.success()
            if isinstance(result, UpstreamStream) and result.whole is None:
                result.also_on_close(lambda target=target: router.end(target))
                if release is not None:
                    result.also_on_close(release)
            else:
                router.end(target)
                if release is not None:
                    release()
            return result
        if deadline is not None and time.monotonic() >= deadline:
            break
    if last_error is not None:
        raise last_error
    error = _nothing_served(flow, skipped)
    # rate_limit_wait: every target is only over its rate limit, so wait (in a bounded queue)
    # for the first to free up rather than answer 429 at once, then route again.
    now = time.monotonic()
    if error.status != 429 or proxy.rate_limit_wait <= 0:
        raise error
    waited_until = waited_until or now + proxy.rate_limit_wait
    if deadline is not None:
        waited_until = min(waited_until, deadline)
    wait = min(seconds for _, _, seconds in skipped if seconds >= 0)
    health = ctx.health
    if now + wait > waited_until or health.waiting >= proxy.rate_limit_queue:
        raise error
    health.waiting += 1
    try:
        await asyncio.sleep(wait + 0.001)
    finally:
        health.waiting -= 1
    return await failover(flow, ctx, attempt, scheduled, waited_until)


def _time_left(attempt: float | None, deadline: float | None) -> float | None:
    if deadline is None:
        return attempt
    left = max(0.001, deadline - time.monotonic())
    return left if attempt is None else min(attempt, left)


def _over_limits(flow: Flow, target: Any, now: float) -> float:
    """0 when the target's and its backend's rate windows take this request (which is then
    counted in them), else the seconds until they would. Written out for speed: it runs for
    every attempt on a target with limits."""
    window, shared = target.window, target.backend_window
    tokens = estimate_tokens(flow)
    wait = window.wait(now, tokens) if window is not None else 0.0
    if shared is not None:
        wait = max(wait, shared.wait(now, tokens))
    if wait > 0:
        return wait
    for each in (window, shared):
        if each is None:
            continue
        each.admit(now, tokens)
        if each.tpm is not None:  # settled with the answer's usage when the flow ends
            if flow.routing is None:
                flow.routing = {}
            flow.routing.setdefault("rate_entries", []).append((each, tokens))
    return 0.0


def _nothing_served(flow: Flow, skipped: list[tuple[Any, str, float]]) -> ProxyError:
    reasons = "; ".join(f"{target.label}: {why}" for target, why, _ in skipped)
    waits = [seconds for _, _, seconds in skipped if seconds >= 0]
    if not waits:  # nothing could ever serve it as configured
        return ProxyError(400, f"no target of {flow.model!r} can serve this request ({reasons})", code="no_capable_target")
    retry_in = max(1, math.ceil(min(waits)))
    limited = all(why.startswith("over its rate limit") or "(rate_limit)" in why for _, why, seconds in skipped if seconds >= 0)
    status = 429 if limited else 503
    return ProxyError(status, f"no target of {flow.model!r} is available now ({reasons})", code="targets_unavailable", headers={"Retry-After": str(retry_in)})


def settle_rate_limits(flow: Flow) -> None:
    """Replace the estimated tokens counted for ``tpm`` with the flow's reported usage."""
    entries = flow.routing.pop("rate_entries", None) if flow.routing is not None else None
    if not entries:
        return
    response = flow.response if flow.error is None else None
    usage = response.usage if response is not None else None
    if usage is None or not (usage.input_tokens or usage.output_tokens):
        return
    used = (usage.input_tokens or 0) + (usage.output_tokens or 0)
    for window, estimate in entries:
        window.settle(estimate, used)


async def _fail(flow: Flow, ctx: ProxyContext, writer: "Writer", error: ProxyError) -> None:
    # A response already on the flow (say, a backend answer a response hook refused) is not
    # an answer from an error hook; a different one, or a cleared error, is.
    refused = None if writer.started else flow.response
    # A backend may quote the key it was sent (or another secret) in an error, mid-stream as
    # well as in a status: mask it before the client, the flow's record or any hook sees it.
    error.message = ctx.redactor.text(error.message)
    flow.error = error
    chains = ctx.chains.of(flow)
    if chains.error:
        await call_chain_logged(chains.error, skip=flow.disabled_plugins, flow=flow)
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
    if flow.routing is not None and "rate_entries" in flow.routing:
        settle_rate_limits(flow)
    chains = ctx.chains.of(flow)
    if chains.flow_done:
        await call_chain_logged(chains.flow_done, skip=flow.disabled_plugins, flow=flow)
    if log.isEnabledFor(logging.INFO):
        target = flow.target.label if flow.target else "-"
        outcome = f"{flow.status}" + (f" {flow.error.message}" if flow.error else "")
        log.info("%s %s %s → %s %s %.0fms", flow.id, flow.frontend, flow.model or "-", target, outcome, (flow.ended - flow.started) * 1000)


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _batch(events: list[StreamEvent]) -> Any:
    """One batch of events as a stream's ``batches`` (a whole answer re-streamed)."""
    yield events


def _once(events: list[StreamEvent]) -> Callable[[], Awaitable[Any]]:
    """A reader (see :meth:`Writer.stream_events`) of one batch of events."""
    return read_from(_batch(events))


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
        self.response: web.StreamResponse | None = None  # set by the one answer written
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
            read = upstream.read
            assert read is not None
            pending = b""
            while chunk := await read():
                pending += chunk
                # Whole frames only when there is a key to blank: one split between two
                # reads would slip through.
                end = complete_frames_end(pending) if upstream.secrets else len(pending)
                if end:
                    await self._forward(response, upstream.mask(pending[:end]))
                    pending = pending[end:]
            if pending:
                await self._forward(response, upstream.mask(pending))
        finally:
            await upstream.close()
        await response.write_eof()

    async def _forward(self, response: web.StreamResponse, data: bytes) -> None:
        if self.flow.first_token_at is None:
            self.flow.first_token_at = time.monotonic()
        if self.flow.sent is not None:
            self.flow.sent.append((time.monotonic(), data))
        await response.write(data)

    async def stream_error(self, error: ProxyError) -> None:
        if self.encoder is not None:
            data = self.encoder.encode([StreamEvent(EventKind.ERROR, error=error)])
        else:
            data = self.codec.error_event(error)
        if self.flow.sent is not None:
            self.flow.sent.append((time.monotonic(), data))
        response = self.response
        assert response is not None, "stream_error before the stream began"
        try:
            await response.write(data)
            await self._end(response, failed=True)
        except (ConnectionError, RuntimeError):
            pass

    async def _end(self, response: web.StreamResponse, failed: bool) -> None:
        """End the stream; after an error event, close the connection instead where the
        client's protocol wants it (``Codec.error_ends_connection``: what is written goes
        first, the end of the stream never does)."""
        if failed and self.codec.error_ends_connection and self.request.transport is not None:
            self.request.transport.close()
        else:
            await response.write_eof()

    async def relay(self, upstream: UpstreamStream, processors: list[Any]) -> None:
        if upstream.whole is not None:
            codec = get_codec(upstream.protocol)
            try:
                response = codec.decode_response(loads(upstream.whole))
            except ValueError:
                raise ProxyError(502, "backend sent a body that is neither a stream nor JSON") from None
            await self.stream_events(_once(response_events(response)), processors)
            return
        if upstream.batches is not None:
            await self.stream_events(read_from(upstream.batches), processors)
            return
        assert upstream.read is not None
        if not processors and upstream.protocol == self.codec.protocol:
            await self._passthrough(upstream)
            return
        await self.stream_events(upstream.read, processors, get_codec(upstream.protocol).stream_decoder())

    async def _passthrough(self, upstream: UpstreamStream) -> None:
        """Same protocol, nobody watching the events: forward whole frames as they arrive
        (with the backend's key blanked, should it quote it)."""
        read, protocol = upstream.read, upstream.protocol
        assert read is not None
        mask = upstream.mask if upstream.secrets else None
        flow = self.flow
        response = self.response if self.started else None  # begun: a retried stream; else at the first write
        received: list[bytes] = []
        pending = b""
        sent = flow.sent
        while chunk := await read():
            received.append(chunk)
            pending += chunk
            end = complete_frames_end(pending)
            if end:
                if flow.first_token_at is None:
                    flow.first_token_at = time.monotonic()
                frames = pending[:end] if mask is None else mask(pending[:end])
                if sent is not None:
                    sent.append((time.monotonic(), frames))
                if response is None:
                    response = await self._begin()
                await response.write(frames)
                pending = pending[end:]
        tail = b"".join(chunk[-80:] for chunk in received[-2:])[-80:]
        model = flow.model  # the closure must not hold the flow: a cycle keeps streams alive
        complete = get_codec(protocol).stream_complete(tail)
        if response is None:
            if not complete:
                # Not one whole frame came (a stream cut inside its first, a web page): this
                # attempt failed before anything reached the client, so it fails whole (the
                # next target may take over) instead of sending what it has.
                _fold(protocol, received, model)  # raises ProxyError when it is not an answer
            response = await self._begin()
        if pending.strip():
            tail_frame = pending if pending.endswith(b"\n\n") else pending + b"\n\n"
            if mask is not None:
                tail_frame = mask(tail_frame)
            if sent is not None:
                sent.append((time.monotonic(), tail_frame))
            await response.write(tail_frame)
        if not complete:
            try:
                _fold(protocol, received, model)  # raises ProxyError when the stream was cut short
            except ProxyError as error:
                if not error.in_stream:
                    raise
                # The backend's own error event has reached the client already, in its
                # protocol: a second error frame from us would be off-protocol. The flow's
                # record is masked as _fail masks every other error.
                error.message = flow.context.redactor.text(error.message)  # type: ignore[union-attr]
                flow.error = error
                await self._end(response, failed=True)
                return
        flow.set_lazy_response(lambda: _fold(protocol, received, model))
        await response.write_eof()

    async def stream_events(self, read: Callable[[], Awaitable[Any]], processors: list[Any], decoder: Any = None) -> None:
        """Encode and write the batches of canonical events ``read()`` returns (an empty one
        at the end), through ``processors``, until a terminal event. With a ``decoder``,
        ``read()`` returns wire chunks it turns into events, here rather than in a generator
        of its own (a layer every read of a stream would pass through); a decoder puts a
        terminal event only at the end of a batch, so then, without processors, no batch is
        searched for one."""
        flow = self.flow
        terminal_last = decoder is not None
        # The encoder writes what the client asked for (include_usage, echoed fields); it
        # reads them from the flow without forcing the request to be decoded.
        encoder = self.encoder = self.codec.stream_encoder(flow)
        # Begun at the first write, not before: until then a failure can still fail over or
        # reach the client as a plain HTTP error.
        response = self.response if self.started else None
        # What the client was sent, folded into flow.response only if someone reads it: most
        # flows have nobody who does, and folding as we go cost as much as encoding. The
        # events are not copied: once encoded and written, nothing changes them.
        sent: list[Any] = []  # events, and the (index, literal) of text copied as it came
        model = flow.model
        ended = failed = False
        # Text copied from the backend's bytes into the client's, unparsed, when no processor
        # could want to see or change it (StreamDecoder.text_literal: optional, on both sides).
        copy_literal = getattr(encoder, "text_literal", None)
        literal_of = None if processors or copy_literal is None else getattr(decoder, "text_literal", None)
        try:
            while True:
                events = await read()
                if literal_of is not None and events:
                    text = literal_of(events)
                    if text is not None:
                        data = copy_literal(*text)
                        if data is not None:
                            sent.append(text)
                            if flow.sent is not None:
                                flow.sent.append((time.monotonic(), data))
                            if response is None:  # never: a block is open, so written to
                                response = await self._begin()
                            await response.write(data)
                            continue
                if not events:  # the end
                    if decoder is None:
                        break
                    events, decoder = decoder.close(), None  # what the stream's end completes
                    if not events:
                        continue
                elif decoder is not None:
                    events = decoder.feed(events)
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
                        if response is None:
                            response = await self._begin()
                        await response.write(data)
                if ended:
                    last = events[-1]
                    if last.kind == EventKind.ERROR:
                        failed = True
                        flow.error = last.error if isinstance(last.error, ProxyError) else ProxyError(500, str(last.error))
                    break
        finally:
            # The closure holds the events and the model, not the flow (a cycle would keep
            # every stream alive until a garbage collection).
            flow.set_lazy_response(lambda: _fold_events(sent, model))
        if not ended:
            raise ProxyError(502, "backend stream ended before the response was complete")
        if response is None:
            response = await self._begin()
        await self._end(response, failed)


def _fold_events(events: list[Any], model: str) -> Response:
    """A streamed response, from the canonical events the client was sent (text sent as
    copied literals comes as ``(index, literal)``)."""
    builder = ResponseBuilder(model, protocol="")
    for event in events:
        if event.__class__ is tuple:
            event = StreamEvent(EventKind.TEXT, event[0], loads(event[1]))
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
