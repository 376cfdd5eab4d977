"""The inspector: a web UI at ``/ui/``, the admin API it uses at ``/admin/api/``, and a
SQLite history of every flow (``llmproxy history`` reads it in the terminal).

On by default, answering loopback callers only, behind an admin key: ``plugins.inspector.
admin_key`` (a reference such as ``${LLMPROXY_ADMIN_KEY}``), or else a random key generated
at each start and printed once in the log beside the UI's URL — never written to disk. See
docs/inspector.md and docs/admin-api.md.

Per flow, on the event loop: a small record when it ends (the flow, its wall-clock start,
its session) put in the recent list and the history's queue; the history thread builds the
summaries and writes them to SQLite in batches (see history.py), and token counts come from
answers already decoded (see live.py for when else). The detail record (bodies, attempts,
events, diffs — masked) costs about as much as proxying the request, so it is built only
when the UI asks for it (from the newest ``details`` flows kept in memory), or for every
flow when the history is kept on disk (``history_path``). Streams keep their fast path: with
``capture_bodies`` the bytes written to the client are kept by the core's wire recording
(``flow.record_wire()``), one list append per write, by default only while a browser has the
UI open (recording every flow's bodies cost tens of µs per request); nothing else runs per event. The
per-plugin diffs come from the core's change tracing (``flow.trace_changes()``), turned on
per ``trace``: by default only while a browser has the UI open.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from llmproxy import hookimpl

from . import api
from .history import History
from .live import Hub, LiveFlows
from .security import Audit, Guard
from .settings import InspectorSettings

if TYPE_CHECKING:
    from llmproxy.context import ProxyContext
    from llmproxy.flow import Flow

NAME = "inspector"
log = logging.getLogger("llmproxy.inspector")

__all__ = ["InspectorSettings", "NAME"]


@dataclass
class Inspector:
    """What the inspector keeps per running proxy (``context.state["inspector"]``)."""

    context: "ProxyContext"
    settings: InspectorSettings
    guard: Guard
    audit: Audit
    hub: Hub
    live: LiveFlows
    history: History
    recording: bool = False  # flows are tracked (``record``: always, or since the UI was first opened)

    def traces(self) -> bool:
        mode = self.settings.trace
        return mode == "always" or (mode == "watched" and self.hub.watched)

    def captures(self) -> bool:
        mode = self.settings.capture_bodies
        return mode == "always" or (mode == "watched" and self.hub.watched)


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return InspectorSettings


@hookimpl
def register_routes(register: Callable[..., None], context: "ProxyContext") -> None:
    api.routes(register, context)


@hookimpl
async def startup(context: "ProxyContext") -> None:
    settings: InspectorSettings = context.settings(NAME) or InspectorSettings()
    if settings.admin_key is not None:
        key = settings.admin_key.get()
        if not key:
            raise ValueError(f"admin_key: {settings.admin_key.describe()} is not set")
        generated = False
    else:
        key = secrets.token_urlsafe(24)
        generated = True
    context.add_secrets(NAME, [key])  # never in a capture or a history record
    audit_path = settings.audit_log
    if audit_path is None and settings.history_path:
        audit_path = str(Path(os.path.expanduser(settings.history_path)).parent / "audit.jsonl")
    history = History(settings.history_path, settings.history_max_age, settings.history_max_bytes)
    try:
        await history.open()
    except Exception as error:
        raise ValueError(f"cannot open the history {settings.history_path}: {error}") from None
    hub = Hub()
    proxy = context.config.proxy
    context.state[NAME] = Inspector(
        context,
        settings,
        Guard(key, proxy.host, settings.allowed_hosts, settings.allow_remote, settings.login_ttl),
        Audit(audit_path),
        hub,
        LiveFlows(settings.recent, hub, settings.details),
        history,
        recording=settings.record == "always" or settings.history_path is not None,
    )
    host = "127.0.0.1" if proxy.host in ("0.0.0.0", "::") else proxy.host
    # Port 0 is chosen when the proxy binds, after start-up: the ready line names it.
    where = f"http://{host}:{proxy.port}/ui/" if proxy.port else f"http://{host}:PORT/ui/ (PORT: see the ready line)"
    if generated:
        # For the person starting the proxy, once; the key lives only in this process. Written
        # to stderr, not logged: the log masks every secret, this key included (it is one of
        # them for captures and history), and no log level may hide the only place to read it.
        print(f"llmproxy inspector: {where} — admin key for this run: {key} (set plugins.inspector.admin_key to choose one)", file=sys.stderr, flush=True)
    else:
        log.info("inspector: %s (admin key: %s)", where, settings.admin_key.describe())  # type: ignore[union-attr]


@hookimpl
async def shutdown(context: "ProxyContext") -> None:
    inspector: Inspector | None = context.state.pop(NAME, None)
    if inspector is not None:
        inspector.hub.close()
        await inspector.history.close()


@hookimpl(tryfirst=True)
def request(flow: "Flow") -> None:
    # tryfirst: the flow shows as in flight, and tracing covers every plugin after this one.
    inspector: Inspector | None = flow.context.state.get(NAME) if flow.context is not None else None
    if inspector is None or not inspector.recording:
        return
    if inspector.captures():
        flow.record_wire()
    if inspector.traces():
        flow.trace_changes()
    inspector.live.started(flow)


@hookimpl(trylast=True)
def flow_done(flow: "Flow") -> None:
    # trylast: once this has run, nothing reads the flow any more, so the history thread may
    # decode its answer (see live.Finished) without racing another plugin.
    context = flow.context
    inspector: Inspector | None = context.state.get(NAME) if context is not None else None
    if inspector is None or not inspector.recording:
        return
    settings = inspector.settings
    inspector.history.add(inspector.live.finished(flow, settings.history_path is not None, flow.sent is not None))


@hookimpl
def register_cli_commands(cli: Any) -> None:
    from .cli import history

    cli.add_command(history)
