"""The aiohttp application: front-end routes, and running the server with a graceful drain."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from . import __version__
from .codecs import get_codec
from .codecs.base import dumps
from .config import Config, ConfigError
from .context import CONTEXT, ProxyContext
from .errors import ProxyError
from .manager import PluginHost
from . import endpoints
from .codecs.base import Codec
from .frontends import add_routes, error_response
from .pipeline import authenticate

log = logging.getLogger("llmproxy")

OPENAI_CHAT = get_codec("openai_chat")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    """200 when the config is loaded and at least one backend is reachable (an HTTP backend:
    its host accepts a TCP connection; offline and replay always) and not marked unhealthy by
    model-list polling (discovery), else 503. The body names each backend's state either way."""
    ctx = request.app[CONTEXT]
    names = list(ctx.providers)
    results = await asyncio.gather(*(ctx.providers[name].probe() for name in names))
    try:  # open like /healthz, but where the backends live is for clients with a key only
        authenticate(request, ctx)
        detailed = True
    except ProxyError:
        detailed = False
    backends = {}
    ready = False
    for name, (ok, detail) in zip(names, results):
        state = "reachable" if ok else "unreachable"
        poller = ctx.providers[name].discovery
        if ok and ctx.providers[name].healthy is False and poller is not None:
            state, detail = "unhealthy", f"{poller.failures} model-list polls failed in a row (last: {poller.last_error})"
        ready = ready or state == "reachable"
        backends[name] = {"state": state, **({"detail": detail} if detailed else {})}
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "config": "loaded", "backends": backends}
    if not names:
        body["reason"] = "no backends are configured"
    elif not ready:
        reachable = any(ok for ok, _ in results)
        body["reason"] = "no reachable backend is healthy" if reachable else "no backend is reachable"
    return web.Response(body=dumps(body), status=200 if ready else 503, content_type="application/json")


async def root(request: web.Request) -> web.Response:
    # Claude Code sends HEAD / as a connectivity check before its first request.
    body = {"name": "llmproxy", "version": __version__,
            "endpoints": ["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1beta/models/{model}:generateContent", "/v1/models", "/healthz", "/readyz"]}
    return web.Response(body=dumps(body), content_type="application/json")


def codec_for_path(path: str) -> Codec:
    """The protocol a route speaks, for errors raised before (or outside) its handler."""
    if path.startswith(("/v1/messages", "/anthropic")):
        return get_codec("anthropic")
    if path.startswith("/v1beta") or ":" in path.rsplit("/", 1)[-1]:
        return get_codec("gemini")
    if path.startswith(("/v1/responses", "/responses")):
        return get_codec("openai_responses")
    return OPENAI_CHAT


def codec_for_request(request: web.Request) -> Codec:
    """As :func:`codec_for_path`, but a path no route knows is answered in the protocol the
    client's headers show (an Anthropic SDK sends ``anthropic-version``, Gemini's
    ``x-goog-api-key``), so even a mistyped URL gets an error that client can read."""
    codec = codec_for_path(request.path)
    if codec is OPENAI_CHAT:
        headers = request.headers
        if "anthropic-version" in headers:
            return get_codec("anthropic")
        if "x-goog-api-key" in headers or "x-goog-api-client" in headers:
            return get_codec("gemini")
    return codec


@web.middleware
async def protocol_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Whatever goes wrong outside a flow — no route, wrong method, a bug — reaches the
    client as an error of the route's own protocol, never aiohttp's text page or a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        if error.status == 405:
            allowed = ", ".join(sorted(getattr(error, "allowed_methods", ()) or ()))
            problem = ProxyError(405, f"{request.method} is not allowed on {request.path} (allowed: {allowed})", headers={"Allow": allowed})
        elif error.status == 404:
            problem = ProxyError(404, f"no such endpoint: {request.method} {request.path}")
        else:
            problem = ProxyError(error.status, error.reason or "request refused")
        return error_response(codec_for_request(request), problem)
    except ProxyError as error:
        return error_response(codec_for_request(request), error)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(codec_for_request(request), ProxyError(500, "internal error; see the proxy log"))


def create_app(ctx: ProxyContext) -> web.Application:
    app = web.Application(client_max_size=ctx.config.proxy.max_body_bytes, middlewares=[protocol_errors])
    app[CONTEXT] = ctx
    ctx.client_keys = client_keys(ctx.config)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await ctx.start()
        interval = ctx.config.proxy.reload_check
        if interval > 0 and Path(ctx.config.source).is_file():
            from .reload import watch

            ctx.spawn(watch(ctx, interval))
        yield
        await ctx.stop()

    app.cleanup_ctx.append(lifecycle)
    routes = app.router
    add_routes(app)
    endpoints.add_routes(app)
    routes.add_get("/healthz", healthz)
    routes.add_get("/readyz", readyz)
    routes.add_get("/", root)  # also answers HEAD
    add_plugin_routes(app, ctx)
    return app


def add_plugin_routes(app: web.Application, ctx: ProxyContext) -> None:
    """The routes plugins add through ``register_routes`` (never under the protocol paths)."""
    for impl in reversed(ctx.host.pm.hook.register_routes.get_hookimpls()):

        def register(method: str, path: str, handler: Any, _owner: str = impl.plugin_name) -> None:
            if path.startswith(("/v1", "/anthropic", "/openai")) or not path.startswith("/"):
                raise ConfigError([f"plugins.{_owner}: cannot add route {path!r} (protocol paths are the core's)"], ctx.config.source)
            if method.upper() == "GET":
                app.router.add_get(path, handler)  # which answers HEAD too, as HTTP says a GET route should
            else:
                app.router.add_route(method, path, handler)

        given = {"register": register, "context": ctx}
        impl.function(*[given[name] for name in impl.argnames])  # pluggy's rule: only the arguments it takes


def client_keys(config: Config) -> list[tuple[str, bytes]]:
    keys = []
    problems = []
    for i, entry in enumerate(config.auth.api_keys):
        value = entry.key.get()
        if not value:
            path = f"auth.api_keys[{i}]"
            problems.append(f"{config.where(path + '.key') or config.where(path)}{path} ({entry.name}): {entry.key.describe()} is not set")
        else:
            keys.append((entry.name, value.encode()))
    if problems:
        raise ConfigError(problems, config.source)
    return keys


def check_bind(config: Config) -> None:
    """Secure by default: no client keys, no listening beyond loopback."""
    if not config.proxy.is_loopback() and not config.auth.api_keys:
        raise ConfigError(
            [f"proxy.host: refusing to listen on {config.proxy.host} without client keys; add auth.api_keys or bind 127.0.0.1"],
            config.source,
        )


async def serve(config: Config, host: PluginHost, ready: Callable[[str], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set), then drain in-flight requests for at
    most ``proxy.drain_timeout`` seconds."""
    started = time.perf_counter()
    check_bind(config)
    ctx = ProxyContext(config, host)
    if not ctx.providers:
        log.warning("no backends are configured: every model request will be answered 404 (add backends: in %s)", config.source)
    app = create_app(ctx)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=config.proxy.drain_timeout, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, config.proxy.host, config.proxy.port, reuse_address=True)
    ports = [("proxy.port", config.proxy.port, site)]
    if config.proxy.anthropic_port is not None:
        port = config.proxy.anthropic_port
        ports.append(("proxy.anthropic_port", port, web.TCPSite(runner, config.proxy.host, port, reuse_address=True)))
    for key, port, each in ports:
        try:
            await each.start()
        except OSError as error:
            await runner.cleanup()
            why = "address already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
            raise ConfigError([f"{key}: cannot listen on {config.proxy.host}:{port}: {why}"], config.source) from None
    for key, port, each in ports[1:]:
        log.info("also serving on %s (%s)", each.name, key)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: ctx.spawn(ctx.reload()))
    except (NotImplementedError, RuntimeError, AttributeError):
        pass
    port = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else config.proxy.port  # type: ignore[union-attr]
    url = f"http://{config.proxy.host}:{port}"
    log.info("llmproxy %s ready on %s in %.0f ms (backends: %s; default: %s)", __version__, url,
             (time.perf_counter() - started) * 1000, ", ".join(ctx.providers) or "none", config.default_backend)
    tune_gc()
    if ready is not None:
        ready(url)
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %.0fs)", config.proxy.drain_timeout)
    await drain(runner, ctx, config.proxy.drain_timeout)
    await runner.cleanup()
    log.info("stopped")


def tune_gc() -> None:
    """Once ready: move what start-up built (modules, config, plugins) out of the collector's
    sight, and collect the youngest generation less often. A flow allocates thousands of
    short-lived objects that reference counting frees anyway; with the default threshold
    (700) the cyclic collector ran every few requests and walked every flow still alive
    (streams in flight, the inspector's recent flows): measured 20–40 µs per request."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


async def drain(runner: web.AppRunner, ctx: ProxyContext, timeout: float) -> None:
    """Stop accepting connections, give in-flight requests ``timeout`` seconds, then cancel
    the rest (which closes their upstreams). aiohttp's own shutdown would wait ``timeout``
    twice over (once for handlers to finish, once more after asking them to stop)."""
    for site in list(runner.sites):
        await site.stop()
    if not ctx.inflight:
        return
    _, late = await asyncio.wait(set(ctx.inflight), timeout=timeout)
    if late:
        log.warning("%d request(s) still running after %.0fs; cancelling them", len(late), timeout)
        ctx.stopping = True
        for task in late:
            task.cancel()
        await asyncio.wait(late, timeout=1.0)
