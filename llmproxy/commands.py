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
        """``args`` split on commas, each stripped (``!/set(a=1, b=2)`` → ["a=1", "b=2"])."""
        return [a.strip() for a in self.args.split(",") if a.strip()] if self.args else []

    def pairs(self) -> dict[str, str]:
        """``key=value`` arguments as a dict; a bare word is an error."""
        out = {}
        for item in self.arguments():
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected key=value, got {item!r}")
            out[key.strip()] = value.strip()
        return out
