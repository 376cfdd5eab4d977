"""Text copied unparsed from a backend's stream into a translated one.

When nobody watches a translated stream (no stream processor), a read that is one plain
OpenAI Chat text chunk reaches an Anthropic client as a ``text_delta`` holding the chunk's
JSON string literal as the backend spelled it (``StreamDecoder.text_literal``). These tests
prove, over real sockets, that the short way is taken, that the client and ``flow_done``
read the same text as with it never taken, that a watched stream never takes it, and that
what only a parse can vouch for still takes the parse (and fails as it always did).

Backend: a real aiohttp server writing hand-made Chat Completions chunks one per write,
a few ms apart (a paced stream), so the proxy reads them one at a time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import aiohttp
import anthropic
import llmproxy_anthropic
import llmproxy_openai
import pytest
from aiohttp import web

from llmproxy import hookimpl
from llmproxy.testing import RunningProxy, start_app, start_proxy

HEAD = b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1730000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1",'
TAIL = b'"logprobs":null,"finish_reason":null}]}\n\n'


def chunk(delta: bytes, finish: bytes = b"null") -> bytes:
    return HEAD + b'"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + finish + b"}]}\n\n"


# Literals as a server may spell them: the escaped slash and the \u escapes are valid JSON
# that llmproxy's own encoder never writes, so the client's bytes show which way each took.
LITERALS = [b'"Hello"', b'" there"', b'", a\\/b"', b'" caf\\u00e9"', b'" \xc3\xbc"', b'" say \\"hi\\""', b'"\\n"', b'" \\ud83d\\ude00"', b'""', b'" end"']
TEXT = "".join(json.loads(literal) for literal in LITERALS)


class Backend:
    """A paced OpenAI Chat stream of ``literals`` (one chunk each), then stop and [DONE]."""

    def __init__(self, literals: list[bytes]) -> None:
        self.literals = literals

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        frames = [chunk(b'{"role":"assistant","content":""}')]
        frames += [chunk(b'{"content":' + literal + b"}") for literal in self.literals]
        frames += [chunk(b"{}", b'"stop"'), b"data: [DONE]\n\n"]
        for frame in frames:
            await response.write(frame)
            await asyncio.sleep(0.005)  # one read per chunk at the proxy
        await response.write_eof()
        return response


class Watch:
    """Records every finished flow's folded answer; with ``processor``, watches every stream."""

    def __init__(self, processor: bool) -> None:
        self.processor = processor
        self.texts: list[str] = []

    @hookimpl
    def stream_start(self, flow: Any) -> Any:
        return (lambda event: event) if self.processor else None

    @hookimpl
    def flow_done(self, flow: Any) -> None:
        self.texts.append(flow.response.text if flow.response is not None else f"<no response: {flow.error}>")


async def _proxy(literals: list[bytes], watch: Watch) -> tuple[RunningProxy, web.AppRunner]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", Backend(literals).chat)
    url, runner = await start_app(app)
    config = {"proxy": {"drain_timeout": 0}, "backends": {"o": {"type": "openai", "base_url": url + "/v1"}}, "default_backend": "o"}
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("watch", watch)]
    return await start_proxy(config, plugins=plugins, entry_points=False), runner


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


BODY = {"model": "gpt-4o-mini", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def post_stream(proxy: RunningProxy, http: aiohttp.ClientSession) -> bytes:
    async with http.post(proxy.url + "/v1/messages", json=BODY, headers={"x-api-key": "k"}) as response:
        assert response.status == 200
        return await response.read()


def deltas(wire: bytes) -> list[bytes]:
    """The raw ``text`` literal of every text_delta frame, as the client received it."""
    marker = b'"delta":{"type":"text_delta","text":'
    return [line[line.index(marker) + len(marker) : -2] for line in wire.split(b"\n") if marker in line]


@pytest.mark.parametrize("watched", [False, True], ids=["nobody-watches", "a-processor-watches"])
async def test_text_is_copied_only_when_nobody_watches(watched: bool, http: aiohttp.ClientSession) -> None:
    watch = Watch(processor=watched)
    proxy, runner = await _proxy(LITERALS, watch)
    try:
        wire = await post_stream(proxy, http)
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="k", max_retries=0)
        async with client.messages.stream(**{k: v for k, v in BODY.items() if k != "stream"}) as stream:
            sdk_text = "".join([text async for text in stream.text_stream])
            final = await stream.get_final_message()
    finally:
        await proxy.stop()
        await runner.cleanup()
    assert sdk_text == TEXT and final.content[0].text == TEXT and final.stop_reason == "end_turn"
    assert watch.texts == [TEXT, TEXT]  # the folded answer flow_done reads
    sent = deltas(wire)
    assert "".join(json.loads(literal) for literal in sent) == TEXT
    assert wire.rstrip().endswith(b'data: {"type":"message_stop"}')
    if watched:  # every delta was parsed and written by llmproxy's encoder
        assert b'a\\/b' not in wire and b'", a/b"' in sent
    else:  # the backend's spelling reached the client, for what the short way may copy
        assert b'", a\\/b"' in sent and b'" say \\"hi\\""' in sent and b'" \xc3\xbc"' in sent
    # a \u escape is never copied: only a parse tells a lone surrogate from a pair
    assert not any(b"\\u" in literal for literal in sent)
    assert '" café"'.encode() in sent and '" 😀"'.encode() in sent


@pytest.mark.parametrize("broken", [b'"bad \\x escape"', b'"\\ud800 lone"', b'"cut \xe2\x82"', b'"a","b"'])
async def test_what_only_a_parse_vouches_for_is_parsed(broken: bytes, http: aiohttp.ClientSession) -> None:
    """A broken literal in a chunk that looks plain, once the short way is on, fails the
    stream as the general path always did: an ``event: error`` frame after the text so far."""
    literals = [b'"one"', b'" two"', b'" three"', b'" four"', broken, b'" never"']
    watch = Watch(processor=False)
    proxy, runner = await _proxy(literals, watch)
    try:
        wire = await post_stream(proxy, http)
    finally:
        await proxy.stop()
        await runner.cleanup()
    assert b"".join(deltas(wire)) == b'"one"" two"" three"" four"'
    frames = [frame for frame in wire.split(b"\n\n") if frame]
    assert frames[-1].startswith(b"event: error\ndata: ") and b"malformed" in frames[-1]
    assert b"never" not in wire and b"message_stop" not in wire


# Reasoning and text in runs, as some Chat servers (DeepSeek, vLLM with a reasoning parser)
# send them: a run after another block is a new block, never one the client saw end.
RUNS = [
    b'{"reasoning_content":"think one"}',
    b'{"content":"Hello"}',
    b'{"content":" there"}',  # by now the text chunk's shape is learned: the fast paths
    b'{"reasoning_content":"think two"}',
    b'{"content":" and"}',
    b'{"content":" after"}',
]


class RunsBackend:
    def __init__(self, burst: bool) -> None:
        self.burst = burst

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        frames = [chunk(b'{"role":"assistant","content":""}'), *[chunk(delta) for delta in RUNS], chunk(b"{}", b'"stop"'), b"data: [DONE]\n\n"]
        if self.burst:
            await response.write(b"".join(frames))
        for frame in frames if not self.burst else ():
            await response.write(frame)
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response


@pytest.mark.parametrize("burst", [False, True], ids=["paced", "burst"])
@pytest.mark.parametrize("watched", [False, True], ids=["nobody-watches", "a-processor-watches"])
async def test_reasoning_and_text_in_runs_reach_an_anthropic_client_whole_and_in_order(burst: bool, watched: bool) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", RunsBackend(burst).chat)
    url, runner = await start_app(app)
    config = {"proxy": {"drain_timeout": 0}, "backends": {"o": {"type": "openai", "base_url": url + "/v1"}}, "default_backend": "o"}
    watch = Watch(processor=watched)
    proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("watch", watch)], entry_points=False)
    try:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="k", max_retries=0)
        async with client.messages.stream(**{k: v for k, v in BODY.items() if k != "stream"}) as stream:
            final = await stream.get_final_message()
    finally:
        await proxy.stop()
        await runner.cleanup()
    blocks = [(block.type, block.thinking if block.type == "thinking" else block.text) for block in final.content]
    assert blocks == [("thinking", "think one"), ("text", "Hello there"), ("thinking", "think two"), ("text", " and after")]
    assert watch.texts == ["Hello there and after"]
