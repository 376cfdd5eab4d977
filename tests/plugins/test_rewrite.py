"""The ``rewrite`` plugin: rule validation, the rewriting functions and the stream processor
on their own (every split of a stream), then end to end through a real llmproxy on a real
socket with the official SDKs against fake upstreams — what the backend receives (inbound)
and what the client receives (outbound), streamed and not, and across protocols.
"""

from __future__ import annotations

import itertools
from typing import Any, AsyncIterator, Awaitable, Callable

import anthropic
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_offline
import llmproxy_openai
import llmproxy_rewrite
import openai
import pytest
from google import genai
from google.genai import types as genai_types
from pydantic import ValidationError

from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from llmproxy.canonical import EventKind, Message, Request, Response, StreamEvent, TextPart, ToolCallPart, ToolResultPart
from llmproxy.testing import RunningProxy, build_flow, plugin_context, start_proxy
from llmproxy_rewrite import RewriteSettings, Rule, StreamRewriter, rewrite_request, rewrite_response

BOUND = 10.0
CLIENT_KEY = "client-key-rewrite"
UPSTREAM_KEY = "sk-upstream-rewrite-5d1e"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])


def rules(*specs: dict[str, Any]) -> list[Rule]:
    return RewriteSettings.model_validate({"rules": list(specs)}).rules


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, complaint",
    [
        ({}, "exactly one of replace, prepend or append"),
        ({"replace": "a", "append": "b"}, "exactly one of"),
        ({"replace": ""}, "must not be empty"),
        ({"replace": "a(", "regex": True}, "not a valid regular expression"),
        ({"replace": "a", "regex": True, "with": r"\2"}, "missing group"),
        ({"replace": "x*", "regex": True}, "matches empty text"),
        ({"append": "!"}, "say which text this adds to"),
        ({"replace": "a", "direction": "outbound", "roles": ["user"]}, "add assistant to roles"),
        ({"replace": "a", "frontends": ["smtp"]}, "frontends"),
        ({"replace": "a", "bogus": 1}, "bogus"),
    ],
)
def test_bad_rules_are_refused_with_a_reason(spec: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError) as error:
        RewriteSettings.model_validate({"rules": [spec]})
    assert complaint in str(error.value)


def test_good_rules_validate() -> None:
    settings = RewriteSettings.model_validate(
        {"rules": [{"replace": "a", "with": "b"}, {"append": "!", "direction": "outbound"}, {"prepend": "> ", "roles": ["user", "assistant"], "direction": "both"}]}
    )
    assert [r.kind for r in settings.rules] == ["replace", "append", "prepend"]
    assert len(settings._inbound) == 2 and len(settings._outbound) == 2


def test_scope_by_model_glob_and_frontend() -> None:
    (rule,) = rules({"replace": "a", "models": ["gpt-4*", "openrouter:*"], "frontends": ["anthropic", "gemini"]})
    assert rule.applies("gpt-4o", "anthropic")
    assert rule.applies("openrouter:qwen/qwen3-coder", "gemini_array")  # the array stream is Gemini too
    assert not rule.applies("gpt-4o", "openai_chat")
    assert not rule.applies("claude-opus-4-8", "anthropic")


# -- inbound ---------------------------------------------------------------------------------


def conversation() -> Request:
    return Request(
        model="m",
        system=[TextPart("You are Claude Code. Be terse.")],
        messages=[
            Message("user", [TextPart("fix the bug in foo.py")]),
            Message("assistant", [TextPart("I'll read foo.py"), ToolCallPart("c1", "Read", '{"path": "foo.py"}')]),
            Message("user", [ToolResultPart("c1", [TextPart("foo.py: def foo(): ...")])]),
            Message("developer", [TextPart("Claude Code says: mind the tests")]),
            Message("user", [TextPart("and foo.py again")]),
        ],
    )


def test_replace_on_each_role() -> None:
    request = conversation()
    changes = rewrite_request(request, rules({"replace": "Claude Code", "with": "the agent", "roles": ["system"]}, {"replace": "foo.py", "with": "bar.py", "roles": ["user"]}))
    assert request.system[0].text == "You are the agent. Be terse."
    assert request.messages[3].parts[0].text == "the agent says: mind the tests"  # a mid-conversation system turn
    assert request.messages[0].parts[0].text == "fix the bug in bar.py"
    assert request.messages[4].parts[0].text == "and bar.py again"
    assert request.messages[1].parts[0].text == "I'll read foo.py"  # assistant: not in roles
    assert request.messages[2].parts[0].content[0].text == "foo.py: def foo(): ..."  # tool results are never rewritten
    assert request.messages[1].parts[1].arguments == '{"path": "foo.py"}'  # nor tool calls
    assert changes == 4


def test_regex_with_groups_and_ignore_case() -> None:
    request = conversation()
    rewrite_request(request, rules({"replace": r"(\w+)\.PY", "regex": True, "ignore_case": True, "with": r"<\1>", "roles": ["assistant"]}))
    assert request.messages[1].parts[0].text == "I'll read <foo>"


def test_prepend_and_append_in_order_and_last_only() -> None:
    request = conversation()
    rewrite_request(
        request,
        rules(
            {"append": " [1]", "roles": ["user"], "messages": "last"},
            {"append": " [2]", "roles": ["user"], "messages": "last"},
            {"prepend": "A. ", "roles": ["system"]},
            {"prepend": "B. ", "roles": ["system"]},
        ),
    )
    assert request.system[0].text == "A. B. You are Claude Code. Be terse."
    assert request.messages[4].parts[0].text == "and foo.py again [1] [2]"
    assert request.messages[0].parts[0].text == "fix the bug in foo.py"  # not the newest


def test_append_to_every_user_message_skips_tool_result_turns() -> None:
    request = conversation()
    rewrite_request(request, rules({"append": "!", "roles": ["user"]}))
    assert request.messages[0].parts[0].text.endswith("foo.py!")
    assert request.messages[4].parts[0].text.endswith("again!")
    assert isinstance(request.messages[2].parts[0], ToolResultPart)


def test_system_prompt_is_created_when_missing() -> None:
    request = Request(model="m", messages=[Message("user", [TextPart("hi")])])
    rewrite_request(request, rules({"append": "Answer in French.", "roles": ["system"]}))
    assert [p.text for p in request.system] == ["Answer in French."]


def test_replacements_never_rewrite_added_text() -> None:
    request = Request(model="m", messages=[Message("user", [TextPart("x")])])
    rewrite_request(request, rules({"append": " cat", "roles": ["user"]}, {"replace": "cat", "with": "dog"}))
    assert request.messages[0].parts[0].text == "x cat"


async def context_with(rule_specs: list[dict[str, Any]]) -> Any:
    config = {"backends": {"o": {"type": "offline"}}, "default_backend": "o", "plugins": {"rewrite": {"rules": rule_specs}}}
    return await plugin_context(config, plugins=[("offline", llmproxy_offline), ("rewrite", llmproxy_rewrite)], entry_points=False)


async def test_request_is_not_decoded_when_no_literal_can_match() -> None:
    context = await context_with([{"replace": "goodbye", "with": "x"}, {"replace": "HELLO THERE!", "ignore_case": True}])
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    flow = build_flow(body, context=context)
    flow.raw_body = b'{"model": "m", "messages": [{"role": "user", "content": "hello there"}]}'
    llmproxy_rewrite.request(flow)
    assert not flow.request_decoded
    flow.raw_body = flow.raw_body.replace(b"hello", b"goodbye")
    flow.raw_request["messages"][0]["content"] = "goodbye there"
    llmproxy_rewrite.request(flow)
    assert flow.request_decoded and flow.request.messages[0].parts[0].text == "x there"
    assert flow.trace and flow.trace[-1]["plugin"] == "rewrite"


async def test_no_outbound_rule_means_no_stream_processor() -> None:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    flow = build_flow(body, context=await context_with([{"replace": "a", "with": "b"}]))  # inbound only
    assert llmproxy_rewrite.stream_start(flow) is None
    flow = build_flow(body, context=await context_with([{"replace": "a", "direction": "outbound", "models": ["claude-*"]}]))
    assert llmproxy_rewrite.stream_start(flow) is None  # another model
    flow = build_flow(body, context=await context_with([{"replace": "a", "direction": "outbound", "models": ["gpt-*"]}]))
    assert isinstance(llmproxy_rewrite.stream_start(flow), StreamRewriter)
    assert not flow.request_decoded


# -- outbound, whole answers ---------------------------------------------------------------


def test_rewrite_response_replace_prepend_append() -> None:
    response = Response(model="m", parts=[TextPart("hello world"), TextPart("world again")])
    rewrite_response(response, rules({"replace": "world", "with": "there", "direction": "outbound"}, {"prepend": "> ", "direction": "outbound"}, {"append": " <", "direction": "outbound"}))
    assert [p.text for p in response.parts] == ["> hello there", "there again <"]


def test_append_skips_an_answer_ending_in_a_tool_call() -> None:
    response = Response(model="m", parts=[TextPart("let me look"), ToolCallPart("c", "Read", "{}")])
    rewrite_response(response, rules({"append": " <", "direction": "outbound"}, {"prepend": "> ", "direction": "outbound"}))
    assert response.parts[0].text == "> let me look"


# -- outbound, streams -----------------------------------------------------------------------


class _Flow:
    def __init__(self) -> None:
        self.trace: list[dict[str, Any]] = []

    def note(self, plugin: str, what: str, **details: Any) -> None:
        self.trace.append({"plugin": plugin, "what": what, **details})


def run_stream(rule_list: list[Rule], blocks: list[tuple[str, list[str]]]) -> tuple[list[StreamEvent], _Flow]:
    """Feed a stream of ``blocks`` (kind, pieces) through a fresh processor, as the pipeline does."""
    flow = _Flow()
    processor = StreamRewriter(rule_list, flow)  # type: ignore[arg-type]
    events = [StreamEvent(EventKind.START, model="m")]
    for index, (kind, pieces) in enumerate(blocks):
        if kind == "text":
            events += [StreamEvent(EventKind.TEXT, index=index, text=p) for p in pieces]
        else:
            events.append(StreamEvent(EventKind.TOOL_CALL_START, index=index, id="c", name="Read"))
            events += [StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=p) for p in pieces]
        events.append(StreamEvent(EventKind.BLOCK_STOP, index=index))
    out: list[StreamEvent] = []

    def emit(result: Any) -> None:
        if result is None:
            return
        out.extend([result] if isinstance(result, StreamEvent) else result)

    for event in events:
        emit(processor(event))
    emit(processor(None))
    emit(processor(StreamEvent(EventKind.STOP, stop_reason="end_turn")))
    return out, flow


def folded(events: list[StreamEvent]) -> list[tuple[str, str]]:
    """(kind, text) per block in order, checking no block gets events after its stop."""
    blocks: dict[int, list[str]] = {}
    kinds: dict[int, str] = {}
    stopped: set[int] = set()
    for event in events:
        if event.kind in (EventKind.TEXT, EventKind.TOOL_CALL_START, EventKind.TOOL_CALL_DELTA):
            assert event.index not in stopped, f"{event} after its block stopped"
            kinds.setdefault(event.index, "text" if event.kind == EventKind.TEXT else "tool")
            blocks.setdefault(event.index, []).append(event.text)
        elif event.kind == EventKind.BLOCK_STOP:
            stopped.add(event.index)
    assert events[-1].kind == EventKind.STOP
    return [(kinds[i], "".join(blocks[i])) for i in sorted(blocks)]


def splits(text: str, pieces: int) -> list[list[str]]:
    """Every way to cut ``text`` into ``pieces`` pieces (empty pieces included)."""
    result = []
    for cuts in itertools.combinations_with_replacement(range(len(text) + 1), pieces - 1):
        bounds = (0, *cuts, len(text))
        result.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return result


STREAM_RULES = [
    {"replace": "quiet", "with": "LOUD", "direction": "outbound"},
    {"replace": "QuIeT", "with": "hush", "ignore_case": True, "direction": "outbound"},
    {"replace": r"\d{2,4}", "regex": True, "with": "<n>", "direction": "outbound", "max_match": 4},
    {"replace": "aa", "with": "a", "direction": "outbound"},
]


@pytest.mark.parametrize("spec", STREAM_RULES, ids=["literal", "ignore-case", "regex", "overlapping"])
def test_stream_equals_whole_answer_for_every_split(spec: dict[str, Any]) -> None:
    rule_list = rules(spec)
    text = "a quiet 1234 aaa quie Quiet 56 İqUIet İQUI"  # İ lower-cases to two characters
    whole = Response(model="m", parts=[TextPart(text)])
    rewrite_response(whole, rule_list)
    for pieces in splits(text, 3):
        out, _ = run_stream(rules(spec), [("text", pieces)])
        assert folded(out) == [("text", whole.parts[0].text)], pieces


def test_chained_rules_and_adds_in_a_stream() -> None:
    specs = ({"replace": "cat", "with": "dog", "direction": "outbound"}, {"replace": "dog house", "with": "kennel", "direction": "outbound"},
             {"prepend": "> ", "direction": "outbound"}, {"append": " <", "direction": "outbound"})
    text = "the cat house and the cat"
    whole = Response(model="m", parts=[TextPart(text)])
    rewrite_response(whole, rules(*specs))
    assert whole.parts[0].text == "> the kennel and the dog <"
    for pieces in splits(text, 3)[::7]:
        out, flow = run_stream(rules(*specs), [("text", pieces)])
        assert folded(out) == [("text", "> the kennel and the dog <")], pieces
    assert flow.trace[-1]["replacements"] == 3 and flow.trace[-1]["appended"] and flow.trace[-1]["prepended"]


def test_stream_with_tool_call_after_text_gets_no_append_and_keeps_block_order() -> None:
    specs = ({"replace": "quiet", "with": "LOUD", "direction": "outbound"}, {"append": " <", "direction": "outbound"})
    out, _ = run_stream(rules(*specs), [("text", ["so qui", "et"]), ("tool", ['{"pa', 'th": 1}']), ("text", ["quiet q"])])
    assert folded(out) == [("text", "so LOUD"), ("tool", '{"path": 1}'), ("text", "LOUD q <")]
    out, _ = run_stream(rules(*specs), [("text", ["qui"]), ("tool", ["{}"])])
    assert folded(out) == [("text", "qui"), ("tool", "{}")]


def test_regex_holds_at_most_max_match_characters() -> None:
    processor = StreamRewriter(rules({"replace": "x+y", "regex": True, "with": "!", "direction": "outbound", "max_match": 5}), _Flow())  # type: ignore[arg-type]
    received = sent = ""
    for piece in ["abcdefgh", "ijklmno", "pqrstuvwxyz"]:
        received += piece
        result = processor(StreamEvent(EventKind.TEXT, text=piece))
        sent += result.text if isinstance(result, StreamEvent) else ""
        assert len(received) - len(sent) <= 5
    assert sent == "abcdefghijklmnopqrstu"
    (rest,) = processor(None)  # type: ignore[misc]
    assert sent + rest.text == "abcdefghijklmnopqrstuvw!z"


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWRITE_UPSTREAM_KEY", UPSTREAM_KEY)


Launch = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def launch() -> AsyncIterator[Launch]:
    started: list[RunningProxy] = []

    async def launch(backend: dict[str, Any], rule_specs: list[dict[str, Any]]) -> RunningProxy:
        config = {
            "proxy": {"drain_timeout": 0},
            "backends": {"up": {**backend, "api_keys": ["${REWRITE_UPSTREAM_KEY}"]}},
            "default_backend": "up",
            "plugins": {"rewrite": {"rules": rule_specs}},
        }
        plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini), ("rewrite", llmproxy_rewrite)]
        proxy = await start_proxy(config, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield launch
    for proxy in started:
        await proxy.stop()


INBOUND = [
    {"replace": "You are a helpful assistant.", "with": "You are a terse assistant.", "roles": ["system"]},
    {"append": " (answer briefly)", "roles": ["user"], "messages": "last"},
]
# The fakes stream "hello from fake upstream" as "hello", " from", " fake", " upstream":
# "from fake" spans two events.
OUTBOUND = [{"replace": "from fake", "with": "via llmproxy", "direction": "outbound"}, {"append": "!", "direction": "outbound"}]
REWRITTEN = "hello via llmproxy upstream!"


@STREAM
async def test_openai_inbound_and_outbound(launch: Launch, fake_openai: FakeOpenAI, stream: bool) -> None:
    proxy = await launch({"type": "openai", "base_url": fake_openai.base_url}, INBOUND + OUTBOUND)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "say hi"}]
    if stream:
        text = ""
        async for chunk in await client.chat.completions.create(model="gpt-4o", messages=messages, stream=True):  # type: ignore[arg-type]
            text += "".join(c.delta.content or "" for c in chunk.choices)
        # the fake really split the match across events
        pieces = [c["choices"][0]["delta"].get("content") for c in fake_openai.last.events if c.get("choices")]
        assert [p for p in pieces if p][:3] == ["hello", " from", " fake"]
    else:
        completion = await client.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
        text = completion.choices[0].message.content or ""
    await client.close()
    assert text == REWRITTEN
    sent = fake_openai.last.json["messages"]
    assert sent[0] == {"role": "system", "content": "You are a terse assistant."}
    assert sent[1]["content"] == "first"  # messages: last
    assert sent[3]["content"] == "say hi (answer briefly)"


@STREAM
async def test_anthropic_client_to_openai_backend(launch: Launch, fake_openai: FakeOpenAI, stream: bool) -> None:
    """Cross-protocol: the Anthropic SDK's answer is rewritten the same way, in its own shape."""
    proxy = await launch({"type": "openai", "base_url": fake_openai.base_url}, INBOUND + OUTBOUND)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    kwargs: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 100, "system": "You are a helpful assistant.", "messages": [{"role": "user", "content": "say hi"}]}
    if stream:
        async with client.messages.stream(**kwargs) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.create(**kwargs)
    await client.close()
    assert [block.text for block in message.content if block.type == "text"] == [REWRITTEN]
    sent = fake_openai.last.json["messages"]
    assert sent[0]["content"] == "You are a terse assistant."
    assert sent[-1]["content"] in ("say hi (answer briefly)", [{"type": "text", "text": "say hi (answer briefly)"}])


@STREAM
async def test_anthropic_same_protocol(launch: Launch, fake_anthropic: FakeAnthropic, stream: bool) -> None:
    proxy = await launch({"type": "anthropic", "base_url": fake_anthropic.base_url}, OUTBOUND)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    kwargs: dict[str, Any] = {"model": "claude-opus-4-8", "max_tokens": 100, "messages": [{"role": "user", "content": "say hi"}]}
    if stream:
        async with client.messages.stream(**kwargs) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.create(**kwargs)
    await client.close()
    assert [block.text for block in message.content if block.type == "text"] == [REWRITTEN]


@STREAM
async def test_gemini_scoped_rule(launch: Launch, fake_gemini: FakeGemini, stream: bool) -> None:
    """A rule scoped to another front-end leaves Gemini clients alone; one scoped to Gemini applies."""
    specs = [{**OUTBOUND[0], "frontends": ["gemini"]}, {"replace": "hello", "with": "NOPE", "direction": "outbound", "frontends": ["openai_chat"]}]
    proxy = await launch({"type": "gemini", "base_url": fake_gemini.base_url}, specs)
    client = genai.Client(api_key=CLIENT_KEY, http_options=genai_types.HttpOptions(base_url=proxy.url, api_version="v1beta", timeout=int(BOUND * 1000)))
    if stream:
        text = ""
        async for chunk in await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="say hi"):
            text += chunk.text or ""
    else:
        text = (await client.aio.models.generate_content(model="gemini-2.5-flash", contents="say hi")).text or ""
    await client.aio.aclose()
    client.close()
    assert text == "hello via llmproxy upstream"
