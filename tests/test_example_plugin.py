"""The third-party example, examples/llmproxy-shout, installed like any other package.

It is pip-installed into this test interpreter's environment (no network: no build
isolation, no dependencies), then llmproxy — unchanged — must list it and run it: a real
llmproxy process between the official ``openai`` SDK and a fake OpenAI upstream, with the
plugin adding a header upstream and rewriting a word in streamed and non-streamed answers.

The install stays after the tests (reinstalling only when the example changed). Installed but
not configured, the plugin changes nothing, so other tests that load every installed plugin
are unaffected; the last test here proves that.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any, AsyncIterator

import openai
import pytest
from aiohttp import web

from llmproxy.canonical import EventKind, StreamEvent
from llmproxy.testing import start_app
from proxy_process import ProxyProcess, clean_env, run_cli, write_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llmproxy-shout"
DIST = "llmproxy-shout"


def _installed_current() -> bool:
    """Installed from this very directory, with the same module and entry point?"""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return False
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("url") != EXAMPLE.as_uri():
        return False
    module = next((f for f in dist.files or () if f.name == "llmproxy_shout.py"), None)
    if module is None or Path(str(dist.locate_file(module))).read_bytes() != (EXAMPLE / "llmproxy_shout.py").read_bytes():
        return False
    return any(ep.name == "shout" and ep.value == "llmproxy_shout" for ep in dist.entry_points if ep.group == "llmproxy")


@pytest.fixture(scope="module")
def installed() -> None:
    if not _installed_current():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "--quiet", str(EXAMPLE)],
            capture_output=True, text=True, timeout=180,
        )
        assert result.returncode == 0, f"pip install {EXAMPLE} failed:\n{result.stdout}\n{result.stderr}"
        importlib.invalidate_caches()
        assert _installed_current(), "pip reported success but the installed llmproxy-shout is not this example"


# -- a fake OpenAI upstream ---------------------------------------------------------------------

# The word "quiet" is split across events on purpose, once over three of them, and the stream
# ends with "qui": held back as a possible start of the word, it must come out at the flush.
STREAM_PIECES = ["A qu", "iet answer, very q", "u", "iet", "! quiet. qui"]
ANSWER = "".join(STREAM_PIECES)


class Upstream:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.url = ""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        envelope = {"id": "chatcmpl-shout", "created": 0, "model": body["model"]}
        if not body.get("stream"):
            return web.json_response(
                {**envelope, "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}] + [{"content": piece} for piece in STREAM_PIECES]
        for delta in deltas:
            chunk = {**envelope, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")  # one event per write
        final = {**envelope, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.completions)
    fake.url, runner = await start_app(app)
    try:
        yield fake
    finally:
        await runner.cleanup()


def proxy_config(tmp_path: Path, upstream: Upstream, shout: str) -> Path:
    return write_config(
        tmp_path,
        textwrap.dedent(
            f"""\
            backends:
              up: {{type: openai, base_url: "{upstream.url}/v1", api_keys: ["${{SHOUT_TEST_KEY}}"]}}
            default_backend: up
            """
        )
        + shout,
    )


async def ask_both(url: str) -> tuple[str, str]:
    """(non-streamed answer, streamed answer) through the official SDK."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused-client-key", max_retries=0, timeout=20)
    try:
        messages: Any = [{"role": "user", "content": "say something"}]
        completion = await client.chat.completions.create(model="gpt-test", messages=messages)
        streamed = []
        stream = await client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                streamed.append(chunk.choices[0].delta.content)
        return completion.choices[0].message.content or "", "".join(streamed)
    finally:
        await client.close()


# -- the tests ------------------------------------------------------------------------------------


def test_llmproxy_plugins_lists_it(installed: None) -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    shout = next((p for p in info["plugins"] if p["name"] == "shout"), None)
    assert shout is not None, result.stdout
    assert shout["origin"] == f"entry point ({DIST})"
    assert shout["version"] == "0.1.0"
    assert shout["module"] == "llmproxy_shout"
    assert set(shout["hooks"]) == {"plugin_settings", "configure", "upstream_request", "response", "stream_start"}
    assert shout["settings"] == "ShoutSettings"
    for hook in ("upstream_request", "response", "stream_start"):  # not configured: nothing to do
        assert "shout" in info["idle"][hook] and "shout" not in info["chains"][hook]

    text = run_cli("plugins").stdout
    assert any(line.startswith("shout ") and f"entry point ({DIST})" in line for line in text.splitlines()), text


def test_its_settings_are_validated_by_llmproxy(installed: None, tmp_path: Path) -> None:
    config = write_config(tmp_path, "plugins:\n  shout:\n    header: authorization\n    volume: 11\n")
    result = run_cli("config", "validate", "--config", str(config))
    assert result.returncode == 2
    assert "line 3: plugins.shout.header: 'authorization' carries credentials or framing" in result.stderr
    assert "line 4: plugins.shout.volume: unknown key" in result.stderr

    config = write_config(tmp_path, "plugins:\n  shout: {header: X-Shout, word: quiet}\n")
    assert run_cli("config", "validate", "--config", str(config)).returncode == 0
    info = json.loads(run_cli("--config", str(config), "plugins", "--json").stdout)
    for hook in ("upstream_request", "response", "stream_start"):  # configured: in the chains
        assert "shout" in info["chains"][hook] and "shout" not in info["idle"][hook]


async def test_it_changes_flows_through_a_real_proxy(installed: None, tmp_path: Path, upstream: Upstream) -> None:
    shout = "plugins:\n  shout: {header: X-Shout, header_value: hello-upstream, word: quiet, replacement: LOUD}\n"
    config = proxy_config(tmp_path, upstream, shout)
    with ProxyProcess("--config", str(config), "--port", "0", env=clean_env(SHOUT_TEST_KEY="sk-shout-test")) as proxy:
        url = await proxy.ready()
        plain, streamed = await ask_both(url)
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0

    expected = ANSWER.replace("quiet", "LOUD")
    assert expected == "A LOUD answer, very LOUD! LOUD. qui"
    assert plain == expected
    assert streamed == expected
    assert len(upstream.requests) == 2
    for headers, body in upstream.requests:
        assert headers.get("X-Shout") == "hello-upstream"
        assert headers.get("Authorization") == "Bearer sk-shout-test"  # untouched
    assert [body.get("stream", False) for _, body in upstream.requests] == [False, True]


async def test_installed_but_not_configured_it_changes_nothing(installed: None, tmp_path: Path, upstream: Upstream) -> None:
    config = proxy_config(tmp_path, upstream, "")
    with ProxyProcess("--config", str(config), "--port", "0", env=clean_env(SHOUT_TEST_KEY="sk-shout-test")) as proxy:
        url = await proxy.ready()
        assert await ask_both(url) == (ANSWER, ANSWER)
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0
    assert all("X-Shout" not in headers for headers, _ in upstream.requests)

    # Disabled by config, it is not even loaded.
    config = write_config(tmp_path, "plugins:\n  shout: {enabled: false, word: quiet}\n", "disabled.yaml")
    info = json.loads(run_cli("--config", str(config), "plugins", "--json").stdout)
    shout = next(p for p in info["plugins"] if p["name"] == "shout")
    assert shout["origin"].endswith("disabled") and shout["hooks"] == []
    assert all("shout" not in order for order in info["chains"].values())


# -- the stream processor on its own --------------------------------------------------------------


def run_processor(pieces: list[str], word: str, replacement: str) -> tuple[str, list[StreamEvent]]:
    from llmproxy_shout import WordRewriter

    processor = WordRewriter(word, replacement)
    out: list[StreamEvent] = []

    def take(result: Any) -> None:
        if result is None:
            return
        out.extend(result if isinstance(result, list) else [result])

    for piece in pieces:
        take(processor(StreamEvent(EventKind.TEXT, index=0, text=piece)))
    take(processor(StreamEvent(EventKind.BLOCK_STOP, index=0)))
    take(processor(None))
    text = "".join(e.text for e in out if e.kind == EventKind.TEXT)
    return text, out


@pytest.mark.parametrize(
    "pieces, word, expected",
    [
        (["quiet"], "quiet", "LOUD"),
        (["q", "u", "i", "e", "t"], "quiet", "LOUD"),
        (["a qui", "et b"], "quiet", "a LOUD b"),
        (["qui", "t quiet"], "quiet", "quit LOUD"),  # a false start is released unchanged
        (["quietquiet"], "quiet", "LOUDLOUD"),
        (["x", "aba"], "aba", "xLOUD"),  # the word's end is also its start
        (["ab", "aba"], "aba", "LOUDba"),
        (["no match at all"], "quiet", "no match at all"),
        (["ends with q"], "quiet", "ends with q"),
    ],
)
def test_rewriter_handles_words_split_across_events(installed: None, pieces: list[str], word: str, expected: str) -> None:
    text, events = run_processor(pieces, word, "LOUD")
    assert text == expected
    # Held text comes out before the block's stop, never after it.
    assert events[-1].kind == EventKind.BLOCK_STOP


def test_rewriter_flushes_what_it_holds_at_the_end(installed: None) -> None:
    from llmproxy_shout import WordRewriter

    processor = WordRewriter("quiet", "LOUD")
    assert processor(StreamEvent(EventKind.TEXT, index=0, text="so qui")).text == "so "  # type: ignore[union-attr]
    assert processor(StreamEvent(EventKind.TEXT, index=2, text="q")) is None
    usage = StreamEvent(EventKind.USAGE)
    assert processor(usage) is usage
    held = processor(None)
    assert isinstance(held, list)
    assert [(e.index, e.text) for e in held] == [(0, "qui"), (2, "q")]
    assert processor(None) is None  # nothing twice
