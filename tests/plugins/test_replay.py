"""The ``replay`` backend: a session recorded through llmproxy (``wire_capture``) against a fake
upstream is served again with the fake gone — the same answers through the official SDKs,
streamed and not, tool calls included; matching by fingerprint (out of order) and by order;
a recorded stream asked for whole and the reverse; another protocol's client; answers
recorded from a canonical backend; a clear 404 on a miss; a clear start-up error on a bad path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import anthropic
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_offline
import llmproxy_openai
import llmproxy_replay
import llmproxy_wire_capture
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from llmproxy.config import ConfigError
from llmproxy.testing import RunningProxy, start_proxy
from llmproxy_replay import answer_of

BOUND = 10.0
UPSTREAM_KEY = "sk-upstream-replay-2f8a6c1e"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}}, "required": ["city"]},
    },
}


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAY_UPSTREAM_KEY", UPSTREAM_KEY)


@pytest.fixture
async def launch() -> AsyncIterator[Any]:
    started: list[RunningProxy] = []

    async def launch(config: dict[str, Any]) -> RunningProxy:
        plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini), ("offline", llmproxy_offline),
                   ("replay", llmproxy_replay), ("wire_capture", llmproxy_wire_capture)]
        proxy = await start_proxy(config, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield launch
    for proxy in started:
        await proxy.stop()


def recording(path: Path, fake: FakeOpenAI) -> dict[str, Any]:
    return {
        "proxy": {"drain_timeout": 1},
        "backends": {"up": {"type": "openai", "base_url": fake.base_url, "api_keys": ["${REPLAY_UPSTREAM_KEY}"]}},
        "default_backend": "up",
        "plugins": {"wire_capture": {"path": str(path)}},
    }


def replaying(path: Path | str, **settings: Any) -> dict[str, Any]:
    return {"proxy": {"drain_timeout": 1}, "backends": {"recorded": {"type": "replay", "path": str(path), **settings}}, "default_backend": "recorded"}


def client_of(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=BOUND)


async def call(client: openai.AsyncOpenAI, messages: list[dict[str, Any]], stream: bool, **kwargs: Any) -> dict[str, Any]:
    """What the SDK delivered, folded: text, tool calls (id, name, arguments), finish reason."""
    kwargs.setdefault("model", "gpt-4o-mini")
    if not stream:
        reply = await client.chat.completions.create(messages=messages, **kwargs)  # type: ignore[arg-type]
        message = reply.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]
        return {"text": message.content or "", "calls": calls, "finish": reply.choices[0].finish_reason}
    text, calls, finish = "", {}, None
    async for chunk in await client.chat.completions.create(messages=messages, stream=True, **kwargs):  # type: ignore[arg-type]
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for c in choice.delta.tool_calls or ():
                entry = calls.setdefault(c.index, [c.id, c.function.name if c.function else None, ""])
                entry[2] += (c.function.arguments or "") if c.function else ""
            finish = choice.finish_reason or finish
    return {"text": text, "calls": [tuple(v) for _, v in sorted(calls.items())], "finish": finish}


async def agent_session(client: openai.AsyncOpenAI, fake: FakeOpenAI | None) -> list[dict[str, Any]]:
    """A small agent session: a tool call, its result, a streamed follow-up, a plain question.
    With ``fake``, each turn is scripted to answer something different."""
    answers = []
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = await call(client, question, stream=False, tools=[WEATHER])
    answers.append(first)
    (call_id, name, arguments) = first["calls"][0]
    if fake is not None:
        fake.script(text="It is sunny in Paris.")
    follow_up = question + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24°C"},
    ]
    answers.append(await call(client, follow_up, stream=True, tools=[WEATHER]))
    if fake is not None:
        fake.script(text="Bonjour from the fake.")
    answers.append(await call(client, [{"role": "user", "content": "Say hello in French."}], stream=True))
    return answers


async def record(tmp_path: Path, launch: Any, session: Any = agent_session) -> tuple[Path, list[dict[str, Any]]]:
    path = tmp_path / "session.jsonl"
    async with FakeOpenAI() as fake:
        proxy = await launch(recording(path, fake))
        client = client_of(proxy)
        answers = await session(client, fake)
        await client.close()
        await proxy.stop()
    return path, answers


# -- end to end ------------------------------------------------------------------------------------


async def test_a_recorded_agent_session_runs_again_offline(tmp_path: Path, launch: Any) -> None:
    path, recorded = await record(tmp_path, launch)
    assert recorded[0]["calls"] and recorded[0]["finish"] == "tool_calls"
    assert recorded[1]["text"] == "It is sunny in Paris." and recorded[2]["text"] == "Bonjour from the fake."
    assert len(path.read_text().splitlines()) == 3

    # The fake is gone: every answer now comes from the file.
    proxy = await launch(replaying(path))
    client = client_of(proxy)
    assert await agent_session(client, None) == recorded
    models = await client.models.list()
    assert [m.id for m in models.data] == ["recorded:gpt-4o-mini", "gpt-4o-mini"]
    await client.close()


async def test_fingerprint_matching_serves_requests_out_of_order_and_order_mode_in_order(tmp_path: Path, launch: Any) -> None:
    async def three(client: openai.AsyncOpenAI, fake: FakeOpenAI | None) -> list[dict[str, Any]]:
        out = []
        for n in ("one", "two", "three"):
            if fake is not None:
                fake.script(text=f"answer {n}")
            out.append(await call(client, [{"role": "user", "content": f"question {n}"}], stream=n == "two"))
        return out

    path, recorded = await record(tmp_path, launch, three)
    proxy = await launch(replaying(path))
    client = client_of(proxy)
    assert (await call(client, [{"role": "user", "content": "question three"}], stream=False))["text"] == "answer three"
    assert (await call(client, [{"role": "user", "content": "question one"}], stream=True))["text"] == "answer one"
    # asked again: the same recorded answer again
    assert (await call(client, [{"role": "user", "content": "question one"}], stream=False))["text"] == "answer one"
    # not recorded at all: the next unused answer for the model
    assert (await call(client, [{"role": "user", "content": "question four"}], stream=False))["text"] == "answer two"
    await client.close()

    proxy = await launch(replaying(path, match="order"))
    client = client_of(proxy)
    got = [(await call(client, [{"role": "user", "content": "anything"}], stream=False))["text"] for _ in range(3)]
    assert got == ["answer one", "answer two", "answer three"]
    with pytest.raises(openai.NotFoundError) as missed:
        await call(client, [{"role": "user", "content": "anything"}], stream=False)
    message = missed.value.response.json()["error"]["message"]
    assert "replay backend 'recorded' has no recorded answer left for this model: model 'gpt-4o-mini'" in message
    assert "gpt-4o-mini (3 recorded, 0 unused)" in message and str(path) in message
    await client.close()


async def test_a_miss_is_a_404_naming_what_was_asked(tmp_path: Path, launch: Any) -> None:
    path, _ = await record(tmp_path, launch)
    proxy = await launch(replaying(path, match="fingerprint"))
    client = client_of(proxy)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as missed:
            await call(client, [{"role": "user", "content": "never asked"}], stream=stream, model="other-model")
        error = missed.value.response.json()["error"]
        assert error["code"] == "replay_miss"
        assert "no recorded answer with this request's fingerprint: model 'other-model', fingerprint " in error["message"]
        assert "holds: gpt-4o-mini (3 recorded, 3 unused)" in error["message"]
    await client.close()


async def test_a_stream_served_whole_and_a_whole_answer_streamed(tmp_path: Path, launch: Any) -> None:
    path, recorded = await record(tmp_path, launch)
    proxy = await launch(replaying(path, timing="recorded", speed=1000))
    client = client_of(proxy)
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    streamed = await call(client, question, stream=True, tools=[WEATHER])  # recorded whole
    assert streamed["calls"] == recorded[0]["calls"] and streamed["finish"] == "tool_calls"
    whole = await call(client, [{"role": "user", "content": "Say hello in French."}], stream=False)  # recorded as a stream
    assert whole["text"] == "Bonjour from the fake." and whole["finish"] == "stop"
    await client.close()


async def test_another_protocols_client_gets_the_same_answers(tmp_path: Path, launch: Any) -> None:
    path, recorded = await record(tmp_path, launch)
    proxy = await launch(replaying(path))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=BOUND)
    reply = await client.messages.create(model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "Say hello in French."}])
    assert reply.content[0].text == recorded[2]["text"]
    async with client.messages.stream(model="gpt-4o-mini", max_tokens=100, tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
                                      messages=[{"role": "user", "content": "What's the weather in Paris?"}]) as events:
        message = await events.get_final_message()
    (tool_use,) = [b for b in message.content if b.type == "tool_use"]
    assert tool_use.name == "get_weather" and json.dumps(tool_use.input) == json.dumps(json.loads(recorded[0]["calls"][0][2]))
    await client.close()


async def test_a_gemini_session_replays_through_the_gemini_sdk(tmp_path: Path, launch: Any) -> None:
    path = tmp_path / "gemini.jsonl"

    async def ask(proxy: RunningProxy) -> list[str]:
        client = genai.Client(api_key="unused", http_options=genai_types.HttpOptions(base_url=proxy.url, api_version="v1beta", timeout=int(BOUND * 1000)))
        texts = [(await client.aio.models.generate_content(model="gemini-2.5-flash", contents="first")).text or ""]
        streamed = ""
        async for chunk in await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="second"):
            streamed += chunk.text or ""
        texts.append(streamed)
        await client.aio.aclose()
        client.close()
        return texts

    async with FakeGemini() as fake:
        fake.script(text="gemini answer")
        proxy = await launch({"backends": {"gem": {"type": "gemini", "base_url": fake.base_url, "api_keys": ["${REPLAY_UPSTREAM_KEY}"]}},
                              "default_backend": "gem", "plugins": {"wire_capture": {"path": str(path)}}})
        recorded = await ask(proxy)
        await proxy.stop()
    assert recorded == ["gemini answer", "gemini answer"]
    proxy = await launch(replaying(path, match="fingerprint"))
    assert await ask(proxy) == recorded


async def test_answers_recorded_from_a_canonical_backend_are_served_from_the_clients_answer(tmp_path: Path, launch: Any) -> None:
    path = tmp_path / "offline.jsonl"
    proxy = await launch({"backends": {"off": {"type": "offline", "mode": "scripted", "replies": ["canned words here"]}},
                          "default_backend": "off", "plugins": {"wire_capture": {"path": str(path)}}})
    client = client_of(proxy)
    assert (await call(client, [{"role": "user", "content": "hi"}], stream=True))["text"] == "canned words here"
    await client.close()
    await proxy.stop()
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["attempts"][0].get("response") is None  # nothing on the wire upstream

    proxy = await launch(replaying(path))
    client = client_of(proxy)
    assert (await call(client, [{"role": "user", "content": "hi"}], stream=False))["text"] == "canned words here"
    await client.close()


async def test_a_path_that_does_not_exist_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backends\.recorded\.path: cannot read .*missing\.jsonl"):
        await start_proxy(replaying(tmp_path / "missing.jsonl"), plugins=[("replay", llmproxy_replay)], entry_points=False)
    with pytest.raises(ConfigError, match=r"no capture file matches"):
        await start_proxy(replaying(tmp_path / "*.jsonl"), plugins=[("replay", llmproxy_replay)], entry_points=False)


# -- what counts as an answer ---------------------------------------------------------------------------


def test_only_successful_flows_with_an_answer_are_served() -> None:
    ok = {"id": "a", "status": 200, "model": "m", "frontend": "openai_chat",
          "attempts": [{"model": "m", "protocol": "openai_chat", "status": 200, "start": 0.5, "response": {"events": [{"t": 0.75, "data": {"x": 1}}, {"t": 1.0, "data": "[DONE]"}]}}]}
    answer = answer_of(ok)
    assert answer is not None and answer.protocol == "openai_chat" and answer.models == ("m",)
    assert answer.frames == [(0.25, b'data: {"x":1}\n\n'), (0.5, b"data: [DONE]\n\n")]
    assert answer_of({**ok, "status": 429}) is None
    assert answer_of({**ok, "kind": "count_tokens"}) is None
    assert answer_of({**ok, "error": {"status": 500}}) is None
    failed_then_ok = {**ok, "attempts": [{"model": "m", "protocol": "openai_chat", "status": 503, "response": {"body": {"error": {}}}}, *ok["attempts"]]}
    assert answer_of(failed_then_ok).frames == answer.frames  # type: ignore[union-attr]
    assert answer_of({**ok, "attempts": [], "response": {"status": 200}}) is None  # recorded without bodies
