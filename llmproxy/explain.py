"""Why a request would go where it goes: the targets in the order they would be tried, and
for each whether it is eligible or skipped — capability, health, circuit breaker, rate
limit, key cooldown — with the numbers behind it.

Used by ``llmproxy route explain`` (against the config alone, or a running proxy's live
state through its admin API) and by the admin API itself. Nothing here changes any state:
no strategy advances, no rate window counts the request, no breaker spends a trial.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .codecs import get_codec
from .codecs.base import dumps
from .errors import ProxyError
from .flow import Flow
from .resilience import HALF_OPEN, OPEN, cannot_serve, estimate_tokens, request_needs

if TYPE_CHECKING:
    from .context import ProxyContext

PROTOCOLS = ("openai_chat", "openai_responses", "anthropic", "gemini")


def guess_protocol(body: dict[str, Any]) -> str:
    """The wire protocol a request body is written in, from the fields only it has."""
    if "contents" in body:
        return "gemini"
    if "input" in body and "messages" not in body:
        return "openai_responses"
    anthropic_only = ("system", "thinking", "stop_sequences", "anthropic_version", "top_k")
    if any(key in body for key in anthropic_only):
        return "anthropic"
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result", "image") for b in content):
            return "anthropic"
    return "openai_chat"


def explain(ctx: "ProxyContext", body: dict[str, Any], protocol: str | None = None, model: str | None = None) -> dict[str, Any]:
    """The routing of ``body`` (a request in ``protocol``; guessed when None) as it stands now."""
    protocol = protocol or guess_protocol(body)
    codec = get_codec(protocol)
    if model is not None:  # Gemini puts the model in the URL
        body = {**body, "model": model} if protocol != "gemini" else body
    asked, stream = codec.peek(body) if protocol != "gemini" else (model or body.get("model") or "", bool(body.get("stream")))
    flow = Flow(protocol, body, asked, stream, request_decoder=codec.decode_request)
    flow.raw_body = dumps(body)
    report: dict[str, Any] = {"model": asked, "protocol": protocol, "stream": stream}
    router = ctx.router
    try:
        targets = router.preview(asked)
    except ProxyError as error:
        report.update(error=error.message, targets=[], first=None)
        return report
    alias = router.alias_for(asked)
    report["alias"] = alias.name if alias is not None else None
    report["strategy"] = alias.strategy if alias is not None else None
    try:
        needs = request_needs(flow)
    except Exception as error:  # noqa: BLE001 - a request the codec cannot read
        report.update(error=f"the request cannot be read as {protocol}: {error}", targets=[], first=None)
        return report
    report["needs"] = {"tools": needs.tools, "vision": needs.vision, "json_schema": needs.json_schema, "estimated_tokens": needs.tokens}
    now = time.monotonic()
    rows = [_target(ctx, target, needs, flow, now) for target in targets]
    report["targets"] = rows
    report["first"] = next((row["target"] for row in rows if row["eligible"]), None)
    return report


def _target(ctx: "ProxyContext", target: Any, needs: Any, flow: Flow, now: float) -> dict[str, Any]:
    provider = target.provider
    settings = provider.settings
    skipped: list[str] = []
    notes: list[str] = []
    if target.declared is not None:
        why = cannot_serve(target.declared, needs)
        if why is not None:
            skipped.append(f"capability: {why}")
    if provider.healthy is False:
        skipped.append("health: marked unhealthy by its model-list polls")
    breaker = ctx.health.breakers.get(target.label)
    breaker_state = breaker.status(now) if breaker is not None else {"state": "closed", "failures": 0, "retry_in": 0.0}
    if not settings.breaker.enabled:
        breaker_state["state"] = "disabled"
    elif breaker_state["state"] == OPEN:
        skipped.append(f"breaker: open after {breaker_state['last_failure']} failures, retry in {breaker_state['retry_in']:.1f}s")
    elif breaker_state["state"] == HALF_OPEN:
        notes.append("breaker: half-open, the next request is a trial")
    tokens = estimate_tokens(flow)
    windows = [("target", target.window), ("backend", target.backend_window)]
    limits = {}
    for scope, window in windows:
        if window is None:
            continue
        limits[scope] = window.status(now)
        wait = window.wait(now, tokens)
        if wait > 0:
            skipped.append(f"rate limit ({scope}): over {_limits(limits[scope])}, frees up in {wait:.1f}s")
    keys = _keys(provider, target, now, notes, skipped)
    if flow.stream and not target.streams:
        notes.append("asked without streaming (capabilities.streaming: false); the answer is re-streamed")
    return {
        "target": target.label,
        "backend": target.backend,
        "model": target.model,
        "type": settings.type,
        "eligible": not skipped,
        "skipped": skipped,
        "notes": notes,
        "breaker": breaker_state,
        "limits": limits,
        "keys": keys,
        "capabilities": target.declared or {},
        "retries": settings.retry.attempts,
    }


def _limits(status: dict[str, Any]) -> str:
    return ", ".join(f"{name} {numbers['used']}/{numbers['limit']}" for name, numbers in status.items())


def _keys(provider: Any, target: Any, now: float, notes: list[str], skipped: list[str]) -> list[dict[str, Any]]:
    refs = provider.settings.api_keys
    names = getattr(provider, "key_names", ())
    resting = getattr(provider, "key_resting_until", ())
    keys = []
    for i, ref in enumerate(refs):
        if target.key_index is not None and i != target.key_index:
            continue
        rest = max(0.0, resting[i] - now) if i < len(resting) else 0.0
        keys.append({"name": names[i] if i < len(names) else f"#{i}", "set": bool(ref.get()), "resting_for": round(rest, 1), "source": ref.describe()})
    if not refs:
        return keys
    usable = [k for k in keys if k["set"]]
    if not usable:
        skipped.append("keys: none is set (" + ", ".join(k["source"] for k in keys) + ")")
    elif all(k["resting_for"] > 0 for k in usable):
        soonest = min(usable, key=lambda k: k["resting_for"])
        notes.append(f"keys: every key rests after a 429; {soonest['name']} (free in {soonest['resting_for']}s) is used anyway")
    if target.key_index is not None:
        notes.append(f"key pinned: {keys[0]['name'] if keys else '?'}")
    return keys


def render(report: dict[str, Any]) -> str:
    """The report as text, for the terminal."""
    lines = []
    head = f"model {report['model']!r} ({report['protocol']}"
    head += f", alias with strategy {report['strategy']}" if report.get("alias") else ""
    head += ", streamed" if report.get("stream") else ""
    lines.append(head + ")")
    if report.get("error"):
        lines.append(f"  cannot be routed: {report['error']}")
        return "\n".join(lines)
    needs = report["needs"]
    wanted = [name for name in ("tools", "vision", "json_schema") if needs[name]]
    lines.append(f"  needs: {', '.join(wanted) or 'nothing special'}; ~{needs['estimated_tokens']} tokens")
    for i, row in enumerate(report["targets"], 1):
        verdict = "eligible" if row["eligible"] else "skipped "
        breaker = row["breaker"]["state"]
        lines.append(f"  {i}. {row['target']:<40} {verdict}  breaker {breaker}, retries {row['retries']}")
        for why in row["skipped"]:
            lines.append(f"       ✗ {why}")
        for note in row["notes"]:
            lines.append(f"       · {note}")
        for scope, status in row["limits"].items():
            lines.append(f"       · {scope} rate window: {_limits(status)}")
    first = report["first"]
    lines.append(f"  → first try: {first}" if first else "  → no target can take it now: the client would get a 400, 429 or 503 saying why")
    return "\n".join(lines)
