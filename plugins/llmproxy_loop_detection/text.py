"""Repeated-text detection: is the end of what the model wrote one unit repeated N times?

A model in a loop writes the same passage again and again, verbatim. Legitimate output repeats
too — separators (``-----``), table rows, code with similar lines, numbered lists, JSON arrays —
but its repetition is either structural (no words), single-token (``None, None, None``) or not
exact (numbers, ids and names change from item to item). So a loop here is:

- the text seen so far *ends* with ``repeats`` exact, consecutive copies of one unit;
- the unit is at least ``min_unit`` characters (a shorter period counts as the smallest
  multiple of it that is long enough, so ``"Wait. "`` must fill ``repeats × min_unit``
  characters before it counts);
- the unit is prose-like: at least two different words, and letters make up at least
  :data:`MIN_LETTER_SHARE` of its non-blank characters.

Incremental and bounded: :class:`RepeatDetector` keeps about ``lookback`` characters (so the
longest unit it can see is ``lookback // repeats``) and looks only after every ``2 × min_unit``
new characters, so a loop is caught at most that late. A look first makes a cheap necessary
test (the last ``min_unit`` characters occurred up to one unit earlier: one ``str.rfind``);
only text that passes it — a loop, or structure like separators — gets the full test, one
anchored regular-expression match over the reversed tail, in C (about 15 µs for 6,000
characters). A streamed text event costs about 0.15 µs on average (docs/plugins/loop_detection.md).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

MIN_LETTER_SHARE = 0.7
"""Letters must be at least this share of a unit's non-blank characters: prose and most code
lines are above it; separators, table borders, numbers and JSON punctuation are below."""

MIN_DISTINCT_WORDS = 2
"""A unit must hold at least this many different words (runs of two or more letters), so a
single repeated token (``None, None``, ``TBD | TBD``) is data, not a loop."""

_BOUNDARIES = frozenset(".!?\n。！？")
_WORD = re.compile(r"[^\W\d_]{2,}")
_LETTER = re.compile(r"[^\W\d_]")
_BLANK = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class Loop:
    """A loop found at the end of the text: ``unit`` repeated ``repeats`` times, the run
    beginning at character ``start`` of everything fed (``end`` is where it was seen)."""

    unit: str
    repeats: int
    start: int
    end: int

    def cut(self, text: str) -> int:
        """Where to cut ``text`` — everything fed, in a complete answer — so that it keeps what
        came before the loop and one copy of the repeated passage, ending at a sentence or line
        end when there is one in the next copy (``start`` counts whole copies only, so it may
        sit mid-sentence)."""
        period = smallest_period(self.unit)
        start = self.start
        while start > 0 and text[start - 1] == text[start - 1 + period]:
            start -= 1  # the repetition began earlier, with a part of a copy
        end = start + period
        copy = text[start:end].rstrip()
        if copy and copy[-1] in _BOUNDARIES:
            return start + len(copy)  # the copy ends a sentence or a line: cut there
        for position in range(end, min(end + period, len(text))):
            if text[position - 1] in _BOUNDARIES:
                return position
        return end


@lru_cache(maxsize=32)
def _pattern(min_unit: int, max_unit: int, repeats: int) -> re.Pattern[str]:
    # Matched against the reversed text, at position 0: the shortest unit (at least min_unit
    # long) that the text's end repeats, then as many further copies as there are.
    return re.compile(r"(.{%d,%d}?)\1{%d,}" % (min_unit, max_unit, repeats - 1), re.S)


def smallest_period(unit: str) -> int:
    """The length of the shortest string that ``unit`` is whole copies of."""
    size = len(unit)
    for period in range(1, size // 2 + 1):
        if size % period == 0 and unit == unit[:period] * (size // period):
            return period
    return size


def prose_like(unit: str) -> bool:
    """Whether ``unit`` reads as words rather than structure (see the module docstring)."""
    # The unit is one rotation of the repeated text and may cut words in two ("e, None, Non"):
    # read the words of two copies in a row, leaving out the first and last, which may be cut.
    words = _WORD.findall(unit + unit)[1:-1]
    if len(set(w.lower() for w in words)) < MIN_DISTINCT_WORDS:
        return False
    solid = len(unit) - len(_BLANK.findall(unit))
    return len(_LETTER.findall(unit)) >= MIN_LETTER_SHARE * solid


class RepeatDetector:
    """Feed text pieces in order; :meth:`feed` returns a :class:`Loop` once the text ends in one.

    After a loop is reported the detector keeps working (a caller that goes on feeding gets
    the loop again at its next look); callers normally stop there.
    """

    __slots__ = ("min_unit", "max_unit", "repeats", "lookback", "step", "pattern", "pieces", "_chunks", "_kept", "_window", "_fed", "_pending")

    def __init__(self, min_unit: int = 40, repeats: int = 6, lookback: int = 6000) -> None:
        if min_unit < 1 or repeats < 2 or lookback < min_unit * repeats:
            raise ValueError("need min_unit >= 1, repeats >= 2 and lookback >= min_unit * repeats")
        self.min_unit = min_unit
        self.repeats = repeats
        self.lookback = lookback
        self.max_unit = lookback // repeats
        self.step = 2 * min_unit  # characters between looks: a loop is caught at most this late
        self.pattern = _pattern(min_unit, self.max_unit, repeats)
        self.pieces: list[str] = []  # fed since the last look (a hot loop may append here itself)
        self._chunks: deque[str] = deque()  # what each look added: the last lookback characters, or a few more
        self._kept = 0  # characters in _chunks
        self._window = ""  # the latest text, enough for the cheap test (see look)
        self._fed = 0  # characters fed in all
        self._pending = 0  # characters fed since the last look

    def feed(self, text: str) -> Loop | None:
        self.pieces.append(text)
        self._pending += len(text)
        if self._pending < self.step:
            return None
        return self.look()

    def look(self) -> Loop | None:
        """Check now, whatever was fed (or appended to :attr:`pieces`) since the last look."""
        self._pending = 0
        new = "".join(self.pieces)
        self.pieces.clear()
        self._fed += len(new)
        chunks = self._chunks
        chunks.append(new)
        self._kept += len(new)
        while self._kept - len(chunks[0]) >= self.lookback:
            self._kept -= len(chunks.popleft())
        if self._fed < self.min_unit * self.repeats:
            self._window += new
            return None
        # Cheap necessary condition first: in a loop the last min_unit characters occurred one
        # unit earlier too. Prose and code almost never pass it, so the regular expression
        # (which tries every unit length) runs only when it may match. The test needs only
        # the last min_unit + max_unit characters, kept apart so a look copies little.
        reach = self.min_unit + self.max_unit
        window = self._window + new
        if len(window) > 2 * reach:
            window = window[-reach:]
        self._window = window
        size = len(window)
        if window.rfind(window[-self.min_unit :], max(0, size - reach), size - self.min_unit) < 0:
            return None
        tail = "".join(chunks)[-self.lookback :]
        match = self.pattern.match(tail[::-1])
        if match is None:
            return None
        unit = match.group(1)[::-1]
        if not prose_like(unit):
            return None
        run = match.end()
        return Loop(unit=unit, repeats=run // len(unit), start=self._fed - run, end=self._fed)


def find_loop(text: str, min_unit: int = 40, repeats: int = 6, lookback: int = 6000) -> Loop | None:
    """The first loop in a complete ``text``, found as a stream would find it."""
    detector = RepeatDetector(min_unit, repeats, lookback)
    step = detector.step  # as often as a stream is looked at: a loop that ends soon after
    for start in range(0, len(text), step):  # it formed must be found here too
        detector.pieces.append(text[start : start + step])
        loop = detector.look()
        if loop is not None:
            return loop
    return None
