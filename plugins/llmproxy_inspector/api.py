"""The admin API under ``/admin/api/`` and the UI's files under ``/ui/`` (docs/admin-api.md
lists every endpoint). Each handler is wrapped by :func:`guarded`, which applies the
:class:`~llmproxy_inspector.security.Guard` rules and turns refusals and bad input into JSON
errors with the right status; changes are written to the audit log.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from importlib import resources
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from llmproxy.commands import CommandCall
from llmproxy.flow import Flow
from llmproxy.sessions import Session

from .detail import build as build_detail
from .history import History
from .live import Finished, decode_answer
from .security import COOKIE, Refused

if TYPE_CHECKING:
    from llmproxy.context import ProxyContext

    from . import Inspector

log = logging.getLogger("llmproxy.inspector")

PREFIX = "/admin/api"
UI_FILES = {"": ("index.html", "text/html"), "app.js": ("app.js", "text/javascript"), "style.css": ("style.css", "text/css")}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
UI_HEADERS = {
    **SECURITY_HEADERS,
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
}
KEEPALIVE = 15.0  # seconds between SSE comments, so idle connections are not cut by middleboxes
Handler = Callable[[web.Request, "Inspector", str], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=SECURITY_HEADERS)


def problem(status: int, message: str) -> web.Response:
    return reply({"error": {"status": status, "message": message}}, status)


def guarded(context: "ProxyContext", handler: Handler, login: bool = False) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler behind the guard; ``login`` routes need no key (they take it)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        from . import NAME

        inspector = context.state.get(NAME)
        if inspector is None:
            return problem(503, "the inspector is starting or stopping")
        try:
            if login:
                inspector.guard.check_origin(request)
                if request.headers.get("X-LLMProxy-Admin") != "1":
                    raise Refused(403, "changes need the header 'X-LLMProxy-Admin: 1'")
                auth = "login"
            else:
                auth = inspector.guard.check(request)
                inspector.recording = True  # the UI or the API is in use: record flows from now on (``record``)
            return await handler(request, inspector, auth)
        except Refused as refused:
            return problem(refused.status, refused.message)
        except BadRequest as bad:
            return problem(bad.status, bad.message)

    return wrapped


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")  # never compressed: the UI sends plain JSON
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _int(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {raw!r}") from None
    if not 1 <= value <= high:
        raise BadRequest(f"{name} must be from 1 to {high}")
    return value


def _float(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number (unix seconds), got {raw!r}") from None


def _filters(request: web.Request) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    for name in ("client", "session", "frontend", "model", "backend"):
        if request.query.get(name):
            filters[name] = request.query[name]
    if request.query.get("status"):
        try:
            filters["status"] = int(request.query["status"])
        except ValueError:
            raise BadRequest("status must be a whole number") from None
    return filters


def _matches(row: dict[str, Any], filters: dict[str, Any], text: str | None) -> bool:
    for name, value in filters.items():
        if row.get(name) != value:
            return False
    if text:
        return text in orjson.dumps(row).decode().lower()
    return True


# -- handlers -------------------------------------------------------------------------------------


async def login(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    body = await json_body(request)
    key = body.get("key")
    if not isinstance(key, str) or not inspector.guard.key_matches(key):
        await inspector.audit.record(request, auth, "login", status=401)
        raise Refused(401, "invalid admin key")
    inspector.recording = True  # the UI is open: record flows from now on (``record``)
    response = reply({"ok": True})
    response.set_cookie(COOKIE, inspector.guard.login(), httponly=True, samesite="Strict", path="/", max_age=int(inspector.guard.login_ttl))
    await inspector.audit.record(request, auth, "login")
    return response


async def logout(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    inspector.guard.logout(request.cookies.get(COOKIE))
    response = reply({"ok": True})
    response.del_cookie(COOKIE, path="/")
    await inspector.audit.record(request, auth, "logout")
    return response


async def info(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    from llmproxy import __version__

    context = inspector.context
    return reply({
        "version": __version__,
        "backends": list(context.providers),
        "default_backend": context.config.default_backend,
        "models": sorted(context.config.models),
        "commands": sorted(context.host.commands),
        "plugins": [name for name, p in context.host.plugins.items() if p.obj is not None],
        "trace": inspector.settings.trace,
        "capture_bodies": inspector.settings.capture_bodies,
        "history": inspector.settings.history_path,
        "reload": callable(getattr(context, "reload", None)),
    })


async def flows(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    limit = _int(request, "limit", 100, 100_000)
    filters = _filters(request)
    text = (request.query.get("q") or "").lower() or None
    live = inspector.live
    rows = live.list(inspector.settings.recent + len(live.active))
    if filters or text:
        rows = [row for row in rows if _matches(row, filters, text)]
    rows = rows[:limit]
    undecoded = live.undecoded(rows)
    if undecoded:  # their token counts, paid for now that someone asks (once per flow)
        await inspector.history.call(learn_tokens, inspector.history, [row.flow for row in undecoded])
        for row in undecoded:
            row.tokens_known()
        found = {row.id: row for row in undecoded}
        rows = [found[row["id"]].summary() if row["id"] in found else row for row in rows]
    return reply({"flows": rows})


async def flow_detail(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    flow_id = request.match_info["id"]
    finished = inspector.live.details.get(flow_id)
    if finished is not None and finished.flow is not None:
        # built now, in the history thread: nobody paid for it before
        record = await inspector.history.call(_detail_and_tokens, inspector.history, finished, finished.flow)
        finished.tokens_known()
    else:
        record = await inspector.history.record(flow_id)
    live = inspector.live.find(flow_id)
    if record is None and live is None:
        raise BadRequest(f"no flow {flow_id!r} (it may have left the history)", 404)
    found = record or {}
    found["summary"] = live if live is not None else found.get("summary")
    found.setdefault("plugin_changes", [])
    return reply(found)


def learn_tokens(history: History, flows: "list[Flow | None]") -> None:
    """Decode the answers of finished flows and store their token counts (in the history's
    thread: a stream's decode takes as long as it had events)."""
    counts: list[tuple[str, int | None, int | None]] = []
    for flow in flows:
        decode_answer(flow)
        response = flow.response if flow is not None else None
        if response is not None:
            counts.append((flow.id, response.usage.input_tokens, response.usage.output_tokens))  # type: ignore[union-attr]
    if counts:
        history.store_tokens(counts)


def _detail_and_tokens(history: History, finished: Finished, flow: Flow) -> dict[str, Any]:
    learn_tokens(history, [flow])
    return build_detail(finished)


async def history(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    rows = await inspector.history.query(
        _filters(request),
        limit=_int(request, "limit", 100, 10_000),
        before=_float(request, "before"),
        since=_float(request, "since"),
        text=request.query.get("q") or None,
    )
    return reply({"flows": rows})


async def events(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    """Server-sent events: ``flow`` (a summary, when a flow starts and when it ends or is
    updated), ``session`` and ``audit`` (after a change). No polling: one connection per page."""
    response = web.StreamResponse(headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    queue = inspector.hub.subscribe()
    try:
        await response.write(b"event: hello\ndata: {}\n\n")
        while True:
            try:
                frame = await asyncio.wait_for(queue.get(), KEEPALIVE)
            except asyncio.TimeoutError:
                frame = b": keepalive\n\n"
            if frame is None:
                break
            await response.write(frame)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        inspector.hub.unsubscribe(queue)
    return response


async def sessions(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    store = inspector.context.sessions
    rows = sorted((s.summary() for s in store.all()), key=lambda s: s["last_seen"], reverse=True)
    return reply({"sessions": rows})


def _session(inspector: "Inspector", request: web.Request) -> Session:
    session_id = request.match_info["id"]
    session = inspector.context.sessions.find(session_id)
    if session is None:
        raise BadRequest(f"no session {session_id!r}", 404)
    return session


class _OneSession:
    """Stands in for the session store on the flow an admin command runs with."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def for_flow(self, flow: Flow) -> Session:
        return self.session


async def run_command(context: "ProxyContext", session: Session, name: str, args: str) -> str | None:
    """Run the in-chat command ``name`` for ``session`` as if its user had typed
    ``!/name(args)``: the UI's controls mean exactly what the commands mean, checks included."""
    command = context.host.commands.get(name)
    if command is None:
        raise BadRequest(f"no in-chat command {name!r} is installed (is the commands plugin enabled?)", 409)
    flow = Flow("admin", {}, "", False)
    flow.context = context
    flow.sessions = _OneSession(session)  # type: ignore[assignment]
    call = CommandCall(name, args, flow, session, context)
    try:
        result = command.handler(call)
        if inspect.isawaitable(result):
            result = await result
    except ValueError as error:
        raise BadRequest(f"{name}: {error}") from None
    return result if isinstance(result, str) else None


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def change_session(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    """``{"backend": name|"", "model": name|"", "set": {key: value}, "unset": [key]}``."""
    session = _session(inspector, request)
    body = await json_body(request)
    context = inspector.context
    replies: list[str] = []
    unknown = set(body) - {"backend", "model", "set", "unset"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}; expected backend, model, set, unset")
    status = 200
    try:
        for name in ("backend", "model"):
            if name in body:
                value = body[name]
                if not isinstance(value, str):
                    raise BadRequest(f"{name} must be a string (empty: back to the default)")
                replies.append(await run_command(context, session, name, _quote(value) if value else "") or "")
        if "set" in body:
            values = body["set"]
            if not isinstance(values, dict) or not values:
                raise BadRequest("set must be an object of setting → value")
            replies.append(await run_command(context, session, "set", ", ".join(f"{k}={_quote(v)}" for k, v in values.items())) or "")
        if "unset" in body:
            keys = body["unset"]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise BadRequest("unset must be a list of setting names")
            replies.append(await run_command(context, session, "unset", ", ".join(_quote(k) for k in keys)) or "")
    except BadRequest as bad:
        status = bad.status
        raise
    finally:
        await inspector.audit.record(request, auth, "session.change", session.id, status, change=body)
    inspector.hub.publish("session", session.summary())
    return reply({"session": session.summary(), "replies": [r for r in replies if r]})


async def clear_session(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    session = _session(inspector, request)
    session.settings.clear()
    session.oneoff = None
    await inspector.audit.record(request, auth, "session.clear", session.id)
    inspector.hub.publish("session", session.summary())
    return reply({"session": session.summary()})


async def backends(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    return reply({"backends": inspector.context.backend_status()})


async def audit(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    return reply({"entries": list(reversed(inspector.audit.recent))})


async def reload(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    method = getattr(inspector.context, "reload", None)
    if not callable(method):
        await inspector.audit.record(request, auth, "reload", status=501)
        return problem(501, "this llmproxy cannot reload its config while running")
    try:
        result = method()
        if inspect.isawaitable(result):
            result = await result
    except Exception as error:  # the config's own complaint, for the user to fix
        await inspector.audit.record(request, auth, "reload", status=400)
        return problem(400, f"reload failed: {error}")
    if isinstance(result, dict) and result.get("status") == "rejected":
        await inspector.audit.record(request, auth, "reload", status=400)
        return reply({"ok": False, "result": result}, 400)
    await inspector.audit.record(request, auth, "reload")
    return reply({"ok": True, "result": result if isinstance(result, (dict, list, str, int, float, bool)) else None})


async def route_explain(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    """``{"request": body, "protocol": optional, "model": optional}`` → how it would be routed
    now (``llmproxy.explain``); changes nothing."""
    from llmproxy.explain import PROTOCOLS, explain

    body = await json_body(request)
    wanted = body.get("request")
    protocol = body.get("protocol")
    if not isinstance(wanted, dict):
        raise BadRequest("'request' must be the request body, a JSON object")
    if protocol is not None and protocol not in PROTOCOLS:
        raise BadRequest(f"'protocol' must be one of {', '.join(PROTOCOLS)}")
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return reply(explain(inspector.context, wanted, protocol, model))


async def try_it(request: web.Request, inspector: "Inspector", auth: str) -> web.StreamResponse:
    """``{"model", "message", "session"?, "system"?}`` → sent as an OpenAI chat request to this
    proxy's own ``/v1/chat/completions`` over loopback, so it takes the whole pipeline."""
    body = await json_body(request)
    model, message = body.get("model"), body.get("message")
    if not isinstance(model, str) or not model or not isinstance(message, str) or not message:
        raise BadRequest("model and message are required strings")
    session = body.get("session")
    if session is not None and not isinstance(session, str):
        raise BadRequest("session must be a string")
    messages = [{"role": "user", "content": message}]
    if isinstance(body.get("system"), str) and body["system"]:
        messages.insert(0, {"role": "system", "content": body["system"]})
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not sockname:
        raise BadRequest("cannot tell which address this server listens on", 500)
    host = sockname[0]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{sockname[1]}/v1/chat/completions"
    headers = {"User-Agent": "llmproxy-inspector (try it)"}
    if session:
        headers["x-session-id"] = session
    keys = inspector.context.client_keys
    if keys:  # the proxy's own key, used inside the process only
        headers["Authorization"] = "Bearer " + keys[0][1].decode()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        async with client.post(url, json={"model": model, "messages": messages}, headers=headers) as answer:
            data = await answer.read()
            status = answer.status
            # str(): aiohttp's header names are istr, which orjson refuses as keys
            routing = {str(k).lower(): v for k, v in answer.headers.items() if k.lower().startswith("x-llmproxy-")}
    await inspector.audit.record(request, auth, "try", model, status, session=session)
    try:
        parsed: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = data.decode(errors="replace")
    text = None
    if isinstance(parsed, dict) and parsed.get("choices"):
        text = ((parsed["choices"][0] or {}).get("message") or {}).get("content")
    return reply({"status": status, "text": text, "body": parsed, "headers": routing})


# -- the UI's files -------------------------------------------------------------------------------


def ui_file(context: "ProxyContext") -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    files = resources.files("llmproxy_inspector") / "static"

    async def serve(request: web.Request) -> web.StreamResponse:
        from . import NAME

        inspector = context.state.get(NAME)
        if inspector is None:
            return problem(503, "the inspector is starting or stopping")
        try:
            inspector.guard.check_origin(request)
        except Refused as refused:
            return problem(refused.status, refused.message)
        entry = UI_FILES.get(request.match_info.get("file", ""))
        if entry is None:
            return problem(404, "no such file")
        name, content_type = entry
        return web.Response(body=(files / name).read_bytes(), content_type=content_type, headers=UI_HEADERS)

    return serve


async def ui_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def routes(register: Callable[..., None], context: "ProxyContext") -> None:
    def add(method: str, path: str, handler: Handler, login_route: bool = False) -> None:
        register(method, PREFIX + path, guarded(context, handler, login_route))

    add("POST", "/login", login, login_route=True)
    add("POST", "/logout", logout)
    add("GET", "/info", info)
    add("GET", "/flows", flows)
    add("GET", "/flows/{id}", flow_detail)
    add("GET", "/events", events)
    add("GET", "/history", history)
    add("GET", "/sessions", sessions)
    add("POST", "/sessions/{id}", change_session)
    add("POST", "/sessions/{id}/clear", clear_session)
    add("GET", "/backends", backends)
    add("GET", "/audit", audit)
    add("POST", "/reload", reload)
    add("POST", "/route/explain", route_explain)
    add("POST", "/try", try_it)
    register("GET", "/ui", ui_redirect)
    register("GET", "/ui/", ui_file(context))
    register("GET", "/ui/{file}", ui_file(context))
