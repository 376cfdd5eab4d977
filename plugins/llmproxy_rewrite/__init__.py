"""rewrite: content rewriting rules for prompts (inbound) and answers (outbound).

A rule replaces text (a literal or a regular expression), or prepends or appends text, in the
system prompt, user messages or assistant messages of the request a backend receives, or in
the answer a client receives — streamed or not. Rules can be limited to some models (globs)
and some front-ends (the client's protocol)::

    plugins:
      rewrite:
        rules:
          - replace: "You are Claude Code, Anthropic's official CLI for Claude."
            with: "You are a careful coding agent."
            roles: [system]
          - append: "\\n\\nAnswer in French."
            roles: [system]
            models: ["qwen*", "openrouter:*"]
          - replace: "(?i)\\\\bchatgpt\\\\b"
            regex: true
            with: "the assistant"
            direction: outbound

What changes where:

- **inbound** (the ``request`` hook): ``system`` is the system prompt and any system or
  developer turn in the conversation; ``user`` and ``assistant`` are those turns' text parts
  (tool calls, tool results, images and thinking are never touched). Prepend and append go
  to the first and last text part of each matching message (``messages: last``: of the
  newest one only); a prepend or append on ``system`` creates a system prompt when there is
  none.
- **outbound** (the ``response`` hook, and a stream processor): the model's answer text.
  A prepend goes before the answer's first text, an append after its last content block
  when that block is text (an answer that ends with a tool call gets no append).

Replacements run first, in the order listed; then prepends and appends, each in the order
listed — so text a rule adds is never rewritten by another rule.

Streams. Text arrives in arbitrary pieces, so a match may be split across events. For a
literal, only the end of a piece that could still begin a match is held back (sent with the
next piece, or when the block ends); a regular expression holds back at most ``max_match``
characters (the longest text one match may span), so a stream is delayed by at most that
much text and never buffered whole. Anchors and look-arounds see the text held, not the
whole answer.

Cost. With no rule for this flow (direction, model, front-end) every hook returns at once:
``stream_start`` returns None (the stream stays on the undecoded fast path) and the request
is not decoded. A request whose literal replacements cannot match (the needle is not in the
raw body) is not decoded either.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from llmproxy import hookimpl
from llmproxy.canonical import EventKind, Message, Request, Response, StreamEvent, TextPart

if TYPE_CHECKING:
    from llmproxy import Flow

NAME = "rewrite"
ROLES = ("system", "user", "assistant")
# Characters every JSON encoder writes verbatim: a needle made only of these appears in the
# raw request body exactly as typed, so its absence there proves the rule cannot match.
_JSON_VERBATIM = re.compile(r"[A-Za-z0-9 _\-.,:;!?()\[\]{}@#$%^*+=|~`']+")


class Rule(BaseModel):
    """One rewriting rule: exactly one of ``replace``, ``prepend`` or ``append``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    replace: Optional[str] = Field(
        None, description="Text to find (a regular expression when `regex` is true); every occurrence becomes `with`."
    )
    with_: str = Field(
        "", alias="with", description="What `replace` becomes. With `regex`, `\\1` and `\\g<name>` insert groups."
    )
    regex: bool = Field(False, description="Treat `replace` as a Python regular expression.")
    ignore_case: bool = Field(False, description="Match `replace` regardless of letter case.")
    prepend: Optional[str] = Field(
        None, description="Text added at the start: of each message the rule applies to (inbound), of the answer (outbound)."
    )
    append: Optional[str] = Field(
        None, description="Text added at the end: of each message the rule applies to (inbound), of the answer when it ends with text (outbound)."
    )
    roles: list[Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: list(ROLES),
        description="Whose text the rule edits (inbound). Outbound text is always the assistant's. "
        "A prepend or append applied inbound must name its roles.",
    )
    direction: Literal["inbound", "outbound", "both"] = Field(
        "inbound", description="inbound: the request the backend receives; outbound: the answer the client receives; both."
    )
    messages: Literal["all", "last"] = Field(
        "all", description="Inbound user and assistant text: every matching message, or only the newest one."
    )
    models: list[str] = Field(
        default_factory=list, description="Globs over the requested model name (`flow.model` when the rule runs), e.g. `gpt-4*`, `openrouter:*`; empty: every model."
    )
    frontends: list[Literal["openai_chat", "openai_responses", "anthropic", "gemini"]] = Field(
        default_factory=list, description="Client protocols the rule applies to; empty: every one."
    )
    max_match: int = Field(
        64, ge=1, le=100_000, description="Regex rules in streams: the longest text one match may span, in characters (held back per text block)."
    )

    _pattern: Optional[re.Pattern[str]] = PrivateAttr(None)
    _needle: Optional[bytes] = PrivateAttr(None)  # for the raw-body check; None: cannot tell

    @model_validator(mode="after")
    def _check(self) -> "Rule":
        ops = [name for name in ("replace", "prepend", "append") if getattr(self, name) is not None]
        if len(ops) != 1:
            raise ValueError(f"a rule needs exactly one of replace, prepend or append (got {', '.join(ops) or 'none'})")
        if not self.roles:
            raise ValueError("roles must name at least one of system, user, assistant")
        if self.direction != "inbound" and "assistant" not in self.roles:
            raise ValueError("an outbound rule edits the model's answer, which is assistant text: add assistant to roles")
        if self.replace is not None:
            if not self.replace:
                raise ValueError("replace must not be empty")
            flags = re.IGNORECASE if self.ignore_case else 0
            if self.regex:
                try:
                    self._pattern = re.compile(self.replace, flags)
                    self._pattern.sub(self.with_, "")  # checks group references in `with`
                except re.error as error:
                    raise ValueError(f"replace is not a valid regular expression, or `with` refers to a missing group: {error}") from None
                if self._pattern.fullmatch(""):
                    raise ValueError("replace matches empty text; use prepend or append to add text")
            else:
                if self.ignore_case:
                    self._pattern = re.compile(re.escape(self.replace), flags)
                if _JSON_VERBATIM.fullmatch(self.replace):
                    self._needle = (self.replace.lower() if self.ignore_case else self.replace).encode()
        elif self.direction != "outbound" and "roles" not in self.model_fields_set:
            raise ValueError("say which text this adds to: roles: [system] (the system prompt), [user] or [assistant]")
        return self

    @property
    def kind(self) -> str:
        return "replace" if self.replace is not None else "prepend" if self.prepend is not None else "append"

    def applies(self, model: str, frontend: str) -> bool:
        if self.models and not any(fnmatch.fnmatchcase(model, glob) for glob in self.models):
            return False
        if self.frontends:
            if frontend == "gemini_array":
                frontend = "gemini"
            return frontend in self.frontends
        return True

    def sub(self, text: str) -> tuple[str, int]:
        """``text`` with every match replaced, and how many there were."""
        if self._pattern is not None:
            if self.regex:
                return self._pattern.subn(self.with_, text)
            replacement = self.with_
            return self._pattern.subn(lambda _: replacement, text)
        count = text.count(self.replace)  # type: ignore[arg-type]
        return (text.replace(self.replace, self.with_), count) if count else (text, 0)  # type: ignore[arg-type]

    def stream_stage(self) -> "_LiteralStage | _RegexStage":
        if self.regex:
            return _RegexStage(self._pattern, self.with_, self.max_match)  # type: ignore[arg-type]
        return _LiteralStage(self.replace, self.with_, self.ignore_case)  # type: ignore[arg-type]


class RewriteSettings(BaseModel):
    """``plugins.rewrite``: no rules, no rewriting."""

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, description="Rewriting rules, applied in order (see docs/plugins/rewrite.md).")

    _inbound: list[Rule] = PrivateAttr(default_factory=list)
    _outbound: list[Rule] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _split(self) -> "RewriteSettings":
        self._inbound = [r for r in self.rules if r.direction in ("inbound", "both")]
        self._outbound = [r for r in self.rules if r.direction in ("outbound", "both")]
        return self

    # `rules` is checked first: a plain field reads faster than pydantic's private attributes,
    # and with no rules every hook must cost next to nothing.
    def inbound(self, flow: "Flow") -> list[Rule]:
        if not self.rules:
            return []
        return [r for r in self._inbound if r.applies(flow.model, flow.frontend)]

    def outbound(self, flow: "Flow") -> list[Rule]:
        if not self.rules:
            return []
        return [r for r in self._outbound if r.applies(flow.model, flow.frontend)]


_DEFAULT = RewriteSettings()


def _settings(flow: "Flow") -> RewriteSettings:
    context = flow.context
    settings = context.settings(NAME) if context is not None else None
    return settings if settings is not None else _DEFAULT


# -- hooks -------------------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return RewriteSettings


@hookimpl
def configure(settings: Optional[RewriteSettings]) -> dict[str, str]:
    s = settings or _DEFAULT
    outbound = "always" if s._outbound else "never"
    return {"request": "always" if s._inbound else "never", "response": outbound, "stream_start": outbound}


@hookimpl
def request(flow: "Flow") -> None:
    rules = _settings(flow).inbound(flow)
    if not rules:
        return
    if not flow.request_decoded and flow.raw_body and not _may_match(rules, flow.raw_body):
        return  # every rule is a literal replacement whose text is not in the request
    changes = rewrite_request(flow.request, rules)
    if changes:
        flow.note(NAME, "rewrote the request", changes=changes)


@hookimpl
def response(flow: "Flow") -> None:
    rules = _settings(flow).outbound(flow)
    if not rules or flow.response is None:
        return
    changes = rewrite_response(flow.response, rules)
    if changes:
        flow.note(NAME, "rewrote the answer", changes=changes)


@hookimpl
def stream_start(flow: "Flow") -> Optional["StreamRewriter"]:
    rules = _settings(flow).outbound(flow)
    if not rules:
        return None  # this stream stays on the fast path
    return StreamRewriter(rules, flow)


# -- inbound -----------------------------------------------------------------------------------


def _may_match(rules: list[Rule], raw: bytes) -> bool:
    lowered: bytes | None = None
    for rule in rules:
        needle = rule._needle
        if rule.replace is None or needle is None:
            return True
        if rule.ignore_case:
            if lowered is None:
                lowered = raw.lower()
            if needle in lowered:
                return True
        elif needle in raw:
            return True
    return False


def rewrite_request(request: Request, rules: list[Rule]) -> int:
    """Apply inbound ``rules`` to ``request`` in place; return how many edits were made."""
    by_role: dict[str, list[Message]] = {"system": [], "user": [], "assistant": []}
    for message in request.messages:
        role = "system" if message.role in ("system", "developer") else message.role
        if role in by_role and any(isinstance(p, TextPart) for p in message.parts):
            by_role[role].append(message)

    def messages_for(rule: Rule, role: str) -> list[Message]:
        found = by_role[role]
        return found[-1:] if rule.messages == "last" and role != "system" else found

    changes = 0
    for rule in rules:
        if rule.replace is None:
            continue
        for role in rule.roles:
            parts = list(request.system) if role == "system" else []
            for message in messages_for(rule, role):
                parts.extend(p for p in message.parts if isinstance(p, TextPart))
            for part in parts:
                part.text, count = rule.sub(part.text)
                changes += count

    for role in ROLES:
        adders = [r for r in rules if r.replace is None and role in r.roles]
        if not adders:
            continue
        if role == "system":
            # the system prompt, created when there is none
            if not request.system:
                request.system.append(TextPart(""))
            edits: list[tuple[list[TextPart], list[Rule]]] = [([request.system[0], request.system[-1]], adders)]
        else:
            chosen: dict[int, tuple[Message, list[Rule]]] = {}
            for rule in adders:
                for message in messages_for(rule, role):
                    chosen.setdefault(id(message), (message, []))[1].append(rule)
            edits = []
            for message, message_rules in chosen.values():
                texts = [p for p in message.parts if isinstance(p, TextPart)]
                edits.append(([texts[0], texts[-1]], message_rules))
        for (first, last), applied in edits:
            before = "".join(r.prepend for r in applied if r.prepend is not None)
            after = "".join(r.append for r in applied if r.append is not None)
            if before:
                first.text = before + first.text
                changes += 1
            if after:
                last.text += after
                changes += 1
    return changes


# -- outbound ----------------------------------------------------------------------------------


def rewrite_response(response: Response, rules: list[Rule]) -> int:
    """Apply outbound ``rules`` to a complete answer in place; return how many edits."""
    changes = 0
    texts = [p for p in response.parts if isinstance(p, TextPart)]
    for rule in rules:
        if rule.replace is not None:
            for part in texts:
                part.text, count = rule.sub(part.text)
                changes += count
    before = "".join(r.prepend for r in rules if r.prepend is not None)
    after = "".join(r.append for r in rules if r.append is not None)
    if before and texts:
        texts[0].text = before + texts[0].text
        changes += 1
    if after and response.parts and isinstance(response.parts[-1], TextPart):
        response.parts[-1].text += after
        changes += 1
    return changes


class _LiteralStage:
    """Replaces a literal in a piece-wise text, holding back only a possible start of it."""

    __slots__ = ("needle", "folded", "replacement", "pattern", "held", "count")

    def __init__(self, needle: str, replacement: str, ignore_case: bool) -> None:
        self.needle = needle
        self.folded = needle.lower() if ignore_case else None
        self.pattern = re.compile(re.escape(needle), re.IGNORECASE) if ignore_case else None
        self.replacement = replacement
        self.held = ""
        self.count = 0

    def feed(self, text: str) -> str:
        if self.held:
            text = self.held + text
        pieces: list[str] = []
        start = 0
        if self.pattern is None:
            needle = self.needle
            while (found := text.find(needle, start)) >= 0:
                pieces.append(text[start:found])
                pieces.append(self.replacement)
                start = found + len(needle)
        else:
            for match in self.pattern.finditer(text):
                pieces.append(text[start : match.start()])
                pieces.append(self.replacement)
                start = match.end()
        if pieces:
            self.count += len(pieces) // 2
        # Only the text after the last match can begin a match that continues later.
        keep = _partial_suffix(text, start, self.needle, self.folded)
        end = len(text) - keep
        self.held = text[end:]
        if not pieces:
            return text[:end] if keep else text
        pieces.append(text[start:end])
        return "".join(pieces)

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _partial_suffix(text: str, start: int, needle: str, folded: str | None) -> int:
    """Length of the longest end of ``text[start:]`` that is a proper start of ``needle``
    (of ``folded``, the lower-cased needle, ignoring case)."""
    limit = min(len(text) - start, len(needle) - 1)
    if limit <= 0:
        return 0
    tail = text[-limit:]
    if folded is not None:
        lowered = tail.lower()
        if len(lowered) != len(tail):  # a character whose lower case is longer: compare one by one
            return next((size for size in range(limit, 0, -1) if folded.startswith(text[-size:].lower())), 0)
        tail, needle = lowered, folded
    # Candidates begin where the needle's first character occurs; the leftmost is the longest.
    first = needle[0]
    at = tail.find(first)
    while at >= 0:
        if needle.startswith(tail[at:]):
            return limit - at
        at = tail.find(first, at + 1)
    return 0


class _RegexStage:
    """Replaces a regular expression in a piece-wise text, holding at most ``hold`` characters.

    A match starting more than ``hold`` characters before the end of what has arrived is
    complete (no match is longer than ``hold``), so it is replaced and sent; the rest waits.
    """

    __slots__ = ("pattern", "replacement", "hold", "held", "count")

    def __init__(self, pattern: re.Pattern[str], replacement: str, hold: int) -> None:
        self.pattern = pattern
        self.replacement = replacement
        self.hold = hold
        self.held = ""
        self.count = 0

    def feed(self, text: str) -> str:
        if self.held:
            text = self.held + text
        boundary = len(text) - self.hold
        if boundary <= 0:
            self.held = text
            return ""
        out: list[str] = []
        pos = 0
        for match in self.pattern.finditer(text):
            if match.start() >= boundary:
                break
            out.append(text[pos : match.start()])
            out.append(match.expand(self.replacement))
            pos = match.end()
            self.count += 1
        cut = max(pos, boundary)
        out.append(text[pos:cut])
        self.held = text[cut:]
        return "".join(out)

    def flush(self) -> str:
        text, self.held = self.held, ""
        if not text:
            return ""
        text, count = self.pattern.subn(self.replacement, text)
        self.count += count
        return text


class StreamRewriter:
    """Stream processor applying outbound rules to one streamed answer.

    Per text block, each replacement rule is a stage that may hold a little text back; held
    text goes out before the block's stop, before another block's first event, or at the end.
    With an append rule the stop of a text block is held until it is clear whether the
    answer ends there (then the appended text goes in before it).
    """

    __slots__ = ("rules", "flow", "prefix", "suffix", "stages", "last_index", "last_is_text", "pending_stop", "prefixed", "appended", "replaced")

    def __init__(self, rules: list[Rule], flow: "Flow") -> None:
        self.rules = [r for r in rules if r.replace is not None]
        self.flow = flow
        self.prefix = "".join(r.prepend for r in rules if r.prepend is not None)
        self.suffix = "".join(r.append for r in rules if r.append is not None)
        self.stages: dict[int, list[Any]] = {}
        self.last_index = -1
        self.last_is_text = False
        self.pending_stop: StreamEvent | None = None
        self.prefixed = False
        self.appended = False
        self.replaced = 0

    def __call__(self, event: Optional[StreamEvent]) -> StreamEvent | list[StreamEvent] | None:
        if event is None:
            return self._finish()
        kind = event.kind
        if kind == EventKind.TEXT:
            index = event.index
            before = self._release(index) if (self.pending_stop is not None or len(self.stages) > 1 or (self.stages and index not in self.stages)) else None
            self.last_index = index
            self.last_is_text = True
            if not event.text:
                return before + [event] if before else event
            text = event.text
            if self.rules:
                stages = self.stages.get(index)
                if stages is None:
                    stages = self.stages[index] = [rule.stream_stage() for rule in self.rules]
                for stage in stages:
                    text = stage.feed(text)
            if not self.prefixed and self.prefix:
                self.prefixed = True
                text = self.prefix + text
            if not text:
                return before or None
            event.text = text
            return before + [event] if before else event
        if kind == EventKind.BLOCK_STOP:
            index = event.index
            out = self._release(index) if self.pending_stop is not None else []
            rest = self._drain(index)
            if rest:
                out.append(StreamEvent(EventKind.TEXT, index=index, text=rest))
            if self.suffix and self.last_is_text and index == self.last_index:
                self.pending_stop = event  # the answer may end with this block
            else:
                out.append(event)
            return out
        if kind in (EventKind.THINKING, EventKind.TOOL_CALL_START, EventKind.TOOL_CALL_DELTA):
            self.last_index = event.index
            self.last_is_text = False
            if self.pending_stop is not None or self.stages:
                return self._release(event.index) + [event]
        return event

    def _drain(self, index: int) -> str:
        stages = self.stages.pop(index, None)
        if not stages:
            return ""
        text = ""
        for stage in stages:
            text = (stage.feed(text) if text else "") + stage.flush()
            self.replaced += stage.count
        return text

    def _release(self, index: int) -> list[StreamEvent]:
        """Everything held for blocks other than ``index``, and a held block stop."""
        out: list[StreamEvent] = []
        for other in [i for i in self.stages if i != index]:
            rest = self._drain(other)
            if rest:
                out.append(StreamEvent(EventKind.TEXT, index=other, text=rest))
        if self.pending_stop is not None:
            out.append(self.pending_stop)
            self.pending_stop = None
        return out

    def _finish(self) -> list[StreamEvent] | None:
        out: list[StreamEvent] = []
        suffix = self.suffix if self.last_is_text else ""
        for index in sorted(self.stages):
            rest = self._drain(index)
            if index == self.last_index and suffix:
                rest += suffix
                suffix = ""
                self.appended = True
            if rest:
                out.append(StreamEvent(EventKind.TEXT, index=index, text=rest))
        if suffix:
            out.append(StreamEvent(EventKind.TEXT, index=self.last_index, text=suffix))
            self.appended = True
        if self.pending_stop is not None:
            out.append(self.pending_stop)
            self.pending_stop = None
        if self.replaced or self.prefixed or self.appended:
            self.flow.note(NAME, "rewrote the streamed answer", replacements=self.replaced, prepended=self.prefixed, appended=self.appended)
        return out or None
