"""Asking the backend again: ``flow.context.resend(flow)`` from a ``response`` hook, and
``RetryStream`` from a stream processor — through a real llmproxy on a real socket, with the
official ``openai`` SDK and the fake OpenAI upstream.

The plugins here are throwaway test plugins; ``empty_recovery`` (tests/plugins/) is the
built-in that uses both.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import llmproxy_openai
import openai
import pytest

from fakes.openai_upstream import DEFAULT_TEXT, FakeOpenAI
from llmproxy import hookimpl
from llmproxy.canonical import EventKind, Message, TextPart
from llmproxy.errors import MAX_STREAM_RETRIES, RetryStream
from llmproxy.testing import RunningProxy, start_proxy

BOUND = 10.0
HI = [{"role": "user", "content": "say hi"}]


class AskTwice:
    """Re-asks every non-streamed answer once, with a note, and keeps the second answer."""

    def __init__(self) -> None:
        self.first: list[str] = []

    @hookimpl
    async def response(self, flow: Any) -> None:
        self.first.append(flow.response.text)
        flow.request.messages.append(Message("user", [TextPart("again, please")]))
        flow.response = await flow.context.resend(flow)


class RetryStreams:
    """Asks again at the end of the answer, ``times`` times, holding every event until then
    (as the contract requires); ``late`` passes the events on and asks after the text was
    written to the client, which is too late."""

    def __init__(self, times: int, late: bool = False) -> None:
        self.times = times
        self.late = late
        self.starts = 0

    @hookimpl
    def stream_start(self, flow: Any) -> Any:
        self.starts += 1
        asked = flow.metadata.setdefault("asked", [0])
        held: list[Any] = []

        def process(event: Any) -> Any:
            if event is None:
                return None
            if self.late:
                if event.kind == EventKind.STOP and flow.first_token_at is not None:
                    raise RetryStream("too late")
                return event
            if event.kind != EventKind.STOP:
                held.append(event)
                return None
            if asked[0] < self.times:
                asked[0] += 1
                raise RetryStream("again")
            return held + [event]

        return process


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESEND_UPSTREAM_KEY", "sk-upstream-resend-1")


@pytest.fixture
async def proxies() -> AsyncIterator[list[RunningProxy]]:
    started: list[RunningProxy] = []
    yield started
    for proxy in started:
        await proxy.stop()


async def launch(started: list[RunningProxy], fake: FakeOpenAI, plugin: Any) -> openai.AsyncOpenAI:
    config = {
        "proxy": {"drain_timeout": 0},
        "backends": {"up": {"type": "openai", "base_url": fake.base_url, "api_keys": ["${RESEND_UPSTREAM_KEY}"]}},
        "default_backend": "up",
    }
    proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("test", plugin)], entry_points=False)
    started.append(proxy)
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0, timeout=BOUND)


async def test_a_response_hook_can_ask_again(fake_openai: FakeOpenAI, proxies: list[RunningProxy]) -> None:
    fake_openai.script_next(text="first answer")
    plugin = AskTwice()
    async with await launch(proxies, fake_openai, plugin) as client:
        completion = await client.chat.completions.create(model="gpt-5", messages=HI)
    assert plugin.first == ["first answer"] and completion.choices[0].message.content == DEFAULT_TEXT
    assert len(fake_openai.requests) == 2
    assert fake_openai.requests[1].json["messages"][-1]["content"] in ("again, please", [{"type": "text", "text": "again, please"}])
    assert fake_openai.requests[1].json.get("stream") is not True


async def test_a_processor_can_ask_for_the_stream_again(fake_openai: FakeOpenAI, proxies: list[RunningProxy]) -> None:
    fake_openai.script_next(text="first answer")
    plugin = RetryStreams(times=1)
    async with await launch(proxies, fake_openai, plugin) as client:
        chunks = await client.chat.completions.create(model="gpt-5", messages=HI, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert text == DEFAULT_TEXT  # nothing of the first answer reached the client
    assert len(fake_openai.requests) == 2 and plugin.starts == 2  # fresh processors for the new stream


async def test_retries_are_bounded(fake_openai: FakeOpenAI, proxies: list[RunningProxy]) -> None:
    async with await launch(proxies, fake_openai, RetryStreams(times=99)) as client:
        with pytest.raises(openai.APIError) as error:
            chunks = await client.chat.completions.create(model="gpt-5", messages=HI, stream=True)
            async for _ in chunks:
                pass
    assert "plugin 'test' failed (RetryStream)" in json.dumps(error.value.body) + str(error.value)
    assert len(fake_openai.requests) == MAX_STREAM_RETRIES + 1


async def test_asking_again_after_the_answer_began_fails_the_flow(fake_openai: FakeOpenAI, proxies: list[RunningProxy]) -> None:
    fake_openai.script(event_delay=0.05)  # frames apart, so the text is written before the end comes
    async with await launch(proxies, fake_openai, RetryStreams(times=1, late=True)) as client:
        text = ""
        with pytest.raises(openai.APIError) as error:
            chunks = await client.chat.completions.create(model="gpt-5", messages=HI, stream=True)
            async for chunk in chunks:
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text == DEFAULT_TEXT  # the answer went out; then the flow failed rather than start again
    assert "RetryStream" in str(error.value) and len(fake_openai.requests) == 1
