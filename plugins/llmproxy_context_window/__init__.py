"""context_window: refuse a request that is longer than its model's context window, before
the backend is called.

A backend refuses an over-long prompt too, but only after a round trip, sometimes after
minutes in a queue, and in its own words. This plugin counts the request's input tokens
locally (tiktoken's ``cl100k_base``, shipped offline with llmproxy: an estimate for non-OpenAI
models, hence the optional safety margin) and answers at once with the error each client
knows how to act on, in its own protocol:

- OpenAI clients: 400, ``invalid_request_error``, ``code: context_length_exceeded`` (Codex
  and the SDKs recognise the code);
- Anthropic clients: 400 ``invalid_request_error``, with the message beginning "prompt is too
  long: N tokens > M maximum" as Anthropic's own (Claude Code recognises it and offers to
  compact);
- Gemini clients: 400 ``INVALID_ARGUMENT``.

::

    plugins:
      context_window:
        limits:                      # model glob -> max input tokens; first match wins
          "gpt-4o*": 128000
          "openrouter:qwen/*": 262144
          "claude-*": 200000
        use_capabilities: true       # else the backend type's max_context, when it has one
        safety_margin: 0.05          # refuse above 95% of the limit (local counts are estimates)

Globs are matched against the model the client asked for and, when it resolves, the first
target's ``backend:model`` and bare model (so an alias is limited by what it points to).

Cost: nothing for a model with no limit. With a limit, a request whose raw body is shorter
(in bytes) than the limit is accepted without counting (a token is at least one byte of the
body), so only requests near or over the limit are tokenized — off the event loop, in the
default executor (the tokenizer loads on first use; a 78 KB Claude Code request takes about
3 ms to count).
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from llmproxy import ProxyError, hookimpl
from llmproxy.tokens import PER_IMAGE, count_request

if TYPE_CHECKING:
    from llmproxy import Flow

NAME = "context_window"


class ContextWindowSettings(BaseModel):
    """``plugins.context_window``: no limits and no capabilities, no checks."""

    model_config = ConfigDict(extra="forbid")

    limits: dict[str, int] = Field(
        default_factory=dict,
        description="Model name glob → the most input tokens it accepts. Matched in the order listed against the "
        "requested model and the first target's `backend:model` and model; the first match wins.",
    )
    use_capabilities: bool = Field(
        False,
        description="For a model no glob matches, use the `max_context` its backend type declares "
        "(llmproxy.providers.Capabilities), when it declares one.",
    )
    safety_margin: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of the limit kept free: 0.05 refuses requests above 95% of it."
    )

    _exact: dict[str, int] = PrivateAttr(default_factory=dict)
    _globs: list[tuple[str, int]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _positive(self) -> "ContextWindowSettings":
        bad = [glob for glob, limit in self.limits.items() if limit < 1]
        if bad:
            raise ValueError(f"limits must be positive token counts (check {', '.join(map(repr, bad))})")
        self._globs = list(self.limits.items())
        self._exact = {k: v for k, v in self.limits.items() if not any(ch in k for ch in "*?[")}
        return self

    @property
    def active(self) -> bool:
        return bool(self.limits) or self.use_capabilities

    def limit_for(self, names: list[str]) -> Optional[int]:
        for glob, limit in self._globs:
            for name in names:
                if name == glob or fnmatch.fnmatchcase(name, glob):
                    return limit
        return None


_DEFAULT = ContextWindowSettings()


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return ContextWindowSettings


@hookimpl
def configure(settings: Optional[ContextWindowSettings]) -> dict[str, str]:
    return {"request": "always" if (settings or _DEFAULT).active else "never"}


def model_limit(flow: "Flow", settings: ContextWindowSettings) -> Optional[int]:
    """The input-token limit that applies to ``flow``'s model, or None."""
    names = [flow.model]
    if settings._exact.get(flow.model) is not None:
        return settings._exact[flow.model]
    target = None
    context = flow.context
    if context is not None:
        try:
            targets = context.router.resolve(flow.model)
        except ProxyError:
            targets = []  # an unknown model: the router's own 404 follows
        if targets:
            target = targets[0]
            names += [target.label, target.model]
    limit = settings.limit_for(names)
    if limit is None and settings.use_capabilities and target is not None:
        limit = target.provider.capabilities.max_context
    return limit


# trylast: count the request as it will be sent, after every plugin that rewrites it.
@hookimpl(trylast=True)
async def request(flow: "Flow") -> None:
    context = flow.context
    settings: ContextWindowSettings = (context.settings(NAME) if context is not None else None) or _DEFAULT
    if not settings.active:
        return
    limit = model_limit(flow, settings)
    if limit is None:
        return
    allowed = math.floor(limit * (1 - settings.safety_margin))
    raw = flow.raw_body
    if raw and not flow.request_decoded and fits_for_sure(raw, allowed):
        return
    request = flow.request
    tokens = await asyncio.get_running_loop().run_in_executor(None, count_request, request)
    if tokens <= allowed:
        flow.note(NAME, "counted", tokens=tokens, limit=allowed)
        return
    flow.note(NAME, "refused", tokens=tokens, limit=allowed)
    raise too_long(flow.frontend, flow.model, tokens, limit, allowed)


def fits_for_sure(raw: bytes, allowed: int) -> bool:
    """Whether a body of these bytes cannot hold more than ``allowed`` tokens: a text token
    is at least one byte of the body, an image (counted as ``PER_IMAGE`` tokens) takes more
    than ``PER_IMAGE / 3`` bytes however it is sent — so no scan is needed far below the
    limit, one search for images near it."""
    size = len(raw)
    if size * 3 <= allowed:
        return True
    return size <= allowed and size + PER_IMAGE * raw.count(b"image") <= allowed


def too_long(frontend: str, model: str, tokens: int, limit: int, allowed: int) -> ProxyError:
    """The client's error for a request of ``tokens`` over ``allowed`` (``limit`` less the margin)."""
    margin = f" (a limit of {limit} less the safety margin)" if allowed != limit else ""
    detail = f"request has {tokens} input tokens; model {model!r} accepts at most {allowed}{margin}, counted by llmproxy before calling the backend"
    if frontend == "anthropic":
        # Anthropic's own wording, which Claude Code recognises.
        message = f"prompt is too long: {tokens} tokens > {allowed} maximum ({detail})"
    else:
        message = detail
    return ProxyError(400, message, kind="invalid_request_error", param="messages", code="context_length_exceeded")
