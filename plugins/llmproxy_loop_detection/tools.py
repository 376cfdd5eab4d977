"""Tool-call loops: the same call, made again and again, read from the conversation itself.

Agents resend the whole conversation with every request, so the calls the model made are in
``flow.request.messages``. :func:`trailing_run` walks back from the end and counts how many
assistant turns in a row made *the same calls* — same tool names, same arguments compared as
JSON values (key order and spacing ignored). Tool results between them do not break the run;
a turn without tool calls, or a user message with text (the human spoke), does.

A turn is compared as a whole (its calls as a sorted tuple), so a model that keeps making the
same two parallel calls is a loop too, while one that alternates between two calls is not.

:class:`RunTracker` keeps, per session, when each run was first seen at each length, so that
"K times in a row *within a time window*" can be told apart from an agent that polls the same
thing every few minutes; and whether the model was already steered for this run.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

from llmproxy.canonical import Message, TextPart, ToolCallPart

MAX_RUNS_KEPT = 16
"""Runs remembered per session (several conversations may share one client session)."""


def canonical_arguments(arguments: str) -> str:
    """A call's argument JSON in one normal form: key order and spacing do not matter."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return (arguments or "").strip()  # not JSON: compared as written
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def turn_signature(calls: Iterable[ToolCallPart]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((call.name, canonical_arguments(call.arguments)) for call in calls))


@dataclass(frozen=True, slots=True)
class Run:
    """``count`` assistant turns in a row made the calls in ``signature``; the run began with
    the call ``first_id`` in message ``first_message`` (together: the run's identity)."""

    signature: tuple[tuple[str, str], ...]
    count: int
    first_id: str
    first_message: int

    @property
    def key(self) -> str:
        return f"{self.first_message}:{self.first_id}:{hash(self.signature):x}"

    @property
    def tools(self) -> str:
        """The tool names, for messages: ``Bash`` or ``Read, Grep``."""
        return ", ".join(dict.fromkeys(name for name, _ in self.signature))


def _is_human_text(message: Message) -> bool:
    return any(isinstance(p, TextPart) and p.text.strip() for p in message.parts)


def trailing_run(messages: list[Message]) -> Run | None:
    """The run of identical tool-call turns that ends the conversation, or None."""
    signature: tuple[tuple[str, str], ...] | None = None
    count = 0
    first_id = ""
    first_message = -1
    for position in range(len(messages) - 1, -1, -1):
        message = messages[position]
        role = message.role
        if role == "tool" or role == "system" or role == "developer":
            continue
        if role == "user":
            if _is_human_text(message):
                break
            continue  # tool results only (some protocols carry them in user turns)
        calls = [p for p in message.parts if isinstance(p, ToolCallPart)]
        if not calls:
            break
        current = turn_signature(calls)
        if signature is None:
            signature = current
        elif current != signature:
            break
        count += 1
        first_id = calls[0].id
        first_message = position
    if signature is None:
        return None
    return Run(signature, count, first_id, first_message)


@dataclass(slots=True)
class _Seen:
    since: float
    times: dict[int, float] = field(default_factory=dict)  # run length -> first seen
    steered_at: int | None = None


class RunTracker:
    """What one session's runs have looked like over time (kept in ``session.data``)."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: OrderedDict[str, _Seen] = OrderedDict()

    def observe(self, run: Run, now: float | None = None) -> _Seen:
        now = time.time() if now is None else now
        seen = self.runs.get(run.key)
        if seen is None:
            seen = self.runs[run.key] = _Seen(since=now)
            while len(self.runs) > MAX_RUNS_KEPT:
                self.runs.popitem(last=False)
        else:
            self.runs.move_to_end(run.key)
        seen.times.setdefault(run.count, now)
        return seen

    @staticmethod
    def span(seen: _Seen, run: Run, repeats: int, now: float) -> float:
        """Seconds over which the last ``repeats`` calls of ``run`` were made, as far as this
        proxy saw them (calls made before it first saw the run count as made just then)."""
        return now - seen.times.get(run.count - repeats + 1, seen.since)


def describe_calls(run: Run, limit: int = 200) -> str:
    """``Bash {"command":"ls"}`` for messages, cut at ``limit`` characters."""
    text = "; ".join(f"{name} {arguments}" for name, arguments in run.signature)
    return text if len(text) <= limit else text[: limit - 1] + "…"
