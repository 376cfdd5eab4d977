"""identity_headers: the headers that say who is calling — User-Agent, X-Title, HTTP-Referer —
set per backend.

OpenRouter attributes traffic to an app by its ``HTTP-Referer`` and ``X-Title`` headers; other
gateways log or route by ``User-Agent``. llmproxy's providers do not forward the client's
headers, so without this plugin a backend sees llmproxy's HTTP client, not Claude Code or
your app. Each header has a mode:

- ``default``: our ``value``, unless the client sent this header — then the client's value;
- ``pass-through``: the client's value when it sent one; otherwise the request is left as
  the provider built it (a header from the backend's own ``headers:`` setting stays);
- ``override``: always our ``value``, whatever the client sent.

::

    plugins:
      identity_headers:
        backends:
          openrouter:                     # a backend name, or a glob such as "*"
            HTTP-Referer: https://github.com/me/my-app
            X-Title: {value: My App, mode: override}
            User-Agent: {mode: pass-through}

A plain string is ``{value: <string>, mode: default}``. When several keys match a backend,
globs apply first (in the order listed) and the backend's own name last, so it wins.
Headers that carry credentials (``Authorization``, ``x-api-key``, cookies, …) or frame the
request (``Host``, ``Content-Length``, …) are refused when the config is read: the backend key
belongs in ``backends.<name>.api_keys``, and a client's credential must never reach a backend.

Cost: one dictionary lookup per upstream attempt for a backend with no rules; nothing per
streamed event.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from llmproxy import hookimpl

if TYPE_CHECKING:
    from llmproxy import Flow
    from llmproxy.context import ProxyContext
    from llmproxy.flow import UpstreamRequest

NAME = "identity_headers"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
CREDENTIAL_HEADERS = frozenset(
    ("authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "set-cookie", "anthropic-api-key")
)
# Any header whose name says it holds a secret is refused too (x-auth-token, x-openai-key, ...).
_CREDENTIAL_WORDS = ("auth", "key", "token", "secret", "cookie", "password", "credential")
FRAMING_HEADERS = frozenset(
    ("host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection", "te", "upgrade", "expect", "trailer", "keep-alive")
)


def refusal(header: str) -> str | None:
    """Why ``header`` may not be set by this plugin, or None when it may."""
    name = header.lower()
    if name in CREDENTIAL_HEADERS or any(word in name for word in _CREDENTIAL_WORDS):
        return (
            f"{header!r} carries credentials; identity_headers never sets or forwards credential headers "
            "(put backend keys in backends.<name>.api_keys)"
        )
    if name in FRAMING_HEADERS:
        return f"{header!r} frames the HTTP request; llmproxy sets it itself"
    return None


class HeaderRule(BaseModel):
    """How one header is set for a backend."""

    model_config = ConfigDict(extra="forbid")

    value: Optional[str] = Field(None, description="Our value (required for default and override).")
    mode: Literal["default", "pass-through", "override"] = Field(
        "default",
        description="default: our value unless the client sent the header (then the client's); "
        "pass-through: the client's value when it sent one; override: always our value.",
    )

    @field_validator("value")
    @classmethod
    def _one_line(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and ("\r" in value or "\n" in value):
            raise ValueError("a header value must be a single line")
        return value

    @model_validator(mode="after")
    def _value_fits_mode(self) -> "HeaderRule":
        if self.mode == "pass-through" and self.value is not None:
            raise ValueError("pass-through copies the client's value; remove value (or use mode: default)")
        if self.mode != "pass-through" and self.value is None:
            raise ValueError(f"mode {self.mode} needs a value")
        return self


def _rule(value: Any) -> Any:
    return {"value": value} if isinstance(value, str) else value


class IdentityHeadersSettings(BaseModel):
    """``plugins.identity_headers``: no backends listed, no headers changed."""

    model_config = ConfigDict(extra="forbid")

    backends: dict[str, dict[str, Union[HeaderRule, str]]] = Field(
        default_factory=dict,
        description="Per backend name (or glob, e.g. `*`): header name → `{value, mode}`, or a plain string "
        "(our value, mode default). Credential and framing headers are refused.",
    )

    _plans: dict[str, list[tuple[str, HeaderRule]]] = PrivateAttr(default_factory=dict)

    @field_validator("backends", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                backend: ({header: _rule(rule) for header, rule in headers.items()} if isinstance(headers, dict) else headers)
                for backend, headers in value.items()
            }
        return value

    @model_validator(mode="after")
    def _headers_allowed(self) -> "IdentityHeadersSettings":
        problems = []
        for backend, headers in self.backends.items():
            for header in headers:
                if not _TOKEN.fullmatch(header):
                    problems.append(f"backends.{backend}.{header}: not a valid HTTP header name")
                elif (why := refusal(header)) is not None:
                    problems.append(f"backends.{backend}.{header}: {why}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def plan(self, backend: str) -> list[tuple[str, HeaderRule]]:
        """The (header, rule) pairs for ``backend``, computed once per backend name."""
        plan = self._plans.get(backend)
        if plan is None:
            merged: dict[str, tuple[str, HeaderRule]] = {}
            for key, headers in self.backends.items():
                if key != backend and fnmatch.fnmatchcase(backend, key):
                    merged.update((h.lower(), (h, r)) for h, r in headers.items())  # type: ignore[misc]
            for h, r in self.backends.get(backend, {}).items():
                merged[h.lower()] = (h, r)  # type: ignore[assignment]
            plan = self._plans[backend] = list(merged.values())
        return plan


_DEFAULT = IdentityHeadersSettings()


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return IdentityHeadersSettings


@hookimpl
def configure(settings: IdentityHeadersSettings, context: "ProxyContext") -> dict[str, str]:
    known = set(context.config.backends)
    unknown = [name for name in settings.backends if not any(ch in name for ch in "*?[") and name not in known]
    if unknown:
        raise ValueError(
            f"backends: no backend named {', '.join(map(repr, unknown))} is configured "
            f"(configured: {', '.join(sorted(known)) or 'none'}; globs such as '*' match several)"
        )
    return {"upstream_request": "always" if settings.backends else "never"}


@hookimpl
def upstream_request(flow: "Flow", upstream: "UpstreamRequest") -> None:
    context = flow.context
    settings: IdentityHeadersSettings = (context.settings(NAME) if context is not None else None) or _DEFAULT
    if not settings.backends or flow.target is None:
        return
    plan = settings.plan(flow.target.backend)
    if not plan:
        return
    client = flow.client.headers or {}
    applied = {}
    for header, rule in plan:
        if rule.mode == "override":
            value = rule.value
        else:
            value = client_header(client, header)
            if value is None:
                value = rule.value  # default: ours; pass-through: None, leave it as it is
        if value is not None:
            set_header(upstream.headers, header, value)
            applied[header] = rule.mode
    if applied:
        flow.note(NAME, "set identity headers", headers=applied)


def client_header(headers: Any, name: str) -> str | None:
    """The client's value of ``name`` (aiohttp's headers are case-insensitive; a plain dict
    holds lower-case names)."""
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def set_header(headers: dict[str, str], name: str, value: str) -> None:
    """Set ``name`` in a plain dict of headers, replacing it whatever its case."""
    lower = name.lower()
    for key in [k for k in headers if k.lower() == lower]:
        del headers[key]
    headers[name] = value
