"""The ``json_repair`` plugin.

Unit tests: what :func:`repair` makes of broken JSON (fences, prose, trailing commas, a
missing brace), schema validation, which wire bodies ask for JSON, and the stream processor
(the text is held and sent repaired in one piece at the end).

End to end through a real llmproxy on a real socket with the official SDKs (their own
structured-output helpers) against the fake upstreams scripted to answer broken JSON
(``raw_text``): every client gets valid JSON its SDK parses, streamed and not, across
protocols; JSON that cannot be repaired passes with ``on_invalid: pass`` and is a 502 with
``error``; a valid answer goes out byte for byte.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable

import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_json_repair
import llmproxy_openai
import openai
import pytest

from clients import CLIENTS, Client, Verdict
from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import FakeUpstream
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses
from llmproxy.canonical import EventKind, Response, StreamEvent, TextPart, ToolCallPart
from llmproxy.testing import RunningProxy, build_flow, start_proxy
from llmproxy_json_repair import JsonHold, JsonRepairSettings, repair, wants_json

BOUND = 10.0
UPSTREAM_KEY = "sk-upstream-json-0d9e"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "integer"}}, "required": ["answer", "confidence"],
          "additionalProperties": False}
FORMAT = {"type": "json_schema", "name": "verdict", "schema": SCHEMA}
BROKEN = 'Sure! Here it is:\n```json\n{"answer": "yes", "confidence": 1,}\n```\nAnything else?'


# -- repair -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [
        (BROKEN, {"answer": "yes", "confidence": 1}),
        ('{"answer": "yes", "confidence": 1', {"answer": "yes", "confidence": 1}),
        ("{'answer': 'yes', 'confidence': 1}", {"answer": "yes", "confidence": 1}),
        ('{answer: "yes", confidence: 1}', {"answer": "yes", "confidence": 1}),
        ('{"answer": "ja – \\u00e9", "confidence": 1,}', {"answer": "ja – é", "confidence": 1}),
    ],
)
def test_repairs_into_valid_json(text: str, value: Any) -> None:
    outcome = repair(text, FORMAT)
    assert outcome.problem is None and outcome.changed and json.loads(outcome.text) == value


def test_valid_json_is_left_exactly_as_it_is() -> None:
    text = '{ "answer" : "yes",\n  "confidence": 1 }'
    outcome = repair(text, FORMAT)
    assert outcome.text is text and not outcome.changed and outcome.problem is None


def test_what_cannot_be_repaired() -> None:
    assert repair("I cannot help with that.", FORMAT).problem == "the answer is not JSON"
    missing = repair('{"answer": "yes"', FORMAT)
    assert missing.problem and "'confidence' is a required property" in missing.problem and missing.text == '{"answer": "yes"'
    assert "at confidence" in repair('{"answer": "yes", "confidence": "high"}', FORMAT).problem
    assert repair('"just a string"', {"type": "json_object"}).problem == "the answer is not a JSON object"
    assert repair("[1, 2]", {"type": "json_object"}).problem is None  # Gemini's JSON mode allows arrays
    assert repair('{"answer": 1}', FORMAT, validate=False).problem is None


def test_wants_json_reads_every_protocol_without_decoding() -> None:
    assert wants_json({"response_format": {"type": "json_schema", "json_schema": {}}})
    assert wants_json({"response_format": {"type": "json_object"}})
    assert not wants_json({"response_format": {"type": "text"}})
    assert wants_json({"text": {"format": {"type": "json_schema", "schema": {}}}})
    assert not wants_json({"text": {"verbosity": "low"}})  # what Codex always sends
    assert wants_json({"output_config": {"format": {"type": "json_schema", "schema": {}}}})
    assert not wants_json({"output_config": {"effort": "high"}})
    assert wants_json({"generationConfig": {"responseMimeType": "application/json"}})
    assert not wants_json({"generationConfig": {"temperature": 0}})
    assert not wants_json({"messages": []})


# -- the processor and the hook -------------------------------------------------------------------------


def json_flow(fmt: dict[str, Any] | None = None, stream: bool = True) -> Any:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "verdict?"}], "stream": stream}
    if fmt is not False:
        body["response_format"] = fmt or {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    return build_flow(body)


def run(processor: Any, events: list[StreamEvent]) -> list[list[StreamEvent]]:
    out = []
    for event in [*events, None]:
        result = processor(event)
        out.append([] if result is None else [result] if isinstance(result, StreamEvent) else list(result))
    return out


def text_events(text: str, size: int = 5) -> list[StreamEvent]:
    return [StreamEvent(EventKind.TEXT, index=0, text=text[i : i + size]) for i in range(0, len(text), size)]


def test_no_processor_without_json_mode() -> None:
    assert llmproxy_json_repair.stream_start(json_flow(False)) is None
    assert isinstance(llmproxy_json_repair.stream_start(json_flow()), JsonHold)


def test_stream_text_is_held_and_sent_repaired_at_the_end() -> None:
    flow = json_flow()
    start = StreamEvent(EventKind.START, model="m")
    out = run(llmproxy_json_repair.stream_start(flow), [start, *text_events(BROKEN), StreamEvent(EventKind.BLOCK_STOP, index=0)])
    assert out[0] == [start]  # the stream begins at once
    assert all(batch == [] for batch in out[1:-1])  # the text is held
    final = out[-1]
    assert [e.kind for e in final] == ["text", "block_stop"] and json.loads(final[0].text) == {"answer": "yes", "confidence": 1}
    assert flow.trace[0]["what"] == "repaired"


def test_stream_valid_text_goes_out_unchanged() -> None:
    text = '{"answer":"yes","confidence":1}'
    out = run(llmproxy_json_repair.stream_start(json_flow()), text_events(text))
    assert out[-1][0].text == text


def test_stream_invalid_text_pass_or_error() -> None:
    flow = json_flow()
    out = run(llmproxy_json_repair.stream_start(flow), text_events("no JSON here"))
    assert out[-1][0].text == "no JSON here" and flow.trace[0]["what"] == "invalid"
    processor = JsonHold(json_flow(), JsonRepairSettings(on_invalid="error"))
    out = run(processor, text_events("no JSON here"))
    assert out[-1][0].kind == EventKind.ERROR and out[-1][0].error.status == 502


def test_stream_text_before_a_tool_call_is_released_before_it() -> None:
    processor = llmproxy_json_repair.stream_start(json_flow())
    call = StreamEvent(EventKind.TOOL_CALL_START, index=1, id="c", name="lookup")
    out = run(processor, [*text_events('{"answer": "x", "confidence": 2'), call])
    assert [e.kind for e in out[-2]] == ["text", "block_stop", "tool_call_start"] and out[-1] == []


def test_response_hook() -> None:
    flow = json_flow(stream=False)
    flow.response = Response(model="m", parts=[TextPart("```json\n{'answer': 'no', "), TextPart("'confidence': 3}\n```")])
    llmproxy_json_repair.response(flow)
    assert [json.loads(p.text) for p in flow.response.parts] == [{"answer": "no", "confidence": 3}]
    flow.response = Response(model="m", parts=[ToolCallPart("c", "lookup", "{}")], stop_reason="tool_use")
    llmproxy_json_repair.response(flow)
    assert flow.response.tool_calls and not flow.trace[1:]


# -- end to end ----------------------------------------------------------------------------------------

FAKES: dict[str, type[FakeUpstream]] = {"chat": FakeOpenAI, "responses": FakeResponses, "anthropic": FakeAnthropic, "gemini": FakeGemini}
BACKEND_TYPES = {"chat": "openai", "responses": "openai-responses", "anthropic": "anthropic", "gemini": "gemini"}
UPSTREAM_MODELS = {"chat": "gpt-5", "responses": "gpt-5", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-pro"}
PROVIDERS = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]
Launch = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeUpstream]]:
    started = {name: await cls().start() for name, cls in FAKES.items()}
    yield started
    for fake in started.values():
        await fake.close()


@pytest.fixture
async def launch(fakes: dict[str, FakeUpstream], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Launch]:
    monkeypatch.setenv("JSON_UPSTREAM_KEY", UPSTREAM_KEY)
    proxies: list[RunningProxy] = []

    async def launch(**settings: Any) -> RunningProxy:
        config = {
            "proxy": {"drain_timeout": 0},
            "backends": {name: {"type": BACKEND_TYPES[name], "base_url": fake.base_url, "api_keys": ["${JSON_UPSTREAM_KEY}"]} for name, fake in fakes.items()},
            "models": {f"via-{name}": {"targets": [f"{name}:{UPSTREAM_MODELS[name]}"]} for name in FAKES},
            "plugins": {"json_repair": settings},
        }
        proxy = await start_proxy(config, plugins=[*PROVIDERS, ("json_repair", llmproxy_json_repair)], entry_points=False)
        proxies.append(proxy)
        return proxy

    yield launch
    for proxy in proxies:
        await proxy.stop()


@STREAM
@pytest.mark.parametrize("back", list(FAKES))
@pytest.mark.parametrize("front", list(CLIENTS))
async def test_every_client_parses_the_repaired_json(launch: Launch, fakes: dict[str, FakeUpstream], front: str, back: str, stream: bool) -> None:
    proxy = await launch()
    client: Client = CLIENTS[front](proxy.url)
    try:
        fakes[back].script(raw_text=True, text=BROKEN)
        reply = await client.ask(f"via-{back}", stream, client.user("verdict?"), schema=True)
        assert reply.parsed == Verdict(answer="yes", confidence=1)
        assert json.loads(reply.text) == {"answer": "yes", "confidence": 1}
    finally:
        await client.close()


async def chat(proxy: RunningProxy, stream: bool, fmt: dict[str, Any] | None = None) -> str:
    sdk = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0, timeout=BOUND)
    fmt = fmt or {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    kwargs: dict[str, Any] = {"model": "via-chat", "messages": [{"role": "user", "content": "verdict?"}], "response_format": fmt}
    try:
        if not stream:
            return (await sdk.chat.completions.create(**kwargs)).choices[0].message.content or ""
        text = ""
        async for chunk in await sdk.chat.completions.create(stream=True, **kwargs):
            text += "".join(c.delta.content or "" for c in chunk.choices)
        return text
    finally:
        await sdk.close()


@STREAM
async def test_valid_json_passes_byte_for_byte(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch()
    text = '{ "answer" : "yes",\n  "confidence": 1 }'
    fakes["chat"].script(raw_text=True, text=text)
    assert await chat(proxy, stream) == text


@STREAM
async def test_json_object_mode(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch()
    fakes["chat"].script(raw_text=True, text="Result: {'ok': true, 'items': [1, 2,]")
    assert json.loads(await chat(proxy, stream, {"type": "json_object"})) == {"ok": True, "items": [1, 2]}


@STREAM
async def test_invalid_passes_as_it_is_by_default(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch()
    fakes["chat"].script(raw_text=True, text='{"answer": "maybe"}')  # valid JSON, but confidence is missing
    assert await chat(proxy, stream) == '{"answer": "maybe"}'


@STREAM
async def test_invalid_is_an_error_when_configured(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch(on_invalid="error")
    fakes["chat"].script(raw_text=True, text="I would rather not say.")
    with pytest.raises(openai.APIError, match="not valid JSON for this request: the answer is not JSON") as failed:
        await chat(proxy, stream)
    if not stream:
        assert isinstance(failed.value, openai.APIStatusError) and failed.value.status_code == 502


async def test_requests_without_json_mode_are_not_touched(launch: Launch, fakes: dict[str, FakeUpstream]) -> None:
    proxy = await launch()
    client: Client = CLIENTS["chat"](proxy.url)
    fakes["chat"].script(raw_text=True, text=BROKEN)
    try:
        reply = await client.ask("via-chat", True, client.user("hi"))
        assert reply.text == BROKEN
    finally:
        await client.close()
