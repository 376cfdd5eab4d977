"""The translation matrix: every front-end protocol × every backend protocol, stream and
non-stream, driven by the OFFICIAL SDKs (see tests/clients.py) through a real llmproxy to the
fake upstreams (tests/fakes/), all on real sockets.

A cell's id reads ``<client>-><backend>-<stream|nonstream>-<scenario>``, for example
``anthropic->gemini-stream-tool``. Protocols are named ``chat`` (OpenAI Chat Completions), ``responses`` (OpenAI Responses), ``anthropic``
and ``gemini`` on both sides. Scenarios:

- ``text``: system prompt and text; the answer, ``end_turn``, and the usage the backend
  reported (cached tokens included) in the client's own terms;
- ``tool``: the shell-tool round trip — one call (begun once on the wire), the result sent
  back under the call's id, the final text quoting it;
- ``image``: a base64 PNG reaches the backend in its own shape with the same bytes;
- ``reasoning``: reasoning asked in the client's terms reaches the backend in its own, the
  backend's thinking comes back as the client's (its signatures only to a client of the same
  protocol), and on the next turn (a tool round trip, as agents do) thinking and signatures
  are replayed exactly to a backend of the same protocol and not at all to another;
- ``json``: a JSON schema in the client's terms reaches the backend in its own; the SDK
  parses the schema-shaped answer;
- ``truncated``: the backend's max-tokens stop is the client's;
- ``error``: upstream 429 (with Retry-After) and 400 are the client SDK's own error types
  with status and message; ``midstream-error`` (stream only): the backend's in-stream error
  event becomes the client protocol's, which its SDK raises.

When client and backend speak the same protocol and no plugin looks, llmproxy forwards the
bytes as they are; ``test_same_protocol_decoded`` runs the diagonal's scenarios again through
a proxy with a plugin that reads every request and answer, so they are decoded to the
canonical model and encoded back, which must lose nothing either (signatures included).

Plus ``test_count_tokens``: Anthropic's and Gemini's counting endpoints against every
backend (the backend's own count where it has one, a local count otherwise).

Two proxies (plain and decoding), each with four backends (one per fake), serve the whole
module; each test re-scripts the fakes. They are started with the built-in providers only,
not every installed entry point, so that a third-party plugin installed into the test
environment cannot change what these tests see. A cell runs alone by its node id, e.g.
``pytest "tests/integration/test_translation_matrix.py::test_matrix[anthropic->gemini-stream-tool]"``
(``-k`` expressions cannot hold ``>``; ``-k "anthropic and gemini and tool"`` selects both
directions).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_openai
import pytest
import pytest_asyncio

from clients import CLIENTS, Client, Reply, Tokens, Verdict
from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import DEFAULT_TEXT, DEFAULT_THINKING, QUOTE_PREFIX, FakeUpstream, Received
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses
from llmproxy import hookimpl
from llmproxy.testing import start_proxy

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROTOCOLS = ("chat", "responses", "anthropic", "gemini")
BACKEND_TYPES = {"chat": "openai", "responses": "openai-responses", "anthropic": "anthropic", "gemini": "gemini"}
FAKES: dict[str, type[FakeUpstream]] = {"chat": FakeOpenAI, "responses": FakeResponses, "anthropic": FakeAnthropic, "gemini": FakeGemini}
# gemini-3: the fake then insists on thoughtSignatures on replayed function calls, as Gemini 3 does.
UPSTREAM_MODELS = {"chat": "gpt-5", "responses": "gpt-5", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-3-pro-preview"}
UPSTREAM_KEY = "sk-upstream-matrix-5e1d"
SKIP_SIGNATURE = "skip_thought_signature_validator"
ECHO = QUOTE_PREFIX + "hi"
# A 1×1 PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


# -- set-up -------------------------------------------------------------------------------------


class Decoding:
    """A plugin that reads every request and answer (and watches every stream), so the
    pipeline decodes them to the canonical model and encodes them again."""

    @hookimpl
    def request(self, flow: Any) -> None:
        assert flow.request.messages

    @hookimpl
    def stream_start(self, flow: Any) -> Any:
        return lambda event: event

    @hookimpl
    def response(self, flow: Any) -> None:
        assert flow.response is not None


@dataclass
class Rig:
    fakes: dict[str, FakeUpstream]
    clients: dict[str, Client]
    """SDK clients of a proxy with no plugin: same-protocol traffic passes through as bytes."""
    decoding: dict[str, Client]
    """SDK clients of a proxy whose plugin makes it decode everything."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig() -> AsyncIterator[Rig]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MATRIX_UPSTREAM_KEY", UPSTREAM_KEY)
        fakes = {name: await cls().start() for name, cls in FAKES.items()}
        config = {
            "proxy": {"drain_timeout": 0},
            # every upstream error cell reuses one proxy: no breaker, so each error is the backend's own
            "backends": {
                name: {"type": BACKEND_TYPES[name], "base_url": fake.base_url, "api_keys": ["${MATRIX_UPSTREAM_KEY}"],
                       "breaker": {"enabled": False}} for name, fake in fakes.items()
            },
            "models": {f"via-{name}": {"targets": [f"{name}:{UPSTREAM_MODELS[name]}"]} for name in PROTOCOLS},
        }
        providers = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]
        proxies = [await start_proxy(config, plugins=providers, entry_points=False),
                   await start_proxy(config, plugins=[*providers, ("decoding", Decoding())], entry_points=False)]
        plain, decoding = ({name: cls(proxy.url) for name, cls in CLIENTS.items()} for proxy in proxies)
        try:
            yield Rig(fakes, plain, decoding)
        finally:
            for client in [*plain.values(), *decoding.values()]:
                await client.close()
            for proxy in proxies:
                await proxy.stop()
            for fake in fakes.values():
                await fake.close()


@pytest.fixture(autouse=True)
def fresh(rig: Rig) -> None:
    """Every fake answers normally and has seen nothing, whatever the test before did."""
    for fake in rig.fakes.values():
        fake.script()
        fake.by_model.clear()
        fake.requests.clear()


@dataclass
class Cell:
    front: str
    back: str
    stream: bool
    rig: Rig
    decoding: bool = False

    @property
    def client(self) -> Client:
        return (self.rig.decoding if self.decoding else self.rig.clients)[self.front]

    @property
    def fake(self) -> FakeUpstream:
        return self.rig.fakes[self.back]

    @property
    def same(self) -> bool:
        return self.front == self.back

    async def ask(self, history: list[Any], **options: Any) -> Reply:
        return await self.client.ask(f"via-{self.back}", self.stream, history, **options)

    def only_request(self) -> Received:
        assert len(self.fake.requests) == 1, [r.path for r in self.fake.requests]
        return self.fake.requests[0]


# -- what the fake received and sent, in its own protocol ---------------------------------------


def answer(back: str, received: Received) -> dict[str, Any]:
    """What the fake answered, folded into its protocol's non-streamed shape."""
    streamed = received.path.endswith(":streamGenerateContent") if back == "gemini" else received.json.get("stream") is True
    if not streamed:
        return json.loads(received.sent)
    events = received.events
    if back == "chat":
        content, calls, usage, finish = "", {}, None, None
        for event in events:
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                content += delta.get("content") or ""
                for call in delta.get("tool_calls") or ():
                    slot = calls.setdefault(call["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                    slot["id"] = call.get("id") or slot["id"]
                    slot["function"]["name"] += (call.get("function") or {}).get("name") or ""
                    slot["function"]["arguments"] += (call.get("function") or {}).get("arguments") or ""
                finish = choice.get("finish_reason") or finish
        message = {"role": "assistant", "content": content, "tool_calls": list(calls.values())}
        return {"choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}
    if back == "responses":
        return events[-1]["response"]  # response.completed carries the whole response
    if back == "anthropic":
        blocks: dict[int, dict[str, Any]] = {}
        message: dict[str, Any] = {}
        for event in events:
            kind = event["type"]
            if kind == "message_start":
                message = dict(event["message"])
            elif kind == "content_block_start":
                blocks[event["index"]] = dict(event["content_block"])
            elif kind == "content_block_delta":
                block, delta = blocks[event["index"]], event["delta"]
                field = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature", "input_json_delta": "partial"}[delta["type"]]
                block[field] = block.get(field, "") + delta[{"partial": "partial_json"}.get(field, field)]
            elif kind == "message_delta":
                message["stop_reason"] = event["delta"]["stop_reason"]
                message["usage"] = {**message["usage"], **event["usage"]}
        for block in blocks.values():
            if block["type"] == "tool_use":
                block["input"] = json.loads(block.pop("partial", "") or "{}")
        message["content"] = [blocks[i] for i in sorted(blocks)]
        return message
    parts = [p for chunk in events for p in chunk["candidates"][0]["content"]["parts"]]
    candidate = {**events[-1]["candidates"][0], "content": {"role": "model", "parts": parts}}
    return {**events[-1], "candidates": [candidate]}


def wire_usage(back: str, body: dict[str, Any]) -> Tokens:
    """The usage in an answer, in :class:`Tokens` terms."""
    if back == "chat":
        usage = body["usage"]
        return Tokens(usage["prompt_tokens"], usage["completion_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    if back == "responses":
        usage = body["usage"]
        return Tokens(usage["input_tokens"], usage["output_tokens"], usage["input_tokens_details"]["cached_tokens"])
    if back == "anthropic":
        usage = body["usage"]
        cached = usage.get("cache_read_input_tokens") or 0
        return Tokens(usage["input_tokens"] + cached + (usage.get("cache_creation_input_tokens") or 0), usage["output_tokens"], cached)
    usage = body["usageMetadata"]
    return Tokens(usage["promptTokenCount"], usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0), usage.get("cachedContentTokenCount", 0))


def history(back: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's turns: chat and Anthropic messages, Responses input items, Gemini contents."""
    return {"chat": body.get("messages"), "responses": body.get("input"), "anthropic": body.get("messages"), "gemini": body.get("contents")}[back] or []


def blocks_of(back: str, turn: dict[str, Any]) -> list[dict[str, Any]]:
    """A turn's content blocks / parts (a string content is one text block)."""
    content = turn.get("parts") if back == "gemini" else turn.get("content")
    if isinstance(content, str):
        return [{"type": "text" if back != "responses" else "input_text", "text": content}]
    return list(content or ())


def system_of(back: str, body: dict[str, Any]) -> str:
    if back == "chat":
        return "".join(m["content"] for m in body["messages"] if m["role"] in ("system", "developer"))
    if back == "responses":
        items = [i for i in history(back, body) if i.get("role") in ("system", "developer")]
        return (body.get("instructions") or "") + "".join(b["text"] for i in items for b in blocks_of(back, i))
    if back == "anthropic":
        system = body.get("system") or ""
        return system if isinstance(system, str) else "".join(b["text"] for b in system)
    return "".join(p["text"] for p in (body.get("systemInstruction") or {}).get("parts", ()))


def images_of(back: str, body: dict[str, Any]) -> list[tuple[str, bytes]]:
    found = []
    for turn in history(back, body):
        for block in blocks_of(back, turn):
            if back in ("chat", "responses"):
                url = (block.get("image_url") or {}).get("url") if back == "chat" else block.get("image_url")
                if block.get("type") in ("image_url", "input_image") and isinstance(url, str):
                    head, data = url.removeprefix("data:").split(";base64,", 1)
                    found.append((head, base64.b64decode(data)))
            elif back == "anthropic" and block.get("type") == "image":
                found.append((block["source"]["media_type"], base64.b64decode(block["source"]["data"])))
            elif back == "gemini" and ("inlineData" in block or "inline_data" in block):
                data = block.get("inlineData") or block["inline_data"]  # the API takes either spelling, nested too
                found.append((data.get("mimeType") or data["mime_type"], base64.b64decode(data["data"])))
    return found


def call_ids(back: str, body: dict[str, Any]) -> list[str]:
    """The ids of the tool calls in an answer."""
    if back == "chat":
        return [c["id"] for c in body["choices"][0]["message"].get("tool_calls") or ()]
    if back == "responses":
        return [i["call_id"] for i in body["output"] if i["type"] == "function_call"]
    if back == "anthropic":
        return [b["id"] for b in body["content"] if b["type"] == "tool_use"]
    return [p["functionCall"]["id"] for p in body["candidates"][0]["content"]["parts"] if "functionCall" in p]


def result_ids(back: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(call id, output) of every tool result in a request."""
    found = []
    for turn in history(back, body):
        if back == "chat" and turn["role"] == "tool":
            found.append((turn["tool_call_id"], turn["content"]))
        elif back == "responses" and turn.get("type") == "function_call_output":
            found.append((turn["call_id"], turn["output"]))
        elif back == "anthropic":
            found += [(b["tool_use_id"], b["content"]) for b in blocks_of(back, turn) if b.get("type") == "tool_result"]
        elif back == "gemini":
            found += [(p["functionResponse"]["id"], p["functionResponse"]["response"]["output"]) for p in blocks_of(back, turn) if "functionResponse" in p]
    return found


def asks_reasoning(back: str, body: dict[str, Any]) -> bool:
    if back == "chat":
        return bool(body.get("reasoning_effort"))
    if back == "responses":
        return bool((body.get("reasoning") or {}).get("effort"))
    if back == "anthropic":
        return (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    return bool(thinking.get("includeThoughts") or thinking.get("include_thoughts"))


def reasoning_in(back: str, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reasoning among blocks / parts / items: Anthropic thinking blocks, Responses
    reasoning items, Gemini thought parts and signed parts (other than the documented
    placeholder), chat ``reasoning_content``."""
    if back == "chat":
        return [{"reasoning_content": b.get("reasoning_content") or b["reasoning"]} for b in blocks if b.get("reasoning_content") or b.get("reasoning")]
    if back == "responses":
        return [b for b in blocks if b.get("type") == "reasoning"]
    if back == "anthropic":
        return [b for b in blocks if b.get("type") in ("thinking", "redacted_thinking")]
    return [b for b in blocks if b.get("thought") or b.get("thoughtSignature", b.get("thought_signature")) not in (None, SKIP_SIGNATURE)]


def reasoning_sent(back: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    if back == "chat":
        return reasoning_in(back, [body["choices"][0]["message"]])
    if back == "responses":
        return reasoning_in(back, body["output"])
    if back == "anthropic":
        return reasoning_in(back, body["content"])
    return reasoning_in(back, body["candidates"][0]["content"]["parts"])


def reasoning_replayed(back: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    turns = history(back, body)
    if back in ("chat", "responses"):
        return reasoning_in(back, turns)
    return reasoning_in(back, [b for turn in turns for b in blocks_of(back, turn)])


def schema_of(back: str, body: dict[str, Any]) -> Any:
    """The JSON schema the request asks the answer to follow, where its protocol puts it."""
    if back == "chat":
        fmt = body["response_format"]
        return fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else None
    if back == "responses":
        fmt = body["text"]["format"]
        return fmt["schema"] if fmt["type"] == "json_schema" else None
    if back == "anthropic":
        fmt = body["output_config"]["format"]
        return fmt["schema"] if fmt["type"] == "json_schema" else None
    config = body["generationConfig"]
    assert (config.get("responseMimeType") or config.get("response_mime_type")) == "application/json"
    return next(config[k] for k in ("responseJsonSchema", "response_json_schema", "responseSchema", "response_schema") if k in config)


# -- the scenarios ------------------------------------------------------------------------------


async def text(cell: Cell) -> None:
    cell.fake.script(cached_tokens=3, cache_write_tokens=2)
    reply = await cell.ask(cell.client.user("say hi"), system="be brief")
    assert (reply.text, reply.stop, reply.calls) == (DEFAULT_TEXT, "end_turn", [])
    received = cell.only_request()
    assert system_of(cell.back, received.json) == "be brief"
    sent = wire_usage(cell.back, answer(cell.back, received))
    assert sent.cached == 3 and sent.input > 3 and sent.output > 0
    assert reply.usage == sent


async def tool(cell: Cell) -> None:
    cell.fake.script(tool_scenario=True)
    turns = cell.client.user("run echo hi")
    first = await cell.ask(turns, tools=True)
    assert [(c.name, c.arguments) for c in first.calls] == [("shell", {"command": "echo hi"})]
    assert first.stop == "tool_use" and first.calls[0].id
    if cell.stream:
        assert first.call_starts == 1, "the tool call was begun more than once"
    turns += first.turn + cell.client.tool_result(first.calls[0], "hi")
    final = await cell.ask(turns, tools=True)
    assert (final.text, final.stop, final.calls) == (ECHO, "end_turn", [])
    asked, answered = cell.fake.requests
    # The result reached the backend under the id the backend gave the call.
    assert result_ids(cell.back, answered.json) == [(call_ids(cell.back, answer(cell.back, asked))[0], "hi")]


async def image(cell: Cell) -> None:
    reply = await cell.ask(cell.client.user("what is in this picture?", image=PNG))
    assert (reply.text, reply.stop) == (DEFAULT_TEXT, "end_turn")
    assert images_of(cell.back, cell.only_request().json) == [("image/png", PNG)]


async def reasoning(cell: Cell) -> None:
    cell.fake.script(tool_scenario=True)
    turns = cell.client.user("run echo hi")
    first = await cell.ask(turns, tools=True, reasoning=True)
    assert asks_reasoning(cell.back, cell.fake.requests[0].json)
    # Chat Completions returns no reasoning (the OpenAI API keeps it), so nothing comes back.
    assert first.thinking == ("" if cell.back == "chat" else DEFAULT_THINKING)
    # A signature is only good for its own family: another's never reaches the client, which
    # would hand it back as its own.
    assert bool(first.signatures) == (cell.same and cell.back != "chat")
    assert [c.name for c in first.calls] == ["shell"]
    if cell.stream:
        assert first.call_starts == 1
    turns += first.turn + cell.client.tool_result(first.calls[0], "hi")
    final = await cell.ask(turns, tools=True, reasoning=True)
    assert final.text == ECHO
    asked, answered = cell.fake.requests
    sent = reasoning_sent(cell.back, answer(cell.back, asked))
    assert bool(sent) == (cell.back != "chat")
    replayed = reasoning_replayed(cell.back, answered.json)
    if cell.same:
        assert replayed == sent  # thinking and signatures exactly as the backend made them
    else:
        assert replayed == []  # another family's reasoning, signed or not, is never forwarded
    if cell.back == "anthropic" and not cell.same:
        # Anthropic refuses thinking when the turn before a tool result has no thinking block.
        assert not asks_reasoning(cell.back, answered.json)


async def json_schema(cell: Cell) -> None:
    reply = await cell.ask(cell.client.user("rate this"), schema=True)
    assert reply.parsed == Verdict(answer=DEFAULT_TEXT, confidence=1)
    schema = schema_of(cell.back, cell.only_request().json)
    assert str(schema["type"]).lower() == "object" and set(schema["properties"]) == {"answer", "confidence"}


async def truncated(cell: Cell) -> None:
    cell.fake.script(truncated=True)
    reply = await cell.ask(cell.client.user("say hi"))
    assert (reply.text, reply.stop) == (DEFAULT_TEXT, "max_tokens")


KINDS = {"chat": {400: "invalid_request_error"}, "responses": {400: "invalid_request_error"},
         "anthropic": {400: "invalid_request_error", 429: "rate_limit_error"}, "gemini": {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED"}}


async def error(cell: Cell) -> None:
    for status, message, retry_after in ((429, "slow down, please", "7"), (400, "that request was malformed", None)):
        cell.fake.script(status=status, message=message, retry_after=retry_after)
        with pytest.raises(cell.client.status_errors[status]) as caught:
            await cell.ask(cell.client.user("say hi"))
        failure = cell.client.failure(caught.value)
        assert (failure.status, failure.message, failure.retry_after) == (status, message, retry_after)
        if status in KINDS[cell.front]:
            assert failure.kind == KINDS[cell.front][status]


async def midstream_error(cell: Cell) -> None:
    cell.fake.script(error_after=3, message="the upstream fell over", event_delay=0.02)  # one event per read: truly mid-stream
    with pytest.raises(cell.client.stream_error) as caught:
        await cell.ask(cell.client.user("say hi"))
    failure = cell.client.failure(caught.value)
    assert "the upstream fell over" in failure.message


SCENARIOS: dict[str, tuple[Callable[[Cell], Awaitable[None]], tuple[bool, ...]]] = {
    "text": (text, (False, True)),
    "tool": (tool, (False, True)),
    "image": (image, (False, True)),
    "reasoning": (reasoning, (False, True)),
    "json": (json_schema, (False, True)),
    "truncated": (truncated, (False, True)),
    "error": (error, (False, True)),
    "midstream-error": (midstream_error, (True,)),
}

# Cells that cannot work by the nature of the protocols: id → why. Keep this short.
XFAIL: dict[str, str] = {}


def cell_id(front: str, back: str, stream: bool, scenario: str) -> str:
    return f"{front}->{back}-{'stream' if stream else 'nonstream'}-{scenario}"


def cells() -> list[Any]:
    params = []
    for front in PROTOCOLS:
        for back in PROTOCOLS:
            for scenario, (_, modes) in SCENARIOS.items():
                for stream in modes:
                    name = cell_id(front, back, stream, scenario)
                    marks = [pytest.mark.xfail(reason=XFAIL[name], strict=True)] if name in XFAIL else []
                    params.append(pytest.param(front, back, stream, scenario, id=name, marks=marks))
    return params


@pytest.mark.parametrize(("front", "back", "stream", "scenario"), cells())
async def test_matrix(rig: Rig, front: str, back: str, stream: bool, scenario: str) -> None:
    await SCENARIOS[scenario][0](Cell(front, back, stream, rig))


def diagonal() -> list[Any]:
    return [
        pytest.param(name, stream, scenario, id=cell_id(name, name, stream, scenario))
        for name in PROTOCOLS
        for scenario, (_, modes) in SCENARIOS.items()
        for stream in modes
    ]


@pytest.mark.parametrize(("name", "stream", "scenario"), diagonal())
async def test_same_protocol_decoded(rig: Rig, name: str, stream: bool, scenario: str) -> None:
    await SCENARIOS[scenario][0](Cell(name, name, stream, rig, decoding=True))


@pytest.mark.parametrize(("front", "back"), [pytest.param(f, b, id=f"{f}->{b}") for f in ("anthropic", "gemini") for b in PROTOCOLS])
async def test_count_tokens(rig: Rig, front: str, back: str) -> None:
    client: Any = rig.clients[front]
    fake = rig.fakes[back]
    counted = await client.count(f"via-{back}", client.user("how many tokens is this?"))
    if back == "anthropic":
        assert [r.path for r in fake.requests] == ["/v1/messages/count_tokens"]
        assert counted == fake.last.events[0]["input_tokens"]  # the backend's own count
    elif back == "gemini":
        assert [r.path for r in fake.requests] == [f"/v1beta/models/{UPSTREAM_MODELS['gemini']}:countTokens"]
        assert counted == fake.last.events[0]["totalTokens"]
    else:
        assert fake.requests == [] and counted > 0  # no counting endpoint: counted locally
