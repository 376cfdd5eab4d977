"""The ``empty_recovery`` plugin.

Unit tests: what is empty (reasoning alone is, a tool call is not), and the stream processor
(holds until real content, releases everything with it, raises RetryStream only for an empty
answer that may be retried).

End to end through a real llmproxy on a real socket with the official SDKs against the fake
upstreams scripted to answer empty once (``script_next(text="")``) and then normally: the
client gets the second answer, streamed and not, in its own protocol; the backend got the
recovery note the second time; it is asked again only once; tool-call-only and
``max_tokens`` answers are not retried; with the plugin alone the retried stream takes the
pass-through path; across protocols (Anthropic, Gemini and Responses clients → OpenAI backend).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable

import llmproxy_anthropic
import llmproxy_empty_recovery
import llmproxy_gemini
import llmproxy_openai
import openai
import pytest

from clients import CLIENTS
from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import FakeUpstream
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import DEFAULT_TEXT, FakeOpenAI
from fakes.responses_upstream import FakeResponses
from llmproxy import hookimpl
from llmproxy.canonical import EventKind, ImagePart, Response, StreamEvent, TextPart, ThinkingPart, ToolCallPart
from llmproxy.errors import RetryStream
from llmproxy.testing import RunningProxy, build_flow, start_proxy
from llmproxy_empty_recovery import RETRIED, is_empty, watch_stream

BOUND = 10.0
CLIENT_KEY = "client-key-matrix"  # what tests/clients.py sends
UPSTREAM_KEY = "sk-upstream-empty-3a7b"
NOTE = "came back empty"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
HI = [{"role": "user", "content": "say hi"}]


# -- what is empty -------------------------------------------------------------------------------


def test_what_counts_as_empty() -> None:
    assert is_empty(Response(model="m"))
    assert is_empty(Response(model="m", parts=[TextPart(""), TextPart(" \n\t")]))
    assert is_empty(Response(model="m", parts=[ThinkingPart("I could say hi."), TextPart("\n")]))
    assert not is_empty(Response(model="m", parts=[TextPart("hi")]))
    assert not is_empty(Response(model="m", parts=[ToolCallPart("c", "Bash", "{}")]))  # tool call only
    assert not is_empty(Response(model="m", parts=[ImagePart(url="https://example.com/x.png")]))


# -- the processor -------------------------------------------------------------------------------


def flow_for_stream() -> Any:
    return build_flow({"model": "m", "messages": [{"role": "user", "content": "say hi"}], "stream": True})


def feed(processor: Any, events: list[StreamEvent]) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    for event in events:
        result = processor(event)
        if result is not None:
            out.extend([result] if isinstance(result, StreamEvent) else result)
    return out


def test_the_processor_holds_until_real_content_then_releases_everything() -> None:
    flow = flow_for_stream()
    watch = watch_stream(flow)
    start, blank = StreamEvent(EventKind.START, model="m"), StreamEvent(EventKind.TEXT, text="\n")
    assert feed(watch, [start, blank]) == [] and watch(None) is None  # held, even over a flush
    first = StreamEvent(EventKind.TEXT, text="Hi")
    assert feed(watch, [first]) == [start, blank, first]
    rest = [StreamEvent(EventKind.TEXT, text=" there"), StreamEvent(EventKind.STOP, stop_reason="end_turn")]
    assert feed(watch, rest) == rest
    assert flow.metadata == {} and flow.trace == []


def test_a_tool_call_is_content() -> None:
    watch = watch_stream(flow_for_stream())
    events = [StreamEvent(EventKind.START), StreamEvent(EventKind.TOOL_CALL_START, id="c", name="Bash"), StreamEvent(EventKind.STOP, stop_reason="tool_use")]
    assert feed(watch, events) == events


def test_an_empty_stream_asks_again_once_with_the_note() -> None:
    flow = flow_for_stream()
    watch = watch_stream(flow)
    feed(watch, [StreamEvent(EventKind.START), StreamEvent(EventKind.TEXT, text=" ")])
    with pytest.raises(RetryStream):
        watch(StreamEvent(EventKind.STOP, stop_reason="end_turn"))
    assert flow.metadata["empty_recovery"] == RETRIED
    assert NOTE in flow.request.messages[-1].text and flow.request.messages[-1].role == "user"
    assert [t["what"] for t in flow.trace] == ["asked again after an empty answer"]
    # the retried stream is not watched
    assert llmproxy_empty_recovery.stream_start(flow) is None


@pytest.mark.parametrize("stop_reason", ["max_tokens", "content_filter"])
def test_an_empty_answer_that_a_limit_ended_is_passed_on(stop_reason: str) -> None:
    flow = flow_for_stream()
    events = [StreamEvent(EventKind.START), StreamEvent(EventKind.STOP, stop_reason=stop_reason)]  # type: ignore[arg-type]
    assert feed(watch_stream(flow), events) == events and flow.metadata == {}


def test_an_error_event_is_passed_on() -> None:
    events = [StreamEvent(EventKind.START), StreamEvent(EventKind.ERROR, error="boom")]
    assert feed(watch_stream(flow_for_stream()), events) == events


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPTY_UPSTREAM_KEY", UPSTREAM_KEY)


class Decoding:
    """A plugin that watches every stream, so streams are decoded whatever else is loaded."""

    @hookimpl
    def stream_start(self, flow: Any) -> Any:
        return lambda event: event


Launch = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def launch() -> AsyncIterator[Launch]:
    started: list[RunningProxy] = []

    async def launch(fake: FakeUpstream, decoding: bool = False, backend_type: str = "openai", **settings: Any) -> RunningProxy:
        config = {
            "proxy": {"drain_timeout": 0},
            "backends": {"up": {"type": backend_type, "base_url": fake.base_url, "api_keys": ["${EMPTY_UPSTREAM_KEY}"]}},
            "default_backend": "up",
            # most tests watch every stream; streams=None keeps the default (streams with tools)
            "plugins": {"empty_recovery": {"streams": "all", "answers": "all", **settings} if settings.get("streams", "all") is not None else {k: v for k, v in settings.items() if k != "streams"}},
        }
        plugins: list[tuple[str, Any]] = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]
        if decoding:
            plugins.append(("decoding", Decoding()))
        plugins.append(("empty_recovery", llmproxy_empty_recovery))
        proxy = await start_proxy(config, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield launch
    for proxy in started:
        await proxy.stop()


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)


async def ask(client: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> tuple[str, str | None, int]:
    """(text, finish reason, tool calls) as the SDK delivered them."""
    kwargs = {"model": "gpt-5", "messages": HI, **kwargs}
    if not stream:
        choice = (await client.chat.completions.create(**kwargs)).choices[0]
        return choice.message.content or "", choice.finish_reason, len(choice.message.tool_calls or ())
    text, finish, calls = "", None, 0
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += sum(1 for c in choice.delta.tool_calls or () if c.id)
            finish = choice.finish_reason or finish
    return text, finish, calls


def recovery_notes(fake: FakeOpenAI) -> list[int]:
    return [i for i, r in enumerate(fake.requests) if NOTE in json.dumps(r.json["messages"])]


@pytest.mark.parametrize("decoding", [False, True], ids=["alone", "with-a-decoding-plugin"])
@STREAM
async def test_an_empty_answer_is_asked_for_again(fake_openai: FakeOpenAI, launch: Launch, stream: bool, decoding: bool) -> None:
    """Alone, the retried stream takes the pass-through path (same protocol, no processor
    left); with another plugin's processor it is decoded. Either way the client sees only
    the second answer."""
    fake_openai.script_next(text="")
    proxy = await launch(fake_openai, decoding=decoding)
    async with openai_client(proxy) as client:
        text, finish, _ = await ask(client, stream)
    assert text == DEFAULT_TEXT and finish == "stop"
    assert len(fake_openai.requests) == 2 and recovery_notes(fake_openai) == [1]
    retried = fake_openai.requests[1].json["messages"]
    assert len(retried) == 1 and retried[0]["role"] == "user"  # the note joins the user's turn, after a blank line
    content = retried[0]["content"]
    text = content if isinstance(content, str) else "".join(part["text"] for part in content)
    assert text.startswith("say hi\n\n(Your previous attempt")


@STREAM
async def test_a_blank_answer_counts_as_empty(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    fake_openai.script_next(text="  \n\n ")
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        text, _, _ = await ask(client, stream)
    assert text == DEFAULT_TEXT and len(fake_openai.requests) == 2


@STREAM
async def test_it_asks_again_only_once(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    fake_openai.script(text="")
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        text, finish, _ = await ask(client, stream)
    assert text == "" and finish == "stop" and len(fake_openai.requests) == 2


@STREAM
async def test_a_tool_call_only_answer_is_not_retried(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    fake_openai.script(text="")  # the tool call comes with no text at all
    proxy = await launch(fake_openai)
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    async with openai_client(proxy) as client:
        text, finish, calls = await ask(client, stream, tools=[tool])
    assert calls == 1 and finish == "tool_calls" and len(fake_openai.requests) == 1


@STREAM
async def test_an_empty_answer_cut_by_max_tokens_is_not_retried(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    fake_openai.script(text="", truncated=True)
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        text, finish, _ = await ask(client, stream)
    assert text == "" and finish == "length" and len(fake_openai.requests) == 1


async def test_streams_can_be_left_alone(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script_next(text="")
    proxy = await launch(fake_openai, streams=False, prompt="Please answer.")
    async with openai_client(proxy) as client:
        assert (await ask(client, True))[0] == "" and len(fake_openai.requests) == 1
        fake_openai.script_next(text="")
        assert (await ask(client, False))[0] == DEFAULT_TEXT
    assert "Please answer." in json.dumps(fake_openai.requests[-1].json["messages"])


async def test_a_failed_second_call_passes_the_empty_answer_on(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script_next(text="")
    fake_openai.script_next(status=503, message="overloaded")
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        text, finish, _ = await ask(client, False)
    assert text == "" and finish == "stop" and len(fake_openai.requests) == 2


@pytest.mark.parametrize("client_name", ["anthropic", "gemini", "responses"])
@STREAM
async def test_other_protocols_through_an_openai_backend(fake_openai: FakeOpenAI, launch: Launch, client_name: str, stream: bool) -> None:
    fake_openai.script_next(text="")
    proxy = await launch(fake_openai)
    client = CLIENTS[client_name](proxy.url)
    try:
        reply = await client.ask("gpt-5", stream, client.user("say hi"))
    finally:
        await client.close()
    assert reply.text == DEFAULT_TEXT and reply.stop == "end_turn"
    assert len(fake_openai.requests) == 2 and recovery_notes(fake_openai) == [1]


@pytest.mark.parametrize("protocol", sorted(CLIENTS))
@STREAM
async def test_every_protocol_against_its_own_backend(launch: Launch, protocol: str, stream: bool) -> None:
    """Each client against a backend of its own protocol (the strict fakes refuse what the
    real APIs refuse): the empty answer is not seen, the retried request is accepted."""
    fakes = {"chat": FakeOpenAI, "responses": FakeResponses, "anthropic": FakeAnthropic, "gemini": FakeGemini}
    types = {"chat": "openai", "responses": "openai-responses", "anthropic": "anthropic", "gemini": "gemini"}
    async with fakes[protocol]() as fake:
        fake.script_next(text="")
        proxy = await launch(fake, backend_type=types[protocol])
        client = CLIENTS[protocol](proxy.url)
        try:
            reply = await client.ask("gpt-5", stream, client.user("say hi"))
        finally:
            await client.close()
        assert reply.text == DEFAULT_TEXT and reply.stop == "end_turn"
        assert [r.status for r in fake.requests] == [200, 200]
        assert NOTE not in fake.requests[0].body.decode() and NOTE in fake.requests[1].body.decode()
