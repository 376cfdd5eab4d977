"""``llmproxy top``: the proxy's recent and active flows and its backends, live in a terminal.

For headless servers. It polls the admin API of the ``inspector`` plugin (``GET
/admin/api/flows?limit=N`` and ``GET /admin/api/backends``, with ``Authorization: Bearer
<admin key>``) every ``--interval`` seconds and redraws two tables with ``rich``. ``--once``
prints one snapshot and exits; ``--json`` prints the two answers as one JSON object.

Errors are one line and an exit status of 1: the proxy unreachable, the admin key refused,
no admin API at that address, an answer that is not the admin API's JSON. While the live view
runs, a failed poll is shown under the tables and the next poll tries again.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import click

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = 5.0  # seconds per admin API request


class AdminAPIError(Exception):
    """A poll failed; the message is the one line shown to the user."""


class AdminAPI:
    """The two read-only endpoints ``top`` needs."""

    def __init__(self, url: str, admin_key: str | None, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.admin_key = admin_key
        self.timeout = timeout

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers={"Accept": "application/json"})
        if self.admin_key:
            request.add_header("Authorization", f"Bearer {self.admin_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):
                hint = "check --admin-key or LLMPROXY_ADMIN_KEY" if self.admin_key else "pass --admin-key or set LLMPROXY_ADMIN_KEY"
                raise AdminAPIError(f"the admin API at {self.url} refused the admin key (HTTP {error.code}): {hint}") from None
            if error.code == 404:
                raise AdminAPIError(f"no admin API at {self.url} (HTTP 404 for {path}): is the inspector plugin enabled?") from None
            raise AdminAPIError(f"the admin API at {self.url} answered HTTP {error.code} for {path}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise AdminAPIError(f"cannot reach llmproxy at {self.url}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise AdminAPIError(f"{self.url}{path} did not answer JSON: is this llmproxy's admin API?") from None

    def snapshot(self, limit: int) -> dict[str, Any]:
        flows = self.get(f"/admin/api/flows?limit={limit}")
        if not isinstance(flows, dict) or not isinstance(flows.get("flows"), list):
            raise AdminAPIError(f"{self.url}/admin/api/flows did not answer {{\"flows\": [...]}}")
        backends = self.get("/admin/api/backends")
        if not isinstance(backends, dict) or not isinstance(backends.get("backends"), dict):
            raise AdminAPIError(f"{self.url}/admin/api/backends did not answer {{\"backends\": {{...}}}}")
        # Entries off the contract are left out rather than allowed to break the view.
        return {"flows": [f for f in flows["flows"] if isinstance(f, dict)], "backends": backends["backends"]}


# -- rendering ---------------------------------------------------------------------------------


def _ms(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.1f}s"
    return f"{value:.1f}ms" if value < 10 else f"{value:.0f}ms"


def _tokens(flow: dict[str, Any]) -> str:
    given, got = flow.get("tokens_in"), flow.get("tokens_out")
    if given is None and got is None:
        return "-"
    return f"{given if given is not None else '-'}/{got if got is not None else '-'}"


def _status(flow: dict[str, Any]) -> Any:
    from rich.text import Text

    if flow.get("active"):
        return Text("active", style="bold cyan")
    status = flow.get("status")
    label = str(status) if status is not None else "-"
    if flow.get("error"):
        label += f" {flow['error']}"
    style = "green" if isinstance(status, int) and status < 400 else "red"
    return Text(label[:60], style=style)


def _route(flow: dict[str, Any]) -> str:
    asked = flow.get("model") or "-"
    backend = flow.get("backend")
    if not backend:
        return asked
    upstream = flow.get("upstream_model")
    served = f"{backend}:{upstream}" if upstream else backend
    attempts = flow.get("attempts")
    return f"{asked} → {served}" + (f" ({attempts} tries)" if isinstance(attempts, int) and attempts > 1 else "")


def flows_table(flows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="Flows (newest first)", title_justify="left", expand=True)
    for column, justify in (("time", "left"), ("client", "left"), ("model → backend", "left"), ("status", "left"),
                            ("tokens in/out", "right"), ("latency", "right"), ("TTFT", "right")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for flow in flows:
        started = flow.get("started")
        when = time.strftime("%H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "-"
        stream = " ⇣" if flow.get("stream") else ""
        latency = _ms(flow.get("latency_ms"))
        if flow.get("active") and flow.get("latency_ms") is None and isinstance(started, (int, float)):
            latency = _ms(max(0.0, time.time() - started) * 1000) + "…"  # still running: time so far
        table.add_row(when, flow.get("client") or "-", _route(flow) + stream, _status(flow), _tokens(flow),
                      latency, _ms(flow.get("ttft_ms")))
    if not flows:
        table.add_row("-", "no flows yet", "", "", "", "", "")
    return table


def _resting(entry: dict[str, Any]) -> str:
    keys = [k for k in entry.get("keys") or () if isinstance(k, dict)]
    resting = [f"{k.get('name')} ({k['resting_for']:.0f}s)" for k in keys if isinstance(k.get("resting_for"), (int, float)) and k["resting_for"] > 0]
    if not keys:
        return "-"
    return ", ".join(resting) if resting else f"none of {len(keys)}"


def _inflight(entry: dict[str, Any]) -> str:
    inflight = entry.get("inflight")
    inflight = inflight if isinstance(inflight, dict) else {}
    total = sum(n for n in inflight.values() if isinstance(n, (int, float)))
    return f"{total:g}" if total else "0"


def _breakers(entry: dict[str, Any]) -> Any:
    from rich.text import Text

    breakers = entry.get("breakers")  # {"backend:model": {"state": …, "retry_in": …}}, once tried
    if not isinstance(breakers, dict) or not breakers:
        return Text("-")
    text = Text()
    for i, (target, state) in enumerate(sorted(breakers.items())):
        breaker = state.get("state") if isinstance(state, dict) else None
        if i:
            text.append(", ")
        text.append(f"{target} ")
        text.append(str(breaker or "?"), style={"closed": "green", "open": "bold red", "half_open": "yellow"}.get(str(breaker), ""))
    return text


def backends_table(backends: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="Backends", title_justify="left", expand=True)
    for column in ("backend", "type", "keys resting", "in flight", "breakers"):
        table.add_column(column, overflow="fold")
    for name, entry in sorted(backends.items()):
        entry = entry if isinstance(entry, dict) else {}
        table.add_row(name, str(entry.get("type") or "-"), _resting(entry), _inflight(entry), _breakers(entry))
    if not backends:
        table.add_row("no backends", "", "", "", "")
    return table


def render(snapshot: dict[str, Any], footer: str | None = None) -> Any:
    from rich.console import Group
    from rich.text import Text

    parts = [flows_table(snapshot["flows"]), backends_table(snapshot["backends"])]
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


# -- the command -------------------------------------------------------------------------------


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.command()
@click.option("--url", default=DEFAULT_URL, envvar="LLMPROXY_URL", show_default=True, help="The proxy's address (env LLMPROXY_URL).")
@click.option("--admin-key", envvar="LLMPROXY_ADMIN_KEY", help="The inspector's admin key (env LLMPROXY_ADMIN_KEY).")
@click.option("--interval", default=1.0, type=click.FloatRange(min=0.1), show_default=True, help="Seconds between polls.")
@click.option("--limit", default=30, type=click.IntRange(min=1, max=1000), show_default=True, help="Flows shown, newest first.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON and exit.")
def top(url: str, admin_key: str | None, interval: float, limit: int, once: bool, as_json: bool) -> None:
    """Live table of recent and active flows and of backends (from the inspector's admin API)."""
    api = AdminAPI(url, admin_key)
    try:
        snapshot = api.snapshot(limit)
    except AdminAPIError as error:
        _fail(str(error))
        return
    if as_json:
        click.echo(json.dumps(snapshot, indent=2))
        return
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if once:
        console.print(render(snapshot))
        return
    footer = f"{api.url} · every {interval:g}s · Ctrl-C to quit"
    # Ctrl-C sets a flag rather than raising KeyboardInterrupt wherever the main thread is:
    # raised while it held the display's lock, the interrupt left rich's refresh thread
    # waiting for that lock forever, and the exit waiting for that thread.
    stop = threading.Event()

    def interrupted(signum: int, frame: Any) -> None:
        stop.set()  # the poll under way ends first; a second Ctrl-C does not wait for it
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        with Live(render(snapshot, footer), console=console, refresh_per_second=4, screen=False) as live:
            while not stop.wait(interval):
                try:
                    snapshot = api.snapshot(limit)
                    live.update(render(snapshot, f"{footer} · updated {time.strftime('%H:%M:%S')}"))
                except AdminAPIError as error:
                    live.update(render(snapshot, f"{footer} · last poll failed: {error}"))
    except KeyboardInterrupt:
        pass  # the second Ctrl-C
    finally:
        signal.signal(signal.SIGINT, previous)
