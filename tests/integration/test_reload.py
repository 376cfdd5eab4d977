"""Hot reload over real sockets: a changed config file, SIGHUP, and ``ProxyContext.reload()``.

Which backend served a request is read from what the fake upstreams received. The file
watcher and SIGHUP are exercised for real: the first on a proxy started from a file in this
process, the second on an ``llmproxy`` process.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import llmproxy_openai
import pytest
import yaml
from fakes.openai_upstream import FakeOpenAI
from proxy_process import ProxyProcess, clean_env, write_config
from pydantic import BaseModel

from llmproxy import hookimpl
from llmproxy.config import load_config
from llmproxy.testing import RunningProxy, start_proxy

BOUND = 10.0
HI = [{"role": "user", "content": "say hi"}]


def config_for(default: str, fakes: dict[str, FakeOpenAI], **proxy: Any) -> dict[str, Any]:
    return {
        "proxy": {"drain_timeout": 0, "reload_check": 0.1, **proxy},
        "backends": {name: {"type": "openai", "base_url": fake.base_url} for name, fake in fakes.items()},
        "default_backend": default,
    }


def write(path: Path, config: dict[str, Any]) -> None:
    # a new file, renamed over the old one: what editors do, and never a half-written file
    temp = path.with_suffix(".tmp")
    temp.write_text(yaml.safe_dump(config))
    temp.replace(path)


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeOpenAI]]:
    a, b = FakeOpenAI(), FakeOpenAI()
    await a.start()
    await b.start()
    yield {"a": a, "b": b}
    await a.close()
    await b.close()



async def ask(http: aiohttp.ClientSession, url: str, stream: bool = False) -> tuple[int, str]:
    async with http.post(url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "stream": stream}) as response:
        return response.status, await response.text()


async def until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def started_from(path: Path, plugins: list[tuple[str, Any]] | None = None) -> RunningProxy:
    return await start_proxy(load_config(path), plugins=[("openai", llmproxy_openai), *(plugins or [])], entry_points=False)


async def test_a_changed_file_is_applied_without_a_restart(tmp_path: Path, fakes: dict[str, FakeOpenAI], http: aiohttp.ClientSession) -> None:
    path = tmp_path / "llmproxy.yaml"
    write(path, config_for("a", fakes))
    proxy = await started_from(path)
    try:
        assert (await ask(http, proxy.url))[0] == 200 and len(fakes["a"].requests) == 1
        write(path, config_for("b", fakes))
        await until(lambda: proxy.context.reloads == 1, "the reload")
        assert (await ask(http, proxy.url))[0] == 200
        assert len(fakes["b"].requests) == 1 and len(fakes["a"].requests) == 1
        # an unchanged backend keeps its provider (connection pool, key rest times)
        assert proxy.context.providers["a"].session is not None
    finally:
        await proxy.stop()


async def test_an_invalid_file_is_rejected_and_the_old_config_stays(tmp_path: Path, fakes: dict[str, FakeOpenAI], http: aiohttp.ClientSession) -> None:
    path = tmp_path / "llmproxy.yaml"
    write(path, config_for("a", fakes))
    proxy = await started_from(path)
    try:
        broken = config_for("a", fakes)
        broken["models"] = {"m": {"targets": ["nowhere:gpt-4o"]}}
        write(path, broken)
        report = await proxy.context.reload()
        assert report["status"] == "rejected"
        assert any("no backend named 'nowhere'" in problem for problem in report["problems"])
        path.write_text("backends: [this is: not, valid")
        report = await proxy.context.reload()
        assert report["status"] == "rejected" and "invalid YAML" in report["problems"][0]
        for empty in ("", "# being written\n", "\n\n"):  # an editor's truncate-then-write, a stray '>'
            path.write_text(empty)
            report = await proxy.context.reload()
            assert report["status"] == "rejected" and "the file is empty" in report["problems"][0]
        assert proxy.context.reloads == 0 and proxy.context.config.default_backend == "a"
        assert (await ask(http, proxy.url))[0] == 200 and len(fakes["a"].requests) == 1
    finally:
        await proxy.stop()


async def test_what_needs_a_restart_is_rejected_by_name(tmp_path: Path, fakes: dict[str, FakeOpenAI]) -> None:
    path = tmp_path / "llmproxy.yaml"
    write(path, config_for("a", fakes))
    proxy = await started_from(path)
    try:
        moved = config_for("b", fakes, port=1234)
        write(path, moved)
        report = await proxy.context.reload()
        assert report["status"] == "rejected" and report["problems"][0].startswith("proxy.port: changed from 8000 to 1234")
        assert proxy.context.config.default_backend == "a"
    finally:
        await proxy.stop()


async def test_a_stream_running_across_a_reload_is_not_dropped(tmp_path: Path, fakes: dict[str, FakeOpenAI], http: aiohttp.ClientSession) -> None:
    path = tmp_path / "llmproxy.yaml"
    write(path, config_for("a", fakes, reload_check=0))
    proxy = await started_from(path)
    try:
        fakes["a"].script(event_delay=0.1)
        running = asyncio.ensure_future(ask(http, proxy.url, stream=True))
        await until(lambda: fakes["a"].requests, "the stream to start")
        old = proxy.context.providers["a"]
        # backend a itself changes: it gets a new provider; the stream keeps the old one
        changed = config_for("a", fakes, reload_check=0)
        changed["backends"]["a"]["headers"] = {"x-reloaded": "yes"}
        write(path, changed)
        assert (await proxy.context.reload())["status"] == "applied"
        assert proxy.context.providers["a"] is not old and old.session is not None
        status, text = await running
        assert status == 200 and text.rstrip().endswith("data: [DONE]")
        await until(lambda: old.session is None, "the replaced provider to close once its stream ended")
        fakes["a"].script()
        assert (await ask(http, proxy.url))[0] == 200
        assert fakes["a"].last.headers.get("x-reloaded") == "yes"
    finally:
        await proxy.stop()


class Greeting(BaseModel):
    word: str = "hello"


class Greeter:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def plugin_settings(self) -> type[BaseModel]:
        return Greeting

    @hookimpl
    def configure(self, settings: Greeting) -> None:
        if settings.word == "forbidden":
            raise ValueError("that word is not allowed")
        self.seen.append(settings.word)


async def test_plugins_get_their_new_settings_and_may_refuse_them(tmp_path: Path, fakes: dict[str, FakeOpenAI]) -> None:
    path = tmp_path / "llmproxy.yaml"
    config = config_for("a", fakes, reload_check=0)
    write(path, config)
    plugin = Greeter()
    proxy = await started_from(path, [("greeter", plugin)])
    try:
        config["plugins"] = {"greeter": {"word": "bonjour"}}
        write(path, config)
        assert (await proxy.context.reload())["status"] == "applied"
        assert plugin.seen == ["hello", "bonjour"] and proxy.context.settings("greeter").word == "bonjour"
        config["plugins"] = {"greeter": {"word": "forbidden"}}
        config["default_backend"] = "b"
        write(path, config)
        report = await proxy.context.reload()
        assert report["status"] == "rejected" and "plugins.greeter: that word is not allowed" in report["problems"][0]
        # everything stays as it was, the plugin's settings included
        assert proxy.context.settings("greeter").word == "bonjour" and proxy.context.config.default_backend == "a"
        assert plugin.seen[-1] == "bonjour"
    finally:
        await proxy.stop()


async def test_sighup_reloads_a_running_llmproxy(tmp_path: Path, fakes: dict[str, FakeOpenAI], http: aiohttp.ClientSession) -> None:
    config = config_for("a", fakes, reload_check=0, port=0)
    path = write_config(tmp_path, yaml.safe_dump(config))
    with ProxyProcess("--config", str(path), env=clean_env()) as process:
        url = await process.ready()
        assert (await ask(http, url))[0] == 200 and len(fakes["a"].requests) == 1
        path.write_text(yaml.safe_dump(config_for("b", fakes, reload_check=0, port=0)))
        process.signal(signal.SIGHUP)
        await until(lambda: "config reloaded" in process.output, "the reload to be logged")
        assert (await ask(http, url))[0] == 200 and len(fakes["b"].requests) == 1
