"""JSON repair: an answer to a JSON-mode or JSON-schema request reaches the client as valid
JSON, checked against the schema.

Models asked for JSON (OpenAI ``response_format``, Responses ``text.format``, Anthropic
``output_config.format``, Gemini ``responseMimeType: application/json``) still wrap it in
a Markdown fence, put prose around it, leave a trailing comma or stop before the last
brace. This plugin takes the answer's text, and when it is not valid JSON repairs it with
`json-repair <https://pypi.org/project/json-repair/>`_ (fences and prose dropped, quotes,
commas and brackets fixed), then validates the value against the request's JSON schema with
``jsonschema`` (a JSON-mode request without a schema needs an object or an array). A text
that is valid already goes out unchanged, byte for byte.

When the text cannot be made valid, ``on_invalid`` decides: ``pass`` (default) sends it as
the model wrote it and notes the flow (``flow.trace``), ``error`` answers with a 502 error
naming the problem (an error event in a stream).

Streams. JSON cannot be judged before it is complete, so in a JSON-mode stream the text is
held and sent as one piece, repaired, just before the stream ends (or when the model moves
on to a tool call): the client sees the stream begin at once, but the JSON arrives at the
end. That is the trade-off for never showing a client broken JSON; clients that parse JSON
answers wait for the end anyway. Streams of requests that do not ask for JSON get no
processor and cost nothing; whether a request asks for JSON is read from the wire body
without decoding it.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from llmproxy import Flow, ProxyError, hookimpl
from llmproxy.canonical import EventKind, StreamEvent, TextPart

__all__ = ["JsonRepairSettings", "JsonHold", "Outcome", "repair", "wants_json"]

NAME = "json_repair"
log = logging.getLogger("llmproxy.json_repair")


class JsonRepairSettings(BaseModel):
    """``plugins.json_repair``."""

    model_config = ConfigDict(extra="forbid")

    on_invalid: Literal["pass", "error"] = Field(
        "pass",
        description="When the answer cannot be repaired into JSON that fits the schema: pass sends it as the model "
        "wrote it (and notes the flow), error answers with a 502 error instead.",
    )
    validate_schema: bool = Field(True, description="Validate the repaired value against the request's JSON schema, when it has one.")


class Outcome:
    """What :func:`repair` made of a text: ``text`` to send, ``changed``, and ``problem``
    (None when the text is valid JSON that fits)."""

    __slots__ = ("text", "changed", "problem")

    def __init__(self, text: str, changed: bool = False, problem: str | None = None) -> None:
        self.text = text
        self.changed = changed
        self.problem = problem


def repair(text: str, response_format: dict[str, Any] | None, validate: bool = True) -> Outcome:
    """Make ``text`` valid JSON for ``response_format`` (canonical: json_object or
    json_schema with ``schema``). Valid text is returned unchanged."""
    parsed = True
    try:
        value = json.loads(text)
    except ValueError:
        parsed = False
        value = _repaired(text)
        if value is _NOTHING:
            return Outcome(text, problem="the answer is not JSON")
    schema = (response_format or {}).get("schema") if (response_format or {}).get("type") == "json_schema" else None
    if schema:
        problem = _schema_problem(value, schema) if validate else None
    else:
        problem = None if isinstance(value, (dict, list)) else "the answer is not a JSON object"
    if problem is not None:
        return Outcome(text, problem=problem)
    if parsed:
        return Outcome(text)
    return Outcome(json.dumps(value, ensure_ascii=False), changed=True)


_NOTHING = object()


def _repaired(text: str) -> Any:
    try:
        from json_repair import repair_json

        value = repair_json(text, return_objects=True)
    except Exception:  # json-repair gives up on some inputs by raising; that is "not JSON"
        return _NOTHING
    if value == "" and text.strip() not in ('""', "''"):
        return _NOTHING  # json-repair's way of saying it found nothing
    return value


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None  # a schema the validator cannot use: judge JSON-ness only
    return cls(schema)


def _schema_problem(value: Any, schema: dict[str, Any]) -> str | None:
    validator = _validator(json.dumps(schema, sort_keys=True))
    if validator is None:
        return None
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"the answer does not match the schema at {where}: {error.message}"


def wants_json(raw: dict[str, Any]) -> bool:
    """Does this wire body ask for JSON output? Read without decoding the request (the
    canonical ``flow.request.response_format`` is what counts once the answer is there)."""
    fmt = raw.get("response_format")  # OpenAI Chat
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return True
    text = raw.get("text")  # OpenAI Responses
    if isinstance(text, dict) and isinstance(text.get("format"), dict) and text["format"].get("type") in ("json_object", "json_schema"):
        return True
    output = raw.get("output_config")  # Anthropic
    if isinstance(output, dict) and isinstance(output.get("format"), dict) and output["format"].get("type") == "json_schema":
        return True
    config = raw.get("generationConfig") or raw.get("generation_config")  # Gemini
    if isinstance(config, dict):
        mime = config.get("responseMimeType") or config.get("response_mime_type")
        return mime == "application/json"
    return False


def _settings(flow: Flow) -> JsonRepairSettings:
    settings = flow.context.settings(NAME) if flow.context is not None else None
    return settings if isinstance(settings, JsonRepairSettings) else _DEFAULTS


_DEFAULTS = JsonRepairSettings()


def _failed(flow: Flow, outcome: Outcome, settings: JsonRepairSettings) -> ProxyError | None:
    flow.note(NAME, "invalid", problem=outcome.problem)
    if settings.on_invalid == "error":
        return ProxyError(502, f"the model's answer is not valid JSON for this request: {outcome.problem}", code="invalid_json")
    return None


# -- hooks -----------------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return JsonRepairSettings


@hookimpl
def response(flow: Flow) -> None:
    if not wants_json(flow.raw_request):
        return
    answer = flow.response
    if answer is None:
        return
    texts = [p for p in answer.parts if isinstance(p, TextPart)]
    text = "".join(p.text for p in texts)
    if not text.strip():
        return  # a tool call instead of an answer, or nothing: nothing to repair
    settings = _settings(flow)
    outcome = repair(text, flow.request.response_format, settings.validate_schema)
    if outcome.problem is not None:
        error = _failed(flow, outcome, settings)
        if error is not None:
            raise error
        return
    if outcome.changed:
        flow.note(NAME, "repaired", before=text[:200])
        texts[0].text = outcome.text
        answer.parts = [p for p in answer.parts if not isinstance(p, TextPart) or p is texts[0]]


@hookimpl
def stream_start(flow: Flow) -> Optional["JsonHold"]:
    if not wants_json(flow.raw_request):
        return None
    return JsonHold(flow, _settings(flow))


class JsonHold:
    """Stream processor: holds the answer's text and sends it repaired in one piece."""

    __slots__ = ("flow", "settings", "parts", "index", "blocks")

    def __init__(self, flow: Flow, settings: JsonRepairSettings) -> None:
        self.flow = flow
        self.settings = settings
        self.parts: list[str] = []
        self.index: int | None = None
        self.blocks: set[int] = set()  # indices of text blocks held

    def __call__(self, event: Optional[StreamEvent]) -> StreamEvent | list[StreamEvent] | None:
        if event is None:
            return self.release()
        kind = event.kind
        if kind == EventKind.TEXT and event.extra is None:
            if self.index is None:
                self.index = event.index
            self.blocks.add(event.index)
            self.parts.append(event.text)
            return None
        if kind == EventKind.BLOCK_STOP and event.index in self.blocks:
            return None  # sent with the text
        if kind == EventKind.TOOL_CALL_START and self.parts:
            return [*self.release(), event]  # the text is over: keep it before the call
        return event

    def release(self) -> list[StreamEvent]:
        if self.index is None:
            return []
        text = "".join(self.parts)
        index = self.index
        self.parts, self.index = [], None
        self.blocks = set()
        out = text
        if text.strip():
            outcome = repair(text, self.flow.request.response_format, self.settings.validate_schema)
            if outcome.problem is not None:
                error = _failed(self.flow, outcome, self.settings)
                if error is not None:
                    return [StreamEvent(EventKind.ERROR, error=error)]
            elif outcome.changed:
                self.flow.note(NAME, "repaired", before=text[:200])
                out = outcome.text
        # Every held block's text went into the first one; only that one was ever begun.
        return [StreamEvent(EventKind.TEXT, index=index, text=out), StreamEvent(EventKind.BLOCK_STOP, index=index)]
