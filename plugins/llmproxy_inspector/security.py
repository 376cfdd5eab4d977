"""Who may use the admin API and the UI, and the audit log of what they changed.

Every admin request passes :meth:`Guard.check`, in this order:

1. the caller's address is loopback (unless ``allow_remote``) — 403;
2. the Host header names loopback, the bind address or one of ``allowed_hosts`` — 403
   (a page on another site whose name was re-pointed at 127.0.0.1, DNS rebinding, sends its
   own name);
3. a mutating method (anything but GET/HEAD) carries ``X-LLMProxy-Admin: 1`` — 403 (a
   cross-site form or ``fetch`` without CORS cannot set a custom header);
4. the admin key, as ``Authorization: Bearer <key>`` (compared with
   ``hmac.compare_digest``), or the UI's session cookie — 401.

The UI logs in once with the key (``POST /admin/api/login``) and gets an HttpOnly,
SameSite=Strict cookie holding a random session token (never the key), valid for
``login_ttl``; page scripts cannot read it and other sites' requests do not carry it.
No CORS header is ever sent, so other origins cannot read any answer.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from llmproxy.config import is_loopback_host

log = logging.getLogger("llmproxy.inspector")
audit_log = logging.getLogger("llmproxy.audit")

COOKIE = "llmproxy_admin"
MARKER_HEADER = "X-LLMProxy-Admin"
LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))
SAFE_METHODS = frozenset(("GET", "HEAD"))


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def host_name(host: str) -> str:
    """The Host header without its port (``[::1]:8000`` → ``::1``), lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def is_loopback_address(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class Guard:
    def __init__(self, key: str, bind_host: str, allowed_hosts: list[str], allow_remote: bool, login_ttl: float) -> None:
        self._key = key.encode()
        self.allow_remote = allow_remote
        self.login_ttl = login_ttl
        hosts = set(LOOPBACK_NAMES) | {h.lower() for h in allowed_hosts}
        if bind_host and bind_host not in ("0.0.0.0", "::", ""):
            hosts.add(host_name(bind_host) if not is_loopback_host(bind_host) else bind_host.lower())
        self.hosts = frozenset(hosts)
        self._tokens: dict[str, float] = {}  # session token → expiry (monotonic)

    def check_origin(self, request: web.Request) -> None:
        """Address and Host: what even the UI's static files require."""
        if not self.allow_remote and not is_loopback_address(request.remote):
            raise Refused(403, "the admin API and the UI answer loopback callers only (plugins.inspector.allow_remote)")
        if host_name(request.headers.get("Host", "")) not in self.hosts:
            raise Refused(403, "Host header not allowed; add the name to plugins.inspector.allowed_hosts")

    def check(self, request: web.Request) -> str:
        """Raise :class:`Refused` unless the request may use the admin API; returns how it
        authenticated (``bearer`` or ``cookie``)."""
        self.check_origin(request)
        if request.method not in SAFE_METHODS and request.headers.get(MARKER_HEADER) != "1":
            raise Refused(403, f"changes need the header '{MARKER_HEADER}: 1'")
        presented = request.headers.get("Authorization", "")
        if presented[:7].lower() == "bearer ":
            if hmac.compare_digest(presented[7:].strip().encode(), self._key):
                return "bearer"
            raise Refused(401, "invalid admin key")
        token = request.cookies.get(COOKIE)
        if token and self._valid_token(token):
            return "cookie"
        raise Refused(401, "admin key required: 'Authorization: Bearer <key>', or log in at /ui/")

    def key_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._key)

    def login(self) -> str:
        now = time.monotonic()
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + self.login_ttl
        return token

    def logout(self, token: str | None) -> None:
        if token:
            self._tokens.pop(token, None)

    def _valid_token(self, token: str) -> bool:
        found = None
        for known, expiry in self._tokens.items():  # compare against each: timing says nothing
            if hmac.compare_digest(known.encode(), token.encode()) and expiry > time.monotonic():
                found = known
        return found is not None


class Audit:
    """Appends one JSON line per change; keeps the newest in memory for ``GET /admin/api/audit``."""

    def __init__(self, path: str | None, keep: int = 200) -> None:
        self.path = Path(path).expanduser() if path else None
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)

    async def record(self, request: web.Request, auth: str, action: str, target: str | None = None, status: int = 200, **details: Any) -> None:
        entry = {
            "ts": round(time.time(), 3),
            "who": {"address": request.remote, "auth": auth, "user_agent": request.headers.get("User-Agent", "")},
            "action": action,
            "target": target,
            "status": status,
            **({"details": details} if details else {}),
        }
        self.recent.append(entry)
        line = orjson.dumps(entry) + b"\n"
        audit_log.info("%s", line.decode().rstrip())
        if self.path is not None:
            await asyncio.to_thread(self._append, line)

    def _append(self, line: bytes) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as file:
            file.write(line)
