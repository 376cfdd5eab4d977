"""ProxyError: the one exception type that becomes a client-visible error.

Anything a plugin, router or provider wants the client to see is raised as a ProxyError
with an HTTP status and a short machine-readable ``kind``; each front-end codec writes it in
its own protocol (OpenAI error JSON, Anthropic error object, Gemini error, SSE error frame).
Any other exception is a bug: the pipeline logs it and the client gets a generic 500, never a
traceback.
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Any

# OpenAI's error "type" strings by status, reused as our canonical kinds.
KIND_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "api_error",
    502: "upstream_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ProxyError(Exception):
    """An error the client should see, in its own protocol, with ``status``.

    ``param`` names the offending request field when there is one; ``code`` is an optional
    short code (OpenAI's ``code``); ``headers`` are added to the HTTP error response (for
    example ``Retry-After``); ``in_stream`` marks an error the backend sent as an event of
    its stream (a pass-through stream has already shown it to the client).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        in_stream: bool = False,
    ) -> None:
        super().__init__(message)
        self.in_stream = in_stream  # the backend reported it as an event inside its stream
        self.status = status
        self.message = message
        self.kind = kind or KIND_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}
        # google.rpc details a Gemini backend gave (RetryInfo, QuotaFailure …): a Gemini client
        # gets them as they were (Gemini CLI tells a daily quota from a short one by them).
        self.details: list[dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "kind": self.kind, "message": self.message, "param": self.param, "code": self.code}


def bad_request(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param)


class RetryStream(Exception):
    """Raised by a stream processor to have the backend asked again, before anything of the
    answer has reached the client (an empty answer, say, or one to re-ask with a hint).

    llmproxy closes the current upstream, calls ``stream_start`` again for fresh processors
    (``flow.metadata`` is where a plugin remembers that it already retried) and streams the
    backend's new answer to ``flow.request`` as it is by then — change the request before
    raising. A processor must hold every event until it knows: raised after events were
    written to the client, or more than :data:`MAX_STREAM_RETRIES` times in one flow, it
    fails the flow like any other exception from a processor.
    """


MAX_STREAM_RETRIES = 2
"""How many times one flow's stream may be asked for again (see :class:`RetryStream`)."""


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value in seconds from now: delay-seconds or an HTTP date (RFC 9110);
    None when absent or unreadable, 0 for a date in the past."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # nan, inf
        return None
    return max(seconds, 0.0)
