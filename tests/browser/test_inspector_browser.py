"""The inspector in a real headless Chromium (playwright driving Debian's /usr/bin/chromium; no
``playwright install``), against a real llmproxy on a real socket, with requests made by the
official ``openai`` SDK. Run with ``tox -e browser`` or ``pytest tests/browser``; the plain
test run leaves this folder out (pyproject's norecursedirs), so it does not need playwright.

What a person would do, checked by what they would see:
- log in with the admin key; a request made with the SDK appears in the list live (SSE);
- its detail shows the ``commands`` plugin's diff of the in-chat command ``!/model(beta:m2)``
  and replays the stream;
- switching a session's backend in the page changes where that session's next request goes
  (two offline backends whose answers name them);
- the admin API refuses the browser without the key, a page reached under a foreign host name
  (DNS rebinding, with Chromium's resolver mapping the name to 127.0.0.1), and a change
  without the custom header.

With ``LLMPROXY_SCREENSHOTS=docs/images`` the screenshots are also written there (the ones
docs/inspector.md shows were made that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import llmproxy_commands
import llmproxy_inspector
import llmproxy_offline
import llmproxy_openai
import openai
import pytest

from llmproxy.testing import RunningProxy, start_proxy

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = os.environ.get("LLMPROXY_CHROMIUM", "/usr/bin/chromium")
ADMIN_KEY = "adm-browser-test-0c9e4d"
TIMEOUT_MS = 10_000
REBOUND = "rebound.example"  # a name an attacker re-points at 127.0.0.1

if not Path(CHROMIUM).exists():
    if os.environ.get("LLMPROXY_BROWSER_REQUIRE"):
        raise RuntimeError(f"Chromium is not at {CHROMIUM} (apt-get install chromium, or set LLMPROXY_CHROMIUM)")
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)


@pytest.fixture
async def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_openai: Any) -> AsyncIterator[RunningProxy]:
    monkeypatch.setenv("LLMPROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("BROWSER_UPSTREAM_KEY", "sk-browser-upstream-1")
    fake_openai.script(status=503, message="down for maintenance")  # "broken": its breaker opens at the first failure
    config = {
        "proxy": {"drain_timeout": 1},
        "backends": {
            "alpha": {"type": "offline", "mode": "scripted", "replies": ["answer from alpha"], "stream_delay": 0.01},
            "beta": {"type": "offline", "mode": "scripted", "replies": ["answer from beta"], "stream_delay": 0.01},
            "broken": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${BROWSER_UPSTREAM_KEY}"],
                       "breaker": {"failures": 1, "cooldown_5xx": 300}, "rpm": 600},
        },
        "default_backend": "alpha",
        "models": {"coding": {"targets": ["alpha:m1", "beta:m1"]}, "flaky": {"targets": ["broken:gpt-4o-mini", "beta:m1"]}},
        # trace: the default, "watched" — the open page is what turns tracing on
        "plugins": {"inspector": {"admin_key": "${LLMPROXY_ADMIN_KEY}", "history_path": str(tmp_path / "history.sqlite3")}},
    }
    plugins = [("offline", llmproxy_offline), ("openai", llmproxy_openai), ("commands", llmproxy_commands), ("inspector", llmproxy_inspector)]
    running = await start_proxy(config, plugins=plugins, entry_points=False)
    yield running
    await running.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=[f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"])
        yield chromium
        await chromium.close()


@pytest.fixture
def shots(tmp_path: Path) -> Any:
    """``shot(page, name)``: a screenshot in tmp (and in $LLMPROXY_SCREENSHOTS when set)."""
    target = os.environ.get("LLMPROXY_SCREENSHOTS")

    async def shot(page: Any, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        await page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000  # a rendered page, not a blank one
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)
        return path

    return shot


def sdk(proxy: RunningProxy, session: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", default_headers={"x-session-id": session}, max_retries=0, timeout=10)


async def ask(proxy: RunningProxy, session: str, text: str, stream: bool = True) -> str:
    client = sdk(proxy, session)
    if not stream:
        answer = await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": text}])
        return answer.choices[0].message.content or ""
    out = []
    async for chunk in await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": text}], stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            out.append(chunk.choices[0].delta.content)
    return "".join(out)


async def logged_in(browser: Any, proxy: RunningProxy) -> Any:
    page = await browser.new_page(viewport={"width": 1500, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(proxy.url + "/ui/")
    await page.fill("#login-key", ADMIN_KEY)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("#live.on")  # the SSE stream is open
    return page


async def test_a_request_appears_live_with_its_plugin_diff_and_a_session_switch_reroutes(browser: Any, proxy: RunningProxy, shots: Any) -> None:
    page = await logged_in(browser, proxy)
    expect = playwright_api.expect

    # 1. a request made with the SDK appears in the open page, without reloading it
    assert await ask(proxy, "demo", "!/model(beta:m2) write a haiku") == "answer from beta"
    row = page.locator("[data-testid=flow-row]", has_text="beta:m2")
    await expect(row).to_have_count(1)
    await expect(row.locator("td.status")).to_have_text("200")
    await ask(proxy, "other", "hello there", stream=False)
    await expect(page.locator("[data-testid=flow-row]")).to_have_count(2)

    # 2. its detail: the commands plugin's diff, and the stream replayed event by event
    await row.click()
    change = page.locator("[data-testid=plugin-change]", has_text="commands")
    await expect(change).to_have_count(1)
    await expect(change.locator("td.before", has_text="!/model(beta:m2)").first).to_be_visible()
    await expect(change.locator("tr", has_text="model").locator("td.after", has_text="beta:m2").first).to_be_visible()
    await shots(page, "inspector-flows")
    await page.click("[data-testid=replay]")
    await expect(page.locator("[data-testid=replay-text]")).to_have_text("answer from beta")

    # 3. sessions: switch "other" to beta in the page; its next request goes there
    await page.click("#tabs button[data-tab=sessions]")
    other = page.locator("[data-testid=session-row][data-session='x-session-id:other']")
    await other.locator("[data-testid=session-backend]").select_option("beta")
    await other.locator("[data-testid=session-apply]").click()
    await expect(page.locator("[data-testid=session-row][data-session='x-session-id:other'] [data-testid=session-settings]")).to_contain_text('backend="beta"')
    await shots(page, "inspector-sessions")
    assert await ask(proxy, "other", "and now?", stream=False) == "answer from beta"
    assert await ask(proxy, "third", "and me?", stream=False) == "answer from alpha"
    await page.click("#tabs button[data-tab=flows]")
    await expect(page.locator("[data-testid=flow-row]")).to_have_count(4)
    await expect(page.locator("[data-testid=flow-row]").first.locator("[data-testid=flow-backend]")).to_have_text("alpha:m1")

    # 4. backends, rendered from backend_status() whatever its keys: a failed-over request has
    # opened "broken"'s breaker, which the page shows with its rate window and key
    answer = await sdk(proxy, "third").chat.completions.create(model="flaky", messages=[{"role": "user", "content": "anyone?"}])
    assert answer.choices[0].message.content == "answer from beta"
    await page.click("#tabs button[data-tab=backends]")
    await expect(page.locator("[data-testid=backend-card]")).to_have_count(3)
    broken = page.locator("[data-testid=backend-card]").filter(has_text="broken")
    await expect(broken).to_contain_text("open")
    await expect(broken).to_contain_text("broken#0")
    await expect(broken).to_contain_text("600")  # the rpm limit
    assert "sk-browser-upstream-1" not in await page.content()
    await shots(page, "inspector-backends")

    # 5. try it: through the proxy's own pipeline
    await page.click("#tabs button[data-tab=try]")
    await page.fill("#try-model", "beta:m7")
    await page.fill("#try-message", "from the page")
    await page.click("#try-form button[type=submit]")
    await expect(page.locator("#try-result")).to_contain_text("answer from beta")
    await expect(page.locator("#try-result")).to_contain_text("HTTP 200")

    # 6. every change was audited, in the page too
    await page.click("#tabs button[data-tab=audit]")
    await expect(page.locator("#audit-table tbody tr")).to_have_count(3)  # login, session change, try
    await expect(page.locator("#audit-table tbody")).not_to_contain_text(ADMIN_KEY)


async def test_the_admin_api_refuses_no_key_a_rebound_host_and_changes_without_the_header(browser: Any, proxy: RunningProxy) -> None:
    port = proxy.url.rsplit(":", 1)[1]
    # no key: a fresh browser (no cookie) is refused data, and the page asks for the key
    fresh = await browser.new_page()
    fresh.set_default_timeout(TIMEOUT_MS)
    await fresh.goto(proxy.url + "/ui/")
    await playwright_api.expect(fresh.locator("#login")).to_be_visible()
    status = await fresh.evaluate("fetch('/admin/api/flows').then(r => r.status)")
    assert status == 401

    # DNS rebinding: the same server reached as rebound.example:port is refused, page and API
    rebound = await browser.new_page()
    response = await rebound.goto(f"http://{REBOUND}:{port}/ui/")
    assert response is not None and response.status == 403
    status = await rebound.evaluate("fetch('/admin/api/flows', {headers: {Authorization: 'Bearer " + ADMIN_KEY + "'}}).then(r => r.status)")
    assert status == 403

    # logged in, a change without the custom header is refused; with it, it is done
    page = await logged_in(browser, proxy)
    await ask(proxy, "victim", "hi", stream=False)
    session = "x-session-id:victim"
    without = await page.evaluate(f"fetch('/admin/api/sessions/{session}', {{method: 'POST', body: JSON.stringify({{backend: 'beta'}})}}).then(r => r.status)")
    assert without == 403
    assert "backend" not in proxy.context.sessions.find(session).settings  # type: ignore[union-attr]
    with_header = await page.evaluate(
        f"fetch('/admin/api/sessions/{session}', {{method: 'POST', headers: {{'X-LLMProxy-Admin': '1'}}, body: JSON.stringify({{backend: 'beta'}})}}).then(r => r.status)"
    )
    assert with_header == 200
    assert proxy.context.sessions.find(session).settings["backend"] == "beta"  # type: ignore[union-attr]
    # the page's script cannot read the session cookie (HttpOnly)
    assert "llmproxy_admin" not in await page.evaluate("document.cookie")
