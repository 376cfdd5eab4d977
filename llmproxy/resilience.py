"""Resilience primitives the failover loop consults once per attempt: circuit breakers,
sliding-window rate limits, backoff with full jitter, and capability checks.

Nothing here runs per streamed event. A breaker is kept per target label (``backend:model``,
shared by every alias that lists it: health belongs to the backend's model); a rate window
per backend (``rpm``/``tpm`` under ``backends``) and per alias target (``rpm``/``tpm`` on
the target's entry). State lives in memory and survives a config reload for the labels
that still exist.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .canonical import ImagePart
from .errors import ProxyError

if TYPE_CHECKING:
    from .config import BreakerSettings, RetrySettings
    from .flow import Flow

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

# What kind of failure an upstream error is, for the breaker's cooldowns and for retrying;
# None: the request's own fault (a 400, 401, 404 …), which says nothing about the backend.
RATE_LIMITED, SERVER, NETWORK = "rate_limit", "server", "network"


def failure_kind(error: ProxyError) -> str | None:
    status = error.status
    if status == 429:
        return RATE_LIMITED
    if status in (408, 504) or error.kind in ("timeout_error", "upstream_unreachable") or getattr(error, "network", False):
        return NETWORK
    if status >= 500 or status == 409:
        return SERVER
    return None


class Breaker:
    """Closed → (``failures`` in a row) → open for the cooldown of the last failure's kind →
    half-open: ``half_open_requests`` trial requests; a success closes, a failure re-opens.
    A 429 with Retry-After opens it at once, for that long: the backend said when to return."""

    __slots__ = ("settings", "state", "failures", "open_until", "trials", "last_kind", "opened")

    def __init__(self, settings: "BreakerSettings") -> None:
        self.settings = settings
        self.state = CLOSED
        self.failures = 0
        self.open_until = 0.0
        self.trials = 0  # trial requests under way while half-open
        self.last_kind: str | None = None
        self.opened = 0  # times it opened, for status and metrics

    def allows(self, now: float) -> bool:
        state = self.state
        if state == CLOSED or not self.settings.enabled:
            return True
        if state == OPEN:
            if now < self.open_until:
                return False
            self.state, self.trials = HALF_OPEN, 0
        if self.trials < self.settings.half_open_requests:
            self.trials += 1
            return True
        return False

    def retry_in(self, now: float) -> float:
        return max(0.0, self.open_until - now) if self.state == OPEN else 0.0

    def success(self) -> None:
        self.state, self.failures, self.trials = CLOSED, 0, 0

    def abandoned(self) -> None:
        """An attempt ended with no verdict (the client left): free its trial slot."""
        if self.state == HALF_OPEN and self.trials:
            self.trials -= 1

    def failure(self, kind: str, retry_after: float | None, now: float) -> None:
        settings = self.settings
        if not settings.enabled:
            return
        self.failures += 1
        self.last_kind = kind
        told = kind == RATE_LIMITED and retry_after is not None and retry_after > 0
        if self.state == HALF_OPEN or self.failures >= settings.failures or told:
            if told:
                cooldown = retry_after
            elif kind == RATE_LIMITED:
                cooldown = settings.cooldown_429
            elif kind == SERVER:
                cooldown = settings.cooldown_5xx
            else:
                cooldown = settings.cooldown_network
            self.state, self.open_until, self.trials = OPEN, now + cooldown, 0  # type: ignore[operator]
            self.opened += 1

    def status(self, now: float) -> dict[str, Any]:
        state = self.state
        if state == OPEN and now >= self.open_until:
            state = HALF_OPEN  # what the next request will find
        return {"state": state, "failures": self.failures, "retry_in": round(self.retry_in(now), 3), "last_failure": self.last_kind, "opened": self.opened}


class RateWindow:
    """Requests and tokens of the last ``span`` seconds (a sliding log; 60 unless
    ``proxy.rate_window`` says otherwise), against ``rpm``/``tpm``.

    The log holds floats and tuples of floats only: objects the cyclic garbage collector
    does not walk, though a busy window holds tens of thousands of them."""

    __slots__ = ("rpm", "tpm", "span", "times", "spent", "tokens")

    def __init__(self, rpm: int | None, tpm: int | None, span: float = 60.0) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.span = span
        self.times: deque[float] = deque()  # when each admitted request began
        self.spent: deque[tuple[float, float]] = deque()  # (time, tokens), with tpm only
        self.tokens = 0.0

    def _prune(self, now: float) -> None:
        horizon = now - self.span
        times = self.times
        while times and times[0] <= horizon:
            times.popleft()
        spent = self.spent
        while spent and spent[0][0] <= horizon:
            self.tokens -= spent.popleft()[1]

    def wait(self, now: float, tokens: float) -> float:
        """Seconds until a request of ``tokens`` fits (0: it fits now)."""
        horizon = now - self.span
        times = self.times
        while times and times[0] <= horizon:
            times.popleft()
        spent = self.spent
        if spent:
            while spent and spent[0][0] <= horizon:
                self.tokens -= spent.popleft()[1]
        rpm = self.rpm
        if rpm is not None and len(times) >= rpm:
            return times[len(times) - rpm] + self.span - now
        if self.tpm is not None and spent and self.tokens + tokens > self.tpm:
            # wait until enough of the oldest entries have left the window (a request larger
            # than the whole budget goes through an empty window alone)
            excess = self.tokens + tokens - self.tpm
            for at, used in spent:
                excess -= used
                if excess <= 0:
                    return at + self.span - now
            return spent[-1][0] + self.span - now
        return 0.0

    def admit(self, now: float, tokens: float) -> None:
        """Count a request that begins now (after :meth:`wait` said it fits)."""
        self.times.append(now)
        if self.tpm is not None:
            self.spent.append((now, tokens))
            self.tokens += tokens

    def settle(self, estimate: float, tokens: float) -> None:
        """A request counted with ``estimate`` tokens really used ``tokens``: the difference
        is counted from now on (and leaves the window ``span`` seconds from now)."""
        if self.tpm is not None and tokens != estimate:
            self.spent.append((time.monotonic(), tokens - estimate))
            self.tokens += tokens - estimate

    def status(self, now: float) -> dict[str, Any]:
        self._prune(now)
        status: dict[str, Any] = {}
        if self.rpm is not None:
            status["rpm"] = {"used": len(self.times), "limit": self.rpm}
        if self.tpm is not None:
            status["tpm"] = {"used": int(self.tokens), "limit": self.tpm}
        return status


def backoff_delay(retry: int, settings: "RetrySettings", retry_after: float | None, rng: random.Random = random._inst) -> float | None:  # type: ignore[attr-defined]
    """Seconds to wait before try ``retry + 1`` of the same target: the backend's
    Retry-After when it gave one (None when that is beyond ``max_retry_after``: better try
    another target), else full jitter over an exponential ceiling."""
    if retry_after is not None:
        return retry_after if retry_after <= settings.max_retry_after else None
    return rng.uniform(0.0, min(settings.max_delay, settings.base_delay * (2**retry)))


@dataclass(slots=True)
class Needs:
    """What a request asks of its target, worked out only when some target declares limits."""

    tools: bool
    vision: bool
    json_schema: bool
    tokens: int


def request_needs(flow: "Flow") -> Needs:
    raw = flow.raw_request
    request = flow.request
    vision = any(isinstance(part, ImagePart) for message in request.messages for part in message.parts)
    fmt = request.response_format
    return Needs(
        tools=bool(raw.get("tools")) or bool(request.tools),
        vision=vision,
        json_schema=bool(fmt) and fmt.get("type") == "json_schema",
        tokens=estimate_tokens(flow),
    )


def estimate_tokens(flow: "Flow") -> int:
    """A cheap upper-side estimate of a request's input tokens: its body's bytes / 4."""
    return len(flow.raw_body) // 4 if flow.raw_body else 0


def cannot_serve(declared: dict[str, Any], needs: Needs) -> str | None:
    """Why a target with these declared capabilities cannot serve the request, or None."""
    if needs.tools and declared.get("tools") is False:
        return "does not take tools (capabilities.tools: false)"
    if needs.vision and declared.get("vision") is False:
        return "does not take images (capabilities.vision: false)"
    if needs.json_schema and declared.get("json_schema") is False:
        return "does not honour JSON schemas (capabilities.json_schema: false)"
    limit = declared.get("max_context")
    if limit is not None and needs.tokens > limit:
        return f"the request (~{needs.tokens} tokens) exceeds its context (capabilities.max_context: {limit})"
    return None


class Health:
    """The breakers of every target label, and the rate windows of backends and targets."""

    def __init__(self) -> None:
        self.breakers: dict[str, Breaker] = {}
        self.windows: dict[str, RateWindow] = {}
        self.span = 60.0  # seconds a rate window counts over (``proxy.rate_window``)
        self.waiting = 0  # requests waiting for a rate limit (``proxy.rate_limit_queue``)

    def breaker(self, label: str, settings: "BreakerSettings") -> Breaker:
        breaker = self.breakers.get(label)
        if breaker is None or breaker.settings is not settings:
            kept = breaker
            breaker = self.breakers[label] = Breaker(settings)
            if kept is not None:  # a reload changed the settings: keep the state
                breaker.state, breaker.failures, breaker.open_until, breaker.opened = kept.state, kept.failures, kept.open_until, kept.opened
        return breaker

    def window(self, name: str, rpm: int | None, tpm: int | None) -> RateWindow | None:
        if rpm is None and tpm is None:
            return None
        window = self.windows.get(name)
        if window is None:
            window = self.windows[name] = RateWindow(rpm, tpm, self.span)
        else:
            window.rpm, window.tpm, window.span = rpm, tpm, self.span
        return window
