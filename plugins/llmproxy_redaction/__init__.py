"""Redaction: secrets are masked in prompts sent to backends, and never reach a log.

What is masked
--------------
- this proxy's own credentials: every backend's keys and every client key, resolved from
  their references;
- ``secrets`` (literal strings), the values of the environment variables named in
  ``secret_env``, and the regular expressions in ``patterns`` from this plugin's settings;
- with ``outbound: all``, also the common key formats of ``llmproxy.redact.DEFAULT_PATTERNS``
  (OpenAI ``sk-…``/``sk-proj-…``, Anthropic ``sk-ant-…``, Google ``AIza…``, GitHub
  ``ghp_…``/``github_pat_…``, AWS ``AKIA…``, Slack ``xox…``, JWTs, PEM private keys,
  ``Bearer …`` tokens, …).

A masked secret becomes ``[REDACTED:secret]`` (``[REDACTED:<format>]`` for a key format,
``[REDACTED:custom]`` for one of ``patterns``).

Where
-----
- **Outbound prompts** (``outbound``, default ``secrets``): in ``upstream_request`` — the last
  step before a request leaves, so the system prompt, every message, tool result, tool
  definition and any field llmproxy does not model are covered, in every protocol. A cheap
  substring test on the client's raw body rules out almost every request; only a request
  that may hold a secret is serialised, masked and parsed again. Any failure refuses the
  request (fail closed). ``outbound: all`` is opt-in because key formats also occur in
  legitimate work (test fixtures, docs, an agent asked to write a key into ``.env``), and
  masking them there changes what the model reads and writes.
- **Logs, always**: a ``logging.Filter`` on the ``llmproxy`` loggers (and those named in
  ``loggers``) masks every message and traceback with the proxy's redactor — this proxy's
  credentials, this plugin's secrets and every key format — whatever ``outbound`` says.
- **Captures**: this plugin adds its secrets to the proxy's redactor
  (``ProxyContext.add_secrets``), which capture plugins use for everything they write.

Switched off for a session (``!/set(plugin.redaction=off)``), prompts of that session go out
unmasked; logs stay masked.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmproxy import ProxyError, hookimpl
from llmproxy.codecs.base import dumps, loads
from llmproxy.redact import DEFAULT_PATTERNS, Pattern, Redactor, pattern, proxy_secrets

if TYPE_CHECKING:
    from llmproxy.context import ProxyContext
    from llmproxy.flow import Flow, UpstreamRequest

NAME = "redaction"
log = logging.getLogger("llmproxy.redaction")


class RedactionSettings(BaseModel):
    """``plugins.redaction``."""

    model_config = ConfigDict(extra="forbid")

    outbound: Literal["off", "secrets", "all"] = Field(
        "secrets",
        description="What is masked in requests sent to backends: `off` nothing; `secrets` this proxy's "
        "backend and client keys plus `secrets`, `secret_env` and `patterns` (exact values: no false "
        "positives); `all` also every common key format (sk-…, AIza…, ghp_…, AKIA…, JWTs, PEM keys, "
        "Bearer tokens), which may also mask example keys in code and docs.",
    )
    secrets: list[str] = Field(
        default_factory=list,
        description="Literal strings to mask everywhere (prompts per `outbound`, logs, captures). "
        "Strings shorter than `min_length` are ignored.",
    )
    secret_env: list[str] = Field(
        default_factory=list,
        description="Names of environment variables whose values are masked like `secrets` "
        "(read at start-up; an unset variable is skipped with a warning).",
    )
    patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions (Python syntax) to mask, as [REDACTED:custom]; a group named "
        "`secret` masks only that group. Matched against every string sent, so keep them specific.",
    )
    min_length: int = Field(8, ge=4, description="Shortest literal secret that is masked (shorter values would mangle ordinary text).")
    loggers: list[str] = Field(
        default_factory=lambda: ["aiohttp"],
        description="Loggers filtered besides llmproxy's own (`llmproxy`, `llmproxy.*`, `llmproxy_*`); "
        "each name covers its existing child loggers too.",
    )

    @field_validator("patterns")
    @classmethod
    def _compile(cls, value: list[str]) -> list[str]:
        for i, regex in enumerate(value):
            try:
                pattern("custom", regex)
            except Exception as error:  # re.error or the empty-match refusal
                raise ValueError(f"patterns[{i}] {regex!r}: {error}") from None
        return value


class _State:
    """Per proxy: the redactor for outbound requests (None when ``outbound: off``)."""

    __slots__ = ("outbound", "settings")

    def __init__(self, settings: RedactionSettings, outbound: Redactor | None) -> None:
        self.settings = settings
        self.outbound = outbound


# -- logs ----------------------------------------------------------------------------------


class LogRedaction(logging.Filter):
    """Masks each record's message and traceback with the redactor of every running proxy
    that has this plugin (logging is per process; proxies come and go, hence weak refs)."""

    def __init__(self) -> None:
        super().__init__("")
        self.contexts: "weakref.WeakSet[ProxyContext]" = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        contexts = tuple(self.contexts)
        if not contexts:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logging module's to report
            return True
        for context in contexts:
            message = context.redactor.text(message)
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            for context in contexts:
                text = context.redactor.text(text)
            record.exc_text = text
        if record.stack_info:
            for context in contexts:
                record.stack_info = context.redactor.text(record.stack_info)
        return True


LOG_FILTER = LogRedaction()


def attach_log_filter(extra: list[str]) -> list[str]:
    """Install :data:`LOG_FILTER` on llmproxy's loggers and on ``extra`` (with their existing
    children); returns the logger names. A logger filter runs before any handler (console,
    files, pytest's caplog), so every handler sees the masked record."""
    names = {"llmproxy", *extra}
    prefixes = tuple(f"{n}." for n in extra)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("llmproxy.", "llmproxy_")) or name.startswith(prefixes):
            names.add(name)
    for name in names:
        logging.getLogger(name).addFilter(LOG_FILTER)  # addFilter ignores a second add
    return sorted(names)


# -- hooks -----------------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return RedactionSettings


@hookimpl
def configure(settings: RedactionSettings | None, context: "ProxyContext") -> dict[str, str]:
    settings = settings or RedactionSettings()
    values = list(settings.secrets)
    for name in settings.secret_env:
        value = os.environ.get(name)
        if value:
            values.append(value)
        else:
            log.warning("plugins.redaction.secret_env: environment variable %s is not set; nothing to mask for it", name)
    custom: list[Pattern] = [pattern("custom", regex) for regex in settings.patterns]
    context.add_secrets(NAME, values, custom)
    outbound = None
    if settings.outbound != "off":
        patterns = (*custom, *DEFAULT_PATTERNS) if settings.outbound == "all" else tuple(custom)
        outbound = Redactor([*proxy_secrets(context), *values], patterns, settings.min_length)
    context.state[NAME] = _State(settings, outbound)
    LOG_FILTER.contexts.add(context)
    attach_log_filter(settings.loggers)
    # nothing to look for (outbound: off, or no secret and no pattern): no request to search
    return {"upstream_request": "always" if outbound else "never"}


@hookimpl
def startup(context: "ProxyContext") -> None:
    state = context.state.get(NAME)
    # Plugins imported after configure have loggers now: cover them too.
    attach_log_filter(state.settings.loggers if state else [])


@hookimpl
def shutdown(context: "ProxyContext") -> None:
    LOG_FILTER.contexts.discard(context)


@hookimpl(trylast=True)
def upstream_request(flow: "Flow", upstream: "UpstreamRequest") -> None:
    """Mask secrets in the body about to be sent (last in the chain: it sees every edit)."""
    state: _State | None = flow.context.state.get(NAME) if flow.context is not None else None
    if state is None or state.outbound is None or upstream.body is None:
        return
    redactor = state.outbound
    # Everything a client can put in a request is in its raw body: when the raw body cannot
    # hold a secret, neither can the request built from it. (JSON-escaped forms of the
    # secrets are among the needles; a \uXXXX escape can spell any character, as Go's
    # encoder writes & < >, so a raw body with one is checked as it will be sent.)
    if flow.raw_body and b"\\u" not in flow.raw_body and not redactor.may_contain(flow.raw_body):
        return
    data = dumps(upstream.body)
    if not redactor.may_contain(data):
        return
    found: list[str] = []
    masked = redactor.text(data.decode(), found)
    if not found:
        return
    try:
        upstream.body = loads(masked)
    except ValueError:
        # Cannot happen with llmproxy's patterns (labels are plain ASCII); a custom pattern
        # that eats a quote could. Never send what could not be masked.
        raise ProxyError(500, "redaction: the request could not be masked (check plugins.redaction.patterns); it was not sent") from None
    kinds = sorted(set(found))
    flow.note(NAME, f"masked {len(found)} secret(s) in the request to {flow.target.label if flow.target else 'the backend'}", count=len(found), kinds=kinds)
    log.info("flow %s: masked %d secret(s) (%s) in the request", flow.id, len(found), ", ".join(kinds))

