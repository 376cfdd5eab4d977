"""Hook chains, end to end: a real llmproxy on a real socket, real clients, real fake upstreams.

Every test starts llmproxy with ``llmproxy.testing.start_proxy`` and talks to it over HTTP
(plain aiohttp, or the official ``openai`` SDK); the backends are the offline provider or a
small OpenAI-compatible aiohttp server defined here. Nothing is mocked and no handler is
called directly, so what is asserted is what a client and a backend would see.

The built-in providers are registered explicitly (``entry_points=False``) so that a
third-party plugin installed in the same environment cannot change the texts asserted here.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import llmproxy_offline
import llmproxy_openai
import openai
import pytest
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from llmproxy import ProxyError, hookimpl
from llmproxy.canonical import EventKind, Response, StreamEvent, TextPart
from llmproxy.config import ConfigError, parse_config
from llmproxy.flow import Flow
from llmproxy.manager import describe
from llmproxy.testing import RunningProxy, start_proxy

SCRIPTED = {"type": "offline", "mode": "scripted", "replies": ["alpha beta gamma"]}
OFFLINE = {"backends": {"offline": {"type": "offline"}}, "default_backend": "offline"}
WORDS = {"backends": {"offline": SCRIPTED}, "default_backend": "offline"}


# -- a real OpenAI-compatible upstream ------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    """An OpenAI Chat Completions server on a real socket that answers ``reply`` (word by
    word when streaming) and records every request it receives.

    ``hang_after=n`` streams n words and then waits forever (until the proxy hangs up, which
    sets ``cancelled``); ``cut_after=n`` streams n words and ends without finishing. Every
    chunk carries ``system_fingerprint`` so a test can tell a forwarded stream from a
    re-encoded one.
    """

    def __init__(self, reply: str = "alpha beta gamma") -> None:
        self.reply = reply
        self.requests: list[Received] = []
        self.hang_after: int | None = None
        self.cut_after: int | None = None
        self.cancelled = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> "FakeOpenAI":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        # handler_cancellation: a handler learns at once that the proxy hung up.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _chunk(self, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Received(dict(request.headers), body))
        model = body.get("model", "")
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply}, "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = self.reply.split(" ")
        try:
            await response.write(self._chunk(model, {"role": "assistant", "content": ""}))
            for i, word in enumerate(words):
                if i == self.hang_after:
                    await asyncio.Event().wait()
                if i == self.cut_after:
                    await response.write_eof()
                    return response
                await response.write(self._chunk(model, {"content": word if i == 0 else " " + word}))
            await response.write(self._chunk(model, {}, "stop"))
            await response.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await response.write_eof()
        return response


def upstream_config(fake: FakeOpenAI) -> dict[str, Any]:
    return {
        "backends": {"upstream": {"type": "openai", "base_url": fake.url}, "offline": {"type": "offline"}},
        "default_backend": "upstream",
    }


# -- fixtures and client helpers ------------------------------------------------------------

StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def proxy(proxies: Any) -> StartProxy:
    """``await proxy(config, (name, plugin), ...)``: llmproxy with the built-in providers and
    these plugins, registered in this order; stopped after the test."""
    return lambda config, *plugins: proxies(config, [("offline", llmproxy_offline), ("openai", llmproxy_openai), *plugins])


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    upstream = await FakeOpenAI().start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # The timeout only turns a hang into a failure; no test asserts a duration.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


def sdk(running: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)


@dataclass
class Reply:
    """What the client got: status, and the JSON body or the SSE frames."""

    status: int
    content_type: str
    raw: bytes
    body: Any = None
    frames: list[Any] = field(default_factory=list)

    @property
    def text(self) -> str:
        if self.frames:
            return "".join(self.deltas)
        return self.body["choices"][0]["message"]["content"]

    @property
    def deltas(self) -> list[str]:
        """The non-empty content pieces of a stream, in order."""
        return [c["choices"][0]["delta"]["content"] for c in self.frames if isinstance(c, dict) and c.get("choices") and c["choices"][0]["delta"].get("content")]

    @property
    def finish_reasons(self) -> list[str]:
        return [c["choices"][0]["finish_reason"] for c in self.frames if isinstance(c, dict) and c.get("choices") and c["choices"][0]["finish_reason"]]

    @property
    def error(self) -> dict[str, Any]:
        if self.frames:
            return self.frames[-1]["error"]
        return self.body["error"]


def parse_sse(raw: bytes) -> list[Any]:
    frames: list[Any] = []
    for block in raw.decode().split("\n\n"):
        data = "\n".join(line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:"))
        if data:
            frames.append(data if data == "[DONE]" else json.loads(data))
    return frames


async def chat(session: aiohttp.ClientSession, running: RunningProxy, text: str = "hello", *, model: str = "offline-echo", stream: bool = False, raw_body: bytes | None = None) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    data = raw_body if raw_body is not None else json.dumps(body).encode()
    async with session.post(running.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}) as response:
        raw = await response.read()
        reply = Reply(response.status, response.content_type, raw)
    if reply.content_type == "text/event-stream":
        reply.frames = parse_sse(raw)
    else:
        reply.body = json.loads(raw)
    return reply


@dataclass
class Seen:
    """A snapshot of a flow, taken inside ``flow_done``."""

    flow: Flow
    status: int | None
    error: ProxyError | None
    response: Response | None


class FlowLog:
    """Records every finished flow; ``await log.next()`` waits for the next one, because
    ``flow_done`` runs after the client already has its answer."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Seen] = asyncio.Queue()

    @hookimpl(trylast=True)
    async def flow_done(self, flow: Flow) -> None:
        await asyncio.sleep(0)  # an async implementation, awaited like any other
        self.queue.put_nowait(Seen(flow, flow.status, flow.error, flow.response))

    async def next(self) -> Seen:
        return await asyncio.wait_for(self.queue.get(), 10)


def user_text(flow: Flow) -> str:
    message = flow.request.last_user_message
    assert message is not None
    return message.text


def set_user_text(flow: Flow, text: str) -> None:
    message = flow.request.last_user_message
    assert message is not None
    message.parts = [TextPart(text)]


def text_processor(change: Callable[[str], Any]) -> Callable[[StreamEvent | None], Any]:
    """A stream processor applying ``change`` to each text delta's text; ``change`` returns
    the new text, None to drop the event, or a list of texts to emit in its place."""

    def processor(event: StreamEvent | None) -> Any:
        if event is None or event.kind != EventKind.TEXT:
            return event
        result = change(event.text)
        if result is None:
            return None
        if isinstance(result, list):
            return [StreamEvent(EventKind.TEXT, index=event.index, text=t) for t in result]
        event.text = result
        return event

    return processor


class StreamPlugin:
    """A plugin whose ``stream_start`` returns ``make()`` (a fresh processor per stream)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make

    @hookimpl
    def stream_start(self, flow: Flow) -> Any:
        return self.make()


# -- order ----------------------------------------------------------------------------------


def recorder(name: str, calls: dict[str, list[str]], **order: bool) -> Any:
    """A plugin implementing the flow chains with ``order`` (tryfirst/trylast), recording
    each call under the hook's name."""

    class Recorder:
        @hookimpl(**order)
        def request(self, flow: Flow) -> None:
            calls["request"].append(name)

        @hookimpl(**order)
        def response(self, flow: Flow) -> None:
            calls["response"].append(name)

        @hookimpl(**order)
        def stream_start(self, flow: Flow) -> Any:
            calls["stream_start"].append(name)

            def processor(event: StreamEvent | None) -> Any:
                if event is None:
                    calls["flush"].append(name)
                elif event.kind == EventKind.START:
                    calls["processor"].append(name)
                return event

            return processor

        @hookimpl(**order)
        def flow_done(self, flow: Flow) -> None:
            calls["flow_done"].append(name)

    return Recorder()


async def test_chains_run_in_declared_order_and_describe_reports_that_order(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    calls: dict[str, list[str]] = defaultdict(list)
    log = FlowLog()
    running = await proxy(
        OFFLINE,
        ("p1", recorder("p1", calls)),
        ("p2", recorder("p2", calls, trylast=True)),
        ("p3", recorder("p3", calls)),
        ("p4", recorder("p4", calls, tryfirst=True)),
        ("p5", recorder("p5", calls)),
        ("p6", recorder("p6", calls, trylast=True)),
        ("p7", recorder("p7", calls, tryfirst=True)),
        ("log", log),  # trylast and registered last: runs after everything it waits for
    )
    # tryfirst (later registered first), the unmarked (later registered first), then
    # trylast (later registered last): pluggy's rule, as the hookspecs docstring says
    expected = ["p7", "p4", "p5", "p3", "p1", "p2", "p6"]

    assert (await chat(session, running)).status == 200
    await log.next()
    assert (await chat(session, running, stream=True)).status == 200
    await log.next()

    chains = describe(running.context.host)["chains"]
    assert calls["request"] == expected * 2
    assert chains["request"] == running.context.chains.order("request") == expected
    assert calls["response"] == expected == chains["response"]
    assert calls["stream_start"] == expected == chains["stream_start"]
    assert calls["processor"] == expected  # processors run in their stream_start order
    assert calls["flush"] == expected
    assert calls["flow_done"] == expected * 2
    assert chains["flow_done"] == expected + ["log"]
    listed = {p["name"]: p["hooks"] for p in describe(running.context.host)["plugins"]}
    assert set(listed["p1"]) == {"request", "response", "stream_start", "flow_done"}


# -- request: rewrite, reroute, answer, block, fail closed, async ---------------------------


class Redact:
    @hookimpl
    def request(self, flow: Flow) -> None:
        set_user_text(flow, user_text(flow).replace("hunter2", "[redacted]"))


@pytest.mark.parametrize("stream", [False, True])
async def test_request_hook_rewrites_what_the_backend_receives(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, stream: bool) -> None:
    running = await proxy(upstream_config(fake), ("redact", Redact()))
    reply = await chat(session, running, "my password is hunter2", model="gpt-test", stream=stream)
    assert reply.status == 200
    assert reply.text == "alpha beta gamma"
    [received] = fake.requests
    assert received.body["messages"] == [{"role": "user", "content": "my password is [redacted]"}]
    assert received.body["model"] == "gpt-test"


async def test_request_hook_reroutes_by_changing_flow_model(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    class Reroute:
        @hookimpl
        def request(self, flow: Flow) -> None:
            if flow.model == "cheap":
                flow.model = "offline:rerouted"

    running = await proxy(upstream_config(fake), ("reroute", Reroute()))
    reply = await chat(session, running, "where am I?", model="cheap")
    assert reply.status == 200
    assert reply.text == "You said: where am I?"  # the offline backend's echo
    assert reply.body["model"] == "rerouted"
    assert fake.requests == []
    assert (await chat(session, running, model="other")).text == "alpha beta gamma"
    assert len(fake.requests) == 1


class Answerer:
    """Answers every request itself, before anything else in the chain."""

    @hookimpl(tryfirst=True)
    def request(self, flow: Flow) -> None:
        flow.response = Response(model=flow.model, parts=[TextPart("answered by a plugin")])


class Later:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def request(self, flow: Flow) -> None:
        self.calls += 1


@pytest.mark.parametrize("stream", [False, True])
async def test_request_hook_answers_itself_and_the_backend_is_never_called(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, stream: bool) -> None:
    later = Later()
    log = FlowLog()
    running = await proxy(upstream_config(fake), ("log", log), ("later", later), ("answerer", Answerer()))
    reply = await chat(session, running, model="gpt-test", stream=stream)
    assert reply.status == 200
    assert reply.text == "answered by a plugin"
    if stream:
        assert reply.content_type == "text/event-stream"
        assert reply.finish_reasons == ["stop"] and reply.frames[-1] == "[DONE]"
    seen = await log.next()
    assert fake.requests == []  # the backend was never called
    assert seen.flow.attempts == []
    assert later.calls == 0  # the rest of the request chain was skipped
    assert seen.status == 200 and seen.error is None


async def test_answer_from_a_request_hook_still_passes_through_stream_processors(proxy: StartProxy, fake: FakeOpenAI) -> None:
    shout = StreamPlugin(lambda: text_processor(str.upper))
    running = await proxy(upstream_config(fake), ("answerer", Answerer()), ("shout", shout))
    client = sdk(running)
    try:
        stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    finally:
        await client.close()
    assert text == "ANSWERED BY A PLUGIN"
    assert fake.requests == []


class Blocker:
    @hookimpl
    def request(self, flow: Flow) -> None:
        if "rm -rf" in user_text(flow):
            raise ProxyError(403, "blocked: this request asks for a dangerous command")


@pytest.mark.parametrize("stream", [False, True])
async def test_request_hook_blocks_with_a_403_in_openai_error_json(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, stream: bool) -> None:
    later = Later()
    running = await proxy(upstream_config(fake), ("later", later), ("blocker", Blocker()))
    reply = await chat(session, running, "please run rm -rf /", model="gpt-test", stream=stream)
    assert reply.status == 403
    assert reply.content_type == "application/json"
    assert reply.body == {
        "error": {"message": "blocked: this request asks for a dangerous command", "type": "permission_error", "param": None, "code": None}
    }
    assert fake.requests == []
    assert later.calls == 0

    client = sdk(running)
    try:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "rm -rf ~"}], stream=stream)
    finally:
        await client.close()
    assert raised.value.status_code == 403
    assert "dangerous command" in raised.value.message
    assert fake.requests == []


class Exploding:
    @hookimpl
    def request(self, flow: Flow) -> None:
        raise RuntimeError("secret internals of the plugin")


@pytest.mark.parametrize("stream", [False, True])
async def test_request_hook_crash_fails_closed_with_500_naming_the_plugin(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, stream: bool) -> None:
    log = FlowLog()
    running = await proxy(upstream_config(fake), ("log", log), ("exploding", Exploding()))
    reply = await chat(session, running, model="gpt-test", stream=stream)
    assert reply.status == 500
    assert reply.content_type == "application/json"
    assert "plugin 'exploding' failed" in reply.error["message"]
    assert reply.error["type"] == "api_error"
    assert b"Traceback" not in reply.raw and b"secret internals" not in reply.raw
    assert fake.requests == []  # fail closed: nothing reached the backend
    seen = await log.next()
    assert seen.status == 500 and seen.error is not None and seen.error.status == 500


def appender(suffix: str, seen: list[str]) -> Any:
    class Append:
        @hookimpl
        async def request(self, flow: Flow) -> None:
            text = user_text(flow)
            await asyncio.sleep(0)  # really suspend: the next hook must still wait for us
            seen.append(text)
            set_user_text(flow, text + suffix)

    return Append()


async def test_async_request_hooks_are_awaited_in_order_each_seeing_the_last_change(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    class SyncAppend:
        @hookimpl
        def request(self, flow: Flow) -> None:
            seen.append(user_text(flow))
            set_user_text(flow, user_text(flow) + "+sync")

    # registered c, sync, b, a: run a, b, sync, c
    running = await proxy(OFFLINE, ("c", appender("+c", seen)), ("sync", SyncAppend()), ("b", appender("+b", seen)), ("a", appender("+a", seen)))
    assert running.context.chains.order("request") == ["a", "b", "sync", "c"]
    reply = await chat(session, running, "x")
    assert seen == ["x", "x+a", "x+a+b", "x+a+b+sync"]
    assert reply.text == "You said: x+a+b+sync+c"


async def test_traced_flows_record_what_each_request_and_response_implementation_changed(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    done: list[Flow] = []

    class Tracer:
        @hookimpl(tryfirst=True)
        def request(self, flow: Flow) -> None:
            flow.trace_changes()

        @hookimpl
        def flow_done(self, flow: Flow) -> None:
            done.append(flow)

    class Reader:  # reads the request (decodes it) without changing anything
        @hookimpl
        def request(self, flow: Flow) -> None:
            user_text(flow)

    class Reroute:  # changes only flow.model, never decoding the request
        @hookimpl
        def request(self, flow: Flow) -> None:
            flow.model = "offline:other"

    running = await proxy(WORDS, ("footer", Footer()), ("reroute", Reroute()), ("sync", _SyncSuffix()), ("reader", Reader()), ("tracer", Tracer()))
    reply = await chat(session, running, "x", stream=False)
    assert reply.text == "alpha beta gamma [reviewed]"
    changes = done[0].changes
    assert changes is not None
    by_plugin = {plugin: (hook, before, after) for hook, plugin, before, after in changes}
    assert set(by_plugin) == {"reader", "sync", "reroute", "footer"}  # the reader decoded it: None → JSON
    hook, before, after = by_plugin["sync"]
    assert hook == "request" and b'"x"' in before["request"] and b'"x+sync"' in after["request"]
    hook, before, after = by_plugin["reroute"]
    assert (before["model"], after["model"]) == ("offline-echo", "offline:other")
    hook, before, after = by_plugin["footer"]
    assert hook == "response" and b"[reviewed]" not in before["response"] and b"[reviewed]" in after["response"]
    # untraced flows record nothing
    plain = await proxy(WORDS, ("sync", _SyncSuffix()), ("done", _Done(done)))
    done.clear()
    await chat(session, plain, "y", stream=False)
    assert done[0].changes is None


class _Done:
    def __init__(self, done: list[Flow]) -> None:
        self.done = done

    @hookimpl
    def flow_done(self, flow: Flow) -> None:
        self.done.append(flow)


class _SyncSuffix:
    @hookimpl
    def request(self, flow: Flow) -> None:
        set_user_text(flow, user_text(flow) + "+sync")


# -- response --------------------------------------------------------------------------------


class Footer:
    @hookimpl
    async def response(self, flow: Flow) -> None:
        await asyncio.sleep(0)
        assert flow.response is not None
        flow.response.parts.append(TextPart(" [reviewed]"))


@pytest.mark.parametrize("backend", ["offline", "upstream"])
async def test_response_hook_changes_a_non_streamed_answer(proxy: StartProxy, fake: FakeOpenAI, backend: str) -> None:
    config = upstream_config(fake) if backend == "upstream" else WORDS
    running = await proxy(config, ("footer", Footer()))
    client = sdk(running)
    try:
        completion = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    assert completion.choices[0].message.content == "alpha beta gamma [reviewed]"


# -- stream processors -----------------------------------------------------------------------


class HoldAll:
    """Holds every text delta and releases them as one at the end of the stream."""

    def __init__(self) -> None:
        self.held: list[StreamEvent] = []

    def __call__(self, event: StreamEvent | None) -> Any:
        if event is None:
            if not self.held:
                return None
            return [StreamEvent(EventKind.TEXT, index=self.held[0].index, text="".join(e.text for e in self.held))]
        if event.kind == EventKind.TEXT:
            self.held.append(event)
            return None
        return event


def injector() -> Callable[[StreamEvent | None], Any]:
    def processor(event: StreamEvent | None) -> Any:
        if event is None:
            return [StreamEvent(EventKind.TEXT, text=" [end]")]
        if event.kind == EventKind.TEXT and event.text == " beta":
            return [event, StreamEvent(EventKind.TEXT, index=event.index, text=" (sic)")]
        return event

    return processor


def stopper() -> Callable[[StreamEvent | None], Any]:
    def processor(event: StreamEvent | None) -> Any:
        if event is not None and event.kind == EventKind.TEXT and "beta" in event.text:
            return [StreamEvent(EventKind.STOP, stop_reason="end_turn")]
        return event

    return processor


PROCESSORS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "change": (lambda: text_processor(str.upper), ["ALPHA", " BETA", " GAMMA"]),
    "drop": (lambda: text_processor(lambda t: None if t == " beta" else t), ["alpha", " gamma"]),
    "split": (lambda: text_processor(lambda t: [t, "!"]), ["alpha", "!", " beta", "!", " gamma", "!"]),
    "hold and flush": (HoldAll, ["alpha beta gamma"]),
    "inject": (injector, ["alpha", " beta", " (sic)", " gamma", " [end]"]),
    "stop early": (stopper, ["alpha"]),
}


@pytest.mark.parametrize("backend", ["offline", "upstream"])
@pytest.mark.parametrize("case", list(PROCESSORS))
async def test_stream_processor(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, case: str, backend: str) -> None:
    make, expected = PROCESSORS[case]
    config = upstream_config(fake) if backend == "upstream" else WORDS
    log = FlowLog()
    running = await proxy(config, ("log", log), ("processor", StreamPlugin(make)))
    reply = await chat(session, running, model="gpt-test", stream=True)
    assert reply.status == 200
    assert reply.deltas == expected  # the exact pieces the client saw, in order
    assert reply.finish_reasons == ["stop"]
    assert reply.frames[-1] == "[DONE]"
    assert "fp_fake" not in reply.raw.decode()  # decoded and re-encoded, not forwarded
    seen = await log.next()
    assert seen.response is not None and seen.response.text == "".join(expected)
    assert seen.error is None


async def test_stop_event_ends_the_stream_and_the_backend_is_not_read_further(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    fake.hang_after = 2  # "alpha", " beta", then the backend would keep the stream open forever
    running = await proxy(upstream_config(fake), ("stopper", StreamPlugin(stopper)))
    reply = await chat(session, running, model="gpt-test", stream=True)
    assert reply.deltas == ["alpha"]
    assert reply.finish_reasons == ["stop"] and reply.frames[-1] == "[DONE]"
    # llmproxy hung up on the backend instead of reading on.
    await asyncio.wait_for(fake.cancelled.wait(), 10)


async def test_processors_compose_in_chain_order(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    # "first" (registered last) turns beta into delta; "second" drops delta. In the other
    # order beta would survive as "delta".
    first = StreamPlugin(lambda: text_processor(lambda t: t.replace("beta", "delta")))
    second = StreamPlugin(lambda: text_processor(lambda t: None if "delta" in t else t))
    running = await proxy(WORDS, ("second", second), ("first", first))
    assert running.context.chains.order("stream_start") == ["first", "second"]
    reply = await chat(session, running, stream=True)
    assert reply.deltas == ["alpha", " gamma"]


async def test_events_released_at_flush_pass_through_the_later_processors(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    holder = StreamPlugin(HoldAll)
    shout = StreamPlugin(lambda: text_processor(str.upper))
    running = await proxy(WORDS, ("shout", shout), ("holder", holder))
    assert running.context.chains.order("stream_start") == ["holder", "shout"]
    reply = await chat(session, running, stream=True)
    assert reply.deltas == ["ALPHA BETA GAMMA"]


def exploding_processor() -> Callable[[StreamEvent | None], Any]:
    def processor(event: StreamEvent | None) -> Any:
        if event is not None and event.kind == EventKind.TEXT and "beta" in event.text:
            raise ValueError("secret internals of the processor")
        return event

    return processor


@pytest.mark.parametrize("backend", ["offline", "upstream"])
async def test_processor_crash_ends_the_stream_with_an_sse_error_naming_the_plugin(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, backend: str) -> None:
    config = upstream_config(fake) if backend == "upstream" else WORDS
    log = FlowLog()
    running = await proxy(config, ("log", log), ("exploder", StreamPlugin(exploding_processor)))
    reply = await chat(session, running, model="gpt-test", stream=True)
    # what came before the failing event in the same backend read is not sent either; when
    # that was everything (the whole answer in one read), the client gets a plain HTTP 500
    if backend == "upstream" and reply.status == 500:
        assert reply.content_type == "application/json" and "plugin 'exploder' failed" in json.loads(reply.raw)["error"]["message"]
    else:
        assert reply.status == 200 and reply.content_type == "text/event-stream"
        assert reply.deltas == ["alpha"]
        assert set(reply.frames[-1]) == {"error"}
        assert "plugin 'exploder' failed" in reply.error["message"]
        assert reply.error["type"] == "api_error"
    assert b"Traceback" not in reply.raw and b"secret internals" not in reply.raw
    seen = await log.next()
    assert seen.error is not None and seen.error.status == 500

    # the official SDK reads it as a protocol error (an error event, or the HTTP 500)
    client = sdk(running)
    try:
        with pytest.raises(openai.APIError, match="plugin 'exploder' failed"):
            stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
            async for _ in stream:
                pass
    finally:
        await client.close()


async def test_processor_may_refuse_mid_stream_with_a_proxy_error(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    def refuse() -> Callable[[StreamEvent | None], Any]:
        def processor(event: StreamEvent | None) -> Any:
            if event is not None and event.kind == EventKind.TEXT and "beta" in event.text:
                raise ProxyError(403, "the answer mentioned beta")
            return event

        return processor

    running = await proxy(WORDS, ("refuse", StreamPlugin(refuse)))
    reply = await chat(session, running, stream=True)
    assert reply.deltas == ["alpha"]
    assert reply.error == {"message": "the answer mentioned beta", "type": "permission_error", "param": None, "code": None}


async def test_processor_may_end_the_stream_with_an_error_event(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    def censor() -> Callable[[StreamEvent | None], Any]:
        def processor(event: StreamEvent | None) -> Any:
            if event is not None and event.kind == EventKind.TEXT and "beta" in event.text:
                return [StreamEvent(EventKind.ERROR, error=ProxyError(403, "the answer was cut off by policy"))]
            return event

        return processor

    log = FlowLog()
    running = await proxy(WORDS, ("log", log), ("censor", StreamPlugin(censor)))
    reply = await chat(session, running, stream=True)
    assert reply.deltas == ["alpha"]
    assert reply.error == {"message": "the answer was cut off by policy", "type": "permission_error", "param": None, "code": None}
    seen = await log.next()
    assert seen.error is not None and seen.error.status == 403
    assert seen.response is not None and seen.response.text == "alpha"


async def test_stream_start_crash_fails_closed_before_the_stream_begins(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    class BrokenStart:
        @hookimpl
        def stream_start(self, flow: Flow) -> Any:
            raise KeyError("secret internals")

    running = await proxy(upstream_config(fake), ("broken", BrokenStart()))
    reply = await chat(session, running, model="gpt-test", stream=True)
    assert reply.status == 500
    assert "plugin 'broken' failed" in reply.error["message"]
    assert b"secret internals" not in reply.raw
    assert fake.requests == []


# -- upstream_request ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_request_hook_edits_what_the_backend_receives(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, stream: bool) -> None:
    class Identify:
        @hookimpl
        def upstream_request(self, flow: Flow, upstream: Any) -> None:
            upstream.headers["X-Flow-Id"] = flow.id

    class Tag:
        @hookimpl
        def upstream_request(self, upstream: Any) -> None:  # an implementation may take fewer arguments
            assert upstream.body is not None
            upstream.body["user"] = "tagged-by-plugin"

    log = FlowLog()
    running = await proxy(upstream_config(fake), ("log", log), ("identify", Identify()), ("tag", Tag()))
    reply = await chat(session, running, model="gpt-test", stream=stream)
    assert reply.status == 200 and reply.text == "alpha beta gamma"
    seen = await log.next()
    [received] = fake.requests
    assert received.headers["X-Flow-Id"] == seen.flow.id
    assert received.body["user"] == "tagged-by-plugin"


# -- error -----------------------------------------------------------------------------------

KNOWN_ONLY = {"backends": {"offline": {"type": "offline", "models": ["known"]}}, "default_backend": "offline"}


async def test_error_hook_sees_the_failure_and_can_replace_the_error(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    seen: list[tuple[int, str]] = []

    class Rewrite:
        @hookimpl
        async def error(self, flow: Flow) -> None:
            assert flow.error is not None
            seen.append((flow.error.status, flow.model))
            if flow.error.status == 404:
                flow.error = ProxyError(410, "that model was retired; use 'known'", param="model")

    running = await proxy(KNOWN_ONLY, ("rewrite", Rewrite()))
    reply = await chat(session, running, model="retired")
    assert seen == [(404, "retired")]
    assert reply.status == 410
    assert reply.body["error"]["message"] == "that model was retired; use 'known'"
    assert reply.body["error"]["param"] == "model"

    bad = await chat(session, running, raw_body=b"{not json")
    assert bad.status == 400  # seen, and left alone
    assert seen[-1] == (400, "")


@pytest.mark.parametrize("stream", [False, True])
async def test_error_hook_can_answer_instead(proxy: StartProxy, session: aiohttp.ClientSession, stream: bool) -> None:
    class Fallback:
        @hookimpl
        def error(self, flow: Flow) -> None:
            if flow.error is not None and flow.error.status == 404:
                flow.response = Response(model=flow.model, parts=[TextPart("no such model, but here is an answer")])

    log = FlowLog()
    running = await proxy(KNOWN_ONLY, ("log", log), ("fallback", Fallback()))
    reply = await chat(session, running, model="retired", stream=stream)
    assert reply.status == 200
    assert reply.content_type == ("text/event-stream" if stream else "application/json")
    assert reply.text == "no such model, but here is an answer"
    seen = await log.next()
    assert seen.status == 200 and seen.error is None


async def test_an_answer_refused_by_a_response_hook_is_not_sent(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    seen: list[int] = []

    class Censor:
        @hookimpl
        def response(self, flow: Flow) -> None:
            assert flow.response is not None
            if "beta" in flow.response.text:
                raise ProxyError(451, "the answer was withheld")

    class Watch:
        @hookimpl
        def error(self, flow: Flow) -> None:
            assert flow.error is not None
            seen.append(flow.error.status)

    running = await proxy(upstream_config(fake), ("watch", Watch()), ("censor", Censor()))
    reply = await chat(session, running, model="gpt-test")
    assert seen == [451]
    assert reply.status == 451
    assert reply.body["error"]["message"] == "the answer was withheld"
    assert b"alpha" not in reply.raw


async def test_a_stream_error_stays_an_error_even_if_an_error_hook_clears_it(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    class Swallow:
        @hookimpl
        def error(self, flow: Flow) -> None:
            flow.error = None  # too late: the stream has begun

    log = FlowLog()
    running = await proxy(WORDS, ("log", log), ("swallow", Swallow()), ("exploder", StreamPlugin(exploding_processor)))
    reply = await chat(session, running, stream=True)
    assert reply.deltas == ["alpha"]
    assert "plugin 'exploder' failed" in reply.error["message"]
    seen = await log.next()
    assert seen.error is not None and seen.error.status == 500


# -- flow_done -------------------------------------------------------------------------------


async def test_flow_done_sees_every_flow_including_failed_ones(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    log = FlowLog()
    config = upstream_config(fake)
    config["backends"]["upstream"]["models"] = ["gpt-test"]
    running = await proxy(config, ("log", log), ("blocker", Blocker()), ("exploder", StreamPlugin(exploding_processor)))

    ok = await chat(session, running, model="gpt-test")
    seen = await log.next()
    assert ok.status == seen.status == 200 and seen.error is None
    assert seen.response is not None and seen.response.text == "alpha beta gamma"

    bad_json = await chat(session, running, raw_body=b'{"model": "gpt-test", "messages": [')
    seen = await log.next()
    assert bad_json.status == seen.status == 400
    assert seen.error is not None and seen.error.status == 400 and "not valid JSON" in seen.error.message

    unknown = await chat(session, running, model="no-such-model")
    seen = await log.next()
    assert unknown.status == seen.status == 404
    assert seen.error is not None and "no-such-model" in seen.error.message

    blocked = await chat(session, running, "rm -rf /", model="gpt-test")
    seen = await log.next()
    assert blocked.status == seen.status == 403
    assert seen.error is not None and seen.error.kind == "permission_error"

    broken = await chat(session, running, model="gpt-test", stream=True)
    seen = await log.next()
    # an HTTP 500 when the crash came before anything was sent, else a 200 stream ending in
    # an error event: flow_done sees the status the client saw either way
    assert broken.status == seen.status and seen.status in (200, 500)
    assert seen.error is not None and seen.error.status == 500 and "exploder" in seen.error.message
    assert log.queue.empty()


async def test_flow_done_sees_an_upstream_stream_cut_short(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    fake.cut_after = 2
    log = FlowLog()
    running = await proxy(upstream_config(fake), ("log", log))
    reply = await chat(session, running, model="gpt-test", stream=True)
    assert reply.deltas == ["alpha", " beta"]
    assert "error" in reply.frames[-1]
    seen = await log.next()
    assert seen.status == 200
    assert seen.error is not None and seen.error.status == 502


async def test_flow_done_sees_the_folded_response_of_a_forwarded_stream(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    log = FlowLog()
    running = await proxy(upstream_config(fake), ("log", log))
    reply = await chat(session, running, model="gpt-test", stream=True)
    assert reply.deltas == ["alpha", " beta", " gamma"]
    assert reply.frames[1]["system_fingerprint"] == "fp_fake"  # forwarded untouched, not re-encoded
    seen = await log.next()
    assert seen.status == 200 and seen.error is None
    assert seen.response is not None
    assert seen.response.text == "alpha beta gamma"
    assert seen.response.stop_reason == "end_turn"


@pytest.mark.parametrize("backend", ["offline", "upstream"])
async def test_flow_done_sees_the_folded_response_of_a_decoded_stream(proxy: StartProxy, session: aiohttp.ClientSession, fake: FakeOpenAI, backend: str) -> None:
    config = upstream_config(fake) if backend == "upstream" else WORDS
    log = FlowLog()
    running = await proxy(config, ("log", log), ("watcher", StreamPlugin(lambda: (lambda event: event))))
    reply = await chat(session, running, model="gpt-test", stream=True)
    assert reply.deltas == ["alpha", " beta", " gamma"]
    seen = await log.next()
    assert seen.status == 200 and seen.error is None
    assert seen.response is not None
    assert seen.response.text == "alpha beta gamma"
    assert seen.response.stop_reason == "end_turn"


# -- configure, startup, shutdown ------------------------------------------------------------


class SuffixSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    suffix: str = Field(" [ok]", description="Appended to every non-streamed answer.")
    times: int = Field(1, ge=1, description="How many times to append it.")


class Suffixer:
    """A plugin with settings, a life cycle, and a hook that uses its settings."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.settings: SuffixSettings | None = None
        self.context: Any = None

    @hookimpl
    def plugin_settings(self) -> type[BaseModel]:
        return SuffixSettings

    @hookimpl
    def configure(self, settings: SuffixSettings, context: Any) -> None:
        self.events.append("configure")
        self.settings = settings
        self.context = context

    @hookimpl
    async def startup(self, context: Any) -> None:
        await asyncio.sleep(0)
        self.events.append("startup")

    @hookimpl
    async def shutdown(self, context: Any) -> None:
        await asyncio.sleep(0)
        self.events.append("shutdown")

    @hookimpl
    def response(self, flow: Flow) -> None:
        assert self.settings is not None and flow.response is not None
        flow.response.parts.append(TextPart(self.settings.suffix * self.settings.times))


async def test_configure_receives_the_validated_settings_of_its_section(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    plugin = Suffixer()
    config = {**OFFLINE, "plugins": {"suffixer": {"suffix": " [checked]"}}}
    running = await proxy(config, ("suffixer", plugin))
    assert isinstance(plugin.settings, SuffixSettings)
    assert plugin.settings.suffix == " [checked]"
    assert plugin.settings.times == 1  # the default
    assert plugin.context is running.context
    assert plugin.context.config.plugin_section("suffixer") == {"suffix": " [checked]"}
    reply = await chat(session, running, "hi")
    assert reply.text == "You said: hi [checked]"


async def test_startup_and_shutdown_are_called_once_each(session: aiohttp.ClientSession) -> None:
    plugin = Suffixer()
    plugins = [("offline", llmproxy_offline), ("suffixer", plugin)]
    running = await start_proxy(OFFLINE, plugins=plugins, entry_points=False)
    try:
        assert plugin.events == ["configure", "startup"]
        assert plugin.settings == SuffixSettings()  # no section: the defaults
        for _ in range(3):
            assert (await chat(session, running)).status == 200
        assert plugin.events == ["configure", "startup"]
    finally:
        await running.stop()
    assert plugin.events == ["configure", "startup", "shutdown"]


class StatusPage:
    """Adds /status (GET) and /status/{name} (every method) through register_routes."""

    def __init__(self) -> None:
        self.context: Any = None

    @hookimpl
    def register_routes(self, register: Callable[..., None], context: Any) -> None:
        self.context = context

        async def status(request: web.Request) -> web.Response:
            return web.json_response({"backends": sorted(context.providers)})

        async def named(request: web.Request) -> web.Response:
            return web.json_response({"name": request.match_info["name"], "method": request.method})

        register("GET", "/status", status)
        register("*", "/status/{name}", named)


async def test_register_routes_adds_plugin_routes_to_the_server(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    plugin = StatusPage()
    running = await proxy(OFFLINE, ("status_page", plugin))
    assert plugin.context is running.context
    async with session.get(f"{running.url}/status") as reply:
        assert reply.status == 200
        assert await reply.json() == {"backends": ["offline"]}
    async with session.delete(f"{running.url}/status/x") as reply:
        assert await reply.json() == {"name": "x", "method": "DELETE"}
    # the protocol routes are untouched
    assert (await chat(session, running, "hi")).status == 200


class Squatter:
    @hookimpl
    def register_routes(self, register: Callable[..., None]) -> None:
        register("POST", "/v1/chat/completions", lambda request: None)


async def test_register_routes_cannot_take_a_protocol_path() -> None:
    from llmproxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.squatter: cannot add route '/v1/chat/completions'"):
        await start_proxy(OFFLINE, plugins=[("offline", llmproxy_offline), ("squatter", Squatter())], entry_points=False)


# -- when a hook has work: what configure declares ------------------------------------------


class WorkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    when: dict[str, Any] = Field(default_factory=dict)


class Declarer:
    """Counts its calls per hook; ``configure`` returns ``plugins.declarer.when`` as it is."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)

    @hookimpl
    def plugin_settings(self) -> type[BaseModel]:
        return WorkSettings

    @hookimpl
    def configure(self, settings: WorkSettings) -> Any:
        return settings.when or None

    @hookimpl
    def request(self, flow: Flow) -> None:
        self.calls["request"] += 1

    @hookimpl
    def response(self, flow: Flow) -> None:
        self.calls["response"] += 1

    @hookimpl
    def stream_start(self, flow: Flow) -> None:
        self.calls["stream_start"] += 1

    @hookimpl
    def flow_done(self, flow: Flow) -> None:
        self.calls["flow_done"] += 1


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


async def _ask(session: aiohttp.ClientSession, running: RunningProxy, tools: bool, stream: bool) -> None:
    body: dict[str, Any] = {"model": "offline-echo", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if tools:
        body["tools"] = [TOOL]
    async with session.post(running.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.read()


async def test_hooks_declared_tools_or_never_run_only_where_they_have_work(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    plugin = Declarer()
    when = {"request": "tools", "response": "never", "stream_start": "tools", "flow_done": "always"}
    running = await proxy({**OFFLINE, "plugins": {"declarer": {"when": when}}}, ("declarer", plugin))
    for stream in (False, True):
        await _ask(session, running, tools=False, stream=stream)
    assert dict(plugin.calls) == {"flow_done": 2}  # neither offered tools
    for stream in (False, True):
        await _ask(session, running, tools=True, stream=stream)
    assert dict(plugin.calls) == {"flow_done": 4, "request": 2, "stream_start": 1}  # response: never
    info = describe(running.context.host, running.context.chains)
    assert info["with_tools_only"]["request"] == ["declarer"] and info["idle"]["response"] == ["declarer"]
    assert "declarer" in info["chains"]["request"] and "declarer" not in info["chains"]["response"]


async def test_a_reload_rebuilds_the_chains_from_what_configure_says_now(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    plugin = Declarer()
    running = await proxy({**OFFLINE, "plugins": {"declarer": {"when": {"request": "never"}}}}, ("declarer", plugin))
    await _ask(session, running, tools=True, stream=False)
    assert "request" not in plugin.calls
    report = await running.context.reload(parse_config({**OFFLINE, "proxy": {"drain_timeout": 0}, "plugins": {"declarer": {"when": {}}}}, "<test>"))
    assert report["status"] == "applied", report
    await _ask(session, running, tools=False, stream=False)
    assert plugin.calls["request"] == 1 and plugin.calls["response"] == 2  # always, the default


@pytest.mark.parametrize(
    "when, problem",
    [
        ({"requests": "never"}, "configure says when 'requests' has work, but the plugin implements no flow hook of that name"),
        ({"upstream_request": "never"}, "no flow hook of that name (it implements: request, response, stream_start, flow_done;"),
        ({"configure": "never"}, "the flow hooks are request, upstream_request, response, stream_start, error, flow_done)"),
        ({"request": "sometimes"}, "configure says 'request' has work 'sometimes'; the choices are 'always', 'tools', 'never'"),
    ],
)
async def test_a_wrong_declaration_stops_start_up_naming_the_plugin(when: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await start_proxy({**OFFLINE, "plugins": {"declarer": {"when": when}}}, plugins=[("offline", llmproxy_offline), ("declarer", Declarer())], entry_points=False)
    assert caught.value.problems[0].startswith("plugins.declarer: ") and problem in caught.value.problems[0]
    # the plugin's mistake, not the user's: the message says whose it is and what to do meanwhile
    assert "a bug in the plugin" in caught.value.problems[0] and "plugins.declarer.enabled: false" in caught.value.problems[0]


async def test_any_mapping_is_a_declaration(proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    class Frozen(Declarer):
        @hookimpl
        def configure(self, settings: WorkSettings) -> Any:
            return MappingProxyType({"request": "never"})

    plugin = Frozen()
    running = await proxy(OFFLINE, ("declarer", plugin))
    await _ask(session, running, tools=True, stream=False)
    assert "request" not in plugin.calls and plugin.calls["response"] == 1


async def test_a_configure_returning_something_else_is_ignored_with_a_warning(proxy: StartProxy, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    # A plugin written before configure could declare anything (``return self.settings``)
    # still loads, and every hook of it runs.
    class Returning(Declarer):
        @hookimpl
        def configure(self, settings: WorkSettings) -> Any:
            return settings

    plugin = Returning()
    running = await proxy(OFFLINE, ("declarer", plugin))
    await _ask(session, running, tools=False, stream=False)
    assert plugin.calls["request"] == 1 and plugin.calls["response"] == 1
    assert "plugins.declarer: configure returned a WorkSettings, not a mapping of when its hooks have work; ignored" in caplog.text
