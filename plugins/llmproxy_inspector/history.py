"""The flow history: one SQLite table, owned by one worker thread.

Every finished flow's summary is a row; its detail record (bodies, attempts, events, the
plugins' changes — see detail.py) is stored with it as masked JSON. All SQLite work —
inserts, retention, queries — runs in the history's own thread (a one-worker executor), never
on the event loop; an in-memory database (no ``history_path``) lives in that thread too.

Writes are batched, so that a flow costs the event loop one list append: :meth:`History.add`
queues an item, and the queue goes to the thread every ``BATCH_SECONDS`` or ``BATCH_ROWS``
items, whichever comes first, where the items are built into rows and written with one
``executemany`` and one commit. A query (and :meth:`History.flush`, which tests use, and
closing) sends what is queued first, so it sees every flow added before it.

Retention runs after writes, at most every ``RETENTION_EVERY`` seconds: rows older than
``max_age`` go, then the oldest until the stored records fit in ``max_bytes``.

The file can be read by another process while the proxy writes it (WAL mode):
``llmproxy history --db FILE`` does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

import orjson

log = logging.getLogger("llmproxy.inspector")

RETENTION_EVERY = 30.0
BATCH_SECONDS = 0.5  # longest a finished flow waits before the thread writes it
BATCH_ROWS = 256  # a queue this long is sent at once
COLUMNS = ("id", "started", "client", "session", "frontend", "model", "backend", "upstream_model", "status", "error")
FILTERS = ("client", "session", "frontend", "model", "backend", "status")
SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    client TEXT, session TEXT, frontend TEXT, model TEXT, backend TEXT, upstream_model TEXT,
    status INTEGER, error TEXT,
    summary BLOB NOT NULL,
    record BLOB,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS flows_started ON flows (started);
"""


def connect(path: str | None) -> sqlite3.Connection:
    if path:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(os.path.expanduser(path) if path else ":memory:", check_same_thread=False)
    if path:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


def query(db: sqlite3.Connection, filters: dict[str, Any], limit: int = 100, before: float | None = None, since: float | None = None, text: str | None = None) -> list[dict[str, Any]]:
    """Summaries, newest first. ``filters`` are exact matches on :data:`FILTERS`; ``text``
    searches every summary field (and the stored record's bodies)."""
    where: list[str] = []
    args: list[Any] = []
    for name in FILTERS:
        value = filters.get(name)
        if value is not None and value != "":
            where.append(f"{name} = ?")
            args.append(value)
    if before is not None:
        where.append("started < ?")
        args.append(before)
    if since is not None:
        where.append("started >= ?")
        args.append(since)
    if text:
        where.append("(instr(lower(summary), ?) > 0 OR instr(lower(CAST(record AS TEXT)), ?) > 0)")
        args.extend([text.lower(), text.lower()])
    sql = "SELECT summary FROM flows" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY started DESC LIMIT ?"
    args.append(limit)
    return [orjson.loads(row[0]) for row in db.execute(sql, args)]


def record_of(db: sqlite3.Connection, flow_id: str) -> dict[str, Any] | None:
    row = db.execute("SELECT summary, record FROM flows WHERE id = ?", (flow_id,)).fetchone()
    if row is None:
        return None
    detail = orjson.loads(row[1]) if row[1] else {}
    detail["summary"] = orjson.loads(row[0])
    return detail


class HistoryItem(Protocol):
    """What :meth:`History.add` queues: built into a row in the history's thread, then told
    (back on the event loop) that it was written."""

    def build(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The summary and the detail record (or None). Runs in the thread: it may take time."""

    def written(self, summary: dict[str, Any]) -> None:
        """Called on the event loop once the row holding ``summary`` is committed."""


class History:
    """The history database and its thread. ``add`` queues a write; the ``q*`` methods are
    awaitable queries that run in the same thread."""

    def __init__(self, path: str | None, max_age: float, max_bytes: int) -> None:
        self.path = path
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmproxy-history")
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_retention = 0.0
        self._queue: list[HistoryItem] = []  # added, not yet sent to the thread
        self._timer: asyncio.TimerHandle | None = None
        self._pending: set[Future[Any]] = set()  # batches sent (kept so none is collected early)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._db = await self._run(connect, self.path)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._send()  # what was added before this call is written before it runs
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def add(self, item: HistoryItem) -> None:
        """Queue ``item`` for the next batch (on the event loop: one append, and a timer per batch)."""
        queue = self._queue
        queue.append(item)
        if len(queue) >= BATCH_ROWS:
            self._send()
        elif self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(BATCH_SECONDS, self._send)

    def _send(self) -> None:
        """Hand the queued items to the thread as one batch."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._queue or self._db is None:
            return
        batch, self._queue = self._queue, []
        future = self._executor.submit(self._write, batch)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def _write(self, batch: list[HistoryItem]) -> None:
        """Build and insert one batch (in the thread), then tell its items on the loop."""
        db = self._db
        assert db is not None
        rows: list[tuple[Any, ...]] = []
        written: list[tuple[HistoryItem, dict[str, Any]]] = []
        for item in batch:
            try:
                summary, record = item.build()
            except Exception:  # one flow that cannot be summarised must not lose the others
                log.exception("inspector: a flow could not be written to the history")
                continue
            blob = orjson.dumps(record) if record is not None else None
            rows.append((*[summary.get(name) for name in COLUMNS], orjson.dumps(summary), blob, len(blob) if blob else 0))
            written.append((item, summary))
        db.executemany(
            f"INSERT OR REPLACE INTO flows ({', '.join(COLUMNS)}, summary, record, size) VALUES ({', '.join('?' * (len(COLUMNS) + 3))})",
            rows,
        )
        db.commit()
        now = time.monotonic()
        if now - self._last_retention >= RETENTION_EVERY:
            self._last_retention = now
            self.retain()
        if self._loop is not None and written:
            try:
                self._loop.call_soon_threadsafe(_tell, written)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

    def store_tokens(self, counts: list[tuple[str, int | None, int | None]]) -> None:
        """Fill in stored summaries' token counts, ``(id, in, out)`` each, once learned (in
        the thread). A flow not written yet is left alone: its row will have them."""
        db = self._db
        assert db is not None
        for flow_id, tokens_in, tokens_out in counts:
            row = db.execute("SELECT summary FROM flows WHERE id = ?", (flow_id,)).fetchone()
            if row is not None:
                summary = orjson.loads(row[0])
                summary["tokens_in"], summary["tokens_out"] = tokens_in, tokens_out
                db.execute("UPDATE flows SET summary = ? WHERE id = ?", (orjson.dumps(summary), flow_id))
        db.commit()

    def retain(self) -> int:
        """Apply max_age and max_bytes (in the thread); returns the rows removed."""
        db = self._db
        assert db is not None
        removed = 0
        if self.max_age:
            removed += db.execute("DELETE FROM flows WHERE started < ?", (time.time() - self.max_age,)).rowcount
        if self.max_bytes:
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM flows").fetchone()[0]
            if total > self.max_bytes:
                # walk from the oldest, summing sizes, to find where to cut
                excess = total - self.max_bytes
                cut, freed = None, 0
                for started, size in db.execute("SELECT started, size FROM flows ORDER BY started"):
                    freed += size
                    cut = started
                    if freed >= excess:
                        break
                if cut is not None:
                    removed += db.execute("DELETE FROM flows WHERE started <= ?", (cut,)).rowcount
        db.commit()
        return removed

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the history thread (after the writes queued before it)."""
        return await self._run(fn, *args)

    async def query(self, filters: dict[str, Any], limit: int = 100, before: float | None = None, since: float | None = None, text: str | None = None) -> list[dict[str, Any]]:
        return await self._run(lambda: query(self._db, filters, limit, before, since, text))  # type: ignore[arg-type]

    async def record(self, flow_id: str) -> dict[str, Any] | None:
        return await self._run(lambda: record_of(self._db, flow_id))  # type: ignore[arg-type]

    async def run_retention(self) -> int:
        return await self._run(self.retain)

    async def flush(self) -> None:
        """Write what was added so far, and wait until it is written."""
        await self._run(lambda: None)

    async def close(self) -> None:
        await self.flush()
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)


def _tell(written: list[tuple[HistoryItem, dict[str, Any]]]) -> None:
    for item, summary in written:
        item.written(summary)
