"""``llmproxy top``, run as a real process against a real aiohttp server that serves the admin
API's two endpoints exactly as the shared contract gives them (``GET /admin/api/flows?limit=N``
and ``GET /admin/api/backends``, ``Authorization: Bearer <admin key>``).

The last test runs ``top`` against a real llmproxy with the inspector plugin serving them.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from typing import AsyncIterator

import pytest
from aiohttp import web

from llmproxy.testing import free_port, start_app
from proxy_process import clean_env

ADMIN_KEY = "admin-key-top-3c4d"
NOW = time.time()
FLOWS = [
    {"id": "9-aa01", "started": NOW - 1, "client": "laptop", "session": "s1", "frontend": "anthropic", "model": "coding",
     "backend": "anthropic", "upstream_model": "claude-sonnet-4-5", "attempts": 1, "status": None, "error": None, "stream": True,
     "tokens_in": None, "tokens_out": None, "latency_ms": None, "ttft_ms": 412.0, "active": True},
    {"id": "8-aa00", "started": NOW - 5, "client": "ci-runner", "session": None, "frontend": "openai_chat", "model": "duo",
     "backend": "good", "upstream_model": "gpt-4o-mini", "attempts": 2, "status": 200, "error": None, "stream": False,
     "tokens_in": 1234, "tokens_out": 56, "latency_ms": 20500.0, "ttft_ms": 20500.0, "active": False},
    {"id": "7-a9ff", "started": NOW - 9, "client": None, "session": None, "frontend": "openai_chat", "model": "forbidden",
     "backend": None, "upstream_model": None, "attempts": 0, "status": 403, "error": "this model is not for you", "stream": False,
     "tokens_in": None, "tokens_out": None, "latency_ms": 1.5, "ttft_ms": None, "active": False},
]
BACKENDS = {
    "good": {"type": "openai", "protocol": "openai_chat", "models": [], "base_url": "http://127.0.0.1:1/v1",
             "keys": [{"name": "good#0", "resting_for": 0.0}, {"name": "good#1", "resting_for": 27.2}],
             "inflight": {"good:gpt-4o-mini": 3}, "breakers": {"good:gpt-4o-mini": {"state": "half_open", "failures": 1, "retry_in": 0.0}}},
    "anthropic": {"type": "anthropic", "keys": [{"name": "anthropic#0", "resting_for": 0.0}], "inflight": {},
                  "breakers": {"anthropic:claude-sonnet-4-5": {"state": "open", "failures": 5, "retry_in": 12.5}}},
    "offline": {"type": "offline", "inflight": {}},  # no keys, no breakers: the status as it is today
}


class AdminAPI:
    """The contract's two endpoints, and what was asked of them."""

    def __init__(self) -> None:
        self.polls: list[tuple[str, str | None]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/admin/api/flows", self.flows)
        app.router.add_get("/admin/api/backends", self.backends)
        return app

    def _check(self, request: web.Request) -> None:
        self.polls.append((request.path_qs, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bearer {ADMIN_KEY}":
            raise web.HTTPUnauthorized(text=json.dumps({"error": {"message": "admin key required"}}), content_type="application/json")

    async def flows(self, request: web.Request) -> web.Response:
        self._check(request)
        limit = int(request.query.get("limit", "50"))
        return web.json_response({"flows": FLOWS[:limit]})

    async def backends(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response({"backends": BACKENDS})


@pytest.fixture
async def admin() -> AsyncIterator[tuple[str, AdminAPI]]:
    api = AdminAPI()
    url, runner = await start_app(api.app())
    yield url, api
    await runner.cleanup()


async def top(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """``llmproxy top ARGS`` as a process (asynchronously: this loop serves the admin API)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmproxy", "top", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(COLUMNS="220", **(env or {})),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("│")[1:-1]]


async def test_once_prints_flows_and_backends(admin: tuple[str, AdminAPI]) -> None:
    url, api = admin
    code, out, err = await top("--once", "--url", url, "--admin-key", ADMIN_KEY)
    assert code == 0, err
    assert api.polls == [("/admin/api/flows?limit=30", f"Bearer {ADMIN_KEY}"), ("/admin/api/backends", f"Bearer {ADMIN_KEY}")]
    lines = out.splitlines()

    def row(*needles: str) -> str:
        found = [line for line in lines if all(n in line for n in needles)]
        assert len(found) == 1, (needles, out)
        return found[0]

    active = row("laptop")
    assert "coding → anthropic:claude-sonnet-4-5" in active and "active" in active and "412ms" in active
    assert re.search(r"\b\d+(\.\d)?(ms|s)… ", active), active  # time so far, for a flow still running
    done = row("ci-runner")
    assert "duo → good:gpt-4o-mini (2 tries)" in done
    assert " 200 " in done and "1234/56" in done and "20.5s" in done
    refused = row("forbidden")
    assert "403 this model is not for you" in refused and "1.5ms" in refused
    # backend, type, keys resting, in flight, breakers
    assert cells(row("good", "openai")) == ["good", "openai", "good#1 (27s)", "3", "good:gpt-4o-mini half_open"]
    assert cells(row("anthropic", "none of 1")) == ["anthropic", "anthropic", "none of 1", "0", "anthropic:claude-sonnet-4-5 open"]
    assert cells(row("offline")) == ["offline", "offline", "-", "0", "-"]
    # newest first, as the API gave them
    assert out.index("laptop") < out.index("ci-runner") < out.index("forbidden")


async def test_json_is_the_two_answers(admin: tuple[str, AdminAPI]) -> None:
    url, _ = admin
    code, out, err = await top("--json", "--limit", "2", "--url", url, env={"LLMPROXY_ADMIN_KEY": ADMIN_KEY})
    assert code == 0, err
    assert json.loads(out) == {"flows": FLOWS[:2], "backends": BACKENDS}


async def test_a_wrong_admin_key_is_one_line_and_exit_1(admin: tuple[str, AdminAPI]) -> None:
    url, _ = admin
    code, out, err = await top("--once", "--url", url, "--admin-key", "wrong")
    assert code == 1 and out == ""
    assert err == f"error: the admin API at {url} refused the admin key (HTTP 401): check --admin-key or LLMPROXY_ADMIN_KEY\n"
    code, _, err = await top("--once", "--url", url)
    assert code == 1 and "pass --admin-key or set LLMPROXY_ADMIN_KEY" in err and err.count("\n") == 1


async def test_an_unreachable_proxy_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await top("--once", "--url", url, "--admin-key", ADMIN_KEY)
    assert code == 1 and out == ""
    assert err.startswith(f"error: cannot reach llmproxy at {url}: ") and err.count("\n") == 1
    assert "Traceback" not in err


async def test_no_admin_api_there() -> None:
    async def other(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/admin/api/other", other)
    url, runner = await start_app(app)
    try:
        code, _, err = await top("--once", "--url", url, "--admin-key", ADMIN_KEY)
    finally:
        await runner.cleanup()
    assert code == 1
    assert err == f"error: no admin API at {url} (HTTP 404 for /admin/api/flows?limit=30): is the inspector plugin enabled?\n"


async def test_an_answer_off_contract_is_refused() -> None:
    async def flows(request: web.Request) -> web.Response:
        return web.json_response({"items": []})  # not {"flows": [...]}

    app = web.Application()
    app.router.add_get("/admin/api/flows", flows)
    url, runner = await start_app(app)
    try:
        code, _, err = await top("--once", "--url", url)
    finally:
        await runner.cleanup()
    assert code == 1 and 'did not answer {"flows": [...]}' in err and err.count("\n") == 1


async def test_live_view_polls_until_interrupted(admin: tuple[str, AdminAPI]) -> None:
    url, api = admin
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmproxy", "top", "--url", url, "--admin-key", ADMIN_KEY, "--interval", "0.2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(COLUMNS="200"),
    )
    try:
        deadline = time.monotonic() + 20
        while len(api.polls) < 6 and time.monotonic() < deadline:  # three polls of two requests
            await asyncio.sleep(0.05)
        assert len(api.polls) >= 6
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert b"ci-runner" in out


async def test_top_against_a_real_llmproxy_with_the_inspector(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmproxy_inspector
    import llmproxy_offline

    from llmproxy.testing import start_proxy

    config = {
        "proxy": {"drain_timeout": 0},
        "backends": {"offline": {"type": "offline"}},
        "default_backend": "offline",
        "plugins": {"inspector": {"admin_key": "${TOP_ADMIN_KEY}"}},  # record: opened — top's first call turns it on
    }
    monkeypatch.setenv("TOP_ADMIN_KEY", ADMIN_KEY)
    proxy = await start_proxy(config, plugins=[("offline", llmproxy_offline), ("inspector", llmproxy_inspector)], entry_points=False)
    try:
        import aiohttp

        code, out, err = await top("--json", "--url", proxy.url, "--admin-key", ADMIN_KEY)
        assert code == 0 and json.loads(out)["flows"] == [], err  # nothing recorded before the admin API was used
        async with aiohttp.ClientSession() as http:
            for text in ("first", "second"):
                body = {"model": "any", "messages": [{"role": "user", "content": text}]}
                async with http.post(proxy.url + "/v1/chat/completions", json=body) as response:
                    assert response.status == 200
        code, out, err = await top("--json", "--url", proxy.url, "--admin-key", ADMIN_KEY)
        assert code == 0, err
        data = json.loads(out)
        assert [f["status"] for f in data["flows"][:2]] == [200, 200]
        assert data["flows"][0]["backend"] == "offline" and "offline" in data["backends"]
        code, out, err = await top("--once", "--url", proxy.url, "--admin-key", ADMIN_KEY)
        assert code == 0 and "offline" in out, err
        code, _, err = await top("--once", "--url", proxy.url, "--admin-key", "wrong")
        assert code == 1 and len(err.strip().splitlines()) == 1
    finally:
        await proxy.stop()
