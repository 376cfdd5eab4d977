"""The ``wire_capture`` plugin: records written through a real llmproxy with the official SDKs
against fake upstreams — their structure for streamed and non-streamed flows (forwarded as
they are, or decoded by a watching plugin), timestamps, masking (no key ever reaches the file
or the log), what plugins changed, failures, rotation by size and age, the front-end filter,
back-pressure and nothing lost when the proxy stops right after its requests — then the
``llmproxy capture list|show`` commands in a subprocess, and the writer's pieces on their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import anthropic
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_openai
import llmproxy_redaction
import llmproxy_wire_capture
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import DEFAULT_TEXT
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from llmproxy import hookimpl
from llmproxy.canonical import TextPart
from llmproxy.testing import RunningProxy, start_proxy
from llmproxy_wire_capture import CaptureSettings
from llmproxy_wire_capture.cli import folded_text, render
from llmproxy_wire_capture.writer import CaptureFile, Recorder

BOUND = 10.0
UPSTREAM_KEY = "sk-upstream-capture-0b7d4e2a91"
ANTHROPIC_KEY = "ant-upstream-capture-6c3f"
CLIENT_KEY = "client-key-capture-58ad"
SECRET_IN_PROMPT = "sk-proj-Qw3rTy7UiOp1AsDfGhJkL9ZxCvBnM0"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
MODES = pytest.mark.parametrize("mode", ["passthrough", "decoded"])
TOP_KEYS = {"v", "ts", "time", "id", "frontend", "kind", "model", "stream", "backend", "target", "status", "error", "duration", "ttft",
            "usage", "stop_reason", "fingerprint", "client", "request", "changes", "attempts", "response"}


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAP_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("CAP_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("CAP_CLIENT_KEY", CLIENT_KEY)


class Watcher:
    """Makes the pipeline decode the answer (a stream processor and a response hook that only
    look), so the client's answer is re-encoded rather than forwarded byte for byte."""

    @hookimpl
    def stream_start(self, flow: Any) -> Any:
        return lambda event: event

    @hookimpl
    def response(self, flow: Any) -> None:
        assert flow.response is not None


class Shouter:
    """Changes the request and says so: the capture must show both."""

    @hookimpl
    def request(self, flow: Any) -> None:
        message = flow.request.last_user_message
        if message is not None and "shout" in message.text:
            message.parts = [TextPart(message.text.upper())]
            flow.note("shouter", "upper-cased the prompt")


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def launch() -> AsyncIterator[Any]:
    started: list[RunningProxy] = []

    async def launch(config: dict[str, Any], *extra: tuple[str, Any]) -> RunningProxy:
        plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini), ("wire_capture", llmproxy_wire_capture), *extra]
        proxy = await start_proxy(config, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield launch
    for proxy in started:
        await proxy.stop()  # stopping twice is harmless: tests that stop early are fine


def config(path: Path, fake: FakeOpenAI | None = None, anthropic_fake: FakeAnthropic | None = None, **capture: Any) -> dict[str, Any]:
    backends: dict[str, Any] = {}
    if fake is not None:
        backends["up"] = {"type": "openai", "base_url": fake.base_url, "api_keys": ["${CAP_UPSTREAM_KEY}"]}
    if anthropic_fake is not None:
        backends["ant"] = {"type": "anthropic", "base_url": anthropic_fake.base_url, "api_keys": ["${CAP_ANTHROPIC_KEY}"]}
    return {
        "proxy": {"drain_timeout": 1},
        "auth": {"api_keys": [{"name": "tester", "key": "${CAP_CLIENT_KEY}"}]},
        "backends": backends,
        "default_backend": next(iter(backends)) if backends else None,
        "plugins": {"wire_capture": {"path": str(path), **capture}},
    }


def records(path: Path) -> list[dict[str, Any]]:
    """Every record of a capture, rotated files first (oldest first), then the current one."""
    files = sorted(path.parent.glob(f"{path.stem}.*{path.suffix}")) + ([path] if path.exists() else [])
    out = []
    for file in files:
        for line in file.read_text().splitlines():
            out.append(json.loads(line))
    return out


def raw_text(path: Path) -> str:
    return "".join(p.read_text() for p in path.parent.glob(f"{path.stem}*{path.suffix}"))


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)


async def chat(client: openai.AsyncOpenAI, prompt: str = "say hi", stream: bool = False, **kwargs: Any) -> str:
    kwargs.setdefault("model", "gpt-4o-mini")
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        reply = await client.chat.completions.create(messages=messages, **kwargs)
        return reply.choices[0].message.content or ""
    text = ""
    async for chunk in await client.chat.completions.create(messages=messages, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
    return text


def check_times(record: dict[str, Any]) -> None:
    """Every time is seconds since the flow began, in order, within the flow."""
    duration = record["duration"]
    assert isinstance(duration, float) and duration >= 0
    assert 0 <= record["ttft"] <= duration
    assert abs(record["ts"] - time.time()) < 600 and record["time"].endswith("+00:00")
    for attempt in record["attempts"]:
        assert 0 <= attempt["start"] <= attempt["end"] <= duration
        times = [e["t"] for e in attempt.get("response", {}).get("events", [])]
        assert times == sorted(times) and all(attempt["start"] <= t <= duration for t in times)
    times = [e["t"] for e in record["response"].get("events", [])]
    assert times == sorted(times) and all(0 <= t <= duration for t in times)


# -- records, end to end ------------------------------------------------------------------------


@MODES
@STREAM
async def test_a_flow_is_one_complete_masked_record(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any, stream: bool, mode: str) -> None:
    path = tmp_path / "capture.jsonl"
    extra = [("watcher", Watcher())] if mode == "decoded" else []
    proxy = await launch(config(path, fake_openai), *extra)
    client = openai_client(proxy)
    assert await chat(client, f"hi, my key is {SECRET_IN_PROMPT}", stream, stream_options={"include_usage": True} if stream else openai.NOT_GIVEN) == DEFAULT_TEXT
    await client.close()
    await proxy.stop()

    (record,) = records(path)
    assert set(record) == TOP_KEYS
    assert record["v"] == 1 and record["frontend"] == "openai_chat" and record["kind"] == "chat" and record["model"] == "gpt-4o-mini"
    assert record["stream"] is stream and record["status"] == 200 and record["error"] is None
    assert record["backend"] == "up" and record["target"] == "up:gpt-4o-mini"
    assert record["usage"]["input_tokens"] > 0 and record["usage"]["output_tokens"] > 0 and record["stop_reason"] == "end_turn"
    assert len(record["fingerprint"]) == 64
    assert record["client"]["key_name"] == "tester" and record["client"]["user_agent"].startswith("AsyncOpenAI/Python")
    check_times(record)

    # The client request: headers (the core never hands plugins the client's key) and the raw body.
    request = record["request"]
    assert request["headers"]["User-Agent"].startswith("AsyncOpenAI/Python") and "Authorization" not in request["headers"]
    assert request["body"]["messages"] == [{"role": "user", "content": "hi, my key is [REDACTED:openai_key]"}]
    assert request["body"].get("stream", False) is stream

    # The attempt: what was sent, and the answer as it arrived.
    (attempt,) = record["attempts"]
    assert attempt["backend"] == "up" and attempt["model"] == "gpt-4o-mini" and attempt["protocol"] == "openai_chat"
    assert attempt["status"] == 200 and attempt["error"] is None and attempt["key_name"] == "up#0"
    assert attempt["request"]["method"] == "POST" and attempt["request"]["url"] == fake_openai.base_url + "/chat/completions"
    assert attempt["request"]["headers"]["authorization"] == "Bearer [REDACTED]"
    assert attempt["request"]["body"]["model"] == "gpt-4o-mini"
    answer = attempt["response"]
    assert answer["headers"]["Content-Type"].startswith("text/event-stream" if stream else "application/json")
    if stream:
        events = answer["events"]
        assert events[-1]["data"] == "[DONE]"
        assert "".join(e["data"]["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["data"]["choices"]) == DEFAULT_TEXT
        assert all(set(e) == {"t", "data"} for e in events)
    else:
        assert answer["body"]["choices"][0]["message"]["content"] == DEFAULT_TEXT
        assert answer["body"] == json.loads(fake_openai.last.sent)

    # The client response: forwarded byte for byte (recorded once), or what llmproxy encoded.
    response = record["response"]
    assert response["status"] == 200
    if mode == "passthrough":
        assert response == {"status": 200, "same_as_attempt": 0}
    elif stream:
        assert response["events"][-1]["data"] == "[DONE]" and len(response["events"]) >= 3
    else:
        assert response["body"]["choices"][0]["message"]["content"] == DEFAULT_TEXT
    assert folded_text(record, answer if mode == "passthrough" else response) == DEFAULT_TEXT

    text = raw_text(path)
    for secret in (UPSTREAM_KEY, CLIENT_KEY, SECRET_IN_PROMPT):
        assert secret not in text


@STREAM
async def test_cross_protocol_anthropic_client_openai_backend(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any, stream: bool) -> None:
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}
    if stream:
        async with client.messages.stream(**kwargs) as events:
            assert "".join([t async for t in events.text_stream]) == DEFAULT_TEXT
    else:
        assert (await client.messages.create(**kwargs)).content[0].text == DEFAULT_TEXT
    await client.close()
    await proxy.stop()

    (record,) = records(path)
    check_times(record)
    assert record["frontend"] == "anthropic" and "X-Api-Key" not in record["request"]["headers"]
    assert record["request"]["body"]["max_tokens"] == 50
    (attempt,) = record["attempts"]
    assert attempt["protocol"] == "openai_chat" and attempt["request"]["body"]["messages"] == [{"role": "user", "content": "hello"}]
    response = record["response"]
    assert "same_as_attempt" not in response
    if stream:
        names = [e.get("event") for e in response["events"]]
        assert names[0] == "message_start" and names[-1] == "message_stop" and "content_block_delta" in names
        assert attempt["response"]["events"][-1]["data"] == "[DONE]"
    else:
        assert response["body"]["type"] == "message" and response["body"]["content"][0]["text"] == DEFAULT_TEXT
    assert folded_text(record, response) == DEFAULT_TEXT
    assert record["usage"]["output_tokens"] > 0


@STREAM
async def test_gemini_client_and_backend(tmp_path: Path, launch: Any, stream: bool) -> None:
    path = tmp_path / "capture.jsonl"
    async with FakeGemini() as fake:
        cfg = config(path)
        cfg["backends"] = {"gem": {"type": "gemini", "base_url": fake.base_url, "api_keys": ["${CAP_UPSTREAM_KEY}"]}}
        cfg["default_backend"] = "gem"
        proxy = await launch(cfg)
        client = genai.Client(api_key=CLIENT_KEY, http_options=genai_types.HttpOptions(base_url=proxy.url, api_version="v1beta", timeout=int(BOUND * 1000)))
        if stream:
            text = ""
            async for chunk in await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="say hi"):
                text += chunk.text or ""
        else:
            text = (await client.aio.models.generate_content(model="gemini-2.5-flash", contents="say hi")).text or ""
        await client.aio.aclose()
        client.close()
        await proxy.stop()
    assert text == DEFAULT_TEXT
    (record,) = records(path)
    check_times(record)
    assert record["frontend"] == "gemini" and record["model"] == "gemini-2.5-flash" and record["stream"] is stream
    assert "x-goog-api-key" not in {k.lower() for k in record["request"]["headers"]}
    (attempt,) = record["attempts"]
    assert attempt["protocol"] == "gemini" and attempt["request"]["headers"]["x-goog-api-key"] == "[REDACTED]"
    assert attempt["request"]["url"].endswith(":streamGenerateContent?alt=sse" if stream else ":generateContent")
    assert record["response"] == {"status": 200, "same_as_attempt": 0}
    assert folded_text(record, attempt["response"]) == DEFAULT_TEXT
    assert UPSTREAM_KEY not in raw_text(path) and CLIENT_KEY not in raw_text(path)


async def test_token_counts_and_embeddings_are_flows_too(tmp_path: Path, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai, fake_anthropic))
    ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    counted = await ant.messages.count_tokens(model="ant:claude-sonnet-4-5", messages=[{"role": "user", "content": "count me"}])
    client = openai_client(proxy)
    embedded = await client.embeddings.create(model="text-embedding-3-small", input="embed me")
    await ant.close()
    await client.close()
    await proxy.stop()
    count, embedding = records(path)
    assert count["kind"] == "count_tokens" and count["frontend"] == "anthropic" and count["status"] == 200
    assert count["attempts"][0]["request"]["url"].endswith("/v1/messages/count_tokens")
    assert count["attempts"][0]["response"]["body"] == {"input_tokens": counted.input_tokens}
    assert embedding["kind"] == "embeddings" and embedding["request"]["body"]["input"] == "embed me"
    assert embedding["attempts"][0]["request"]["headers"]["authorization"] == "Bearer [REDACTED]"
    assert len(embedding["attempts"][0]["response"]["body"]["data"][0]["embedding"]) == len(embedded.data[0].embedding)
    assert UPSTREAM_KEY not in raw_text(path) and ANTHROPIC_KEY not in raw_text(path)


async def test_what_plugins_changed_is_recorded(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai), ("shouter", Shouter()))
    client = openai_client(proxy)
    await chat(client, "please shout this")
    await chat(client, "quietly")
    await client.close()
    await proxy.stop()

    loud, quiet = records(path)
    (note,) = loud["changes"]["plugins"]
    assert note["plugin"] == "shouter" and note["what"] == "upper-cased the prompt" and note["at"] >= 0
    assert loud["changes"]["request"] == [{"field": "messages[0]", "before": "user: please shout this", "after": "user: PLEASE SHOUT THIS"}]
    assert loud["request"]["body"]["messages"][0]["content"] == "please shout this"  # what the client sent
    assert loud["attempts"][0]["request"]["body"]["messages"][0]["content"] == "PLEASE SHOUT THIS"  # what the backend got
    assert quiet["changes"] == {"plugins": [], "request": []}


async def test_redaction_notes_and_secrets_reach_the_capture(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    cfg = config(path, fake_openai)
    cfg["plugins"]["redaction"] = {"secrets": ["Codename-Bluebird-7"]}
    proxy = await launch(cfg, ("redaction", llmproxy_redaction))
    client = openai_client(proxy)
    await chat(client, f"the key is {UPSTREAM_KEY}, the codename Codename-Bluebird-7")
    await client.close()
    await proxy.stop()
    (record,) = records(path)
    (note,) = record["changes"]["plugins"]
    assert note["plugin"] == "redaction" and note["count"] == 2
    assert "Codename-Bluebird-7" not in raw_text(path) and UPSTREAM_KEY not in raw_text(path)


@pytest.mark.parametrize("mode", ["passthrough", "decoded"])
async def test_a_secret_split_over_stream_events_is_masked(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any, mode: str) -> None:
    path = tmp_path / "capture.jsonl"
    cfg = config(path, fake_openai)
    cfg["plugins"]["redaction"] = {"secrets": ["Project Nightingale"], "outbound": "off"}
    extra = [("redaction", llmproxy_redaction)] + ([("watcher", Watcher())] if mode == "decoded" else [])
    proxy = await launch(cfg, *extra)
    fake_openai.script(text="The codename is Project Nightingale and the key AKIAIOSFODNN7EXAMPLE.")
    client = openai_client(proxy)
    text = await chat(client, stream=True)
    await client.close()
    await proxy.stop()
    assert text == "The codename is Project Nightingale and the key AKIAIOSFODNN7EXAMPLE."  # the client's answer is not changed
    (record,) = records(path)
    pieces = [e["data"]["choices"][0]["delta"].get("content") for e in record["attempts"][0]["response"]["events"] if isinstance(e["data"], dict) and e["data"]["choices"]]
    assert "Project" in fake_openai.last.sent.decode() and "Nightingale" in fake_openai.last.sent.decode()  # sent in pieces
    assert "Nightingale" not in raw_text(path) and "AKIAIOSFODNN7EXAMPLE" not in raw_text(path)
    assert "".join(p or "" for p in pieces) == "The codename is [REDACTED:secret] and the key [REDACTED:aws_access_key_id]."
    source = record["attempts"][0]["response"] if mode == "passthrough" else record["response"]
    assert folded_text(record, source) == "The codename is [REDACTED:secret] and the key [REDACTED:aws_access_key_id]."


async def test_failures_are_recorded_too(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai))
    fake_openai.script(status=429, message="slow down, {key}", retry_after="7")
    client = openai_client(proxy)
    with pytest.raises(openai.RateLimitError):
        await chat(client)
    bad = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="wrong-client-key-123456", max_retries=0, timeout=BOUND)
    with pytest.raises(openai.AuthenticationError):
        await chat(bad)
    await client.close()
    await bad.close()
    await proxy.stop()

    limited, refused = records(path)
    assert limited["status"] == 429 and limited["error"]["status"] == 429
    (attempt,) = limited["attempts"]
    assert attempt["status"] == 429 and attempt["error"] == "HTTP 429"
    assert attempt["response"]["headers"]["Retry-After"] == "7"
    assert attempt["response"]["body"]["error"]["message"] == "slow down, [REDACTED:secret]"  # the echoed key
    assert limited["response"]["body"]["error"]["type"] == "rate_limit_error"
    assert refused["status"] == 401 and refused["attempts"] == [] and refused["error"]["status"] == 401
    assert UPSTREAM_KEY not in raw_text(path) and "wrong-client-key-123456" not in raw_text(path)


async def test_only_the_chosen_frontends_and_no_bodies(tmp_path: Path, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai, fake_anthropic, frontends=["anthropic"], include_bodies=False))
    client = openai_client(proxy)
    await chat(client)  # not captured: openai_chat is not listed
    ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    async with ant.messages.stream(model="ant:claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as events:
        await events.get_final_message()
    await client.close()
    await ant.close()
    await proxy.stop()
    (record,) = records(path)
    assert record["frontend"] == "anthropic" and record["target"] == "ant:claude-sonnet-4-5" and record["status"] == 200
    text = raw_text(path)
    assert '"body"' not in text and '"events"' not in text and '"hi"' not in text
    assert record["attempts"][0]["status"] == 200 and record["duration"] >= record["ttft"] >= 0


async def test_no_path_captures_nothing(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    cfg = config(tmp_path / "unused.jsonl", fake_openai)
    cfg["plugins"]["wire_capture"] = {}
    proxy = await launch(cfg)
    client = openai_client(proxy)
    await chat(client, stream=True)
    await client.close()
    assert "wire_capture" not in proxy.context.state
    assert list(tmp_path.iterdir()) == []


async def test_a_path_that_cannot_be_written_stops_start_up(tmp_path: Path) -> None:
    from llmproxy.config import ConfigError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"plugins\.wire_capture: failed to start: ValueError: cannot write the capture file .*not-a-folder/c\.jsonl"):
        await start_proxy(config(blocker / "c.jsonl"), plugins=[("wire_capture", llmproxy_wire_capture)], entry_points=False)


async def test_keys_never_reach_the_log(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai), ("redaction", llmproxy_redaction))
    fake_openai.script(status=401, message="invalid key {key}")
    client = openai_client(proxy)
    with pytest.raises(openai.AuthenticationError):
        await chat(client, f"use {UPSTREAM_KEY}")
    await client.close()
    await proxy.stop()
    assert "capturing flows to" in caplog.text and "1 flow(s) written" in caplog.text
    assert UPSTREAM_KEY not in caplog.text and UPSTREAM_KEY not in raw_text(path)


# -- rotation, back-pressure, shutdown -----------------------------------------------------------------


async def test_rotation_by_size_keeps_every_record_and_at_most_max_files(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    path = tmp_path / "logs" / "capture.jsonl"
    proxy = await launch(config(path, fake_openai, max_bytes=6000, max_files=100))
    client = openai_client(proxy)
    for i in range(12):
        await chat(client, f"question {i}", stream=i % 2 == 1)
    await client.close()
    await proxy.stop()
    files = sorted(path.parent.iterdir())
    assert len(files) >= 3, files
    assert all(f.stat().st_size <= 6000 for f in files)
    got = records(path)
    assert [r["request"]["body"]["messages"][0]["content"] for r in got] == [f"question {i}" for i in range(12)]
    assert len({r["id"] for r in got}) == 12

    # The same with max_files 2: only the newest files stay.
    small = tmp_path / "small" / "capture.jsonl"
    proxy = await launch(config(small, fake_openai, max_bytes=6000, max_files=2))
    client = openai_client(proxy)
    for i in range(12):
        await chat(client, f"question {i}")
    await client.close()
    await proxy.stop()
    assert len(list(small.parent.iterdir())) == 2
    kept = [r["request"]["body"]["messages"][0]["content"] for r in records(small)]
    assert kept and kept == [f"question {i}" for i in range(12 - len(kept), 12)]


async def test_rotation_by_age_moves_an_old_file_aside(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    path.write_text('{"v":1,"ts":1000.0,"id":"old-flow"}\n')  # a file begun long ago
    proxy = await launch(config(path, fake_openai, max_age=3600))
    client = openai_client(proxy)
    await chat(client)
    await chat(client)
    await client.close()
    await proxy.stop()
    rotated = [p for p in tmp_path.iterdir() if p != path]
    assert len(rotated) == 1 and rotated[0].name.startswith("capture.") and rotated[0].suffix == ".jsonl"
    assert rotated[0].read_text() == '{"v":1,"ts":1000.0,"id":"old-flow"}\n'
    assert len(path.read_text().splitlines()) == 2  # both new flows in the new file: it is young


async def test_nothing_is_lost_when_the_proxy_stops_right_after_its_requests(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai, queue_size=2))  # a tiny queue: flows must wait, not drop
    client = openai_client(proxy)
    answers = await asyncio.wait_for(asyncio.gather(*(chat(client, f"n{i}", stream=i % 3 == 0) for i in range(30))), BOUND)
    assert answers == [DEFAULT_TEXT] * 30
    await proxy.stop()  # at once: the shutdown hook writes what is queued
    await client.close()
    got = records(path)
    assert sorted(r["request"]["body"]["messages"][0]["content"] for r in got) == sorted(f"n{i}" for i in range(30))


# -- the command line ----------------------------------------------------------------------------------


async def test_capture_list_and_show_commands(tmp_path: Path, fake_openai: FakeOpenAI, launch: Any) -> None:
    path = tmp_path / "capture.jsonl"
    proxy = await launch(config(path, fake_openai))
    client = openai_client(proxy)
    await chat(client, "first question")
    await chat(client, "second question", stream=True, stream_options={"include_usage": True})
    await client.close()
    await proxy.stop()
    first, second = records(path)
    with path.open("a") as file:
        file.write('{"v":1,"id":"half-writ')  # a line cut short: skipped with a warning

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llmproxy", "capture", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    listed = run("list", str(path))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["TIME", "FLOW", "FRONTEND", "MODEL", "BACKEND", "STATUS", "TOKENS", "DURATION"]
    assert len(lines) == 3
    for line, record in zip(lines[1:], (first, second)):
        cells = line.split()
        assert cells[2] == record["id"] and cells[3:7] == ["openai_chat", "gpt-4o-mini", "up:gpt-4o-mini", "200"]
        assert cells[7] == f"{record['usage']['input_tokens']}→{record['usage']['output_tokens']}" and cells[8].endswith("s")
    assert "not a complete record; skipped" in listed.stderr and "2 flow(s)" in listed.stderr

    shown = run("show", str(path), "--flow", second["id"])
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"━━ flow {second['id']}" in out and first["id"] not in out
    for piece in ("── client request", "User-Agent: AsyncOpenAI/Python", '"content": "second question"', "── attempt 0: up:gpt-4o-mini  status 200",
                  f"→ POST {fake_openai.base_url}/chat/completions", "authorization: Bearer [REDACTED]", "data: [DONE]",
                  "── client response  status 200", "(byte for byte the answer of attempt 0)", f"answer: {DEFAULT_TEXT}"):
        assert piece in out, piece
    assert UPSTREAM_KEY not in out

    as_json = run("show", str(path), "--flow", first["id"], "--json")
    assert json.loads(as_json.stdout) == first
    missing = run("show", str(path), "--flow", "no-such-flow")
    assert missing.returncode == 1 and "no flow 'no-such-flow'" in missing.stderr


def test_render_is_readable_for_a_minimal_record() -> None:
    text = render({"id": "x1", "ts": 0, "frontend": "openai_chat", "status": 401, "error": {"status": 401, "message": "bad key"},
                   "attempts": [], "response": {"status": 401}, "request": {"headers": {}}})
    assert "━━ flow x1" in text and "error: 401 bad key" in text and "status 401" in text


# -- the writer on its own ----------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = CaptureSettings()
    assert settings.path is None and settings.include_bodies and settings.frontends == []
    assert (settings.max_bytes, settings.max_age, settings.max_files, settings.queue_size) == (100_000_000, 86_400.0, 10, 1000)
    for name, field in CaptureSettings.model_fields.items():
        assert field.description, name
    assert not settings.wants("openai_chat")
    assert CaptureSettings(path="x", frontends=["anthropic"]).wants("anthropic")


def test_capture_file_rotates_by_size_and_prunes(tmp_path: Path) -> None:
    file = CaptureFile(tmp_path / "c.jsonl", max_bytes=25, max_files=3)
    for i in range(10):
        file.write([f'{{"ts":{time.time()},"n":{i}}}\n'.encode()[:20].ljust(19) + b"\n"])
    file.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and "c.jsonl" in names
    assert len(file.rotated()) == 2


async def test_recorder_writes_after_close_too(tmp_path: Path) -> None:
    recorder = Recorder(CaptureFile(tmp_path / "c.jsonl"), lambda n: f'{{"n":{n}}}\n'.encode(), queue_size=1)
    recorder.start()
    pending = [recorder.submit(i) for i in range(5)]
    await asyncio.wait_for(asyncio.gather(*(p for p in pending if p is not None)), BOUND)
    await asyncio.wait_for(recorder.close(), BOUND)
    late = recorder.submit(99)  # a flow that ended after shutdown (cancelled by the drain)
    assert late is not None
    await asyncio.wait_for(late, BOUND)
    assert sorted(json.loads(line)["n"] for line in (tmp_path / "c.jsonl").read_text().splitlines()) == [0, 1, 2, 3, 4, 99]


async def test_a_broken_record_is_logged_and_the_rest_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def build(n: int) -> bytes:
        if n == 1:
            raise ValueError("boom")
        return f"{n}\n".encode()

    recorder = Recorder(CaptureFile(tmp_path / "c.jsonl"), build)
    recorder.start()
    for i in range(3):
        recorder.submit(i)
    await asyncio.wait_for(recorder.close(), BOUND)
    assert (tmp_path / "c.jsonl").read_text() == "0\n2\n"
    assert "could not build the record" in caplog.text
