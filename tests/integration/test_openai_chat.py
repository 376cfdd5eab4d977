"""OpenAI Chat Completions end to end, over real sockets: the official ``openai`` SDK →
llmproxy (a real aiohttp server) → a fake OpenAI upstream (a real aiohttp server).

Most streaming and answering tests run in three modes, because the pipeline has three ways
to carry a flow:

- ``passthrough``: no plugin watches, so the upstream's bytes are forwarded as they are;
- ``decoded``: a plugin returns a stream processor (and has a ``response`` hook), so the
  answer is decoded to canonical events and encoded again;
- ``decoded+request``: the plugin also reads ``flow.request``, so the request itself is
  decoded and re-encoded for the backend too.

The proxy is started with the built-in OpenAI provider only, not every installed entry
point, so that a third-party plugin installed into the test environment cannot change what
these tests see.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import llmproxy_openai
import openai
import pytest
from pydantic import BaseModel

from fakes.openai_upstream import DEFAULT_TEXT, FakeOpenAI, split_text
from llmproxy import hookimpl
from llmproxy.testing import RunningProxy, free_port, start_proxy

UPSTREAM_KEY = "sk-upstream-SECRET-4f1c9e2a7b"
CLIENT_KEY = "client-key-7d3a"
BOUND = 10.0  # seconds: no test waits longer than this for anything (no hangs, ever)
MODES = ("passthrough", "decoded", "decoded+request")

SHELL_TOOL = {
    "type": "function",
    "function": {
        "name": "shell",
        "description": "run a shell command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 3}},
            "required": ["city", "days"],
        },
    },
}
HI = [{"role": "user", "content": "say hi"}]


# -- set-up -------------------------------------------------------------------------------


class Watcher:
    """A test plugin that makes the pipeline decode the answer (a stream processor and a
    ``response`` hook that only look), and with ``read_request`` the request as well."""

    def __init__(self, read_request: bool) -> None:
        self.read_request = read_request
        self.events: list[str] = []
        self.responses = 0
        self.flushes = 0

    @hookimpl
    def request(self, flow: Any) -> None:
        if self.read_request:
            assert flow.request.messages  # decoding is the point

    @hookimpl
    def stream_start(self, flow: Any) -> Any:
        def watch(event: Any) -> Any:
            if event is None:
                self.flushes += 1
                return None
            self.events.append(event.kind)
            return event

        return watch

    @hookimpl
    def response(self, flow: Any) -> None:
        self.responses += 1


@dataclass
class Proxied:
    """A running proxy, an SDK client pointed at it, and the plugin watching (if any)."""

    proxy: RunningProxy
    client: openai.AsyncOpenAI
    mode: str
    watcher: Watcher | None

    def check_path(self, stream: bool, flows: int = 1) -> None:
        """The last ``flows`` flows took the path this mode says they should."""
        if self.watcher is None:
            return
        if stream:
            assert self.watcher.events and self.watcher.events[-1] == "stop" and self.watcher.flushes == flows
        else:
            assert self.watcher.responses == flows


Launch = Callable[..., Awaitable[Proxied]]


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("TEST_CLIENT_KEY", CLIENT_KEY)


def backend(fake: FakeOpenAI | None, **settings: Any) -> dict[str, Any]:
    base_url = fake.base_url if fake is not None else f"http://127.0.0.1:{free_port()}/v1"
    section = {"type": "openai", "base_url": base_url, "api_keys": ["${TEST_UPSTREAM_KEY}"], "headers": {"X-Team": "llmproxy-tests"}}
    section.update(settings)
    return section


def make_config(fake: FakeOpenAI | None, **top: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"proxy": {"drain_timeout": 1}, "backends": {"up": backend(fake)}, "default_backend": "up"}
    config.update(top)
    return config


@pytest.fixture
async def launch() -> AsyncIterator[Launch]:
    started: list[Proxied] = []

    async def launch(config: dict[str, Any], mode: str = "passthrough", api_key: str = CLIENT_KEY) -> Proxied:
        watcher = None if mode == "passthrough" else Watcher(read_request=mode == "decoded+request")
        plugins: list[tuple[str, Any]] = [("openai", llmproxy_openai)]
        if watcher is not None:
            plugins.append(("watcher", watcher))
        proxy = await start_proxy(config, plugins=plugins, entry_points=False)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=api_key, max_retries=0, timeout=BOUND)
        started.append(Proxied(proxy, client, mode, watcher))
        return started[-1]

    yield launch
    for proxied in started:
        await proxied.client.close()
        await proxied.proxy.stop()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def proxied(fake_openai: FakeOpenAI, launch: Launch, mode: str) -> Proxied:
    return await launch(make_config(fake_openai), mode)



# -- helpers ------------------------------------------------------------------------------


@dataclass
class Collected:
    """A streamed answer as the SDK delivered it, folded."""

    text: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish: str | None = None
    usage: Any = None
    chunks: list[Any] = field(default_factory=list)
    usage_chunks: int = 0


async def collect(stream: Any, into: Collected | None = None) -> Collected:
    got = into if into is not None else Collected()
    async for chunk in stream:
        got.chunks.append(chunk)
        if chunk.usage is not None:
            got.usage = chunk.usage
            got.usage_chunks += 1
        for choice in chunk.choices:
            delta = choice.delta
            got.text += delta.content or ""
            for call in delta.tool_calls or ():
                if call.index not in got.calls:
                    # The protocol: a call's first delta carries its id and name.
                    assert call.id and call.function and call.function.name, call
                    got.calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                if call.function and call.function.arguments:
                    got.calls[call.index]["arguments"] += call.function.arguments
            if choice.finish_reason:
                got.finish = choice.finish_reason
    return got


async def stream_chat(client: openai.AsyncOpenAI, into: Collected | None = None, **kwargs: Any) -> Collected:
    kwargs.setdefault("model", "gpt-4o-mini")
    kwargs.setdefault("messages", HI)
    stream = await client.chat.completions.create(stream=True, **kwargs)
    return await asyncio.wait_for(collect(stream, into), BOUND)


def strict_loads(data: bytes | str) -> Any:
    """json.loads that refuses duplicate keys (RFC 8259: names SHOULD be unique)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        assert len(keys) == len(set(keys)), f"duplicate keys in {data!r}"
        return dict(items)

    return json.loads(data, object_pairs_hook=pairs)


def sse_data(body: bytes) -> list[bytes]:
    """The data of every SSE frame in ``body`` (every frame must be complete)."""
    assert body.endswith(b"\n\n"), body[-200:]
    frames = []
    for raw in body.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        lines = [line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
        assert lines, raw
        frames.append(b"\n".join(lines))
    return frames


def assert_openai_error(body: Any, status_message: str | None = None) -> dict[str, Any]:
    """``body`` is OpenAI's error JSON; returns its ``error`` object."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if status_message is not None:
        assert status_message in error["message"], error
    return error


def sdk_error(exc: openai.APIStatusError) -> dict[str, Any]:
    """The error object of an SDK status error, checked for OpenAI's shape."""
    return assert_openai_error(exc.response.json())


async def post(http: aiohttp.ClientSession, proxied: Proxied, body: Any, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}", **kwargs.pop("headers", {})}
    async with http.post(proxied.proxy.url + "/v1/chat/completions", data=data, headers=headers, **kwargs) as response:
        raw = await response.read()
    try:
        parsed = strict_loads(raw)
    except ValueError:
        parsed = raw
    return response.status, parsed, response


# -- answers ------------------------------------------------------------------------------


async def test_create(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    completion = await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI)

    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(split_text(DEFAULT_TEXT))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    proxied.check_path(stream=False)
    upstream = fake_openai.last
    assert upstream.path == "/v1/chat/completions"
    assert upstream.json["model"] == "gpt-4o-mini" and upstream.json["messages"] == HI
    assert "stream" not in upstream.json or upstream.json["stream"] is False


async def test_upstream_gets_the_backend_key_and_headers(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    await stream_chat(proxied.client)

    for upstream in fake_openai.requests:
        assert upstream.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert upstream.headers["X-Team"] == "llmproxy-tests"
        assert CLIENT_KEY not in str(list(upstream.headers.items()))


async def test_stream(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    got = await stream_chat(proxied.client)

    assert got.text == DEFAULT_TEXT
    assert got.finish == "stop"
    assert got.usage is None  # not asked for
    assert got.chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in got.chunks if c.choices and c.choices[0].delta.content]) == len(split_text(DEFAULT_TEXT))
    assert fake_openai.last.json["stream"] is True
    proxied.check_path(stream=True)


async def test_stream_include_usage(proxied: Proxied) -> None:
    got = await stream_chat(proxied.client, stream_options={"include_usage": True})

    assert got.text == DEFAULT_TEXT
    assert got.usage_chunks == 1
    last = got.chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(split_text(DEFAULT_TEXT))
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens > 0
    proxied.check_path(stream=True)


async def test_stream_helper(proxied: Proxied) -> None:
    async def run() -> Any:
        async with proxied.client.chat.completions.stream(model="gpt-4o-mini", messages=HI) as stream:
            return await stream.get_final_completion()

    final = await asyncio.wait_for(run(), BOUND)

    assert final.choices[0].message.content == DEFAULT_TEXT
    assert final.choices[0].finish_reason == "stop"


async def test_stream_is_protocol_correct_on_the_wire(proxied: Proxied, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    status, raw, response = await post(http, proxied, body)

    assert status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    frames = sse_data(raw)
    assert frames[-1] == b"[DONE]"
    chunks = [strict_loads(f) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("stop") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    text = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(c["delta"]["content"] for c in text) == DEFAULT_TEXT
    assert all(c["logprobs"]["content"][0]["token"] == c["delta"]["content"] for c in text)


async def test_passthrough_forwards_upstream_bytes(fake_openai: FakeOpenAI, launch: Launch, http: aiohttp.ClientSession) -> None:
    proxied = await launch(make_config(fake_openai), "passthrough")
    url = proxied.proxy.url + "/v1/chat/completions"

    for body in ({"model": "gpt-4o-mini", "messages": HI, "stream": True}, {"model": "gpt-4o-mini", "messages": HI}):
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            assert response.status == 200
            assert await response.read() == bytes(fake_openai.last.sent)
            if body.get("stream"):
                assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"


# -- tools --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_tool_call_round_trip(proxied: Proxied, fake_openai: FakeOpenAI, stream: bool) -> None:
    client = proxied.client
    if stream:
        got = await stream_chat(client, messages=HI, tools=[SHELL_TOOL])
        calls, finish = [got.calls[i] for i in sorted(got.calls)], got.finish
    else:
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, tools=[SHELL_TOOL])
        message = completion.choices[0].message
        assert message.content is None
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()]
        finish = completion.choices[0].finish_reason
    assert finish == "tool_calls"
    assert len(calls) == 1 and calls[0]["name"] == "shell"
    assert json.loads(calls[0]["arguments"]) == {"command": "echo hi"}
    assert fake_openai.last.json["tools"] == [SHELL_TOOL]

    call = calls[0]
    follow_up = HI + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call["id"], "type": "function", "function": {"name": "shell", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "hi"},
    ]
    if stream:
        got = await stream_chat(client, messages=follow_up, tools=[SHELL_TOOL])
        text, finish = got.text, got.finish
    else:
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=follow_up, tools=[SHELL_TOOL])
        text, finish = completion.choices[0].message.content, completion.choices[0].finish_reason
    assert (text, finish) == (DEFAULT_TEXT, "stop")
    sent = fake_openai.last.json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call["id"] and sent[1]["tool_calls"][0]["function"]["arguments"] == call["arguments"]
    assert sent[2] == {"role": "tool", "tool_call_id": call["id"], "content": "hi"}
    proxied.check_path(stream=stream, flows=2)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_parallel_tool_calls(proxied: Proxied, stream: bool) -> None:
    tools = [SHELL_TOOL, WEATHER_TOOL]
    if stream:
        got = await stream_chat(proxied.client, tools=tools)
        calls, finish = [got.calls[i] for i in sorted(got.calls)], got.finish
        assert sorted(got.calls) == [0, 1]
    else:
        completion = await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI, tools=tools)
        message = completion.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()]
        finish = completion.choices[0].finish_reason
    assert finish == "tool_calls"
    assert [c["name"] for c in calls] == ["shell", "get_weather"]
    assert len({c["id"] for c in calls}) == 2
    assert json.loads(calls[0]["arguments"]) == {"command": "echo hi"}
    assert json.loads(calls[1]["arguments"]) == {"city": "Paris", "days": 3}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_tool_choice(proxied: Proxied, fake_openai: FakeOpenAI, stream: bool) -> None:
    tools = [SHELL_TOOL, WEATHER_TOOL]
    named = {"type": "function", "function": {"name": "get_weather"}}

    async def ask(**kwargs: Any) -> tuple[list[str], str | None, str | None]:
        if stream:
            got = await stream_chat(proxied.client, tools=tools, **kwargs)
            return [got.calls[i]["name"] for i in sorted(got.calls)], got.text or None, got.finish
        completion = await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI, tools=tools, **kwargs)
        message = completion.choices[0].message
        return [c.function.name for c in message.tool_calls or ()], message.content, completion.choices[0].finish_reason

    assert await ask(tool_choice=named) == (["get_weather"], None, "tool_calls")
    assert fake_openai.last.json["tool_choice"] == named
    assert await ask(tool_choice="none") == ([], DEFAULT_TEXT, "stop")
    assert fake_openai.last.json["tool_choice"] == "none"
    assert await ask(tool_choice="required", parallel_tool_calls=False) == (["shell"], None, "tool_calls")
    assert fake_openai.last.json["tool_choice"] == "required" and fake_openai.last.json["parallel_tool_calls"] is False


# -- structured output and pass-through fields --------------------------------------------


class Answer(BaseModel):
    answer: str
    confidence: int


async def test_parse_json_schema(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    completion = await proxied.client.chat.completions.parse(model="gpt-4o-mini", messages=HI, response_format=Answer)

    parsed = completion.choices[0].message.parsed
    assert parsed == Answer(answer=DEFAULT_TEXT, confidence=1)
    sent = fake_openai.last.json["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "Answer" and sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["required"] == ["answer", "confidence"]


async def test_stream_json_schema(proxied: Proxied) -> None:
    async def run() -> Any:
        async with proxied.client.chat.completions.stream(model="gpt-4o-mini", messages=HI, response_format=Answer) as stream:
            return await stream.get_final_completion()

    final = await asyncio.wait_for(run(), BOUND)
    assert final.choices[0].message.parsed == Answer(answer=DEFAULT_TEXT, confidence=1)


UNKNOWN_FIELDS = {"logprobs": True, "top_logprobs": 2, "seed": 7}
VENDOR_FIELDS = {"vendor_field": {"nested": [1, "two", None]}, "service_tier": "flex"}


async def test_unknown_fields_pass_through(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    completion = await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI, extra_body=VENDOR_FIELDS, **UNKNOWN_FIELDS)

    sent = fake_openai.last.json
    for key, value in {**UNKNOWN_FIELDS, **VENDOR_FIELDS}.items():
        assert sent[key] == value, key
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == split_text(DEFAULT_TEXT)
    assert all(len(t.top_logprobs) == 2 for t in logprobs.content)
    assert completion.system_fingerprint == "fp_fake"


async def test_unknown_fields_pass_through_stream(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    got = await stream_chat(proxied.client, extra_body=VENDOR_FIELDS, **UNKNOWN_FIELDS)

    sent = fake_openai.last.json
    for key, value in {**UNKNOWN_FIELDS, **VENDOR_FIELDS}.items():
        assert sent[key] == value, key
    tokens = [c.choices[0].logprobs.content[0] for c in got.chunks if c.choices and c.choices[0].delta.content]
    assert [t.token for t in tokens] == split_text(DEFAULT_TEXT)
    assert all(len(t.top_logprobs) == 2 for t in tokens)


# -- routing and the small endpoints ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_backend_prefix_routing(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    async with FakeOpenAI() as other:
        config = make_config(fake_openai, backends={"up": backend(fake_openai), "other": backend(other)})
        proxied = await launch(config)
        if stream:
            got = await stream_chat(proxied.client, model="other:gpt-special")
            assert got.text == DEFAULT_TEXT
        else:
            completion = await proxied.client.chat.completions.create(model="other:gpt-special", messages=HI)
            assert completion.choices[0].message.content == DEFAULT_TEXT
        assert [r.json["model"] for r in other.requests] == ["gpt-special"]
        assert fake_openai.requests == []

        await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # bare: the default backend
        assert [r.json["model"] for r in fake_openai.requests] == ["gpt-4o-mini"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_alias_fails_over_from_503(fake_openai: FakeOpenAI, launch: Launch, stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeOpenAI() as good:
        fake_openai.script(status=503, message="The engine is currently overloaded, please try again later")
        config = make_config(
            fake_openai,
            backends={"bad": backend(fake_openai), "good": backend(good)},
            default_backend="bad",
            models={"smart": {"targets": ["bad:gpt-bad", "good:gpt-good"]}},
        )
        proxied = await launch(config)
        if stream:
            got = await stream_chat(proxied.client, model="smart")
            text, finish = got.text, got.finish
        else:
            completion = await proxied.client.chat.completions.create(model="smart", messages=HI)
            text, finish = completion.choices[0].message.content, completion.choices[0].finish_reason

        assert (text, finish) == (DEFAULT_TEXT, "stop")
        assert [r.json["model"] for r in fake_openai.requests] == ["gpt-bad"]
        assert [r.json["model"] for r in good.requests] == ["gpt-good"]
        assert "trying the next target" in caplog.text


async def test_alias_with_every_target_failing_returns_the_last_error(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script(model="gpt-a", status=503, message="a is overloaded")
    fake_openai.script(model="gpt-b", status=500, message="b is broken")
    proxied = await launch(make_config(fake_openai, models={"duo": {"targets": ["up:gpt-a", "up:gpt-b"]}}))

    with pytest.raises(openai.InternalServerError) as caught:
        await proxied.client.chat.completions.create(model="duo", messages=HI)
    assert caught.value.status_code == 500
    assert sdk_error(caught.value)["message"] == "b is broken"
    assert [r.json["model"] for r in fake_openai.requests] == ["gpt-a", "gpt-b"]


async def test_models_list(fake_openai: FakeOpenAI, launch: Launch) -> None:
    config = make_config(fake_openai, models={"smart": {"targets": ["up:gpt-a"]}})
    config["backends"]["up"]["models"] = ["gpt-a", "gpt-b"]
    proxied = await launch(config)

    page = await proxied.client.models.list()

    ids = [m.id for m in page.data]
    assert {"smart", "up:gpt-a", "up:gpt-b", "gpt-a", "gpt-b"} <= set(ids)
    assert all(m.object == "model" for m in page.data)


async def test_healthz_and_head_root(fake_openai: FakeOpenAI, launch: Launch, http: aiohttp.ClientSession) -> None:
    proxied = await launch(make_config(fake_openai))

    async with http.get(proxied.proxy.url + "/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    async with http.head(proxied.proxy.url + "/") as response:
        assert response.status == 200
    async with http.get(proxied.proxy.url + "/v2/nothing") as response:
        assert response.status == 404
        assert_openai_error(await response.json(), "/v2/nothing")


# -- request errors -----------------------------------------------------------------------


async def test_malformed_json_is_400(fake_openai: FakeOpenAI, launch: Launch, http: aiohttp.ClientSession) -> None:
    proxied = await launch(make_config(fake_openai))

    status, body, _ = await post(http, proxied, b'{"model": "gpt-4o-mini", "messages": [')

    assert status == 400
    error = assert_openai_error(body, "not valid JSON")
    assert error["type"] == "invalid_request_error"
    status, body, _ = await post(http, proxied, b"[1, 2]")
    assert status == 400
    assert_openai_error(body, "JSON object")
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"messages": HI}, "model", "'model' is required"),
        ({"model": "", "messages": HI}, "model", "'model' is required"),
        ({"model": "gpt-4o-mini"}, "messages", "'messages' is required"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages", "'messages' is required"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'robot'"),
        ({"model": "gpt-4o-mini", "messages": HI, "stream": "yes"}, "stream", "'stream'"),
    ],
    ids=["no-model", "empty-model", "no-messages", "empty-messages", "bad-role", "bad-stream"],
)
async def test_invalid_request_is_400_naming_the_field(
    fake_openai: FakeOpenAI, launch: Launch, http: aiohttp.ClientSession, body: dict[str, Any], param: str, words: str
) -> None:
    proxied = await launch(make_config(fake_openai))

    status, answer, _ = await post(http, proxied, body)

    assert status == 400
    error = assert_openai_error(answer, words)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert fake_openai.requests == []


async def test_invalid_request_through_the_sdk(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "wizard", "content": "hi"}])  # type: ignore[list-item]
    assert caught.value.status_code == 400
    assert sdk_error(caught.value)["param"] == "messages[0].role"
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    "model, named, listed",
    [
        ("up:gpt-z", "'up:gpt-z'", "serves only gpt-a, gpt-b"),
        ("gpt-z", "'gpt-z'", "up:gpt-a"),
        ("nowhere:gpt-a", "'nowhere:gpt-a'", "up:gpt-b"),
    ],
)
async def test_unknown_model_is_404_listing_what_exists(fake_openai: FakeOpenAI, launch: Launch, model: str, named: str, listed: str) -> None:
    config = make_config(fake_openai, models={"smart": {"targets": ["up:gpt-a"]}})
    config["backends"]["up"]["models"] = ["gpt-a", "gpt-b"]
    proxied = await launch(config)

    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            await proxied.client.chat.completions.create(model=model, messages=HI, stream=stream)
        error = sdk_error(caught.value)
        assert named in error["message"] and listed in error["message"] and "smart" in error["message"]
        assert error["param"] == "model" and error["code"] == "model_not_found"
    assert fake_openai.requests == []


async def test_unknown_model_without_default_backend_is_404(fake_openai: FakeOpenAI, launch: Launch) -> None:
    config = make_config(fake_openai, default_backend=None)
    config["backends"]["up"]["models"] = ["gpt-a"]
    proxied = await launch(config)

    with pytest.raises(openai.NotFoundError) as caught:
        await proxied.client.chat.completions.create(model="mystery", messages=HI)
    error = sdk_error(caught.value)
    assert "'mystery'" in error["message"] and "no default_backend" in error["message"] and "up:gpt-a" in error["message"]
    completion = await proxied.client.chat.completions.create(model="up:gpt-a", messages=HI)
    assert completion.choices[0].message.content == DEFAULT_TEXT


async def test_client_keys(fake_openai: FakeOpenAI, launch: Launch, http: aiohttp.ClientSession) -> None:
    config = make_config(fake_openai, auth={"api_keys": [{"name": "laptop", "key": "${TEST_CLIENT_KEY}"}]})
    proxied = await launch(config, api_key="wrong-key")
    url = proxied.proxy.url + "/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": HI}

    with pytest.raises(openai.AuthenticationError) as caught:
        await proxied.client.chat.completions.create(**body)  # type: ignore[call-overload]
    error = sdk_error(caught.value)
    assert caught.value.status_code == 401 and error["type"] == "authentication_error"
    assert "Authorization: Bearer" in error["message"] and "wrong-key" not in error["message"]
    with pytest.raises(openai.AuthenticationError):
        await proxied.client.chat.completions.create(stream=True, **body)  # type: ignore[call-overload]
    async with http.post(url, json=body) as response:  # no key at all
        assert response.status == 401
        assert_openai_error(await response.json(), "invalid or missing API key")
    async with http.post(url, json=body, headers={"x-api-key": "wrong-key"}) as response:
        assert response.status == 401
    async with http.get(proxied.proxy.url + "/v1/models") as response:
        assert response.status == 401
        assert_openai_error(await response.json())
    assert fake_openai.requests == []

    right = openai.AsyncOpenAI(base_url=proxied.proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    try:
        completion = await right.chat.completions.create(**body)  # type: ignore[call-overload]
        assert completion.choices[0].message.content == DEFAULT_TEXT
        assert (await stream_chat(right)).text == DEFAULT_TEXT
    finally:
        await right.close()
    async with http.post(url, json=body, headers={"x-api-key": CLIENT_KEY}) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["message"]["content"] == DEFAULT_TEXT
    async with http.get(proxied.proxy.url + "/v1/models", headers={"x-api-key": CLIENT_KEY}) as response:
        assert response.status == 200 and (await response.json())["object"] == "list"
    assert all(r.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" for r in fake_openai.requests)
    assert all(CLIENT_KEY not in str(list(r.headers.items())) for r in fake_openai.requests)


async def test_body_over_the_limit_is_413(fake_openai: FakeOpenAI, launch: Launch) -> None:
    proxied = await launch(make_config(fake_openai, proxy={"max_body_bytes": 4096, "drain_timeout": 1}))

    with pytest.raises(openai.APIStatusError) as caught:
        await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 10_000}])
    assert caught.value.status_code == 413
    error = sdk_error(caught.value)
    assert "4096" in error["message"] and "max_body_bytes" in error["message"]
    assert fake_openai.requests == []
    completion = await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # small is fine
    assert completion.choices[0].message.content == DEFAULT_TEXT


@pytest.mark.parametrize("depth", [300, 2000])
async def test_a_body_nested_too_deep_is_a_400(depth: int, fake_openai: FakeOpenAI, launch: Launch, http: aiohttp.ClientSession) -> None:
    """Deeper than the JSON writer goes (254) or than the reader does (1024): a 400 in
    OpenAI's shape either way, the backend never asked."""
    proxied = await launch(make_config(fake_openai))
    body = json.dumps({"model": "gpt-4o-mini", "messages": HI, "metadata_x": None}).replace("null", "[" * depth + "]" * depth)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    for stream in (False, True):
        async with http.post(proxied.proxy.url + "/v1/chat/completions", data=body.replace('"messages"', f'"stream": {str(stream).lower()}, "messages"'), headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert fake_openai.requests == []


# -- upstream errors ----------------------------------------------------------------------


UPSTREAM_ERRORS = [
    (400, openai.BadRequestError, "Invalid value for 'temperature': must be at most 2."),
    (429, openai.RateLimitError, "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3."),
    (500, openai.InternalServerError, "The server had an error while processing your request. Sorry about that!"),
]


@pytest.mark.parametrize("status, exc_type, message", UPSTREAM_ERRORS, ids=["400", "429", "500"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_error_keeps_status_and_message(
    proxied: Proxied, fake_openai: FakeOpenAI, status: int, exc_type: type[openai.APIStatusError], message: str, stream: bool
) -> None:
    fake_openai.script(status=status, message=message, error_code="rate_limit_exceeded" if status == 429 else None, retry_after="7" if status == 429 else None)

    with pytest.raises(exc_type) as caught:
        await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=stream)

    assert caught.value.status_code == status
    error = sdk_error(caught.value)
    assert error["message"] == message
    if status == 429:
        assert caught.value.response.headers["Retry-After"] == "7"
        assert error["type"] == "rate_limit_error"
    assert len(fake_openai.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_unreachable_is_502(launch: Launch, stream: bool) -> None:
    proxied = await launch(make_config(None))  # a port nobody listens on

    with pytest.raises(openai.InternalServerError) as caught:
        await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=stream)

    assert caught.value.status_code == 502
    assert "'up' is unreachable" in sdk_error(caught.value)["message"]


async def test_upstream_malformed_json_is_502(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(malformed=True)

    with pytest.raises(openai.InternalServerError) as caught:
        await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI)

    assert caught.value.status_code == 502
    assert "not JSON" in sdk_error(caught.value)["message"]


async def test_upstream_hangs_is_504(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script(hang_after=0)
    proxied = await launch(make_config(fake_openai, backends={"up": backend(fake_openai, timeout={"read": 0.3})}))

    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            await asyncio.wait_for(proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=stream), BOUND)
        assert caught.value.status_code == 504
        error = sdk_error(caught.value)
        assert "did not answer in time" in error["message"] and error["type"] == "timeout_error"
    for upstream in fake_openai.requests:  # the proxy gave up and hung up on it
        await asyncio.wait_for(upstream.disconnected.wait(), BOUND)


# -- failures after the stream began -------------------------------------------------------


async def _stream_until_error(proxied: Proxied) -> tuple[Collected, openai.APIError]:
    got = Collected()
    with pytest.raises(openai.APIError) as caught:
        await stream_chat(proxied.client, into=got)
    assert not isinstance(caught.value, openai.APIStatusError)  # the stream had begun: 200 then an error event
    return got, caught.value


async def _raw_stream_error(http: aiohttp.ClientSession, proxied: Proxied) -> tuple[list[Any], dict[str, Any]]:
    """Stream with a raw client; every frame but the last must be a chunk, the last an error."""
    status, raw, _ = await post(http, proxied, {"model": "gpt-4o-mini", "messages": HI, "stream": True})
    assert status == 200
    frames = sse_data(raw)
    chunks = [strict_loads(f) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    error = assert_openai_error(strict_loads(frames[-1]))
    return chunks, error


async def test_stream_broken_mid_way_ends_with_an_error_event(proxied: Proxied, fake_openai: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    fake_openai.script(break_after=3)  # the role chunk and two words, then the connection drops

    got, error = await _stream_until_error(proxied)

    assert got.text == "hello from"
    assert "broke off" in error.message
    chunks, body = await _raw_stream_error(http, proxied)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "hello from"
    assert "broke off" in body["message"] and body["type"] == "upstream_error"


async def test_stream_that_goes_silent_ends_with_a_timeout_event(fake_openai: FakeOpenAI, launch: Launch, mode: str, http: aiohttp.ClientSession) -> None:
    fake_openai.script(hang_after=3)
    proxied = await launch(make_config(fake_openai, backends={"up": backend(fake_openai, timeout={"read": 0.3})}), mode)

    got, error = await _stream_until_error(proxied)

    assert got.text == "hello from"
    assert "went silent" in error.message
    _, body = await _raw_stream_error(http, proxied)
    assert body["type"] == "timeout_error"
    for upstream in fake_openai.requests:
        await asyncio.wait_for(upstream.disconnected.wait(), BOUND)


@pytest.mark.parametrize("mode", ["decoded", "decoded+request"])
async def test_stream_with_a_malformed_event_ends_with_an_error_event(fake_openai: FakeOpenAI, launch: Launch, mode: str) -> None:
    # The pass-through path does not parse events, so only decoded streams can notice. One
    # event per read, so the first events reach the client before the bad one (garbage in the
    # first read is an HTTP 502 instead: nothing was sent yet; see tests/integration/test_faults.py).
    fake_openai.script(malformed=True, event_delay=0.03)
    proxied = await launch(make_config(fake_openai), mode)

    got, error = await _stream_until_error(proxied)

    # What arrived in the same read as the bad event may be lost with it; what did arrive is right.
    assert DEFAULT_TEXT.startswith(got.text)
    assert "malformed stream event" in error.message


async def test_client_disconnect_cancels_the_upstream(proxied: Proxied, fake_openai: FakeOpenAI) -> None:
    # 400 words at 25 ms each: the upstream would need 10 s to finish on its own.
    fake_openai.script(text=" ".join(["word"] * 400), event_delay=0.025)

    stream = await proxied.client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    received = 0
    async for chunk in stream:
        received += 1
        if received == 3:
            break
    await stream.close()

    upstream = fake_openai.last
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    assert b"[DONE]" not in upstream.sent
    # The proxy still answers afterwards.
    fake_openai.script()
    assert (await stream_chat(proxied.client)).text == DEFAULT_TEXT


# -- secrets ------------------------------------------------------------------------------


async def test_backend_key_never_reaches_the_client_or_the_log(
    fake_openai: FakeOpenAI, launch: Launch, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A careless upstream that echoes the credential it was given.
    fake_openai.script(status=401, message="Incorrect API key provided: {key}. You can find your API key at ...")
    fake_openai.script(model="gpt-overloaded", status=503, message="overloaded; key {key} is throttled")
    config = make_config(
        fake_openai,
        backends={"up": backend(fake_openai), "down": backend(None)},
        models={"duo": {"targets": ["up:gpt-overloaded", "down:gpt-x"]}},
    )
    proxied = await launch(config)
    answers: list[bytes] = []
    for model in ("gpt-4o-mini", "duo", "down:gpt-x"):
        for stream in (False, True):
            async with http.post(
                proxied.proxy.url + "/v1/chat/completions",
                json={"model": model, "messages": HI, "stream": stream},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ) as response:
                assert response.status >= 400
                answers.append(await response.read())
                answers.append(str(dict(response.headers)).encode())

    assert any(b"Incorrect API key provided" in a for a in answers)  # the message still arrives
    assert fake_openai.requests and all(r.key == UPSTREAM_KEY for r in fake_openai.requests)
    for answer in answers:
        assert UPSTREAM_KEY.encode() not in answer
    assert "trying the next target" in caplog.text
    assert "down:gpt-x failed (502 backend 'down' is unreachable: ClientConnectorError); no other target is left" in caplog.text
    assert UPSTREAM_KEY not in caplog.text
