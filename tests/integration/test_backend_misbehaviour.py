"""Backends that answer what their API never would — a redirect, a page of HTML, a stream cut
inside its first frame, an error sent with 200 — or as few servers do (parallel tool calls
with their argument pieces interleaved, the key they were sent quoted in an error event), and
what each client sees, over real sockets.

The backends here are small aiohttp servers written for each case (``serve``, tests/conftest.py;
the protocol fakes in tests/fakes answer like the real APIs, which is not the point here).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_openai
import pytest
from aiohttp import web

from llmproxy.errors import ProxyError
from llmproxy.testing import RunningProxy

PLUGINS = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]

KEYS = {"OA_KEY": "sk-oa-redirect-1111", "AN_KEY": "sk-ant-redirect-2222", "GM_KEY": "AIza-redirect-3333"}


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


def backends(url: str) -> dict[str, Any]:
    return {
        "oa": {"type": "openai", "base_url": url + "/v1", "api_keys": ["${OA_KEY}"]},
        "an": {"type": "anthropic", "base_url": url, "api_keys": ["${AN_KEY}"]},
        "gm": {"type": "gemini", "base_url": url + "/v1beta", "api_keys": ["${GM_KEY}"]},
    }


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def post(proxy: RunningProxy, path: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    """Status, JSON body (or None) and raw body; a stream cut after its error event (as
    Gemini's is) gives what came before the cut."""
    async with aiohttp.ClientSession() as http, http.post(proxy.url + path, json=body) as response:
        raw = b""
        try:
            async for piece in response.content.iter_any():
                raw += piece
        except aiohttp.ClientPayloadError:
            pass
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        return response.status, data, raw


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("backend", ["oa", "an", "gm"])
async def test_a_redirect_is_not_followed_and_no_key_leaves(backend: str, status: int, serve: Any, proxies: Any) -> None:
    """aiohttp drops only Authorization on a redirect to another host: followed, the
    Anthropic and Gemini keys would go wherever Location points."""
    elsewhere: list[dict[str, str]] = []

    async def sink(request: web.Request) -> web.Response:
        elsewhere.append(dict(request.headers))
        return web.json_response({"error": "should never be asked"})

    sink_url = await serve(sink)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": sink_url + request.path + "?token=secret-in-query"})

    proxy = await proxies({"backends": backends(await serve(redirect))}, PLUGINS)
    answer = await post(proxy, "/v1/chat/completions", {"model": f"{backend}:some-model", **CHAT})
    assert answer[0] == 502, answer
    message = answer[1]["error"]["message"]
    assert f"HTTP {status}" in message and "redirect" in message and sink_url in message and "secret-in-query" not in message
    assert elsewhere == []
    streamed = await post(proxy, "/v1/chat/completions", {"model": f"{backend}:other", **CHAT, "stream": True})
    assert streamed[0] == 502 and elsewhere == []
    with pytest.raises(ProxyError, match=f"HTTP {status}, a redirect"):  # what discovery and `llmproxy check` ask
        await proxy.context.providers[backend].list_models()
    assert elsewhere == []


async def misbehave(request: web.Request) -> web.StreamResponse:
    """Answers by the model asked for: ``html``, a sign-in page with 200; ``partial``, a
    stream that ends cleanly 40 bytes into its first frame."""
    body = await request.read()
    model = request.path.split("/models/")[-1].split(":")[0] if "/models/" in request.path else json.loads(body)["model"]
    if model == "html":
        return web.Response(text="<html><body>Please sign in to continue</body></html>", content_type="text/html")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"id": "c1", "object": "chat.compl')
    await response.write_eof()
    return response


STREAMS = {  # client protocol: (path for model m, body)
    "openai": ("/v1/chat/completions", {"model": "{m}", "stream": True, **CHAT}),
    "anthropic": ("/v1/messages", {"model": "{m}", "max_tokens": 64, "stream": True, **CHAT}),
    "gemini": ("/v1beta/models/{m}:streamGenerateContent?alt=sse", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
}


def frames_are_whole(raw: bytes) -> bool:
    """Every data: line of an SSE body is JSON (or [DONE])."""
    lines = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    return bool(lines) and all(line == b"[DONE]" or json.loads(line) is not None for line in lines)


@pytest.mark.parametrize("how", ["partial", "html"])
@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
async def test_a_stream_that_never_made_a_frame_fails_over_whole(
    protocol: str, how: str, serve: Any, proxies: Any, fake_openai: Any, fake_anthropic: Any, fake_gemini: Any
) -> None:
    """The first target's stream ends inside its first frame (or is a web page): nothing of
    it may reach the client, and the next target's answer arrives alone, as if the first had
    refused; with no next target, a clean 502 in the client's protocol."""
    bad = backends(await serve(misbehave))
    good = {"openai": ("oa", fake_openai.base_url, "gpt-4o-mini"), "anthropic": ("an", fake_anthropic.base_url, "claude-sonnet-4-5"),
            "gemini": ("gm", fake_gemini.base_url, "gemini-2.5-flash")}[protocol]
    kind = bad[good[0]]["type"]
    config = {"backends": {"bad": bad[good[0]], "good": {"type": kind, "base_url": good[1], "api_keys": [bad[good[0]]["api_keys"][0]]}},
              "models": {"fo": {"targets": [f"bad:{how}", f"good:{good[2]}"]}, "alone": {"targets": [f"bad:{how}"]}}}
    if protocol == "openai":
        config["backends"]["good"]["api_keys"] = []
    proxy = await proxies(config, PLUGINS)
    path, body = STREAMS[protocol]
    status, _, raw = await post(proxy, path.replace("{m}", "fo"), json.loads(json.dumps(body).replace("{m}", "fo")))
    assert status == 200 and frames_are_whole(raw), raw[:300]
    assert b"chat.compl" not in raw.replace(b"chat.completion.chunk", b"") and b"sign in" not in raw
    status, data, raw = await post(proxy, path.replace("{m}", "alone"), json.loads(json.dumps(body).replace("{m}", "alone")))
    assert status == 502 and data is not None and "error" in data, raw[:300]
    if how == "html":  # the page is named, so a wrong base_url is found at once
        assert "web page" in raw.decode() and "Please sign in" in raw.decode()


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


CALLS = [("call_A", "Bash", '{"command":"mkdir x"}'), ("call_B", "Write", '{"path":"x/y","content":"hi"}')]


async def interleaving(request: web.Request) -> web.StreamResponse:
    """Two parallel calls announced in order, then their arguments one character at a time,
    the second call's first."""
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    frames = [chat_chunk({"role": "assistant", "content": None})]
    frames += [chat_chunk({"tool_calls": [{"index": i, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]})
               for i, (call_id, name, _) in enumerate(CALLS)]
    first, second = CALLS[0][2], CALLS[1][2]
    for n in range(max(len(first), len(second))):
        for i, arguments in ((1, second), (0, first)):
            if n < len(arguments):
                frames.append(chat_chunk({"tool_calls": [{"index": i, "function": {"arguments": arguments[n]}}]}))
    frames += [chat_chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    for frame in frames:
        await response.write(frame)
    await response.write_eof()
    return response


async def test_interleaved_parallel_calls_reach_an_anthropic_client_whole_and_in_order(serve: Any, proxies: Any) -> None:
    import anthropic

    proxy = await proxies({"backends": {"oa": {"type": "openai", "base_url": await serve(interleaving) + "/v1"}}, "default_backend": "oa"}, PLUGINS)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="k", max_retries=0)
    tools = [{"name": name, "input_schema": {"type": "object"}} for _, name, _ in CALLS]
    async with client.messages.stream(model="m", max_tokens=100, tools=tools, messages=[{"role": "user", "content": "go"}]) as stream:
        message = await stream.get_final_message()
    assert [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"] == [(i, n, json.loads(a)) for i, n, a in CALLS]
    assert message.stop_reason == "tool_use"


async def error_with_200(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"error": {"message": "upstream says overloaded", "type": "server_error"}})


@pytest.mark.parametrize("client", ["openai", "anthropic"], ids=["same-protocol", "translated"])
async def test_an_error_sent_with_200_is_a_failed_attempt(client: str, serve: Any, proxies: Any, fake_openai: Any) -> None:
    config = {"backends": {"bad": {"type": "openai", "base_url": await serve(error_with_200) + "/v1"},
                           "good": {"type": "openai", "base_url": fake_openai.base_url}},
              "models": {"fo": {"targets": ["bad:m", "good:gpt-4o-mini"]}, "alone": {"targets": ["bad:m"]}}}
    proxy = await proxies(config, PLUGINS)
    path, extra = ("/v1/chat/completions", {}) if client == "openai" else ("/v1/messages", {"max_tokens": 50})
    status, data, raw = await post(proxy, path, {"model": "fo", **CHAT, **extra})
    assert status == 200 and ("choices" in data if client == "openai" else "content" in data), raw[:300]
    status, data, raw = await post(proxy, path, {"model": "alone", **CHAT, **extra})
    assert status == 502 and "upstream says overloaded" in data["error"]["message"], raw[:300]


FORWARDED = {  # client protocol: (backend type, model, path, body) — the same protocol on both sides, forwarded unparsed
    "chat": ("openai", "gpt-4o-mini", "/v1/chat/completions", {"stream": True, **CHAT}),
    "responses": ("openai-responses", "gpt-5", "/v1/responses", {"stream": True, "input": "hi"}),
    "anthropic": ("anthropic", "claude-sonnet-4-5", "/v1/messages", {"stream": True, "max_tokens": 64, **CHAT}),
    "gemini": ("gemini", "gemini-2.5-flash", "/v1beta/models/{m}:streamGenerateContent?alt=sse", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
}


@pytest.mark.parametrize("protocol", list(FORWARDED))
async def test_a_key_the_backend_quotes_mid_stream_never_reaches_the_client(
    protocol: str, proxies: Any, fake_openai: Any, fake_responses: Any, fake_anthropic: Any, fake_gemini: Any
) -> None:
    """Some servers quote the credential they were sent in an error (OpenAI does in a 401).
    Forwarded streams are not parsed, so their frames are searched for the key instead."""
    kind, model, path, body = FORWARDED[protocol]
    fake = {"chat": fake_openai, "responses": fake_responses, "anthropic": fake_anthropic, "gemini": fake_gemini}[protocol]
    fake.script(error_after=2, message="stream broke for key {key}")
    proxy = await proxies({"backends": {"up": {"type": kind, "base_url": fake.base_url, "api_keys": ["${AN_KEY}"]}}}, PLUGINS)
    path = path.replace("{m}", f"up:{model}")
    status, _, raw = await post(proxy, path, body if protocol == "gemini" else {**body, "model": f"up:{model}"})
    assert status == 200 and fake.last.key == KEYS["AN_KEY"]  # the backend had it, and quoted it
    assert KEYS["AN_KEY"].encode() not in raw and b"stream broke for key [backend key]" in raw, raw[-400:]


async def legacy_stream_quoting_the_key(request: web.Request) -> web.StreamResponse:
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    frame = b'data: {"error": {"message": "key ' + key.encode() + b' is out of credit"}}\n\n'
    for piece in (frame[:20], frame[20:31], frame[31:]):  # the key split between reads
        await response.write(piece)
        await asyncio.sleep(0.02)
    await response.write_eof()
    return response


async def test_a_key_quoted_in_a_forwarded_legacy_stream_is_blanked_too(serve: Any, proxies: Any) -> None:
    proxy = await proxies({"backends": {"oa": {"type": "openai", "base_url": await serve(legacy_stream_quoting_the_key) + "/v1", "api_keys": ["${OA_KEY}"]}},
                           "default_backend": "oa"}, PLUGINS)
    status, _, raw = await post(proxy, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True})
    assert status == 200 and KEYS["OA_KEY"].encode() not in raw and b"key [backend key] is out of credit" in raw, raw


async def calls_with_stop(request: web.Request) -> web.StreamResponse:
    """Ollama's way (and some vLLM tool parsers'): the calls are made, the finish reason says "stop"."""
    body = await request.json()
    call = {"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}
    if not body.get("stream"):
        message = {"role": "assistant", "content": "", "tool_calls": [call]}
        return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(chat_chunk({"role": "assistant", "tool_calls": [{"index": 0, **call}]}))
    await response.write(chat_chunk({}, "stop") + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_calls_made_under_a_stop_finish_reason_still_ask_the_client_to_run_them(stream: bool, serve: Any, proxies: Any) -> None:
    import anthropic

    proxy = await proxies({"backends": {"ol": {"type": "ollama", "base_url": await serve(calls_with_stop) + "/v1"}}, "default_backend": "ol"}, PLUGINS)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="k", max_retries=0)
    ask = {"model": "qwen3", "max_tokens": 100, "tools": [{"name": "Bash", "input_schema": {"type": "object"}}], "messages": [{"role": "user", "content": "ls"}]}
    if stream:
        async with client.messages.stream(**ask) as streamed:
            message = await streamed.get_final_message()
    else:
        message = await client.messages.create(**ask)
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == [("Bash", {"command": "ls"})]
    assert message.stop_reason == "tool_use"  # Claude Code runs the calls of a tool_use turn only
