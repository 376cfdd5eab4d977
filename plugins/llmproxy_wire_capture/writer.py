"""Writing captures off the event loop: a bounded queue, one writer thread, a JSONL file with
rotation by size, age and file count.

The event loop only puts snapshots on the queue (:meth:`Recorder.submit`); the thread builds
each line, writes whatever is queued in one go and flushes, so a record reaches the OS as
soon as the thread gets to it. :meth:`Recorder.close` (the ``shutdown`` hook) writes
everything still queued before it returns; a flow that ends after that (one cancelled by the
shutdown drain) is written by a short-lived thread of its own, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("llmproxy.wire_capture")

_STOP = object()
_TS = re.compile(rb'"ts":([0-9.]+)')


class CaptureFile:
    """A JSONL file that rotates itself: when the next line would pass ``max_bytes``, or the
    file is older than ``max_age`` seconds, it is renamed to ``<stem>.<UTC time>-<microseconds><suffix>``
    beside it and a new file is begun; rotated files beyond ``max_files - 1`` are deleted,
    oldest first. Used from one thread at a time."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 0, max_age: float = 0, max_files: int = 10) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.max_files = max_files
        self._file: Any = None
        self._size = 0
        self._born = 0.0

    def check(self) -> None:
        """Create the folder and make sure the file can be appended to (at start-up, so a
        bad path is a start-up error, not a warning per flow)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab"):
            pass

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._size = self._file.tell()
        self._born = time.time()
        if self._size:
            # Appending to an earlier run's file: its age is its first record's.
            with open(self.path, "rb") as existing:
                match = _TS.search(existing.read(200))
            if match:
                self._born = float(match.group(1))

    def write(self, lines: list[bytes]) -> None:
        for line in lines:
            if self._file is None:
                self._open()
            if self._size and self._due(len(line)):
                self.rotate()
                self._open()
            self._file.write(line)
            self._size += len(line)
        if self._file is not None:
            self._file.flush()

    def _due(self, incoming: int) -> bool:
        if self.max_bytes and self._size + incoming > self.max_bytes:
            return True
        return bool(self.max_age) and time.time() - self._born >= self.max_age

    def rotate(self) -> Path | None:
        """Close the current file and move it aside; returns the rotated file's path."""
        self.close()
        if not self.path.exists():
            return None
        now = time.time()
        micros = int(now % 1 * 1_000_000)
        while True:  # names sort in time order; two rotations in one microsecond take the next
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"-{micros:06d}"
            target = self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}")
            if not target.exists():
                break
            micros += 1
        os.replace(self.path, target)
        self._prune()
        return target

    def rotated(self) -> list[Path]:
        """Rotated files of this capture, oldest first."""
        pattern = re.compile(re.escape(self.path.stem) + r"\.\d{8}T\d{6}-\d{6,}" + re.escape(self.path.suffix) + "$")
        return sorted(p for p in self.path.parent.iterdir() if pattern.match(p.name))

    def _prune(self) -> None:
        old = self.rotated()
        for path in old[: max(0, len(old) - (self.max_files - 1))]:
            try:
                path.unlink()
            except OSError as error:
                log.warning("capture: cannot delete old capture file %s: %s", path, error.strerror)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


class Recorder:
    """A queue of snapshots and the thread that writes them with ``build`` (snapshot → line)."""

    def __init__(self, file: CaptureFile, build: Callable[[Any], bytes], queue_size: int = 1000) -> None:
        self.file = file
        self.build = build
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.lock = threading.Lock()  # the file, for the rare writer after close
        self.closed = False
        self.written = 0
        self.thread = threading.Thread(target=self._run, name=f"llmproxy-capture:{file.path.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, snapshot: Any) -> Any:
        """Queue a snapshot. Returns None when queued at once, else an awaitable that waits
        (without blocking the loop) for room — or, after close, for its own write."""
        if self.closed:
            return asyncio.to_thread(self._write, [snapshot])
        try:
            self.queue.put_nowait(snapshot)
            return None
        except queue.Full:
            return asyncio.to_thread(self.queue.put, snapshot)

    async def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the thread and close the file."""
        if self.closed:
            return
        self.closed = True
        await asyncio.to_thread(self.queue.put, _STOP)
        await asyncio.to_thread(self.thread.join, timeout)
        if self.thread.is_alive():
            log.warning("capture: the writer is still busy after %.0fs; %s may be incomplete", timeout, self.file.path)
            return
        with self.lock:
            self.file.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self.queue.get()]
            while len(batch) < 256:  # whatever else is waiting goes out in the same write
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [item for item in batch if item is not _STOP]
            self._write(batch)

    def _write(self, snapshots: list[Any]) -> None:
        lines = []
        for snapshot in snapshots:
            try:
                lines.append(self.build(snapshot))
            except Exception:
                log.exception("capture: could not build the record of flow %s", getattr(snapshot, "id", "?"))
        if not lines:
            return
        with self.lock:
            try:
                self.file.write(lines)
                self.written += len(lines)
            except OSError as error:
                log.error("capture: cannot write %s: %s", self.file.path, error.strerror or error)
            if self.closed and not self.thread.is_alive():
                self.file.close()  # a late writer: leave no file open behind
