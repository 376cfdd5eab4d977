"""Finding in-chat commands in a user's text, and taking them out.

A command is the prefix (``!/`` by default), a name, and optionally arguments in
parentheses: ``!/status``, ``!/model(gpt-5-mini)``, ``!/set(temperature=0.2, stop=")")``.
The rules are strict on purpose, because a false match eats the user's words:

- the prefix starts the text or follows whitespace (``a!/b``, ``\\!/b``, ```!/b``` are text);
- the name is a letter then letters, digits, ``_`` or ``-`` (matched without regard to case);
- without parentheses, the name must be followed by the end, whitespace or ``. , ; : ! ?``
  (so a path like ``!/usr/bin`` is text);
- arguments end at the matching ``)`` on the same line. Inside them, ``"…"`` or ``'…'``
  opened at the start of a value hides ``)`` and ``,``; a backslash escapes the next
  character; nested parentheses balance. An argument list that never closes leaves the whole
  thing as text.

Text inside client-injected wrappers (``<system-reminder>…</system-reminder>`` and the like,
see ``ignore_tags``) is never read: the client, not the user, wrote it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_BARE_END = frozenset(".,;:!?")
_QUOTES = "\"'"


@dataclass(frozen=True, slots=True)
class Found:
    """One command in a text: ``name`` (lower case), ``args`` (the raw text between the
    parentheses, or None without them), and where it is (``text[start:end]``)."""

    name: str
    args: str | None
    start: int
    end: int


def find_commands(text: str, prefix: str = "!/", ignore_tags: tuple[str, ...] = ()) -> list[Found]:
    """Every well-formed command in ``text``, in order (see the module docstring)."""
    if prefix not in text:
        return []
    hidden = _hidden_spans(text, ignore_tags) if ignore_tags and "<" in text else []
    found: list[Found] = []
    size = len(prefix)
    at = text.find(prefix)
    while at >= 0:
        command = _command_at(text, at, size)
        if command is not None and not any(start <= at < end for start, end in hidden):
            found.append(command)
            at = text.find(prefix, command.end)
        else:
            at = text.find(prefix, at + size)
    return found


def _command_at(text: str, at: int, size: int) -> Found | None:
    if at > 0 and not text[at - 1].isspace():
        return None
    match = _NAME.match(text, at + size)
    if match is None:
        return None
    name = match.group().lower()
    after = match.end()
    if after < len(text) and text[after] == "(":
        close = _closing_paren(text, after)
        if close is None:
            return None
        return Found(name, text[after + 1 : close], at, close + 1)
    if after < len(text) and not (text[after].isspace() or text[after] in _BARE_END):
        return None
    return Found(name, None, at, after)


def _closing_paren(text: str, open_at: int) -> int | None:
    """Index of the ``)`` that closes the ``(`` at ``open_at``, or None."""
    depth = 0
    quote = ""
    value_start = True  # a quote opens a string only where a value begins
    i = open_at
    end = len(text)
    while i < end:
        char = text[i]
        if char == "\n" and not quote:
            return None
        if char == "\\":
            i += 2
            value_start = False
            continue
        if quote:
            if char == quote:
                quote = ""
        elif char in _QUOTES and value_start:
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        if not quote:
            if char in "(,=":
                value_start = True
            elif not char.isspace():
                value_start = False
        i += 1
    return None


def _hidden_spans(text: str, tags: tuple[str, ...]) -> list[tuple[int, int]]:
    spans = []
    for tag in tags:
        opening, closing = f"<{tag}>", f"</{tag}>"
        start = text.find(opening)
        while start >= 0:
            stop = text.find(closing, start)
            stop = len(text) if stop < 0 else stop + len(closing)
            spans.append((start, stop))
            start = text.find(opening, stop)
    return spans


def remove_commands(text: str, found: list[Found]) -> str:
    """``text`` without the ``found`` commands; the space that followed each one goes too,
    and the result is stripped at the ends only where a command was removed."""
    if not found:
        return text
    pieces = []
    last = 0
    for command in found:
        pieces.append(text[last : command.start])
        last = command.end
        while last < len(text) and text[last] in " \t":
            last += 1
    pieces.append(text[last:])
    out = "".join(pieces)
    if found[0].start == 0 or not text[: found[0].start].strip():
        out = out.lstrip()
    if not text[found[-1].end :].strip():
        out = out.rstrip()
    return out
