"""In-chat commands: the registry plugins fill through ``register_commands``, and the call
object handlers receive. Parsing and running commands is the ``commands`` plugin's job."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .flow import Flow
    from .sessions import Session

NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass
class Command:
    name: str
    handler: Callable[["CommandCall"], Any]
    help: str
    plugin: str


@dataclass
class CommandCall:
    """One use of a command: ``!/name(args)`` in ``flow``'s newest user message."""

    name: str
    args: str
    flow: "Flow"
    session: "Session"
    context: Any = None

    def arguments(self) -> list[str]:
        """``args`` split on commas, each stripped and unquoted (``!/set(a=1, b=2)`` →
        ["a=1", "b=2"]; see :func:`split_arguments`)."""
        return split_arguments(self.args)

    def pairs(self) -> dict[str, str]:
        """``key=value`` arguments as a dict; a bare word is an error. A quoted value keeps
        its commas, parentheses and spaces (``!/set(stop=", ")``)."""
        out = {}
        for item in _split(self.args or "", ","):
            if not item.strip():
                continue
            pieces = _split(item, "=", 1)
            if len(pieces) < 2 or not pieces[0].strip():
                raise ValueError(f"expected key=value, got {_unquote(item)!r}")
            out[_unquote(pieces[0])] = _unquote(pieces[1])
        return out


def split_arguments(args: str | None) -> list[str]:
    """Split a command's raw arguments on the commas outside quotes and parentheses.

    Each argument is stripped; a value that begins with ``"`` or ``'`` is taken literally up
    to the matching quote (commas, ``)`` and spaces included), and a backslash makes the next
    character literal anywhere. Empty arguments are left out.
    """
    return [_unquote(item) for item in _split(args or "", ",") if item.strip()]


def _split(text: str, sep: str, limit: int = -1) -> list[str]:
    pieces: list[str] = []
    depth = 0
    quote = ""
    value_start = True  # a quote opens a string only where a value begins
    start = i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            value_start = False
            continue
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'" and value_start:
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == sep and depth <= 0 and limit != 0:
            pieces.append(text[start:i])
            start = i + 1
            limit -= 1
        if not quote:
            if char in "(,=":
                value_start = True
            elif not char.isspace():
                value_start = False
        i += 1
    pieces.append(text[start:])
    return pieces


def _unquote(raw: str) -> str:
    text = raw.strip()
    out: list[str] = []
    quote = text[0] if text[:1] in ("\"", "'") else ""
    i = 1 if quote else 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if quote and char == quote:
            quote = ""
        else:
            out.append(char)
        i += 1
    return "".join(out)
