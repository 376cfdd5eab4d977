"""A fake OpenAI-compatible upstream that holds every chat request until the test releases it.

For scheduling tests: it records the order in which models arrived (:attr:`HeldOpenAI.order`),
how many requests it is serving at once (:attr:`active`) and the most it ever served at once
(:attr:`peak`). A request waits, after being recorded, until :meth:`release` lets the oldest
held one go on to be answered as :class:`FakeOpenAI` would (its scripted behaviours apply
after the release)::

    async with HeldOpenAI() as fake:
        ... send requests through llmproxy ...
        await fake.until_held(1)
        fake.release()
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from .common import Received
from .openai_upstream import FakeOpenAI

BOUND = 10.0  # seconds any wait here may take


class HeldOpenAI(FakeOpenAI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order: list[str | None] = []
        self.active = 0
        self.peak = 0
        self._gates: list[tuple[Received, asyncio.Event]] = []

    async def _answer(self, request: web.Request, received: Received) -> web.StreamResponse:
        self.order.append(received.model)
        self.active += 1
        self.peak = max(self.peak, self.active)
        gate = asyncio.Event()
        self._gates.append((received, gate))
        try:
            await gate.wait()
            return await super()._answer(request, received)
        finally:
            self.active -= 1

    @property
    def held(self) -> int:
        """Requests waiting for :meth:`release` (those whose client went away not counted)."""
        return sum(1 for received, gate in self._gates if not gate.is_set() and not received.finished.is_set())

    def release(self) -> None:
        """Let the oldest held request be answered."""
        for received, gate in self._gates:
            if not gate.is_set() and not received.finished.is_set():
                gate.set()
                return
        raise AssertionError("no request is held")

    async def until_held(self, count: int) -> None:
        deadline = time.monotonic() + BOUND
        while self.held < count:
            assert time.monotonic() < deadline, f"timed out waiting for {count} held requests (held: {self.held}, order: {self.order})"
            await asyncio.sleep(0.005)

    async def serve_all(self, count: int) -> None:
        """Release requests one at a time as they arrive until ``count`` were released."""
        for _ in range(count):
            await self.until_held(1)
            self.release()
