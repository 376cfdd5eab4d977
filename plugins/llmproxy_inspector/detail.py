"""A flow's detail record, built in the history thread from a finished flow (kept whole in
memory for a while, see live.Finished): the wire capture's record (client request, each
upstream attempt, the answer or every stream event with its time — see
llmproxy_wire_capture.record, whose format this reuses), plus a field-by-field diff of what each plugin changed (``flow.changes``), all masked with
the proxy's redactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from llmproxy.codecs import CODECS
from llmproxy.redact import Redactor
from llmproxy_wire_capture.record import Snapshot, build_line, trim

if TYPE_CHECKING:
    from .live import Finished

MAX_CHANGES = 200  # paths listed per plugin; a plugin that rewrote everything is summarised


def build(finished: "Finished") -> dict[str, Any]:
    """The detail record (masked). Costs about as much as the request itself (mostly the
    masking), so it is built in the history thread, and only when someone asks for it or the
    history is kept on disk."""
    flow = finished.flow
    assert flow is not None
    capture = Snapshot.of(flow, finished.include_bodies, flow.context.redactor)
    capture.wall_start = finished.started
    record = orjson.loads(build_line(capture))
    record["plugin_changes"] = _mask(plugin_changes(capture, list(flow.changes or ())), capture.redactor)
    return record


def plugin_changes(capture: Snapshot, changes: list[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per implementation that changed the flow: hook, plugin, and the changed
    paths with their values before and after."""
    out = []
    for hook, plugin, before, after in changes:
        old, new = _state(capture, before), _state(capture, after)
        diff: list[dict[str, Any]] = []
        _diff(old, new, "", diff)
        if not diff:
            continue  # it only read (decoded) the request
        entry: dict[str, Any] = {"hook": hook, "plugin": plugin, "changes": diff[:MAX_CHANGES]}
        if len(diff) > MAX_CHANGES:
            entry["more"] = len(diff) - MAX_CHANGES
        out.append(entry)
    return out


def _state(capture: Snapshot, state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as plain JSON; an undecoded request is decoded from what the client sent,
    which is what it still was."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "request" and value is None:
            out[key] = _client_request(capture, state.get("model"))
        elif isinstance(value, (bytes, bytearray)):
            out[key] = orjson.loads(value)
        else:
            out[key] = value
    return out


def _client_request(capture: Snapshot, model: Any) -> Any:
    codec = CODECS.get(capture.frontend)
    if codec is None or not capture.raw_request:
        return None
    try:
        request = codec.decode_request(capture.raw_request)
    except Exception:
        return None
    if isinstance(model, str) and model:
        request.model = model
    return orjson.loads(orjson.dumps(request, default=repr, option=orjson.OPT_NON_STR_KEYS))


def _diff(a: Any, b: Any, path: str, out: list[dict[str, Any]]) -> None:
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            _diff(a.get(key), b.get(key), f"{path}.{key}" if path else str(key), out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            _diff(a[i] if i < len(a) else None, b[i] if i < len(b) else None, f"{path}[{i}]", out)
        return
    if isinstance(a, str) and isinstance(b, str):
        a, b = trim(a, b)
    out.append({"path": path, "before": a, "after": b})


def _mask(value: Any, redactor: Redactor) -> Any:
    return orjson.loads(redactor.text(orjson.dumps(value).decode()))
