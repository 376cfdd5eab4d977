"""Model-affinity scheduling for backends that serve a few requests at a time (local servers).

A local server (Ollama, llama.cpp, LM Studio, vLLM on one GPU) holds one model in memory and
pays seconds to swap it for another. With ``max_concurrency`` set on a backend, its
:class:`ModelScheduler` lets that many requests run at once; the others wait in one queue per
model. A freed slot goes to a waiter for the **loaded** model (the one granted last) first,
so queued requests for it are drained before the backend switches; another model gets the slot
when none wait for the loaded one, or when the loaded one has been served
``model_switch_after`` times in a row while others waited (so no model waits forever). Among
other models, the one whose first waiter has waited longest goes next.

A waiter whose client goes away leaves its queue at once (cancellation-safe: a slot granted
just as it left is passed on). A full queue (``max_queue``) and a wait beyond
``queue_timeout`` are 503s, which an alias's next target may serve instead. Without
``max_concurrency`` a backend has no scheduler at all, and the pipeline skips it with one
attribute test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any, Callable

from .errors import ProxyError

Release = Callable[[], None]


class ModelScheduler:
    """Slots and per-model queues of one backend; ``await acquire(model)`` → ``release()``."""

    def __init__(self, backend: str, limit: int, switch_after: int = 8, max_queue: int = 100, queue_timeout: float = 300.0) -> None:
        self.backend = backend
        self.limit = limit
        self.switch_after = switch_after
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0  # slots in use
        self.loaded: str | None = None  # the model granted last: the one the server holds
        self.queued = 0  # waiters over every model
        self.served_while_others_wait = 0  # grants to the loaded model in a row while another model waited
        # model → its waiters, oldest first: (arrival number, future the grant resolves)
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self._arrivals = itertools.count()

    @property
    def free(self) -> bool:
        return self.active < self.limit

    def waiting(self) -> dict[str, int]:
        """Waiters per model."""
        return {model: len(queue) for model, queue in self._waiting.items()}

    def status(self) -> dict[str, Any]:
        return {"max_concurrency": self.limit, "active": self.active, "loaded": self.loaded, "queued": self.waiting()}

    async def acquire(self, model: str) -> Release:
        """Wait for a slot for ``model``; return the callable that gives it back (safe to
        call more than once). Raises ProxyError 503 when the queue is full or the wait
        exceeds ``queue_timeout``; a cancelled wait leaves the queue."""
        if self.active < self.limit and not self.queued:
            self._grant(model)
            return self._releaser()
        if self.queued >= self.max_queue:
            raise ProxyError(
                503,
                f"backend {self.backend!r} is busy: {self.active} requests running (max_concurrency {self.limit}) "
                f"and {self.queued} queued (max_queue {self.max_queue}); try again shortly",
                headers={"Retry-After": "1"},
            )
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._arrivals), granted)
        self._waiting.setdefault(model, deque()).append(entry)
        self.queued += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await granted
        except BaseException as error:
            if granted.done() and not granted.cancelled():
                # The slot was ours just as we left (a timeout or the client going away
                # raced the grant): hand it on rather than lose it.
                self._release()
            else:
                self._forget(model, entry)
            if isinstance(error, TimeoutError):
                raise ProxyError(
                    503,
                    f"backend {self.backend!r} had no free slot for {model!r} within {self.queue_timeout:g}s "
                    f"(max_concurrency {self.limit}, queue_timeout)",
                    headers={"Retry-After": "1"},
                ) from None
            raise
        return self._releaser()

    # -- internals ------------------------------------------------------------------------
    def _releaser(self) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release()

        return release

    def _grant(self, model: str) -> None:
        self.active += 1
        if model != self.loaded:
            self.loaded = model
            self.served_while_others_wait = 0

    def _forget(self, model: str, entry: tuple[int, asyncio.Future[None]]) -> None:
        queue = self._waiting.get(model)
        if queue is None:
            return
        try:
            queue.remove(entry)
        except ValueError:
            return
        self.queued -= 1
        if not queue:
            del self._waiting[model]

    def _release(self) -> None:
        self.active -= 1
        while self.active < self.limit and self.queued:
            model = self._next_model()
            queue = self._waiting[model]
            _, granted = queue.popleft()
            self.queued -= 1
            if not queue:
                del self._waiting[model]
            if granted.done():
                continue  # cancelled, its task not yet resumed to leave the queue itself
            others_wait = any(m != model for m in self._waiting)
            if model == self.loaded:
                self.served_while_others_wait = self.served_while_others_wait + 1 if others_wait else 0
            self._grant(model)
            granted.set_result(None)

    def _next_model(self) -> str:
        """The loaded model while it has waiters and its run is within the fairness bound;
        else the model whose first waiter arrived earliest."""
        waiting = self._waiting
        loaded = self.loaded
        if loaded in waiting and (len(waiting) == 1 or self.served_while_others_wait < self.switch_after):
            return loaded  # type: ignore[return-value]
        return min((m for m in waiting if m != loaded), key=lambda m: waiting[m][0][0])
