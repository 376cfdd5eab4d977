"""Finding tool calls that a model wrote as text, in a whole answer or a stream of pieces.

The forms recognised (each only when it names a tool the request offered):

- a fenced JSON block: ````` ```json {"name": "Bash", "arguments": {"command": "ls"}} ``` `````
  (also ``tool_call``/``tool_code`` fences, and a list of such objects);
- tags: ``<tool_call>{…}</tool_call>`` (Hermes, Qwen), ``<function_call>``, ``<tool_use>``,
  and Qwen3-Coder's XML ``<function=NAME><parameter=KEY>VALUE</parameter></function>``;
- a prefix: ``TOOL CALL: name {…}`` (also ``TOOL_CALL:``, ``Tool call:``, ``name({…})``)
  and Mistral's ``[TOOL_CALLS][{…}]``;
- a bare JSON object that is the whole answer: ``{"tool": "Bash", "args": {…}}``.

Object shapes: a name under ``name``, ``tool``, ``tool_name``, ``function`` (a string, or
an object holding ``name`` and ``arguments``), ``function_name``, ``recipient_name`` or
``action``; arguments under ``arguments``, ``parameters``, ``args``, ``input``, ``params``,
``action_input`` or ``tool_input`` (an object, or a JSON string) — or, when none of those is
there, the object's other keys; ``{"tool_calls": [...]}`` holds several.

:class:`Scanner` is incremental: fed text piece by piece, it returns at once the text that
cannot be (the start of) a call and holds only what still could be — from a marker such as
`````` ``` `````` or ``<tool_call>`` (or a trailing part of one, like ``<tool_``) until the
form is complete, or shown not to be a call (another fence language, a first key that no
call has, a name no tool has). Held text is bounded by ``max_held``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

NAME_KEYS = ("name", "tool", "tool_name", "function", "function_name", "recipient_name", "action")
ARG_KEYS = ("arguments", "parameters", "args", "input", "params", "action_input", "tool_input", "arguments_json")
_SHAPE_KEYS = frozenset((*NAME_KEYS, *ARG_KEYS, "tool_calls", "type", "id", "call_id"))
_IGNORED_KEYS = frozenset(("type", "id", "call_id"))
CALL_FENCES = frozenset(("", "json", "jsonc", "json5", "tool_call", "tool_code", "tool", "tool_use", "function_call", "tool_calls"))
TAGS = ("tool_call", "function_call", "tool_use")

_MARKER = re.compile(r"```|<(?:tool_call|function_call|tool_use)\b|<function=|\[TOOL_CALLS\]|(?:TOOL|Tool)[ _](?:CALL|[Cc]all)\s*:")
_MARKER_WORDS = ("```", "<tool_call>", "<function_call>", "<tool_use>", "<function=", "[TOOL_CALLS]", "TOOL CALL:", "TOOL_CALL:",
                 "Tool call:", "Tool Call:", "Tool_call:")
_PREFIXES = frozenset(word[:k] for word in _MARKER_WORDS for k in range(1, len(word)))
_PREFIX_LEN = max(len(p) for p in _PREFIXES)
_PREFIX_ENDS = frozenset(p[-1] for p in _PREFIXES)
_MARKER_STARTS = frozenset(word[0] for word in _MARKER_WORDS)
_PREFIX_CALL = re.compile(r"(?:TOOL|Tool)[ _](?:CALL|[Cc]all)\s*:[ \t]*")
_TOOL_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_FIRST_KEY = re.compile(r'\{\s*"((?:[^"\\]|\\.){0,80})"\s*:')
_FIRST_NAME = re.compile(r'\s*"((?:[^"\\]|\\.){0,200})"')
_JSON_TOKENS = re.compile(r'["{}\[\]]')
_STRING_END = re.compile(r'["\\]')
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)\s*>(.*?)(?:</function>|\Z)", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\s]+)\s*>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|\Z)", re.S)

INCOMPLETE, CALL, NOT = 0, 1, 2


@dataclass(slots=True)
class TextCall:
    """A call found in text: the tool's name as offered, its arguments (a dict, or the
    string values of an XML call), and the text it was written as."""

    name: str
    arguments: Any
    written: str
    explicit: bool = True
    """False when the object had no arguments key and its other keys were taken as the
    arguments: such a "call" counts only if the arguments fit the tool's schema."""


Piece = "str | TextCall"
Resolver = Callable[[str], "str | None"]


# -- reading a complete candidate -------------------------------------------------------------------


def loads_lenient(text: str) -> Any:
    """JSON, repaired when broken; None when there is nothing JSON-like in it."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        from json_repair import repair_json

        value = repair_json(text, return_objects=True)
    except Exception:
        return None
    return value if isinstance(value, (dict, list)) else None


def calls_in(value: Any, resolve: Resolver, written: str) -> list[TextCall]:
    """The calls a JSON value describes (all of them, or none)."""
    if isinstance(value, list):
        calls = []
        for item in value:
            found = calls_in(item, resolve, written)
            if len(found) != 1:
                return []
            calls += found
        return calls
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("tool_calls"), list):
        return calls_in(value["tool_calls"], resolve, written)
    function = value.get("function")
    if isinstance(function, dict):
        value = {**function, **{k: v for k, v in value.items() if k != "function"}}
    name = next((value[k] for k in NAME_KEYS if isinstance(value.get(k), str)), None)
    if name is None:
        return []
    tool = resolve(name)
    if tool is None:
        return []
    key = next((k for k in ARG_KEYS if k in value), None)
    if key is not None:
        arguments = value[key]
        if isinstance(arguments, str):
            arguments = loads_lenient(arguments) if arguments.strip() else {}
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return []
    else:
        name_key = next(k for k in NAME_KEYS if value.get(k) == name)
        arguments = {k: v for k, v in value.items() if k != name_key and k not in _IGNORED_KEYS}
        return [TextCall(tool, arguments, written, explicit=False)]
    return [TextCall(tool, arguments, written)]


def xml_calls(text: str, resolve: Resolver, written: str) -> list[TextCall]:
    """Qwen3-Coder's ``<function=NAME><parameter=KEY>VALUE</parameter></function>``."""
    calls = []
    for match in _XML_FUNCTION.finditer(text):
        tool = resolve(match.group(1))
        if tool is None:
            return []
        arguments = {m.group(1): m.group(2) for m in _XML_PARAMETER.finditer(match.group(2))}
        calls.append(TextCall(tool, _XmlArguments(arguments), written))
    return calls


class _XmlArguments(dict):  # type: ignore[type-arg]
    """Arguments whose values are all strings as written; typed by the tool's schema later."""


def is_xml_arguments(value: Any) -> bool:
    return isinstance(value, _XmlArguments)


def body_calls(body: str, resolve: Resolver, written: str) -> list[TextCall]:
    stripped = body.strip()
    if stripped.startswith("<function="):
        return xml_calls(stripped, resolve, written)
    value = loads_lenient(stripped)
    return calls_in(value, resolve, written) if value is not None else []


def json_end(text: str, start: int, state: list[int] | None = None) -> int | None:
    """Index just past the JSON object or array opening at ``start``, or None while it is
    still open. ``state`` ([position, depth, in_string]) lets a caller resume a scan."""
    if state is None or not state:
        position, depth, in_string = start, 0, 0
    else:
        position, depth, in_string = state
    n = len(text)
    while position < n:
        if in_string:
            match = _STRING_END.search(text, position)
            if match is None:
                position = n
                break
            position = match.end()
            if match.group() == "\\":
                if position >= n:
                    position -= 1  # the escaped character has not arrived yet
                    break
                position += 1
                continue
            in_string = 0
            continue
        match = _JSON_TOKENS.search(text, position)
        if match is None:
            position = n
            break
        position = match.end()
        token = match.group()
        if token == '"':
            in_string = 1
        elif token in "{[":
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                if state is not None:
                    state[:] = []
                return position
    if state is not None:
        state[:] = [position, depth, in_string]
    return None


def _skip_space(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    return i


def _key_rules_out(text: str, i: int, resolve: Resolver) -> bool:
    """The object opening at ``i`` cannot be a call: its first key is one no call object has,
    or it begins with a name (``{"name": "my-package", …``) that no offered tool has."""
    match = _FIRST_KEY.match(text, i)
    if match is None:
        return False
    if match.group(1) not in _SHAPE_KEYS:
        return True
    if match.group(1) in NAME_KEYS:
        named = _FIRST_NAME.match(text, match.end())
        if named is not None:
            try:
                name = json.loads(f'"{named.group(1)}"')
            except ValueError:
                return False
            return resolve(name) is None
    return False


# -- the scanner ---------------------------------------------------------------------------------------


class Scanner:
    """Finds calls in one text block fed piece by piece (see the module docstring)."""

    __slots__ = ("resolve", "max_held", "buffer", "message_start", "in_fence", "json_state", "checked")

    def __init__(self, resolve: Resolver, max_held: int = 20000, message_start: bool = True) -> None:
        self.resolve = resolve
        self.max_held = max_held
        self.buffer = ""
        self.message_start = message_start  # only blank text so far: a bare JSON call may begin
        self.in_fence = False  # inside a fence that is not a call: pass text on until it closes
        self.json_state: list[int] = []  # resumable scan of the held candidate's JSON
        self.checked = 0  # how far the held candidate's closer has been searched for

    @property
    def holding(self) -> bool:
        return bool(self.buffer)

    def feed(self, text: str) -> list[Any]:
        if not self.buffer and not self.in_fence and not self.message_start:
            # The common case, kept cheap: no marker and no marker's beginning at the end.
            if _MARKER.search(text) is None and _partial_marker(text, 0) == 0:
                return [text] if text else []
        self.buffer += text
        return self._scan(False)

    def finish(self) -> list[Any]:
        """The block ended: what is held is judged as it is, then released."""
        if not self.buffer:
            return []
        return self._scan(True)

    def _scan(self, final: bool) -> list[Any]:
        out: list[Any] = []
        buffer = self.buffer
        n = len(buffer)
        i = 0
        while i < n:
            if self.in_fence:
                close = buffer.find("```", i)
                if close < 0:
                    keep = 0 if final else len(buffer) - len(buffer.rstrip("`"))
                    self._text(out, buffer[i : n - keep])
                    i = n - keep
                    break
                self._text(out, buffer[i : close + 3])
                self.in_fence = False
                i = close + 3
                continue
            position, kind = self._candidate(buffer, i)
            if position < 0:
                keep = 0 if final else _partial_marker(buffer, i)
                self._text(out, buffer[i : n - keep])
                i = n - keep
                break
            if position > i:
                self._text(out, buffer[i:position])
            resume = position == 0
            status, end, calls = self._parse(kind, buffer, position, final, resume)
            if status == INCOMPLETE:
                if n - position > self.max_held:
                    self.in_fence = kind == "fence"
                    self._text(out, buffer[position:])
                    i = n
                    break
                i = position
                break
            self.json_state = []
            self.checked = 0
            if status == CALL:
                out.extend(calls)
                self.message_start = False
            else:
                self._text(out, buffer[position:end])
            i = end
        self.buffer = buffer[i:]
        if i != 0:
            self.json_state = [s - i for s in self.json_state[:1]] + self.json_state[1:] if self.json_state else []
            self.checked = max(0, self.checked - i)
        return out

    def _text(self, out: list[Any], text: str) -> None:
        if not text:
            return
        if self.message_start and text.strip():
            self.message_start = False
        if out and isinstance(out[-1], str):
            out[-1] += text
        else:
            out.append(text)

    def _candidate(self, buffer: str, i: int) -> tuple[int, str]:
        match = _MARKER.search(buffer, i)
        position = match.start() if match else -1
        if self.message_start:
            j = _skip_space(buffer, i)
            if j < len(buffer) and buffer[j] == "{" and (position < 0 or j < position):
                return j, "bare"
        if match is None:
            return -1, ""
        token = match.group()
        if token == "```":
            return position, "fence"
        if token.startswith("<function="):
            return position, "xml"
        if token.startswith("<"):
            return position, "tag"
        if token.startswith("["):
            return position, "mistral"
        return position, "prefix"

    def _parse(self, kind: str, buffer: str, start: int, final: bool, resume: bool) -> tuple[int, int, list[TextCall]]:
        if kind == "fence":
            return self._fence(buffer, start, final, resume)
        if kind in ("tag", "xml"):
            return self._tag(kind, buffer, start, final, resume)
        if kind == "bare":
            return self._json_at(buffer, start, start, final, resume, None)
        if kind == "mistral":
            j = _skip_space(buffer, start + len("[TOOL_CALLS]"))
            if j >= len(buffer):
                return (NOT, len(buffer), []) if final else (INCOMPLETE, 0, [])
            if buffer[j] not in "[{":
                return NOT, j, []
            return self._json_at(buffer, start, j, final, resume, None)
        return self._prefix(buffer, start, final, resume)

    def _json_at(self, buffer: str, start: int, j: int, final: bool, resume: bool, name: str | None,
                 paren: bool = False) -> tuple[int, int, list[TextCall]]:
        """A JSON value at ``j`` (``start`` is where the candidate's text begins)."""
        if name is None and buffer[j] == "{" and _key_rules_out(buffer, j, self.resolve):
            return NOT, j + 1, []
        state = self.json_state if resume else []
        end = json_end(buffer, j, state)
        self.json_state = state
        if end is None:
            if not final:
                return INCOMPLETE, 0, []
            end = len(buffer)
        tail = end
        if paren:  # name({...}): take the closing parenthesis along
            k = _skip_space(buffer, end)
            if k >= len(buffer) and not final:
                return INCOMPLETE, 0, []
            if k < len(buffer) and buffer[k] == ")":
                tail = k + 1
        written = buffer[start:tail]
        value = loads_lenient(buffer[j:end])
        if name is not None:
            tool = self.resolve(name)
            if tool is None or not isinstance(value, dict):
                return NOT, tail, []
            return CALL, tail, [TextCall(tool, value, written)]
        calls = calls_in(value, self.resolve, written) if value is not None else []
        return (CALL, tail, calls) if calls else (NOT, tail, [])

    def _fence(self, buffer: str, start: int, final: bool, resume: bool) -> tuple[int, int, list[TextCall]]:
        n = len(buffer)
        newline = buffer.find("\n", start + 3)
        if newline < 0:
            language = buffer[start + 3 :].strip().lower()
            if not final and len(language) < 20 and any(f.startswith(language) for f in CALL_FENCES):
                return INCOMPLETE, 0, []
            self.in_fence = not final
            return NOT, n if final else start + 3, []
        language = buffer[start + 3 : newline].strip().lower()
        if language not in CALL_FENCES:
            self.in_fence = True
            return NOT, newline + 1, []
        j = _skip_space(buffer, newline + 1)
        if j >= n:
            return (NOT, n, []) if final else (INCOMPLETE, 0, [])
        if buffer[j] not in "{[<" or (buffer[j] == "{" and _key_rules_out(buffer, j, self.resolve)):
            self.in_fence = True
            return NOT, j, []
        close = buffer.find("```", max(j, self.checked if resume else 0))
        if close < 0:
            if not final:
                self.checked = max(j, n - 2)
                return INCOMPLETE, 0, []
            close = end = n
        else:
            end = close + 3
        calls = body_calls(buffer[j:close], self.resolve, buffer[start:end])
        return (CALL, end, calls) if calls else (NOT, end, [])

    def _tag(self, kind: str, buffer: str, start: int, final: bool, resume: bool) -> tuple[int, int, list[TextCall]]:
        n = len(buffer)
        if kind == "xml":
            body_start, closer = start, "</function>"
        else:
            close_angle = buffer.find(">", start)
            if close_angle < 0:
                return (NOT, n, []) if final else (INCOMPLETE, 0, [])
            tag = buffer[start + 1 : close_angle].strip()
            if tag not in TAGS:
                return NOT, start + 1, []
            body_start, closer = close_angle + 1, f"</{tag}>"
        j = _skip_space(buffer, body_start)
        if j < n and buffer[j] not in "{[<":
            return NOT, j, []
        if j < n and buffer[j] == "{" and _key_rules_out(buffer, j, self.resolve):
            return NOT, j, []
        close = buffer.find(closer, max(body_start, self.checked if resume else 0))
        if close < 0:
            if not final:
                self.checked = max(body_start, n - len(closer))
                return INCOMPLETE, 0, []
            close = end = n
        else:
            end = close + len(closer)
        calls = body_calls(buffer[body_start:close] if kind == "tag" else buffer[start:close], self.resolve, buffer[start:end])
        return (CALL, end, calls) if calls else (NOT, end, [])

    def _prefix(self, buffer: str, start: int, final: bool, resume: bool) -> tuple[int, int, list[TextCall]]:
        n = len(buffer)
        match = _PREFIX_CALL.match(buffer, start)
        if match is None:
            return NOT, start + 1, []
        after = match.end()
        if after >= n:
            return (NOT, n, []) if final else (INCOMPLETE, 0, [])
        if buffer[after] in "{[":
            return self._json_at(buffer, start, after, final, resume, None)
        name = _TOOL_NAME.match(buffer, after)
        if name is None:
            return NOT, after, []
        if name.end() >= n:
            return (NOT, n, []) if final else (INCOMPLETE, 0, [])
        k = _skip_space(buffer, name.end())
        paren = k < n and buffer[k] == "("
        if paren:
            k = _skip_space(buffer, k + 1)
        if k >= n:
            return (NOT, n, []) if final else (INCOMPLETE, 0, [])
        if buffer[k] != "{" or self.resolve(name.group()) is None:
            return NOT, name.end(), []
        return self._json_at(buffer, start, k, final, resume, name.group(), paren)


def _partial_marker(buffer: str, i: int) -> int:
    """Length of the longest end of ``buffer[i:]`` that is the beginning of a marker."""
    n = len(buffer)
    if n == i or buffer[-1] not in _PREFIX_ENDS:
        return 0
    first = max(i, n - _PREFIX_LEN)
    window = buffer[first:]
    for k, char in enumerate(window):
        if char in _MARKER_STARTS and window[k:] in _PREFIXES:
            return len(window) - k
    return 0


def find_calls(text: str, resolve: Resolver) -> list[Any]:
    """A whole text as pieces: strings and :class:`TextCall` s, in order."""
    scanner = Scanner(resolve, max_held=len(text) + 1)
    pieces: list[Any] = []
    for piece in scanner.feed(text) + scanner.finish():
        if isinstance(piece, str) and pieces and isinstance(pieces[-1], str):
            pieces[-1] += piece
        else:
            pieces.append(piece)
    return pieces
