"""``llmproxy history``: the flow history in the terminal, read from the SQLite file
(``--db``) or from a running proxy's admin API (``--url``, with ``--admin-key`` or
``LLMPROXY_ADMIN_KEY``)."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from .history import query


def _fetch(url: str, key: str | None, params: dict[str, Any]) -> list[dict[str, Any]]:
    if not key:
        raise click.UsageError("--url needs the admin key: --admin-key or LLMPROXY_ADMIN_KEY")
    query_string = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    request = urllib.request.Request(f"{url.rstrip('/')}/admin/api/history?{query_string}", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())["flows"]
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = error.reason
        raise click.ClickException(f"{url}: {error.code} {message}") from None
    except urllib.error.URLError as error:
        raise click.ClickException(f"{url}: {error.reason}") from None


def _cell(value: Any, width: int) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'time':<19} {'id':<16} {'front-end':<16} {'model':<22} {'backend:model':<30} {'st':>3} {'att':>3} {'in':>7} {'out':>7} {'ms':>8}"]
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.get("started") or 0))
        used = f"{row.get('backend') or '-'}:{row.get('upstream_model') or '-'}"
        lines.append(
            f"{when:<19} {_cell(row.get('id'), 16):<16} {_cell(row.get('frontend'), 16):<16} {_cell(row.get('model'), 22):<22} "
            f"{_cell(used, 30):<30} {_cell(row.get('status'), 3):>3} {row.get('attempts', 0):>3} {_cell(row.get('tokens_in'), 7):>7} "
            f"{_cell(row.get('tokens_out'), 7):>7} {_cell(row.get('latency_ms'), 8):>8}"
        )
    return "\n".join(lines)


@click.command("history")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, exists=True), help="The history file (plugins.inspector.history_path).")
@click.option("--url", help="A running llmproxy, e.g. http://127.0.0.1:8000 (instead of --db).")
@click.option("--admin-key", envvar="LLMPROXY_ADMIN_KEY", help="Admin key for --url (default: $LLMPROXY_ADMIN_KEY).")
@click.option("--limit", "-n", type=click.IntRange(1, 100_000), default=50, show_default=True, help="Flows to show, newest first.")
@click.option("--backend", help="Only flows served by this backend.")
@click.option("--model", help="Only flows that asked for this model.")
@click.option("--session", help="Only flows of this session id.")
@click.option("--status", type=int, help="Only flows with this HTTP status.")
@click.option("--search", "-q", "text", help="Only flows whose summary or bodies contain this text.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines (one summary each).")
def history(db_path: str | None, url: str | None, admin_key: str | None, limit: int, backend: str | None, model: str | None,
            session: str | None, status: int | None, text: str | None, as_json: bool) -> None:
    """Show the flow history kept by the inspector plugin."""
    filters = {"backend": backend, "model": model, "session": session, "status": status}
    if bool(db_path) == bool(url):
        raise click.UsageError("give one of --db FILE or --url URL")
    if db_path:
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            rows = query(db, filters, limit, text=text)
            db.close()
        except sqlite3.DatabaseError as error:
            raise click.ClickException(f"{db_path}: not an llmproxy history ({error})") from None
    else:
        rows = _fetch(url, admin_key, {**filters, "limit": limit, "q": text})  # type: ignore[arg-type]
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    click.echo(render(rows) if rows else "no flows")
