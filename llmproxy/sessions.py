"""Sessions: one conversation's state across requests.

Agents do not send a session id in any standard way, so a flow's session is identified from
what each client really sends, in this order:

1. ``x-session-id`` — an explicit header any client or wrapper can set;
2. ``x-claude-code-session-id`` — Claude Code's header;
3. ``metadata.user_id`` — Claude Code's JSON string ``{"session_id": …}`` (Anthropic body);
4. ``session-id`` — Codex CLI's header, else its body's ``prompt_cache_key``;
5. otherwise the client's key name (or address) plus its user agent, so one client
   program on one machine is one session.

Sessions are created on first use and forgotten after ``proxy.session_ttl`` seconds without a
request (and beyond ``proxy.max_sessions``, least recently used first). Nothing here runs
unless a plugin reads ``flow.session``.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .codecs.base import loads

if TYPE_CHECKING:
    from .flow import Flow


@dataclass
class Session:
    """What a conversation carries from one request to the next.

    ``settings`` holds what in-chat commands set (``backend``, ``model``, sampling values,
    ``plugin.<name>`` switches); ``oneoff`` a target for the next request only; ``data`` is
    for plugins' own state, under the plugin's name.
    """

    id: str
    source: str
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    requests: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    oneoff: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def disabled_plugins(self) -> frozenset[str]:
        return frozenset(k[7:] for k, v in self.settings.items() if k.startswith("plugin.") and not v)

    def plugin_enabled(self, plugin: str, default: bool = True) -> bool:
        """Whether ``plugin`` is on for this session (``!/set(plugin.NAME=off)`` turns it off)."""
        value = self.settings.get(f"plugin.{plugin}")
        return default if value is None else bool(value)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "created": self.created,
            "last_seen": self.last_seen,
            "requests": self.requests,
            "settings": dict(self.settings),
            "oneoff": self.oneoff,
        }


class SessionStore:
    def __init__(self, ttl: float = 24 * 3600, max_sessions: int = 10_000) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        # Set once any session switches a plugin: only then does every flow look up its
        # session to know which plugins to leave out.
        self.plugin_switches = False

    def switch_plugin(self, session: Session, plugin: str, on: bool) -> None:
        """Turn ``plugin`` on or off for ``session`` (its hooks are skipped for its flows)."""
        session.settings[f"plugin.{plugin}"] = on
        self.plugin_switches = True

    def for_flow(self, flow: "Flow") -> Session:
        key, source = identify(flow)
        return self.get(key, source)

    def get(self, key: str, source: str = "explicit") -> Session:
        now = time.time()
        session = self._sessions.get(key)
        if session is not None and now - session.last_seen > self.ttl:
            del self._sessions[key]
            session = None
        if session is None:
            session = self._sessions[key] = Session(key, source)
            self._evict(now)
        else:
            self._sessions.move_to_end(key)
        session.last_seen = now
        session.requests += 1
        return session

    def find(self, key: str) -> Session | None:
        return self._sessions.get(key)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def _evict(self, now: float) -> None:
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        # expired ones at the old end go too, so an idle store does not keep them forever
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_seen <= self.ttl:
                break
            self._sessions.popitem(last=False)


def identify(flow: "Flow") -> tuple[str, str]:
    """(session key, how it was found) for ``flow`` — see the module docstring."""
    headers = flow.client.headers
    explicit = headers.get("x-session-id")
    if explicit:
        return f"x-session-id:{explicit}", "x-session-id"
    claude = headers.get("x-claude-code-session-id")
    if claude:
        return f"claude-code:{claude}", "claude-code"
    raw = flow.raw_request
    metadata = raw.get("metadata") if isinstance(raw, dict) else None
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str) and "session_id" in user_id:
        try:
            session_id = loads(user_id).get("session_id")
        except (ValueError, AttributeError):
            session_id = None
        if session_id:
            return f"claude-code:{session_id}", "claude-code"
    codex = headers.get("session-id") or (raw.get("prompt_cache_key") if isinstance(raw, dict) else None)
    if codex:
        return f"codex:{codex}", "codex"
    who = flow.client.key_name or flow.client.address or "local"
    agent = hashlib.sha1(flow.client.user_agent.encode()).hexdigest()[:10]
    return f"client:{who}:{agent}", "client"
