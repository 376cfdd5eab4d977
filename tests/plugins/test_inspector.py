"""The ``inspector`` plugin over real sockets: llmproxy as a real server, real clients (aiohttp
and the ``openai`` SDK), and backends that answer distinguishably — two ``offline`` backends
(``alpha``, ``beta``) whose scripted replies name them, and a fake OpenAI upstream (a real
HTTP server) where the wire matters.

Covered: the admin API's guard (key, cookie login, Host header, the custom header on changes,
no CORS), the flow list in the shape other tools rely on, a flow's detail with the per-plugin
diff of an in-chat command, the live SSE stream, sessions changed through the API routing the
next request, the SQLite history (query API, retention, ``llmproxy history``), try-it, reload,
and the audit log (which never holds a key).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import llmproxy_commands
import llmproxy_inspector
import llmproxy_offline
import llmproxy_openai
import openai
import pytest
from click.testing import CliRunner

from fakes.openai_upstream import FakeOpenAI
from llmproxy.cli import main
from llmproxy.testing import RunningProxy, start_proxy
from llmproxy_inspector.history import History
from proxy_process import ProxyProcess

BOUND = 10.0
ADMIN_KEY = "adm-inspector-test-5b1d9c"
UPSTREAM_KEY = "sk-upstream-inspector-77aa1e"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHANGE = {**ADMIN, "X-LLMProxy-Admin": "1"}
CONTRACT = {"id", "started", "client", "session", "frontend", "model", "backend", "upstream_model", "attempts", "status", "error",
            "stream", "tokens_in", "tokens_out", "latency_ms", "ttft_ms", "active"}

Start = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("INSPECTOR_UPSTREAM_KEY", UPSTREAM_KEY)


def config(tmp_path: Path, fake: FakeOpenAI | None = None, **inspector: Any) -> dict[str, Any]:
    backends: dict[str, Any] = {
        "alpha": {"type": "offline", "mode": "scripted", "replies": ["answer from alpha"]},
        "beta": {"type": "offline", "mode": "scripted", "replies": ["answer from beta"]},
    }
    if fake is not None:
        backends["up"] = {"type": "openai", "base_url": fake.base_url, "api_keys": ["${INSPECTOR_UPSTREAM_KEY}"]}
    settings = {"admin_key": "${LLMPROXY_ADMIN_KEY}", "trace": "always", "capture_bodies": "always", "record": "always",
                "history_path": str(tmp_path / "history.sqlite3"), **inspector}
    return {"proxy": {"drain_timeout": 1}, "backends": backends, "default_backend": "alpha", "plugins": {"inspector": settings}}


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[RunningProxy] = []

    async def start(cfg: dict[str, Any]) -> RunningProxy:
        plugins = [("offline", llmproxy_offline), ("openai", llmproxy_openai), ("commands", llmproxy_commands), ("inspector", llmproxy_inspector)]
        proxy = await start_proxy(cfg, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()



def sdk(proxy: RunningProxy, session: str = "demo") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", default_headers={"x-session-id": session}, max_retries=0, timeout=BOUND)


async def ask(proxy: RunningProxy, text: str, session: str = "demo", model: str = "m1", stream: bool = False) -> str:
    client = sdk(proxy, session)
    if stream:
        out = []
        async for chunk in await client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                out.append(chunk.choices[0].delta.content)
        return "".join(out)
    answer = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return answer.choices[0].message.content or ""


async def get(http: aiohttp.ClientSession, proxy: RunningProxy, path: str, **kwargs: Any) -> tuple[int, Any]:
    headers = kwargs.pop("headers", ADMIN)
    async with http.get(proxy.url + path, headers=headers, **kwargs) as response:
        return response.status, await response.json()


async def post(http: aiohttp.ClientSession, proxy: RunningProxy, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.post(proxy.url + path, json=body or {}, headers=CHANGE if headers is None else headers) as response:
        return response.status, await response.json()


async def settle(proxy: RunningProxy) -> None:
    """Wait for the history thread to write what was queued."""
    await proxy.context.state["inspector"].history.flush()


# -- the guard ----------------------------------------------------------------------------------


async def test_admin_api_refuses_without_key_with_a_foreign_host_and_changes_without_the_header(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    status, body = await get(http, proxy, "/admin/api/flows", headers={})
    assert status == 401 and "admin key" in body["error"]["message"]
    status, _ = await get(http, proxy, "/admin/api/flows", headers={"Authorization": "Bearer not-the-key"})
    assert status == 401
    for headers, expected in (({}, 401), (ADMIN, 200)):  # HEAD answers as GET does, guarded the same
        async with http.head(proxy.url + "/admin/api/flows", headers=headers) as response:
            assert response.status == expected
    status, body = await get(http, proxy, "/admin/api/flows", headers={**ADMIN, "Host": "evil.example:8000"})
    assert status == 403 and "Host" in body["error"]["message"]
    # the UI page itself is refused to a rebinding page as well
    async with http.get(proxy.url + "/ui/", headers={"Host": "evil.example"}) as response:
        assert response.status == 403
    sessions = proxy.context.sessions
    sessions.get("x-session-id:demo")
    status, body = await post(http, proxy, "/admin/api/sessions/x-session-id:demo", {"backend": "beta"}, headers=ADMIN)
    assert status == 403 and "X-LLMProxy-Admin" in body["error"]["message"]
    assert "backend" not in sessions.find("x-session-id:demo").settings  # type: ignore[union-attr]
    status, body = await get(http, proxy, "/admin/api/flows")
    assert status == 200 and body == {"flows": []}
    async with http.get(proxy.url + "/admin/api/flows", headers={**ADMIN, "Origin": "http://evil.example"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    for host in ("localhost", f"localhost:{proxy.url.rsplit(':', 1)[1]}", "[::1]:9"):
        status, _ = await get(http, proxy, "/admin/api/flows", headers={**ADMIN, "Host": host})
        assert status == 200, host


async def test_the_allowed_hosts_setting_adds_names(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path, allowed_hosts=["llm.lan"]))
    assert (await get(http, proxy, "/admin/api/flows", headers={**ADMIN, "Host": "llm.lan:8000"}))[0] == 200
    assert (await get(http, proxy, "/admin/api/flows", headers={**ADMIN, "Host": "other.lan"}))[0] == 403


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_key(start: Start, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    # unsafe=True: aiohttp's jar otherwise refuses cookies from IP addresses such as 127.0.0.1
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND), cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.post(proxy.url + "/admin/api/login", json={"key": "wrong"}, headers={"X-LLMProxy-Admin": "1"}) as response:
            assert response.status == 401
        async with browser.post(proxy.url + "/admin/api/login", json={"key": ADMIN_KEY}) as response:
            assert response.status == 403  # no custom header: a cross-site form cannot log in
        async with browser.post(proxy.url + "/admin/api/login", json={"key": ADMIN_KEY}, headers={"X-LLMProxy-Admin": "1"}) as response:
            assert response.status == 200
            cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and ADMIN_KEY not in cookie
        async with browser.get(proxy.url + "/admin/api/sessions") as response:
            assert response.status == 200
        async with browser.post(proxy.url + "/admin/api/logout", headers={"X-LLMProxy-Admin": "1"}) as response:
            assert response.status == 200
        async with browser.get(proxy.url + "/admin/api/sessions") as response:
            assert response.status == 401


async def test_an_unset_admin_key_variable_stops_start_up(start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_ADMIN_KEY")
    with pytest.raises(Exception, match="LLMPROXY_ADMIN_KEY is not set"):
        await start(config(tmp_path))


async def test_without_an_admin_key_one_is_generated_and_printed_once(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A real ``llmproxy`` with every built-in (redaction masks secrets in the log, and this
    key is one): the key printed at start-up is the real one, readable, and opens the API."""
    cfg = tmp_path / "llmproxy.yaml"
    cfg.write_text(f"proxy: {{port: 0}}\nplugins:\n  inspector: {{history_path: {tmp_path / 'history.db'}}}\n")
    with ProxyProcess("--config", str(cfg), cwd=tmp_path) as proxy:
        url = await proxy.ready()
        lines = [line for line in proxy.stderr if "admin key for this run" in line]
        assert len(lines) == 1, proxy.output
        key = lines[0].split("admin key for this run: ")[1].split(" ")[0]
        assert len(key) >= 24 and "REDACTED" not in key
        async with http.get(url + "/admin/api/flows", headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200
        async with http.get(url + "/admin/api/flows", headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
    assert key not in (tmp_path / "history.db").read_bytes().decode("latin-1")
    assert not list(tmp_path.glob("**/*key*"))


# -- flows ----------------------------------------------------------------------------------------


async def test_flows_list_has_the_contract_shape_newest_first(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    assert await ask(proxy, "first") == "answer from alpha"
    assert await ask(proxy, "second", stream=True) == "answer from alpha"
    await settle(proxy)
    status, body = await get(http, proxy, "/admin/api/flows?limit=5")
    assert status == 200
    rows = body["flows"]
    assert len(rows) == 2 and set(rows[0]) >= CONTRACT
    newest, oldest = rows
    assert newest["stream"] is True and oldest["stream"] is False
    assert newest["started"] >= oldest["started"]
    for row in rows:
        assert row["frontend"] == "openai_chat" and row["model"] == "m1" and row["backend"] == "alpha"
        assert row["session"] == "x-session-id:demo" and row["status"] == 200 and row["active"] is False
        assert row["attempts"] == 1 and row["latency_ms"] > 0 and row["ttft_ms"] is not None
        assert row["tokens_in"] and row["tokens_out"]
    assert (await get(http, proxy, "/admin/api/flows?limit=1"))[1]["flows"][0]["id"] == newest["id"]
    assert [r["id"] for r in (await get(http, proxy, "/admin/api/flows?q=nothing-like-this"))[1]["flows"]] == []
    assert (await get(http, proxy, "/admin/api/flows?limit=zero"))[0] == 400


async def test_flow_detail_shows_the_commands_plugin_diff_and_the_stream_events(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    assert await ask(proxy, "!/model(beta:m2) tell me", stream=True) == "answer from beta"
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    assert row["backend"] == "beta" and row["upstream_model"] == "m2" and row["model"] == "m1"
    status, detail = await get(http, proxy, f"/admin/api/flows/{row['id']}")
    assert status == 200
    changes = {c["plugin"]: c for c in detail["plugin_changes"]}
    assert set(changes) == {"commands"}, detail["plugin_changes"]
    paths = {c["path"]: c for c in changes["commands"]["changes"]}
    assert paths["model"]["before"] == "m1" and paths["model"]["after"] == "beta:m2"
    text = [c for p, c in paths.items() if p.startswith("request.messages") and p.endswith(".text")]
    assert text and "!/model(beta:m2)" in text[0]["before"] and "!/model" not in text[0]["after"]
    events = detail["response"]["events"]  # what the client was sent, event by event, timed
    deltas = [e["data"]["choices"][0]["delta"].get("content") for e in events if isinstance(e["data"], dict) and e["data"]["choices"]]
    assert "".join(d for d in deltas if d) == "answer from beta" and len(deltas) > 3
    assert all(isinstance(e["t"], float) for e in events)
    assert detail["request"]["body"]["messages"][0]["content"] == "!/model(beta:m2) tell me"
    assert (await get(http, proxy, "/admin/api/flows/nope"))[0] == 404


async def test_upstream_attempts_are_recorded_with_the_backend_key_masked(start: Start, http: aiohttp.ClientSession, tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    proxy = await start(config(tmp_path, fake_openai))
    client = sdk(proxy)
    await client.chat.completions.create(model="up:gpt-x", messages=[{"role": "user", "content": "hello"}])
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    status, detail = await get(http, proxy, f"/admin/api/flows/{row['id']}")
    assert status == 200 and len(detail["attempts"]) == 1
    attempt = detail["attempts"][0]
    assert attempt["backend"] == "up" and attempt["status"] == 200 and attempt["request"]["body"]["model"] == "gpt-x"
    everything = json.dumps(detail) + (tmp_path / "history.sqlite3").read_bytes().decode(errors="replace")
    assert UPSTREAM_KEY not in everything and ADMIN_KEY not in everything


@pytest.mark.parametrize("front", ["openai", "anthropic"])
async def test_a_key_echoed_in_a_mid_stream_error_reaches_no_one(front: str, start: Start, http: aiohttp.ClientSession, tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    """An upstream quotes the key it was sent in the error it streams after two events: the
    client's error event (forwarded or translated), the flow list, the flow and the history
    on disk carry a mask instead."""
    proxy = await start(config(tmp_path, fake_openai))
    fake_openai.script(error_after=4, event_delay=0.05, message="quota for key {key} exceeded")
    if front == "openai":
        request = {"model": "up:gpt-x", "messages": [{"role": "user", "content": "hello"}], "stream": True}
        path = "/v1/chat/completions"
    else:
        request = {"model": "up:gpt-x", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}], "stream": True}
        path = "/v1/messages"
    async with http.post(proxy.url + path, json=request) as response:
        streamed = await response.text()
    assert UPSTREAM_KEY in fake_openai.last.sent.decode()  # the fake did echo it
    assert "quota for key" in streamed
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    assert "quota for key" in row["error"]
    detail = (await get(http, proxy, f"/admin/api/flows/{row['id']}"))[1]
    history = (await get(http, proxy, "/admin/api/history"))[1]
    if front == "anthropic":
        assert UPSTREAM_KEY not in streamed and "event: error" in streamed
    for where, what in (("row", json.dumps(row)), ("detail", json.dumps(detail)), ("history", json.dumps(history)),
                        ("on disk", (tmp_path / "history.sqlite3").read_bytes().decode(errors="replace"))):
        assert UPSTREAM_KEY not in what, where


async def test_flows_are_not_traced_unless_watched_by_default(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path, trace="watched"))
    await ask(proxy, "!/model(beta:m2) untraced")
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    assert (await get(http, proxy, f"/admin/api/flows/{row['id']}"))[1]["plugin_changes"] == []
    async with http.get(proxy.url + "/admin/api/events", headers=ADMIN) as events:
        assert (await events.content.readline()).startswith(b"event: hello")
        await ask(proxy, "!/model(beta:m3) traced")
        await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    assert [c["plugin"] for c in (await get(http, proxy, f"/admin/api/flows/{row['id']}"))[1]["plugin_changes"]] == ["commands"]


async def test_the_event_stream_sends_each_flow_as_it_starts_and_ends(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    async with http.get(proxy.url + "/admin/api/events", headers=ADMIN) as events:
        assert events.headers["Content-Type"].startswith("text/event-stream")
        assert (await events.content.readline()).startswith(b"event: hello")
        asking = asyncio.ensure_future(ask(proxy, "live please"))
        seen: list[dict[str, Any]] = []
        async def read() -> None:
            kind = None
            async for line in events.content:
                if line.startswith(b"event: "):
                    kind = line[7:].strip()
                elif line.startswith(b"data: ") and kind == b"flow":
                    seen.append(json.loads(line[6:]))
                    if not seen[-1]["active"]:
                        return
        await asyncio.wait_for(read(), BOUND)
        await asyncio.wait_for(asking, BOUND)
    assert seen[0]["active"] is True and seen[-1]["active"] is False and seen[-1]["status"] == 200
    assert seen[0]["id"] == seen[-1]["id"]


# -- sessions -------------------------------------------------------------------------------------


async def test_changing_a_sessions_backend_routes_its_next_request(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    assert await ask(proxy, "hi", session="s1") == "answer from alpha"
    status, body = await get(http, proxy, "/admin/api/sessions")
    assert status == 200 and [s["id"] for s in body["sessions"]] == ["x-session-id:s1"]
    status, body = await post(http, proxy, "/admin/api/sessions/x-session-id:s1", {"backend": "beta"})
    assert status == 200 and body["session"]["settings"]["backend"] == "beta" and "beta" in body["replies"][0]
    assert await ask(proxy, "hi again", session="s1") == "answer from beta"
    assert await ask(proxy, "other session", session="s2") == "answer from alpha"
    status, body = await post(http, proxy, "/admin/api/sessions/x-session-id:s1", {"backend": "nowhere"})
    assert status == 400 and "no backend named 'nowhere'" in body["error"]["message"]
    status, body = await post(http, proxy, "/admin/api/sessions/x-session-id:s1", {"set": {"temperature": 0.5}})
    assert status == 200 and body["session"]["settings"]["temperature"] == 0.5
    status, body = await post(http, proxy, "/admin/api/sessions/x-session-id:s1", {"colour": "red"})
    assert status == 400 and "unknown field" in body["error"]["message"]
    status, body = await post(http, proxy, "/admin/api/sessions/x-session-id:s1/clear")
    assert status == 200 and body["session"]["settings"] == {}
    assert await ask(proxy, "and back", session="s1") == "answer from alpha"
    assert (await post(http, proxy, "/admin/api/sessions/x-session-id:nobody", {"backend": "beta"}))[0] == 404
    async with http.post(proxy.url + "/admin/api/sessions/x-session-id:s1", data=b"{not json", headers=CHANGE) as response:
        assert response.status == 400 and "JSON" in (await response.json())["error"]["message"]


# -- backends, try it, reload, audit --------------------------------------------------------------


async def test_backends_is_backend_status(start: Start, http: aiohttp.ClientSession, tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    proxy = await start(config(tmp_path, fake_openai))
    status, body = await get(http, proxy, "/admin/api/backends")
    assert status == 200 and set(body["backends"]) == {"alpha", "beta", "up"}
    assert body["backends"] == json.loads(json.dumps(proxy.context.backend_status()))
    assert UPSTREAM_KEY not in json.dumps(body)


async def test_try_it_goes_through_the_pipeline_and_is_audited(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg["proxy"]["response_headers"] = True  # the routing headers come back with the answer
    proxy = await start(cfg)
    status, body = await post(http, proxy, "/admin/api/try", {"model": "beta:m9", "message": "try", "session": "tryer"})
    assert status == 200 and body["status"] == 200 and body["text"] == "answer from beta"
    assert body["headers"]["x-llmproxy-backend"] == "beta" and body["headers"]["x-llmproxy-attempts"] == "1"
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    assert row["backend"] == "beta" and row["session"] == "x-session-id:tryer"
    assert (await post(http, proxy, "/admin/api/try", {"model": "m1"}))[0] == 400
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert lines[-1]["action"] == "try" and lines[-1]["who"]["auth"] == "bearer" and lines[-1]["target"] == "beta:m9"


async def test_reload_applies_a_changed_file_and_refuses_a_broken_one(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    import yaml

    from llmproxy.config import load_config

    settings = config(tmp_path, audit_log=str(tmp_path / "audit" / "changes.jsonl"))
    settings["proxy"]["reload_check"] = 0  # only the admin call reloads here
    path = tmp_path / "llmproxy.yaml"
    path.write_text(yaml.safe_dump(settings))
    plugins = [("offline", llmproxy_offline), ("openai", llmproxy_openai), ("commands", llmproxy_commands), ("inspector", llmproxy_inspector)]
    proxy = await start_proxy(load_config(path), plugins=plugins, entry_points=False)
    try:
        assert await ask(proxy, "who?") == "answer from alpha"
        settings["default_backend"] = "beta"
        path.write_text(yaml.safe_dump(settings))
        status, body = await post(http, proxy, "/admin/api/reload")
        assert status == 200 and body["ok"] is True and body["result"]["status"] == "applied" and body["result"]["changed"] == ["default_backend"]
        assert await ask(proxy, "who now?") == "answer from beta"
        settings["default_backend"] = "gamma"
        path.write_text(yaml.safe_dump(settings))
        status, body = await post(http, proxy, "/admin/api/reload")
        assert status == 400 and body["result"]["status"] == "rejected" and "'gamma' is not one of backends" in body["result"]["problems"][0]
        assert await ask(proxy, "still?") == "answer from beta"
        assert (await post(http, proxy, "/admin/api/reload", headers=ADMIN))[0] == 403  # a change needs the header
        audit = (tmp_path / "audit" / "changes.jsonl").read_text()
        assert ADMIN_KEY not in audit and '"action":"reload"' in audit
        status, body = await get(http, proxy, "/admin/api/audit")
        assert [(e["action"], e["status"]) for e in body["entries"][:2]] == [("reload", 400), ("reload", 200)]
    finally:
        await proxy.stop()


async def test_route_explain_over_the_admin_api_and_from_the_cli(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    import asyncio
    import sys

    settings = config(tmp_path)
    settings["models"] = {"pair": {"targets": ["alpha:m1", {"target": "beta:m2", "capabilities": {"tools": False}}]}}
    proxy = await start(settings)
    tools = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}]
    request = {"model": "pair", "messages": [{"role": "user", "content": "ls"}], "tools": tools}
    status, body = await post(http, proxy, "/admin/api/route/explain", {"request": request})
    assert status == 200 and body["first"] == "alpha:m1"
    assert [(t["target"], t["eligible"]) for t in body["targets"]] == [("alpha:m1", True), ("beta:m2", False)]
    assert (await post(http, proxy, "/admin/api/route/explain", {"request": "nope"}))[0] == 400
    assert (await post(http, proxy, "/admin/api/route/explain", {"request": request}, headers={"X-LLMProxy-Admin": "1"}))[0] == 401
    file = tmp_path / "request.json"
    file.write_text(json.dumps(request))
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmproxy", "route", "explain", "--file", str(file), "--url", proxy.url, "--admin-key", ADMIN_KEY,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(cli.communicate(), BOUND)
    text = out.decode()
    assert cli.returncode == 0, err.decode()
    assert "✗ capability: does not take tools (capabilities.tools: false)" in text and "→ first try: alpha:m1" in text
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmproxy", "route", "explain", "--file", str(file), "--url", proxy.url, "--admin-key", "wrong",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(cli.communicate(), BOUND)
    assert cli.returncode == 2 and "the admin API answered 401" in err.decode() and "Traceback" not in err.decode()


# -- what a flow costs: no answer decoded just for its token counts ---------------------------------


async def test_an_undecoded_answer_is_decoded_for_its_tokens_only_when_asked(start: Start, http: aiohttp.ClientSession, tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    cfg = config(tmp_path, fake_openai, trace="watched")
    del cfg["plugins"]["inspector"]["history_path"]
    proxy = await start(cfg)
    # same protocol both sides: the answer is forwarded as the backend sent it, undecoded
    answer = await sdk(proxy).chat.completions.create(model="up:gpt-x", messages=[{"role": "user", "content": "passed through"}])
    assert answer.usage is not None
    await ask(proxy, "decoded by the offline backend")
    await settle(proxy)
    history = {row["backend"]: row for row in (await get(http, proxy, "/admin/api/history"))[1]["flows"]}
    # nobody asked and nobody watched: the forwarded answer was never decoded, so no tokens;
    # the offline backend's answer was decoded anyway, so its tokens are there
    assert history["up"]["tokens_in"] is None and history["up"]["tokens_out"] is None
    assert history["alpha"]["tokens_in"] and history["alpha"]["tokens_out"]
    live = proxy.context.state["inspector"].live
    assert live.details[history["up"]["id"]].undecoded
    # the flow list is asked for: the answers of the flows it returns are decoded now (in the
    # history thread), once, and the history keeps what was learned
    rows = {row["backend"]: row for row in (await get(http, proxy, "/admin/api/flows"))[1]["flows"]}
    assert (rows["up"]["tokens_in"], rows["up"]["tokens_out"]) == (answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert not live.details[rows["up"]["id"]].undecoded
    history = {row["backend"]: row for row in (await get(http, proxy, "/admin/api/history"))[1]["flows"]}
    assert (history["up"]["tokens_in"], history["up"]["tokens_out"]) == (rows["up"]["tokens_in"], rows["up"]["tokens_out"])


async def stream_with_usage(proxy: RunningProxy, text: str) -> Any:
    """A stream through the fake OpenAI upstream, asking for its usage; returns the usage."""
    usage = None
    stream = await sdk(proxy).chat.completions.create(model="up:gpt-x", messages=[{"role": "user", "content": text}], stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None and usage.prompt_tokens > 0
    return usage


async def test_tokens_stay_null_for_a_forwarded_answer_no_longer_in_memory(start: Start, http: aiohttp.ClientSession, tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    cfg = config(tmp_path, fake_openai, details=0)
    del cfg["plugins"]["inspector"]["history_path"]
    proxy = await start(cfg)
    await stream_with_usage(proxy, "forgotten")
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    assert row["backend"] == "up" and row["status"] == 200 and row["tokens_in"] is None and row["tokens_out"] is None
    # with the history on disk the detail record decodes every answer: tokens are always there
    proxy = await start(config(tmp_path, fake_openai, details=0))
    usage = await stream_with_usage(proxy, "remembered")
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    assert row["backend"] == "up" and (row["tokens_in"], row["tokens_out"]) == (usage.prompt_tokens, usage.completion_tokens)


async def test_a_watching_browser_gets_the_tokens_of_a_forwarded_answer(start: Start, http: aiohttp.ClientSession, tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    cfg = config(tmp_path, fake_openai)
    del cfg["plugins"]["inspector"]["history_path"]
    proxy = await start(cfg)
    async with http.get(proxy.url + "/admin/api/events", headers=ADMIN) as events:
        assert (await events.content.readline()).startswith(b"event: hello")
        asking = asyncio.ensure_future(ask(proxy, "watched", model="up:gpt-x"))

        async def tokens() -> dict[str, Any]:
            kind = None
            async for line in events.content:
                if line.startswith(b"event: "):
                    kind = line[7:].strip()
                elif line.startswith(b"data: ") and kind == b"flow":
                    summary = json.loads(line[6:])
                    if not summary["active"] and summary["tokens_in"] is not None:
                        return summary
            raise AssertionError("the event stream ended")

        summary = await asyncio.wait_for(tokens(), BOUND)  # the next history batch sends it
        await asyncio.wait_for(asking, BOUND)
    assert summary["backend"] == "up" and summary["tokens_in"] > 0 and summary["tokens_out"] > 0


# -- history ---------------------------------------------------------------------------------------


async def test_history_is_queryable_and_read_by_the_cli(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    await ask(proxy, "one")
    await ask(proxy, "two", model="beta:m2")
    await settle(proxy)
    status, body = await get(http, proxy, "/admin/api/history?backend=beta")
    assert status == 200 and [r["backend"] for r in body["flows"]] == ["beta"]
    status, body = await get(http, proxy, "/admin/api/history?q=answer%20from%20alpha")
    assert [r["backend"] for r in body["flows"]] == ["alpha"]
    assert (await get(http, proxy, "/admin/api/history?since=soon"))[0] == 400
    db = str(tmp_path / "history.sqlite3")
    result = CliRunner().invoke(main, ["history", "--db", db, "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["backend"] for r in rows] == ["beta", "alpha"]
    table = CliRunner().invoke(main, ["history", "--db", db, "--backend", "alpha"])
    assert table.exit_code == 0 and "alpha:m1" in table.output and "beta" not in table.output
    # the CLI blocks on urllib: it must not run on this test's loop (which serves the proxy)
    result = await asyncio.to_thread(CliRunner().invoke, main, ["history", "--url", proxy.url, "--limit", "1", "--json"], env={"LLMPROXY_ADMIN_KEY": ADMIN_KEY})
    assert result.exit_code == 0 and json.loads(result.output)["backend"] == "beta"
    bad = await asyncio.to_thread(CliRunner().invoke, main, ["history", "--url", proxy.url], env={"LLMPROXY_ADMIN_KEY": "wrong"})
    assert bad.exit_code == 1 and "401" in bad.output
    assert CliRunner().invoke(main, ["history"]).exit_code == 2


class Item:
    """A history item that is already built (see llmproxy_inspector.history.HistoryItem)."""

    def __init__(self, summary: dict[str, Any], record: dict[str, Any] | None = None) -> None:
        self.summary, self.record, self.told = summary, record, False

    def build(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.summary, self.record

    def written(self, summary: dict[str, Any]) -> None:
        self.told = True


def test_history_retention_by_age_and_size(tmp_path: Path) -> None:
    async def run() -> None:
        history = History(str(tmp_path / "h.sqlite3"), max_age=3600, max_bytes=5000)
        await history.open()
        now = time.time()
        items = []
        for i in range(10):
            summary = {"id": f"f{i}", "started": now - 7200 if i == 0 else now - 100 + i, "backend": "b"}
            items.append(Item(summary, {"blob": "x" * 1000}))
            history.add(items[-1])
        await history.flush()  # one batch; retention runs after the first write
        assert all(item.told for item in items)
        ids = [r["id"] for r in await history.query({}, limit=100)]
        assert "f0" not in ids and ids[0] == "f9" and len(ids) <= 4
        for i in range(10, 16):  # within the 30 s since: kept until retention runs again
            history.add(Item({"id": f"f{i}", "started": now - 50 + i, "backend": "b"}, {"blob": "x" * 1000}))
        removed = await history.run_retention()
        ids = [r["id"] for r in await history.query({}, limit=100)]
        await history.close()
        assert removed >= 5 and ids[0] == "f15" and len(ids) <= 4
    asyncio.run(run())


async def _rows_on_disk(path: Path, count: int) -> list[str]:
    """Poll the file from another connection (a query would send the queue first) until it
    holds ``count`` rows."""
    deadline = time.monotonic() + BOUND
    while True:
        with sqlite3.connect(path) as db:
            ids = [row[0] for row in db.execute("SELECT id FROM flows ORDER BY started")]
        if len(ids) >= count or time.monotonic() > deadline:
            return ids
        await asyncio.sleep(0.05)


async def test_history_writes_in_batches_by_time_and_by_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from llmproxy_inspector import history as module

    history = History(str(tmp_path / "h.sqlite3"), max_age=0, max_bytes=0)
    await history.open()
    now = time.time()
    # by time: nobody flushes, the batch goes within BATCH_SECONDS; an item that fails to
    # build is logged and does not lose the others
    broken = Item({})
    broken.build = lambda: 1 / 0  # type: ignore[method-assign,assignment,return-value]
    items = [Item({"id": "a", "started": now}), broken, Item({"id": "b", "started": now + 1})]
    for item in items:
        history.add(item)
    assert await _rows_on_disk(tmp_path / "h.sqlite3", 2) == ["a", "b"]
    await history.flush()
    assert items[0].told and items[2].told and not broken.told
    assert "could not be written to the history" in caplog.text
    # by size: with the timer out of the way, BATCH_ROWS items go at once
    monkeypatch.setattr(module, "BATCH_SECONDS", 3600.0)
    for i in range(module.BATCH_ROWS):
        history.add(Item({"id": f"n{i:04d}", "started": now + 2 + i}))
    assert len(await _rows_on_disk(tmp_path / "h.sqlite3", 2 + module.BATCH_ROWS)) == 2 + module.BATCH_ROWS
    history.add(Item({"id": "last", "started": now + 9999}))  # one short of a batch: waits…
    assert [row["id"] for row in await history.query({}, limit=1)] == ["last"]  # …but a query sends it first
    await history.close()


async def test_an_in_memory_history_works_without_a_file(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    del cfg["plugins"]["inspector"]["history_path"]
    proxy = await start(cfg)
    await ask(proxy, "remember me")
    await settle(proxy)
    status, body = await get(http, proxy, "/admin/api/history")
    assert status == 200 and len(body["flows"]) == 1
    assert not list(tmp_path.iterdir())


async def test_the_ui_is_served_with_a_strict_content_security_policy(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start(config(tmp_path))
    async with http.get(proxy.url + "/ui/") as response:
        assert response.status == 200 and "<title>llmproxy inspector</title>" in await response.text()
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
    async with http.get(proxy.url + "/ui/app.js") as response:
        assert response.status == 200 and "EventSource" in await response.text()
    async with http.get(proxy.url + "/ui/../pyproject.toml") as response:
        assert response.status == 404
    async with http.get(proxy.url + "/ui", allow_redirects=False) as response:
        assert response.status == 302 and response.headers["Location"] == "/ui/"


def test_a_plugin_left_unconfigured_is_on_with_defaults() -> None:
    from llmproxy_inspector.settings import InspectorSettings

    settings = InspectorSettings()
    assert settings.admin_key is None and settings.trace == "watched" and settings.allow_remote is False
    with pytest.raises(ValueError, match="references"):
        InspectorSettings(admin_key="literal-key-in-file")


async def test_details_come_from_memory_or_from_the_history_on_disk(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    # details: 0 keeps no flow in memory: the detail is the record the history stored
    proxy = await start(config(tmp_path, details=0))
    await ask(proxy, "!/model(beta:m2) on disk")
    await settle(proxy)
    row = (await get(http, proxy, "/admin/api/flows"))[1]["flows"][0]
    detail = (await get(http, proxy, f"/admin/api/flows/{row['id']}"))[1]
    assert [c["plugin"] for c in detail["plugin_changes"]] == ["commands"] and detail["request"]["body"]["messages"]
    # no history file: nothing is built for a flow until it is asked for, and once it has
    # left memory only its summary remains
    cfg = config(tmp_path / "mem", details=1)
    del cfg["plugins"]["inspector"]["history_path"]
    proxy = await start(cfg)
    await ask(proxy, "first")
    await ask(proxy, "second")
    await settle(proxy)
    newest, oldest = (await get(http, proxy, "/admin/api/flows"))[1]["flows"]
    assert (await get(http, proxy, f"/admin/api/flows/{newest['id']}"))[1]["request"]["body"]["messages"][0]["content"] == "second"
    old = (await get(http, proxy, f"/admin/api/flows/{oldest['id']}"))[1]
    assert old["summary"]["id"] == oldest["id"] and "request" not in old


async def test_by_default_flows_are_recorded_from_the_first_use_of_the_admin_api(start: Start, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    settings = config(tmp_path)
    settings["plugins"]["inspector"] = {"admin_key": "${LLMPROXY_ADMIN_KEY}"}  # the defaults: record: opened, no history file
    proxy = await start(settings)
    assert await ask(proxy, "unseen") == "answer from alpha"
    assert proxy.context.state["inspector"].recording is False
    status, body = await get(http, proxy, "/admin/api/flows", headers={})  # no key: refused, and still not recording
    assert status == 401 and proxy.context.state["inspector"].recording is False
    status, body = await get(http, proxy, "/admin/api/flows")
    assert status == 200 and body["flows"] == []  # the flow before was not recorded
    assert await ask(proxy, "seen") == "answer from alpha"
    status, body = await get(http, proxy, "/admin/api/flows")
    assert [f["status"] for f in body["flows"]] == [200]
