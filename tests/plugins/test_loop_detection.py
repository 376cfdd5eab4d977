"""The ``loop_detection`` plugin.

Unit tests: the repeated-text detector on realistic samples, both sides — legitimately
repetitive output (tables, separators, code, numbered lists, JSON arrays, this repository's own
sources and docs) is left alone, real loops (a sentence, a paragraph, a code block, CJK) are
found, at the same place however the stream is split; the tool-call run analysis (key order
ignored, what breaks a run); the settings; the stream processor and the response hook.

End to end through a real llmproxy on a real socket with the official SDKs against the fake
upstreams: a looping stream ends early with the notice and a clean end in the client's
protocol (all four client protocols against an OpenAI backend) and llmproxy stops reading the
backend; a non-streamed loop is cut; legitimately repetitive answers pass untouched; a
tool-call loop gets a steering note first, then the answer (or error) that stops it, streamed
and not, across protocols; slow repetition outside the time window is left alone.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_loop_detection
import llmproxy_openai
import openai
import pytest
from pydantic import ValidationError

from clients import CLIENTS, Call
from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import FakeUpstream
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses
from llmproxy.canonical import EventKind, Message, Response, StreamEvent, TextPart, ThinkingPart, ToolCallPart, ToolResultPart
from llmproxy.testing import RunningProxy, build_flow, start_proxy
from llmproxy_loop_detection import LoopDetectionSettings, watch_stream
from llmproxy_loop_detection import response as response_hook
from llmproxy_loop_detection.text import RepeatDetector, find_loop, prose_like
from llmproxy_loop_detection.tools import RunTracker, canonical_arguments, trailing_run

ROOT = Path(__file__).resolve().parents[2]
BOUND = 10.0
CLIENT_KEY = "client-key-matrix"  # what tests/clients.py sends
UPSTREAM_KEY = "sk-upstream-loops-8c2f"
NOTICE = "stopped a repeating loop"
STOPPED = "stopped a tool-call loop"
STEERING = "[llmproxy loop detection]"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])


# -- samples -------------------------------------------------------------------------------------

TABLE = "| Model | Context | Price (in) | Price (out) |\n|---|---|---|---|\n" + "".join(
    f"| model-{i} | {8 * (i % 5 + 1)}k | ${i * 0.25:.2f} | ${i * 0.5:.2f} |\n" for i in range(80)
)
CODE = "import unittest\n\n\nclass TestCompute(unittest.TestCase):\n" + "".join(
    f"    def test_case_{i}(self):\n        result = compute({i})\n        self.assertEqual(result, expected[{i}])\n\n" for i in range(60)
)
LEGITIMATE = {
    "markdown-table": TABLE,
    "table-same-rows": "| Feature | Supported |\n|---|---|\n" + "| yes | yes |\n" * 60,
    "table-empty-cells": "| a | b | c |\n|---|---|---|\n" + "|   |   |   |\n" * 80,
    "separators": ("-" * 300 + "\n" + "=" * 300 + "\n") * 5 + "\n---\n\n" * 100 + "#" * 400,
    "code-similar-lines": CODE,
    "code-closing-braces": "".join(f"if (x{i}) {{\n    y{i}();\n}}\n" for i in range(100)) + "    }\n  }\n}\n" * 40,
    "numbered-list": "".join(f"{i}. Run the test suite again and check the output\n" for i in range(1, 80)),
    "checklist-numbered": "".join(f"- [ ] Step {i}: review the pull request\n" for i in range(1, 80)),
    "json-array-ids": json.dumps([{"id": i, "name": f"user{i}", "active": True} for i in range(100)], indent=2),
    "json-array-same-objects": json.dumps([{"status": "pending", "owner": None, "priority": "normal"}] * 40, indent=2),
    "json-array-same-compact": json.dumps([{"type": "text", "text": "hello"}] * 60),
    "json-zeros": "[" + ", ".join("0" for _ in range(800)) + "]",
    "python-nones": "[" + ", ".join("None" for _ in range(600)) + "]",
    "bullets-one-word": "- TBD\n" * 200,
    "html-list": "<ul>\n" + "".join(f'  <li class="item">Item {i}</li>\n' for i in range(80)) + "</ul>\n",
    "html-empty-rows": "<tr><td></td><td></td></tr>\n" * 80,
    "csv": "date,open,close\n" + "".join(f"2024-01-{i % 28 + 1:02d},{100 + i},{101 + i}\n" for i in range(200)),
    "log-lines": "".join(f"2024-05-01T12:{i // 60:02d}:{i % 60:02d} INFO worker-{i % 4} processed batch {i}\n" for i in range(200)),
    "ascii-box": "+" + "-" * 60 + "+\n" + ("|" + " " * 60 + "|\n") * 30 + "+" + "-" * 60 + "+\n",
    "blank-lines": "\n" * 600 + " " * 600,
    "short-repeated-code": 'print("hello")\n' * 10,
    "song-with-refrain": ("Row, row, row your boat,\nGently down the stream.\nMerrily, merrily, merrily, merrily,\nLife is but a dream.\n\n") * 4,
}

LOOPS = {
    "sentence": ("Sure, here is the plan. ", "I will now check the configuration file again. ", 20),
    "paragraph": (
        "Intro.\n\n",
        "Let me look at the failing test once more. The assertion compares the parsed value with the expected one.\n"
        "I should check the parser.\n\n",
        8,
    ),
    "short-phrase": ("", "Let me try again. ", 40),
    "code-block": ("```python\n", "def retry():\n    response = call_api()\n    if response.ok:\n        return response\n", 10),
    "cjk": ("好的。", "我需要再检查一下配置文件。然后重新运行测试。", 30),
}


def pieces(text: str, seed: int) -> list[str]:
    """``text`` in random stream-sized pieces (1 to 12 characters)."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        size = rng.randint(1, 12)
        out.append(text[i : i + size])
        i += size
    return out


def stream_loop(text: str, seed: int, settings: LoopDetectionSettings | None = None) -> tuple[int, Any]:
    """Feed ``text`` in random pieces; (characters fed when a loop was reported, the loop)."""
    detector = (settings or LoopDetectionSettings()).detector()
    fed = 0
    for piece in pieces(text, seed):
        fed += len(piece)
        loop = detector.feed(piece)
        if loop is not None:
            return fed, loop
    return fed, None


# -- the detector --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LEGITIMATE))
def test_legitimately_repetitive_output_is_not_a_loop(name: str) -> None:
    text = LEGITIMATE[name]
    assert find_loop(text) is None
    for seed in range(3):
        assert stream_loop(text, seed)[1] is None


def test_this_repositorys_code_and_docs_are_not_loops() -> None:
    files = [p for pattern in ("llmproxy/**/*.py", "plugins/**/*.py", "tests/**/*.py", "docs/**/*.md", "*.md") for p in ROOT.glob(pattern)]
    assert len(files) > 30
    looping = [str(p) for p in files if find_loop(p.read_text(errors="replace")) is not None]
    assert looping == []


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loops_are_found_wherever_the_stream_splits(name: str) -> None:
    intro, unit, copies = LOOPS[name]
    text = intro + unit * copies
    loop = find_loop(text)
    assert loop is not None
    # the unit found is the repeated passage (or a whole multiple of a short one), in some rotation
    assert len(loop.unit) % len(unit) == 0 and loop.unit in unit * (len(loop.unit) // len(unit) + 1)
    assert loop.repeats >= 6
    # cutting keeps the introduction and one copy of the passage, ending where a sentence ends
    assert text[: loop.cut(text)].rstrip("\n") == (intro + unit).rstrip(" \n")
    # a stream finds it within one look (2 x min_unit characters, plus a piece) of the sixth
    # copy's end, however it is split
    sixth = len(intro) + 6 * len(loop.unit)
    for seed in range(5):
        fed, found = stream_loop(text, seed)
        assert found is not None and found.unit in unit * 40
        assert 6 * len(loop.unit) <= fed < sixth + 80 + 12


def test_a_loop_needs_enough_copies_of_a_long_enough_unit() -> None:
    sentence = "I will now check the configuration file again. "  # 47 characters
    assert find_loop(sentence * 5) is None  # 5 copies of a 47-character unit: not yet
    assert find_loop(sentence * 6) is not None
    tighter = LoopDetectionSettings(min_unit_chars=20, repeats=3, lookback_chars=1000)
    assert find_loop(sentence * 3, 20, 3, 1000) is not None
    assert stream_loop(sentence * 4, 0, tighter)[1] is not None
    # a unit longer than lookback / repeats is out of sight
    rng = random.Random(5)
    long_unit = " ".join("".join(rng.choices("abcdefghijklmnop", k=6)) for _ in range(300)) + ". "  # ~2,100 characters
    assert find_loop(long_unit * 4, 40, 3, 6000) is None
    assert find_loop(long_unit * 4, 40, 3, 8000) is not None


def test_prose_like_units() -> None:
    assert prose_like("I will check the file again. ")
    assert prose_like("    self.assertEqual(result, expected)\n")
    assert not prose_like("-" * 40)
    assert not prose_like("e, None, None, None, Non")  # one word, cut by the rotation
    assert not prose_like('{"a": 1, "b": 2}, ')  # mostly punctuation
    assert not prose_like("| yes | yes |\n")


def test_the_detector_keeps_a_bounded_tail() -> None:
    detector = RepeatDetector(40, 6, 2000)
    text = LEGITIMATE["log-lines"] * 20  # ~200 KB of text that is not a loop
    for piece in pieces(text, 1):
        assert detector.feed(piece) is None
    assert detector._kept < 2000 + 2 * 80 and len(detector._window) < 2 * (40 + 2000 // 6) and len(detector.pieces) < 80


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="lookback_chars"):
        LoopDetectionSettings(min_unit_chars=100, repeats=10, lookback_chars=500)
    with pytest.raises(ValidationError, match="placeholder"):
        LoopDetectionSettings(steering_message="you called {tool} again")
    with pytest.raises(ValidationError):
        LoopDetectionSettings(repeats=1)
    with pytest.raises(ValidationError):
        LoopDetectionSettings(tool_call_action="explode")
    loop = find_loop("Let me try again. " * 40)
    assert loop is not None
    assert LoopDetectionSettings(text_notice="[loop of {repeats} x {chars}; braces: {{}}]").notice(loop) == f"[loop of {loop.repeats} x 54; braces: {{}}]"


# -- tool-call runs ------------------------------------------------------------------------------


def call_turn(call_id: str, name: str, arguments: str) -> list[Message]:
    return [
        Message("assistant", [ToolCallPart(call_id, name, arguments)]),
        Message("tool", [ToolResultPart(call_id, [TextPart("same output")])]),
    ]


def test_a_run_counts_the_same_call_with_keys_in_any_order() -> None:
    messages = [Message("user", [TextPart("fix the build")])]
    messages += call_turn("c1", "Bash", '{"command": "make", "timeout": 60}')
    messages += call_turn("c2", "Bash", '{"timeout":60,"command":"make"}')
    messages += call_turn("c3", "Bash", '{\n  "command": "make",\n  "timeout": 60\n}')
    run = trailing_run(messages)
    assert run is not None and run.count == 3 and run.tools == "Bash" and run.first_id == "c1"
    assert canonical_arguments('{"b": [1, {"y": 2, "x": 1}], "a": "é"}') == '{"a":"é","b":[1,{"x":1,"y":2}]}'


def test_what_breaks_a_run() -> None:
    start = [Message("user", [TextPart("go")])]
    same = call_turn("a", "Read", '{"path": "x.py"}')
    # different arguments
    assert trailing_run(start + same + call_turn("b", "Read", '{"path": "y.py"}')).count == 1  # type: ignore[union-attr]
    # the human speaking in between
    assert trailing_run(start + same + [Message("user", [TextPart("try harder")])] + call_turn("b", "Read", '{"path": "x.py"}')).count == 1  # type: ignore[union-attr]
    # a text-only answer in between
    assert trailing_run(start + same + [Message("assistant", [TextPart("done")])] + call_turn("b", "Read", '{"path": "x.py"}')).count == 1  # type: ignore[union-attr]
    # alternating calls are not one run
    alternating = start + same + call_turn("b", "Read", '{"path": "y.py"}') + call_turn("c", "Read", '{"path": "x.py"}')
    assert trailing_run(alternating).count == 1  # type: ignore[union-attr]
    # no tool call at the end: no run
    assert trailing_run(start + same + [Message("assistant", [TextPart("done")])]) is None
    # tool results in user turns (as some protocols carry them) do not break it; text with a call is the same turn
    chatty = [Message("assistant", [TextPart("Let me read it."), ToolCallPart("d", "Read", '{"path": "x.py"}')]), Message("user", [ToolResultPart("d", [])])]
    assert trailing_run(start + same + chatty).count == 2  # type: ignore[union-attr]
    # parallel calls compare as a whole turn, in any order
    pair = [Message("assistant", [ToolCallPart("e", "Read", '{"path": "x.py"}'), ToolCallPart("f", "Grep", '{"q": "x"}')])]
    swapped = [Message("assistant", [ToolCallPart("g", "Grep", '{"q":"x"}'), ToolCallPart("h", "Read", '{"path":"x.py"}')])]
    run = trailing_run(start + pair + swapped)
    assert run is not None and run.count == 2 and run.tools == "Grep, Read"
    # arguments that are not JSON compare as written
    assert trailing_run(start + call_turn("i", "Bash", "ls -la") + call_turn("j", "Bash", " ls -la ")).count == 2  # type: ignore[union-attr]


def test_the_time_window_is_measured_from_the_first_of_the_repeats() -> None:
    messages = [Message("user", [TextPart("go")])]
    tracker = RunTracker()
    seen = None
    for count in range(1, 5):  # one call every 100 s
        messages += call_turn(f"c{count}", "Bash", '{"command": "gh run view"}')
        run = trailing_run(messages)
        seen = tracker.observe(run, now=1000.0 + 100 * count)  # type: ignore[arg-type]
    assert run.count == 4 and seen is not None  # type: ignore[union-attr]
    assert tracker.span(seen, run, 4, now=1400.0) == 300.0  # type: ignore[arg-type]
    # a proxy that saw the run only late counts from when it first saw it
    late = RunTracker()
    seen_late = late.observe(run, now=5000.0)  # type: ignore[arg-type]
    assert late.span(seen_late, run, 4, now=5001.0) == 1.0  # type: ignore[arg-type]


# -- the processor and the response hook ---------------------------------------------------------


def run_processor(processor: Any, events: list[StreamEvent]) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    for event in events + [None]:  # type: ignore[list-item]
        result = processor(event)
        if result is None:
            continue
        out.extend([result] if isinstance(result, StreamEvent) else result)
    return out


def text_events(text: str, index: int = 0) -> list[StreamEvent]:
    return [StreamEvent(EventKind.TEXT, index=index, text=p) for p in pieces(text, 7)]


def test_the_processor_ends_a_looping_stream_with_the_notice_and_a_stop() -> None:
    flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    events = [StreamEvent(EventKind.START, model="m")] + text_events("Plan: " + "I will now check the configuration file again. " * 50)
    events += [StreamEvent(EventKind.BLOCK_STOP), StreamEvent(EventKind.STOP, stop_reason="max_tokens")]
    out = run_processor(watch_stream(flow, LoopDetectionSettings()), events)
    assert out[-1].kind == EventKind.STOP and out[-1].stop_reason == "end_turn"
    assert out[-2].kind == EventKind.TEXT and NOTICE in out[-2].text and out[-2].index == 0
    sent = "".join(e.text for e in out[:-2] if e.kind == EventKind.TEXT)
    assert sent.count("configuration file again") in range(6, 8)  # stopped soon after the sixth copy
    assert [t["what"] for t in flow.trace] == ["stopped a repeating text loop"]


def test_the_processor_passes_repetitive_but_legitimate_streams_untouched() -> None:
    flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    events = [StreamEvent(EventKind.START, model="m")] + text_events(TABLE + CODE) + [StreamEvent(EventKind.STOP, stop_reason="end_turn")]
    out = run_processor(watch_stream(flow, LoopDetectionSettings()), events)
    assert out == events and flow.trace == []


def test_reasoning_loops_are_watched_only_when_asked() -> None:
    flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    looping = [StreamEvent(EventKind.THINKING, index=0, text=p) for p in pieces("Wait, let me reconsider the whole approach. " * 40, 3)]
    events = [StreamEvent(EventKind.START, model="m")] + looping + [StreamEvent(EventKind.STOP, stop_reason="end_turn")]
    assert run_processor(watch_stream(flow, LoopDetectionSettings()), list(events)) == events
    out = run_processor(watch_stream(flow, LoopDetectionSettings(thinking=True)), list(events))
    assert [e.kind for e in out[-3:]] == [EventKind.BLOCK_STOP, EventKind.TEXT, EventKind.STOP]
    assert out[-2].index == 1 and NOTICE in out[-2].text  # a new text block after the reasoning


def test_the_response_hook_cuts_a_looping_answer_after_its_first_copy() -> None:
    tool = {"type": "function", "function": {"name": "Bash", "parameters": {"type": "object"}}}
    flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]})
    text = "Here is the plan.\n" + "I will now check the configuration file again.\n" * 30
    flow.response = Response(model="m", parts=[TextPart(text), ToolCallPart("c", "Bash", "{}")], stop_reason="max_tokens")
    response_hook(flow)
    answer = flow.response
    assert answer.text.startswith("Here is the plan.\nI will now check the configuration file again.\n")
    assert answer.text.count("configuration file") == 1 and NOTICE in answer.text
    assert answer.stop_reason == "end_turn" and answer.tool_calls == []
    # and leaves a legitimate one alone
    flow.response = Response(model="m", parts=[TextPart(TABLE), ThinkingPart("x" * 500)])
    response_hook(flow)
    assert flow.response.text == TABLE
    # by default (answers: with_tools) a plain chat answer is not even read
    plain = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    plain.response = Response(model="m", parts=[TextPart(text)])
    response_hook(plain)
    assert plain.response.text == text


# -- end to end ----------------------------------------------------------------------------------

LOOPING_TEXT = "Sure. " + "I will now check the configuration file again. " * 120


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPS_UPSTREAM_KEY", UPSTREAM_KEY)


Launch = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def launch() -> AsyncIterator[Launch]:
    started: list[RunningProxy] = []

    async def launch(fake: FakeUpstream, backend_type: str = "openai", **settings: Any) -> RunningProxy:
        config = {
            "proxy": {"drain_timeout": 0},
            "backends": {"up": {"type": backend_type, "base_url": fake.base_url, "api_keys": ["${LOOPS_UPSTREAM_KEY}"]}},
            "default_backend": "up",
            # most tests watch every stream; streams=None keeps the default (streams with tools)
            "plugins": {"loop_detection": {"streams": "all", "answers": "all", **settings} if settings.get("streams", "all") is not None else {k: v for k, v in settings.items() if k != "streams"}},
        }
        plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini), ("loop_detection", llmproxy_loop_detection)]
        proxy = await start_proxy(config, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield launch
    for proxy in started:
        await proxy.stop()


def openai_client(proxy: RunningProxy, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND, default_headers=headers or None)


async def test_a_looping_stream_ends_early_and_the_backend_is_no_longer_read(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script(text=LOOPING_TEXT, event_delay=0.002)  # ~1,000 frames: long enough to be cut off
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        stream = await client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "check it"}], stream=True)
        text, finishes = "", []
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
    assert finishes == ["stop"]
    assert text.rstrip().endswith("times in a row]") and NOTICE in text
    assert 6 <= text.count("configuration file again") < 10
    # llmproxy closed the upstream connection: the fake saw its peer go before it was done
    await asyncio.wait_for(fake_openai.last.disconnected.wait(), BOUND)


async def test_by_default_only_streams_offering_tools_are_watched(fake_openai: FakeOpenAI, launch: Launch) -> None:
    """The default (streams: with_tools): agent streams are watched; a plain chat stream keeps
    the pass-through path, so its bytes reach the client exactly as the backend sent them."""
    fake_openai.script(text=LOOPING_TEXT)
    proxy = await launch(fake_openai, streams=None)
    shell = {"type": "function", "function": {"name": "shell", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}
    async with openai_client(proxy) as client:
        plain = "".join([c.choices[0].delta.content or "" async for c in await client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": "check it"}], stream=True) if c.choices])
        assert NOTICE not in plain and plain.count("configuration file again") > 10
        assert fake_openai.last.sent.startswith(b"data: ")
        watched = "".join([c.choices[0].delta.content or "" async for c in await client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": "check it"}], stream=True, tools=[shell], tool_choice="none") if c.choices])
        assert NOTICE in watched and watched.count("configuration file again") < 10


async def test_a_looping_answer_is_cut_after_its_first_copy(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script(text=LOOPING_TEXT)
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        completion = await client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "check it"}])
    text = completion.choices[0].message.content or ""
    assert text.startswith("Sure. I will now check the configuration file again.")
    assert text.count("configuration file again") == 1 and NOTICE in text
    assert completion.choices[0].finish_reason == "stop"


@STREAM
async def test_legitimately_repetitive_answers_pass_untouched(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    answer = TABLE + "\n" + "-" * 200 + "\n" + LEGITIMATE["numbered-list"] + LEGITIMATE["json-array-ids"]
    fake_openai.script(text=answer)
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        if stream:
            chunks = await client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "tabulate"}], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            completion = await client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "tabulate"}])
            text = completion.choices[0].message.content or ""
    assert text == answer


@pytest.mark.parametrize("client_name", sorted(CLIENTS))
@STREAM
async def test_every_client_protocol_gets_a_clean_end(fake_openai: FakeOpenAI, launch: Launch, client_name: str, stream: bool) -> None:
    """Claude, Responses, Gemini and Chat clients against an OpenAI backend: the notice, then
    the end of the answer in the client's own protocol, which its SDK accepts."""
    fake_openai.script(text=LOOPING_TEXT)
    proxy = await launch(fake_openai)
    client = CLIENTS[client_name](proxy.url)
    try:
        reply = await client.ask("gpt-5", stream, client.user("check it"))
    finally:
        await client.close()
    assert NOTICE in reply.text and reply.stop == "end_turn"
    assert reply.text.count("configuration file again") < 10


# -- tool-call loops end to end ------------------------------------------------------------------

SHELL = {"type": "function", "function": {"name": "shell", "description": "run a command", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}


async def chat_tool_loop(client: openai.AsyncOpenAI, turns: int, stream: bool) -> tuple[list[dict[str, Any]], Any]:
    """Ask, run every tool call (always the same output), ask again; ``turns`` times or until
    the answer is not a tool call. Returns the history and the last answer message."""
    history: list[dict[str, Any]] = [{"role": "user", "content": "get the build green"}]
    message: Any = None
    for _ in range(turns):
        if stream:
            async with client.chat.completions.stream(model="gpt-5", messages=history, tools=[SHELL]) as events:
                async for _event in events:
                    pass
                message = (await events.get_final_completion()).choices[0].message
        else:
            message = (await client.chat.completions.create(model="gpt-5", messages=history, tools=[SHELL])).choices[0].message
        if not message.tool_calls:
            break
        history.append({"role": "assistant", "content": message.content, "tool_calls": [c.model_dump() for c in message.tool_calls]})
        history += [{"role": "tool", "tool_call_id": c.id, "content": "make: *** [all] Error 1"} for c in message.tool_calls]
    return history, message


def steering_notes(fake: FakeOpenAI) -> list[int]:
    """Indexes of the upstream requests whose last message is the steering note."""
    return [i for i, r in enumerate(fake.requests) if STEERING in json.dumps(r.json["messages"][-1])]


@STREAM
async def test_a_tool_call_loop_is_steered_then_stopped(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    fake_openai.script(ignore_results=True)  # the model calls the tool again, whatever the result
    proxy = await launch(fake_openai)
    async with openai_client(proxy) as client:
        history, last = await chat_tool_loop(client, 10, stream)
    # calls 1-4 went through; the request after the 4th carried the steering note, as a user
    # turn after the tool result; the model called again (5th); the next request was answered
    assert len(fake_openai.requests) == 5
    assert steering_notes(fake_openai) == [4]
    steered = fake_openai.requests[4].json["messages"]
    assert [m["role"] for m in steered[-3:]] == ["assistant", "tool", "user"] and "4 times in a row" in json.dumps(steered[-1])
    assert last.tool_calls is None and STOPPED in last.content and "5 times in a row" in last.content
    assert sum(1 for m in history if m["role"] == "assistant") == 5


async def test_the_stop_can_be_an_error(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script(ignore_results=True)
    proxy = await launch(fake_openai, tool_call_action="error", tool_call_repeats=2)
    async with openai_client(proxy) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await chat_tool_loop(client, 10, stream=False)
    assert STOPPED in str(error.value.message) and "3 times in a row" in str(error.value.message)
    assert len(fake_openai.requests) == 3 and steering_notes(fake_openai) == [2]


async def test_repetition_slower_than_the_window_is_left_alone(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script(ignore_results=True)
    proxy = await launch(fake_openai, tool_call_repeats=2, tool_call_window=1e-6)  # every pair of calls is "slower" than this
    async with openai_client(proxy) as client:
        history, last = await chat_tool_loop(client, 5, stream=False)
    assert len(fake_openai.requests) == 5 and steering_notes(fake_openai) == [] and last.tool_calls


async def test_switched_off_tool_call_detection_changes_nothing(fake_openai: FakeOpenAI, launch: Launch) -> None:
    fake_openai.script(ignore_results=True)
    proxy = await launch(fake_openai, tool_calls=False, tool_call_repeats=2)
    async with openai_client(proxy) as client:
        await chat_tool_loop(client, 4, stream=True)
    assert len(fake_openai.requests) == 4 and steering_notes(fake_openai) == []


@STREAM
async def test_a_claude_client_looping_through_an_openai_backend(fake_openai: FakeOpenAI, launch: Launch, stream: bool) -> None:
    """Cross-protocol: Anthropic SDK → llmproxy → OpenAI backend. The steering note reaches
    the OpenAI backend as a user turn after the tool result; the stop is an Anthropic text answer."""
    fake_openai.script(ignore_results=True)
    proxy = await launch(fake_openai, tool_call_repeats=3)
    client = CLIENTS["anthropic"](proxy.url)
    history = client.user("get the build green")
    try:
        for _ in range(8):
            reply = await client.ask("gpt-5", stream, history, tools=True)
            history += reply.turn
            if not reply.calls:
                break
            for call in reply.calls:
                history += client.tool_result(Call(call.id, call.name, call.arguments), "make: *** [all] Error 1")
    finally:
        await client.close()
    assert len(fake_openai.requests) == 4 and steering_notes(fake_openai) == [3]
    assert [m["role"] for m in fake_openai.requests[3].json["messages"][-3:]] == ["assistant", "tool", "user"]
    assert STOPPED in reply.text and reply.stop == "end_turn" and not reply.calls


@pytest.mark.parametrize("protocol", sorted(CLIENTS))
async def test_the_steering_note_is_valid_in_every_protocol(launch: Launch, protocol: str) -> None:
    """Each client against a backend of its own protocol (the strict fakes refuse what the
    real APIs refuse): the request carrying the steering note is accepted, and the stop
    answer ends the loop."""
    fakes = {"chat": FakeOpenAI, "responses": FakeResponses, "anthropic": FakeAnthropic, "gemini": FakeGemini}
    types = {"chat": "openai", "responses": "openai-responses", "anthropic": "anthropic", "gemini": "gemini"}
    async with fakes[protocol]() as fake:
        fake.script(ignore_results=True)
        proxy = await launch(fake, backend_type=types[protocol], tool_call_repeats=2)
        client = CLIENTS[protocol](proxy.url)
        history = client.user("get the build green")
        try:
            for _ in range(6):
                reply = await client.ask("gpt-5", True, history, tools=True)
                history += reply.turn
                if not reply.calls:
                    break
                for call in reply.calls:
                    history += client.tool_result(call, "make: *** [all] Error 1")
        finally:
            await client.close()
        assert len(fake.requests) == 3 and all(r.status == 200 for r in fake.requests)
        assert STEERING in fake.requests[2].body.decode() and STEERING not in fake.requests[1].body.decode()
        assert STOPPED in reply.text and not reply.calls


def test_a_stream_that_cannot_hold_a_loop_is_not_watched() -> None:
    def flow_with(**body: Any) -> Any:
        flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, **body})
        assert flow.request.messages  # decoded by "another plugin"
        return flow

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    # by default (streams: with_tools) only streams that offer tools are watched
    assert llmproxy_loop_detection.stream_start(flow_with()) is None
    assert llmproxy_loop_detection.stream_start(flow_with(tools=[tool])) is not None
    assert llmproxy_loop_detection.stream_start(flow_with(tools=[tool], tool_choice="auto")) is not None
    assert llmproxy_loop_detection.stream_start(flow_with(tools=[tool], tool_choice="required")) is None  # only a tool call can come
    assert llmproxy_loop_detection.stream_start(flow_with(tools=[tool], max_tokens=1)) is None  # a quota probe
    assert llmproxy_loop_detection.stream_start(flow_with(tools=[tool], max_tokens=1000)) is not None
    # not decoded: not decoded for this either, and watched
    undecoded = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 1, "tools": [tool]})
    assert llmproxy_loop_detection.stream_start(undecoded) is not None and not undecoded.request_decoded
