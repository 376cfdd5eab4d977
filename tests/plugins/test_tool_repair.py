"""The ``tool_repair`` plugin.

Unit tests: every written form is found (in a whole text and fed piece by piece at random
splits, with the same result), text that is not a call is released as soon as that is
clear, arguments are repaired and typed and validated, and the stream processor renumbers
blocks around the calls it inserts.

End to end through a real llmproxy on a real socket with the official SDKs against the fake
upstreams, scripted to write a tool call as text (``raw_text``) or to send broken argument
JSON (``tool_arguments``): the client receives a proper tool call in its own protocol,
streamed and not, across protocols; an invalid call is asked for again (the backend sees the
re-ask) or refused with a 502; text that merely looks like a call passes untouched.
"""

from __future__ import annotations

import json
import random
from typing import Any, AsyncIterator, Awaitable, Callable

import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_openai
import llmproxy_tool_repair
import openai
import pytest

from clients import CLIENTS, Client
from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import FakeUpstream
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses
from llmproxy.canonical import EventKind, Response, StreamEvent, TextPart, Tool, ToolCallPart
from llmproxy.errors import RetryStream
from llmproxy.testing import RunningProxy, build_flow, start_proxy
from llmproxy_tool_repair import Repairer, ToolRepairSettings, find_calls, fix_arguments
from llmproxy_tool_repair.textcalls import Scanner, TextCall

BOUND = 10.0
UPSTREAM_KEY = "sk-upstream-repair-77c1"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
TOOLS = {"Bash", "Read", "get_weather", "shell"}


def resolve(name: str) -> str | None:
    if name in TOOLS:
        return name
    return next((t for t in TOOLS if t.lower() == name.lower()), None)


def calls_of(pieces: list[Any]) -> list[tuple[str, Any]]:
    return [(p.name, dict(p.arguments)) for p in pieces if isinstance(p, TextCall)]


def texts_of(pieces: list[Any]) -> str:
    return "".join(p for p in pieces if isinstance(p, str))


# -- finding written calls ---------------------------------------------------------------------------

WRITTEN = {
    "fenced json": ('I will list the files.\n```json\n{"name": "Bash", "arguments": {"command": "ls"}}\n```', [("Bash", {"command": "ls"})], "I will list the files.\n"),
    "fence without language": ('```\n{"name": "Bash", "parameters": {"command": "ls"}}\n```', [("Bash", {"command": "ls"})], ""),
    "tool_call fence": ('```tool_call\n{"tool": "Bash", "args": {"command": "ls"}}\n```', [("Bash", {"command": "ls"})], ""),
    "tags": ('<tool_call>\n{"name": "Read", "arguments": {"file_path": "a.py"}}\n</tool_call>', [("Read", {"file_path": "a.py"})], ""),
    "two tags": ('<tool_call>{"name": "Read", "arguments": {"file_path": "a"}}</tool_call>\n<tool_call>{"name": "Read", "arguments": {"file_path": "b"}}</tool_call>',
                 [("Read", {"file_path": "a"}), ("Read", {"file_path": "b"})], "\n"),
    "qwen xml": ("<tool_call>\n<function=Bash>\n<parameter=command>\nls -la\n</parameter>\n</function>\n</tool_call>", [("Bash", {"command": "ls -la"})], ""),
    "xml without wrapper": ("<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>",
                            [("get_weather", {"city": "Paris", "days": "3"})], ""),
    "prefix": ('TOOL CALL: Bash {"command": "pwd"}', [("Bash", {"command": "pwd"})], ""),
    "prefix with parentheses": ('Tool call: get_weather({"city": "Oslo", "days": 3}) then more', [("get_weather", {"city": "Oslo", "days": 3})], " then more"),
    "prefix with object": ('TOOL_CALL: {"name": "Bash", "arguments": {"command": "id"}}', [("Bash", {"command": "id"})], ""),
    "mistral": ('[TOOL_CALLS][{"name": "Bash", "arguments": {"command": "ls"}}]', [("Bash", {"command": "ls"})], ""),
    "bare object": ('{"tool": "Bash", "args": {"command": "ls"}}', [("Bash", {"command": "ls"})], ""),
    "bare, arguments as a string": ('  {"name": "Bash", "arguments": "{\\"command\\": \\"ls\\"}"}', [("Bash", {"command": "ls"})], "  "),
    "openai shape": ('{"type": "function", "function": {"name": "Bash", "arguments": "{\\"command\\": \\"ls\\"}"}}', [("Bash", {"command": "ls"})], ""),
    "tool_calls list": ('```json\n{"tool_calls": [{"name": "Read", "arguments": {"file_path": "x"}}]}\n```', [("Read", {"file_path": "x"})], ""),
    "broken json": ('<tool_call>{"name": "Bash", "arguments": {"command": "ls",}</tool_call>', [("Bash", {"command": "ls"})], ""),
    "unclosed at the end": ('<tool_call>{"name": "bash", "arguments": {"command": "ls"}}', [("Bash", {"command": "ls"})], ""),
    "name in other case": ('```json\n{"name": "BASH", "arguments": {"command": "ls"}}\n```', [("Bash", {"command": "ls"})], ""),
}

NOT_CALLS = [
    "Here is some code:\n```python\nprint({'name': 'Bash'})\n```\nDone.",
    '```json\n{"users": [{"name": "Bash"}]}\n```',
    '```json\n{"name": "John", "arguments": {"age": 3}}\n```',  # no such tool
    '{"status": "ok"}',
    "The Tool call: syntax is explained below. TOOL CALL: nothing {",
    "Use <tool_call> tags, like <tool_call>this</tool_call>.",
    "Prices went from $3 to <5 and `x` < y; T-shirts.",
    'Then: {"name": "Bash", "arguments": {"command": "ls"}} — a bare object after prose is prose.',
]


@pytest.mark.parametrize("name", list(WRITTEN))
def test_written_forms(name: str) -> None:
    text, calls, rest = WRITTEN[name]
    pieces = find_calls(text, resolve)
    assert calls_of(pieces) == calls
    assert texts_of(pieces) == rest


@pytest.mark.parametrize("text", NOT_CALLS)
def test_look_alikes_stay_text(text: str) -> None:
    assert find_calls(text, resolve) == [text]


@pytest.mark.parametrize("text", [w[0] for w in WRITTEN.values()] + NOT_CALLS)
def test_pieces_give_the_same_result(text: str) -> None:
    whole = find_calls(text, resolve)
    rng = random.Random(text)
    for _ in range(25):
        scanner = Scanner(resolve)
        out: list[Any] = []
        i = 0
        while i < len(text):
            k = rng.randint(1, 9)
            out += scanner.feed(text[i : i + k])
            i += k
        out += scanner.finish()
        merged: list[Any] = []
        for piece in out:
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] += piece
            else:
                merged.append(piece)
        assert merged == whole


def test_text_that_is_not_a_call_is_released_at_once() -> None:
    scanner = Scanner(resolve)
    assert scanner.feed("Sure, here is the code:\n") == ["Sure, here is the code:\n"]
    assert scanner.feed("```j") == []  # could be ```json …
    assert scanner.feed("ava\n") == ["```java\n"]  # … but is not: released with its language line
    assert scanner.feed('{"name": "Bash", "arguments": {}}\n') == ['{"name": "Bash", "arguments": {}}\n']  # inside python: not looked at
    assert scanner.feed("``") == []  # the closing fence, perhaps
    assert scanner.feed("`\nAnd <tool_") == ["```\nAnd "]  # … which is held only while it could be a tag
    assert scanner.feed("tip>") == ["<tool_tip>"]
    assert scanner.feed('```json\n{"data":') == ['```json\n{"data":']  # a first key no call has
    assert scanner.feed(" 1}\n```") == [' 1}\n```']
    assert not scanner.holding


def test_a_bare_object_is_released_as_soon_as_its_first_key_rules_it_out() -> None:
    scanner = Scanner(resolve)
    assert scanner.feed("{") == []
    assert scanner.feed('"ans') == []
    assert scanner.feed('wer": 42}') == ['{"answer": 42}']


def test_held_text_is_bounded() -> None:
    scanner = Scanner(resolve, max_held=100)
    assert scanner.feed('<tool_call>{"name": "Bash", "arguments": {"command": "') == []
    released = scanner.feed("x" * 200)
    assert texts_of(released).startswith("<tool_call>") and not scanner.holding


# -- arguments -----------------------------------------------------------------------------------------

SHELL = Tool("shell", parameters={"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}}, "required": ["command"]})
SETTINGS = ToolRepairSettings()


def test_fix_arguments() -> None:
    fine = fix_arguments('{"command": "ls"}', SHELL, SETTINGS)
    assert (fine.text, fine.changed, fine.problem) == ('{"command": "ls"}', False, None)
    broken = fix_arguments("{'command': 'ls', 'timeout': 5,", SHELL, SETTINGS)
    assert json.loads(broken.text) == {"command": "ls", "timeout": 5} and broken.changed and broken.problem is None
    twice = fix_arguments(json.dumps(json.dumps({"command": "ls"})), SHELL, SETTINGS)
    assert json.loads(twice.text) == {"command": "ls"} and twice.changed
    wrong = fix_arguments('{"cmd": "ls",', SHELL, SETTINGS)
    assert wrong.changed and "'command' is a required property" in wrong.problem
    assert fix_arguments("not json at all", SHELL, SETTINGS).problem
    assert fix_arguments('{"cmd": 1}', SHELL, SETTINGS).problem is None  # valid JSON is not validated by default ...
    assert fix_arguments('{"cmd": 1}', SHELL, ToolRepairSettings(validate_calls="all")).problem  # ... unless asked
    assert fix_arguments('{"cmd": 1', SHELL, ToolRepairSettings(validate_calls="none")).problem is None
    assert fix_arguments('{"command": "ls"', SHELL, ToolRepairSettings(repair_arguments=False)).problem


def test_xml_values_are_typed_by_the_schema() -> None:
    [call] = find_calls("<function=shell><parameter=command>ls</parameter><parameter=timeout>30</parameter></function>", lambda n: n)
    fixed = fix_arguments(call.arguments, SHELL, SETTINGS, converted=True)
    assert json.loads(fixed.text) == {"command": "ls", "timeout": 30}


# -- the stream processor --------------------------------------------------------------------------

SHELL_WIRE = {"type": "function", "function": {"name": "shell", "parameters": SHELL.parameters}}


def stream_flow(tools: list[Any] | None = None) -> Any:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True}
    if tools is not False:
        body["tools"] = tools or [SHELL_WIRE]
    return build_flow(body)


def run(processor: Any, events: list[StreamEvent]) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    for event in [*events, None]:
        result = processor(event)
        if result is not None:
            out += [result] if isinstance(result, StreamEvent) else result
    return out


def text_events(text: str, index: int = 0, size: int = 4) -> list[StreamEvent]:
    return [StreamEvent(EventKind.TEXT, index=index, text=text[i : i + size]) for i in range(0, len(text), size)]


def test_no_processor_without_tools() -> None:
    assert llmproxy_tool_repair.stream_start(stream_flow(False)) is None
    assert isinstance(llmproxy_tool_repair.stream_start(stream_flow()), Repairer)


def test_written_call_in_a_stream_becomes_a_call_and_blocks_are_renumbered() -> None:
    flow = stream_flow()
    text = 'Listing.\n<tool_call>{"name": "shell", "arguments": {"command": "ls"}}</tool_call>\nDone.'
    events = [StreamEvent(EventKind.START, model="m"), StreamEvent(EventKind.THINKING, index=0, text="hmm"), StreamEvent(EventKind.BLOCK_STOP, index=0),
              *text_events(text, 1), StreamEvent(EventKind.BLOCK_STOP, index=1),
              StreamEvent(EventKind.TOOL_CALL_START, index=2, id="real", name="shell"), StreamEvent(EventKind.TOOL_CALL_DELTA, index=2, text='{"command": "pwd"}'),
              StreamEvent(EventKind.BLOCK_STOP, index=2), StreamEvent(EventKind.STOP, stop_reason="end_turn")]
    out = run(llmproxy_tool_repair.stream_start(flow), events)
    blocks: dict[int, list[str]] = {}
    for event in out:
        if event.kind not in ("start", "stop"):
            blocks.setdefault(event.index, []).append(event.kind)
    assert "".join(e.text for e in out if e.kind == "text" and e.index == 1) == "Listing.\n"
    [made] = [e for e in out if e.kind == "tool_call_start" and e.id != "real"]
    assert made.name == "shell" and made.id.startswith("call_")
    assert json.loads("".join(e.text for e in out if e.kind == "tool_call_delta" and e.index == made.index)) == {"command": "ls"}
    after = [e for e in out if e.kind == "text" and e.index not in (1,)]
    assert "".join(e.text for e in after) == "\nDone." and len({e.index for e in after}) == 1
    # every block has one index of its own, and indices are never reused
    assert all(kinds[-1] == "block_stop" and kinds.count("block_stop") == 1 for kinds in blocks.values()), blocks
    assert len(blocks) == 5
    assert out[-1].stop_reason == "tool_use"
    assert [t["what"] for t in flow.trace] == ["converted"]


def test_real_call_that_parses_is_released_untouched() -> None:
    events = [StreamEvent(EventKind.TOOL_CALL_START, index=0, id="c", name="shell"),
              StreamEvent(EventKind.TOOL_CALL_DELTA, index=0, text='{ "command":'), StreamEvent(EventKind.TOOL_CALL_DELTA, index=0, text=' "ls" }'),
              StreamEvent(EventKind.BLOCK_STOP, index=0)]
    processor = llmproxy_tool_repair.stream_start(stream_flow())
    assert processor(events[0]) is None and processor(events[1]) is None and processor(events[2]) is None
    assert processor(events[3]) == events  # the very objects, at the block stop


def test_stream_reask_only_before_anything_was_sent() -> None:
    flow = stream_flow()
    processor = llmproxy_tool_repair.stream_start(flow)
    processor(StreamEvent(EventKind.START, model="m"))
    events = [StreamEvent(EventKind.TOOL_CALL_START, index=0, id="c", name="shell"), StreamEvent(EventKind.TOOL_CALL_DELTA, index=0, text='{"cmd": 1'),
              StreamEvent(EventKind.BLOCK_STOP, index=0)]
    processor(events[0])
    processor(events[1])
    with pytest.raises(RetryStream):
        processor(events[2])
    assert flow.metadata["tool_repair"] == "reasked"
    assert "'command' is a required property" in flow.request.messages[-1].text
    # the second stream: an invalid call now ends it with an error
    again = run(llmproxy_tool_repair.stream_start(flow), [StreamEvent(EventKind.START, model="m"), *[StreamEvent(e.kind, index=0, id=e.id, name=e.name, text=e.text) for e in events]])
    assert again[-1].kind == EventKind.ERROR and again[-1].error.status == 502


def test_once_text_went_out_an_invalid_call_is_an_error() -> None:
    processor = llmproxy_tool_repair.stream_start(stream_flow())
    out = run(processor, [StreamEvent(EventKind.START, model="m"), *text_events("Running it."), StreamEvent(EventKind.BLOCK_STOP, index=0),
                          StreamEvent(EventKind.TOOL_CALL_START, index=1, id="c", name="shell"), StreamEvent(EventKind.TOOL_CALL_DELTA, index=1, text="{}"),
                          StreamEvent(EventKind.BLOCK_STOP, index=1)])
    assert [e.kind for e in out[-3:]] == ["tool_call_start", "tool_call_delta", "block_stop"]  # valid JSON, not validated: passes
    processor = Repairer(stream_flow(), ToolRepairSettings(validate_calls="all"))
    out = run(processor, [StreamEvent(EventKind.START, model="m"), *text_events("Running it."), StreamEvent(EventKind.BLOCK_STOP, index=0),
                          StreamEvent(EventKind.TOOL_CALL_START, index=1, id="c", name="shell"), StreamEvent(EventKind.TOOL_CALL_DELTA, index=1, text="{}"),
                          StreamEvent(EventKind.BLOCK_STOP, index=1)])
    assert [e.kind for e in out][:2] == ["start", "text"] and out[-1].kind == EventKind.ERROR


def test_response_hook_converts_and_keeps_the_prose() -> None:
    flow = stream_flow()
    flow.response = Response(model="m", parts=[TextPart('Let me check.\n\n```json\n{"name": "shell", "arguments": {"command": "ls"}}\n```')])
    assert llmproxy_tool_repair.response(flow) is None
    parts = flow.response.parts
    assert isinstance(parts[0], TextPart) and parts[0].text == "Let me check."
    assert isinstance(parts[1], ToolCallPart) and json.loads(parts[1].arguments) == {"command": "ls"}
    assert flow.response.stop_reason == "tool_use"


def test_response_hook_leaves_answers_with_real_calls_alone() -> None:
    flow = stream_flow()
    flow.response = Response(model="m", parts=[TextPart('e.g. {"name": "shell", "arguments": {"command": "x"}}'), ToolCallPart("c", "shell", '{"command": "ls"}')])
    llmproxy_tool_repair.response(flow)
    assert [type(p).__name__ for p in flow.response.parts] == ["TextPart", "ToolCallPart"]


def test_a_loose_object_counts_only_if_it_fits_the_schema() -> None:
    flow = stream_flow()
    flow.response = Response(model="m", parts=[TextPart('```json\n{"name": "shell", "description": "runs things"}\n```')])
    llmproxy_tool_repair.response(flow)
    assert [type(p).__name__ for p in flow.response.parts] == ["TextPart"]
    flow.response = Response(model="m", parts=[TextPart('```json\n{"name": "shell", "command": "ls"}\n```')])
    llmproxy_tool_repair.response(flow)
    assert [(p.name, json.loads(p.arguments)) for p in flow.response.tool_calls] == [("shell", {"command": "ls"})]


# -- end to end -------------------------------------------------------------------------------------

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
    monkeypatch.setenv("REPAIR_UPSTREAM_KEY", UPSTREAM_KEY)
    proxies: list[RunningProxy] = []

    async def launch(**settings: Any) -> RunningProxy:
        config = {
            "proxy": {"drain_timeout": 0},
            "backends": {
                name: {"type": BACKEND_TYPES[name], "base_url": fake.base_url, "api_keys": ["${REPAIR_UPSTREAM_KEY}"]} for name, fake in fakes.items()
            },
            "models": {f"via-{name}": {"targets": [f"{name}:{UPSTREAM_MODELS[name]}"]} for name in FAKES},
            "plugins": {"tool_repair": settings},
        }
        proxy = await start_proxy(config, plugins=[*PROVIDERS, ("tool_repair", llmproxy_tool_repair)], entry_points=False)
        proxies.append(proxy)
        return proxy

    yield launch
    for proxy in proxies:
        await proxy.stop()


FORMS = [
    'I will run it.\n\n```json\n{"name": "shell", "arguments": {"command": "ls -la"}}\n```',
    '<tool_call>\n{"name": "shell", "arguments": {"command": "ls -la"}}\n</tool_call>',
    'TOOL CALL: shell {"command": "ls -la"}',
    '{"tool": "shell", "args": {"command": "ls -la"}}',
]


@STREAM
@pytest.mark.parametrize("back", list(FAKES))
@pytest.mark.parametrize("front", list(CLIENTS))
async def test_written_call_becomes_a_call_for_every_protocol_pair(launch: Launch, fakes: dict[str, FakeUpstream], front: str, back: str, stream: bool) -> None:
    proxy = await launch()
    client: Client = CLIENTS[front](proxy.url)
    form = FORMS[(list(CLIENTS).index(front) + list(FAKES).index(back)) % len(FORMS)]
    try:
        fakes[back].script(raw_text=True, text=form)
        reply = await client.ask(f"via-{back}", stream, client.user("list the files"), tools=True)
        assert [(c.name, c.arguments) for c in reply.calls] == [("shell", {"command": "ls -la"})]
        assert reply.stop == "tool_use"
        assert "ls -la" not in reply.text and "tool_call" not in reply.text  # nothing of the call leaked as text
        assert reply.text.strip() in ("", "I will run it.")
        if stream:
            assert reply.call_starts == 1
        # the client answers the call, and the conversation goes on as with a real call
        history = [*client.user("list the files"), *reply.turn, *client.tool_result(reply.calls[0], "a.py b.py")]
        fakes[back].script(text="two files")
        follow = await client.ask(f"via-{back}", stream, history, tools=True)
        assert follow.text == "two files" and follow.calls == []
    finally:
        await client.close()


@STREAM
@pytest.mark.parametrize("front,back", [("chat", "chat"), ("responses", "responses"), ("anthropic", "chat"), ("gemini", "responses")])
async def test_broken_arguments_are_repaired(launch: Launch, fakes: dict[str, FakeUpstream], front: str, back: str, stream: bool) -> None:
    proxy = await launch()
    client: Client = CLIENTS[front](proxy.url)
    try:
        fakes[back].script(tool_scenario=True, tool_arguments="{'command': 'ls -la',")
        reply = await client.ask(f"via-{back}", stream, client.user("list"), tools=True)
        assert [(c.name, c.arguments) for c in reply.calls] == [("shell", {"command": "ls -la"})]
    finally:
        await client.close()


async def test_broken_arguments_from_a_streamed_anthropic_backend(launch: Launch, fakes: dict[str, FakeUpstream]) -> None:
    proxy = await launch()
    client: Client = CLIENTS["chat"](proxy.url)  # the Anthropic SDK itself reads partial JSON leniently
    try:
        fakes["anthropic"].script(tool_scenario=True, tool_arguments='{"command": "ls -la"')
        reply = await client.ask("via-anthropic", True, client.user("list"), tools=True)
        assert [(c.name, c.arguments) for c in reply.calls] == [("shell", {"command": "ls -la"})]
    finally:
        await client.close()


@STREAM
@pytest.mark.parametrize("front", ["chat", "anthropic"])
async def test_invalid_call_is_asked_for_again(launch: Launch, fakes: dict[str, FakeUpstream], front: str, stream: bool) -> None:
    proxy = await launch()
    client: Client = CLIENTS[front](proxy.url)
    fake = fakes["chat"]
    try:
        fake.script_next(raw_text=True, text='<tool_call>{"name": "shell", "arguments": {"cmd": "ls"}}</tool_call>')
        fake.script(tool_scenario=True)
        reply = await client.ask("via-chat", stream, client.user("list"), tools=True)
        assert [(c.name, c.arguments) for c in reply.calls] == [("shell", {"command": "echo hi"})]
        assert len(fake.requests) == 2
        history = fake.requests[1].json["messages"]
        assert history[-2]["role"] == "assistant" and '"cmd": "ls"' in history[-2]["content"]
        assert history[-1]["role"] == "user" and "'command' is a required property" in history[-1]["content"]
    finally:
        await client.close()


@STREAM
async def test_invalid_twice_is_a_502(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch()
    fake = fakes["chat"]
    fake.script(raw_text=True, text='<tool_call>{"name": "shell", "arguments": {"cmd": "ls"}}</tool_call>')
    sdk = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0, timeout=BOUND)
    kwargs: dict[str, Any] = {"model": "via-chat", "messages": [{"role": "user", "content": "go"}], "tools": [SHELL_WIRE]}
    try:
        with pytest.raises(openai.APIError, match="the model's call of tool 'shell' is not valid: 'command' is a required property"):
            if stream:
                async for _ in await sdk.chat.completions.create(stream=True, **kwargs):
                    pass
            else:
                await sdk.chat.completions.create(**kwargs)
        assert len(fake.requests) == 2
    finally:
        await sdk.close()


@STREAM
async def test_on_invalid_error_does_not_ask_again(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch(on_invalid="error")
    fake = fakes["chat"]
    fake.script(tool_scenario=True, tool_arguments='{"cmd": "ls"')
    sdk = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0, timeout=BOUND)
    kwargs: dict[str, Any] = {"model": "via-chat", "messages": [{"role": "user", "content": "go"}], "tools": [SHELL_WIRE]}
    try:
        if stream:
            with pytest.raises(openai.APIError, match="not valid"):
                async for _ in await sdk.chat.completions.create(stream=True, **kwargs):
                    pass
        else:
            with pytest.raises(openai.InternalServerError) as failed:
                await sdk.chat.completions.create(**kwargs)
            assert failed.value.status_code == 502
        assert len(fake.requests) == 1
    finally:
        await sdk.close()


@STREAM
async def test_on_invalid_pass_sends_the_repaired_call(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch(on_invalid="pass")
    client: Client = CLIENTS["chat"](proxy.url)
    fakes["chat"].script(tool_scenario=True, tool_arguments='{"cmd": "ls"')
    try:
        reply = await client.ask("via-chat", stream, client.user("go"), tools=True)
        assert [(c.name, c.arguments) for c in reply.calls] == [("shell", {"cmd": "ls"})]
    finally:
        await client.close()


@STREAM
async def test_look_alike_text_passes_untouched(launch: Launch, fakes: dict[str, FakeUpstream], stream: bool) -> None:
    proxy = await launch()
    client: Client = CLIENTS["anthropic"](proxy.url)
    text = 'To call a tool, models write e.g. <tool_call>{"name": "get_time"}</tool_call>.\n```python\nprint("x")\n```\nTOOL CALL: none'
    fakes["chat"].script(raw_text=True, text=text)
    try:
        reply = await client.ask("via-chat", stream, client.user("explain"), tools=True)
        assert reply.text == text and reply.calls == [] and reply.stop == "end_turn"
    finally:
        await client.close()


async def test_without_tools_nothing_is_looked_at(launch: Launch, fakes: dict[str, FakeUpstream]) -> None:
    proxy = await launch()
    client: Client = CLIENTS["chat"](proxy.url)
    text = '{"name": "shell", "arguments": {"command": "ls"}}'
    fakes["chat"].script(raw_text=True, text=text)
    try:
        reply = await client.ask("via-chat", True, client.user("json please"))
        assert reply.text == text and reply.calls == []
    finally:
        await client.close()


def test_a_json_block_naming_no_tool_is_released_once_the_name_is_read() -> None:
    scanner = Scanner(resolve)
    assert scanner.feed('```json\n{\n  "name": "my-pack') == []
    assert scanner.feed('age",') == ['```json\n{\n  "name": "my-package",']  # package.json, not a call
    assert scanner.feed('\n  "version": "1.0.0"\n}\n```') == ['\n  "version": "1.0.0"\n}\n```']
