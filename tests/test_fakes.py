"""The fake upstreams, checked with the OFFICIAL SDKs talking to them directly (no llmproxy).

If an SDK cannot parse what a fake sends, the fake is wrong — and every test that uses it to
judge llmproxy would judge against a wrong wire format. Raw aiohttp requests cover what the
SDKs cannot send or hide (missing fields, a JSON-array stream, ``?key=``, dropped streams).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel

from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import DEFAULT_TEXT, DEFAULT_THINKING, split_text
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses

KEY = "sk-fake-key-123"
ECHO = "the command printed: hi"


class Answer(BaseModel):
    answer: str
    confidence: int


# -- clients (each closed after its test) --------------------------------------------------------

_open: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _open:
        await _open.pop().close()


def claude(fake: FakeAnthropic) -> anthropic.AsyncAnthropic:
    _open.append(client := anthropic.AsyncAnthropic(base_url=fake.base_url, api_key=KEY, max_retries=0, timeout=5))
    return client


def oai(fake: FakeOpenAI | FakeResponses) -> openai.AsyncOpenAI:
    _open.append(client := openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0, timeout=5))
    return client


class _Gemini:
    def __init__(self, client: Any) -> None:
        self.client = client

    async def close(self) -> None:
        await self.client.aio.aclose()
        self.client.close()


def gem(fake: FakeGemini) -> Any:
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=fake.url, api_version="v1beta", timeout=5000))
    _open.append(_Gemini(client))
    return client.aio


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.post(url, json=body, headers=headers or {}) as response:
            return response.status, await response.read()


BASH = {
    "name": "Bash",
    "description": "Run a shell command",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "command": {"type": "string"},
            "description": {"type": "string"},
            "timeout": {"type": "number"},
            "run_in_background": {"type": "boolean"},
        },
        "required": ["command"],
    },
}
READ = {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}


# == Anthropic ====================================================================================


async def test_anthropic_create(fake_anthropic: FakeAnthropic) -> None:
    client = claude(fake_anthropic)
    message = await client.messages.create(model="claude-opus-4-8", max_tokens=64, messages=[{"role": "user", "content": "say hi"}])
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == DEFAULT_TEXT
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == len(split_text(DEFAULT_TEXT))
    count = await client.messages.count_tokens(model="claude-opus-4-8", messages=[{"role": "user", "content": "say hi"}])
    assert count.input_tokens == message.usage.input_tokens
    first, second = fake_anthropic.requests
    assert first.key == KEY and first.headers["anthropic-version"] and first.path == "/v1/messages"
    assert second.path == "/v1/messages/count_tokens" and json.loads(second.sent) == {"input_tokens": count.input_tokens}


async def test_anthropic_stream_wire_format(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(cached_tokens=7, cache_write_tokens=3)
    client = claude(fake_anthropic)
    stream = await client.messages.create(
        model="claude-opus-4-8",
        max_tokens=64,
        stream=True,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "say hi"}],
    )
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    n = len(split_text(DEFAULT_TEXT))
    assert kinds == ["message_start", "content_block_start"] + ["content_block_delta"] * n + ["content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.usage.cache_read_input_tokens == 7 and events[0].message.usage.cache_creation_input_tokens == 3
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == DEFAULT_TEXT
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == n
    assert events[-2].usage.cache_read_input_tokens == 7
    raw = fake_anthropic.last
    # Every frame has its event: line, and the ping the SDK hides was sent.
    assert raw.event_names == [e["type"] for e in raw.events] and raw.event_names[2] == "ping"


async def test_anthropic_tool_scenario_with_thinking(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(tool_scenario=True)
    client = claude(fake_anthropic)
    messages: list[Any] = [{"role": "user", "content": "run echo hi"}]
    async with client.messages.stream(
        model="claude-opus-4-8", max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048}, tools=[READ, BASH], messages=messages
    ) as stream:
        message = await stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "tool_use"] and message.stop_reason == "tool_use"
    thinking, call = message.content
    assert thinking.thinking == DEFAULT_THINKING and thinking.signature
    assert call.name == "Bash" and call.input == {"command": "echo hi"}
    assert "input_json_delta" in fake_anthropic.last.sent.decode() and "signature_delta" in fake_anthropic.last.sent.decode()

    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "hi", "is_error": False}]},
    ]
    final = await client.messages.create(model="claude-opus-4-8", max_tokens=4096, thinking={"type": "adaptive"}, tools=[READ, BASH], messages=messages)
    assert final.content[-1].text == ECHO and final.stop_reason == "end_turn"


async def test_anthropic_generic_tools_and_json(fake_anthropic: FakeAnthropic) -> None:
    client = claude(fake_anthropic)
    ask = [{"role": "user", "content": "do things"}]
    both = await client.messages.create(model="m", max_tokens=64, tools=[READ, BASH], messages=ask)
    assert [b.name for b in both.content] == ["Read", "Bash"]
    one = await client.messages.create(
        model="m", max_tokens=64, tools=[READ, BASH], messages=ask, tool_choice={"type": "any", "disable_parallel_tool_use": True}
    )
    assert [b.name for b in one.content] == ["Read"]
    named = await client.messages.create(model="m", max_tokens=64, tools=[READ, BASH], messages=ask, tool_choice={"type": "tool", "name": "Bash"})
    assert [(b.name, b.input["command"]) for b in named.content] == [("Bash", "echo hi")]
    none = await client.messages.create(model="m", max_tokens=64, tools=[READ, BASH], messages=ask, tool_choice={"type": "none"})
    assert none.content[0].text == DEFAULT_TEXT
    parsed = await client.messages.parse(model="m", max_tokens=64, messages=ask, output_format=Answer)
    assert parsed.parsed_output == Answer(answer=DEFAULT_TEXT, confidence=1)
    assert fake_anthropic.last.json["output_config"]["format"]["type"] == "json_schema"


async def test_anthropic_redacted_thinking_and_truncation(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(redacted_thinking=True, truncated=True)
    client = claude(fake_anthropic)
    async with client.messages.stream(model="m", max_tokens=2000, thinking={"type": "adaptive"}, messages=[{"role": "user", "content": "x"}]) as stream:
        message = await stream.get_final_message()
    assert [b.type for b in message.content] == ["redacted_thinking", "text"] and message.stop_reason == "max_tokens"


async def test_anthropic_errors(fake_anthropic: FakeAnthropic) -> None:
    client = claude(fake_anthropic)
    ask: Any = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "x"}]}
    fake_anthropic.script(status=529, message="Overloaded")
    with pytest.raises(anthropic.APIStatusError) as err:
        await client.messages.create(**ask)
    assert err.value.status_code == 529 and err.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    fake_anthropic.script(status=429, retry_after="7")
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(**ask)
    assert limited.value.response.headers["retry-after"] == "7" and limited.value.body["type"] == "error"
    fake_anthropic.script(error_after=3, message="went away")
    with pytest.raises(anthropic.APIStatusError, match="went away"):
        async for _ in await client.messages.create(**ask, stream=True):
            pass
    assert fake_anthropic.last.event_names[-1] == "error"
    fake_anthropic.script()
    with pytest.raises(anthropic.BadRequestError, match="signature"):
        await client.messages.create(
            model="m",
            max_tokens=64,
            messages=[
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "y"}]},
                {"role": "user", "content": "z"},
            ],
        )
    with pytest.raises(anthropic.BadRequestError, match="tool_use_id"):
        await client.messages.create(
            model="m", max_tokens=64, messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "hi"}]}]
        )
    status, body = await post(fake_anthropic.url + "/v1/messages", {"model": "m", "messages": []}, {"anthropic-version": "2023-06-01"})
    assert status == 400 and json.loads(body)["error"]["message"] == "max_tokens: Field required"


# == OpenAI Responses =============================================================================

EXEC = {
    "type": "function",
    "name": "exec_command",
    "description": "Runs a command",
    "strict": False,
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}, "workdir": {"type": "string"}}, "required": ["cmd"]},
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo"]}}, "required": ["city"]},
}


async def test_responses_create(fake_responses: FakeResponses) -> None:
    client = oai(fake_responses)
    response = await client.responses.create(model="gpt-5", input="say hi")
    assert response.output_text == DEFAULT_TEXT and response.status == "completed"
    assert response.usage is not None and response.usage.output_tokens == len(split_text(DEFAULT_TEXT))
    assert [item.type for item in response.output] == ["message"]
    assert fake_responses.last.key == KEY and fake_responses.last.path == "/v1/responses"


async def test_responses_stream_wire_format(fake_responses: FakeResponses) -> None:
    client = oai(fake_responses)
    stream = await client.responses.create(model="gpt-5", input="say hi", stream=True)
    events = [e async for e in stream]
    n = len(split_text(DEFAULT_TEXT))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == DEFAULT_TEXT and events[-1].response.usage.total_tokens > 0
    assert fake_responses.last.event_names == [e.type for e in events]


async def test_responses_tool_scenario_with_reasoning(fake_responses: FakeResponses) -> None:
    fake_responses.script(tool_scenario=True)
    client = oai(fake_responses)
    history: list[Any] = [
        {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text", "text": "be a coding agent"}]},
        {"type": "message", "id": "msg_2", "role": "user", "content": [{"type": "input_text", "text": "run echo hi"}]},
    ]
    tools: Any = [WEATHER, EXEC, {"type": "web_search", "external_web_access": False}]
    kwargs: Any = {"model": "gpt-5.1-codex", "tools": tools, "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"], "store": False}
    async with client.responses.stream(input=history, **kwargs) as stream:
        types_seen = [event.type async for event in stream]
        response = await stream.get_final_response()
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    reasoning, call = response.output
    assert reasoning.encrypted_content and reasoning.summary[0].text == DEFAULT_THINKING
    assert call.name == "exec_command" and json.loads(call.arguments) == {"cmd": "echo hi"}
    assert types_seen.count("response.function_call_arguments.delta") == 2 and "response.reasoning_summary_text.done" in types_seen

    history += [item.model_dump(exclude_none=True) for item in response.output]
    history.append({"type": "function_call_output", "id": "fco_1", "call_id": call.call_id, "output": "Process exited with code 0\nOutput:\nhi\n"})
    final = await client.responses.create(input=history, **kwargs)
    assert final.output_text == "the command printed: Process exited with code 0\nOutput:\nhi"


async def test_responses_parse_tools_and_local_shell(fake_responses: FakeResponses) -> None:
    client = oai(fake_responses)
    parsed = await client.responses.parse(model="gpt-5", input="rate it", text_format=Answer)
    assert parsed.output_parsed == Answer(answer=DEFAULT_TEXT, confidence=1)
    both = await client.responses.create(model="gpt-5", input="go", tools=[WEATHER, EXEC])
    assert [item.name for item in both.output] == ["get_weather", "exec_command"]
    one = await client.responses.create(model="gpt-5", input="go", tools=[WEATHER, EXEC], parallel_tool_calls=False)
    assert [item.name for item in one.output] == ["get_weather"]
    fake_responses.script(tool_scenario=True)
    shell = await client.responses.create(model="gpt-5", input="go", tools=[{"type": "local_shell"}])
    assert shell.output[0].type == "local_shell_call" and shell.output[0].action.command == ["echo", "hi"]
    fake_responses.script(truncated=True)
    cut = await client.responses.create(model="gpt-5", input="go")
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


async def test_responses_errors(fake_responses: FakeResponses) -> None:
    client = oai(fake_responses)
    fake_responses.script(status=429, message="slow down", retry_after="3")
    with pytest.raises(openai.RateLimitError) as err:
        await client.responses.create(model="gpt-5", input="x")
    assert err.value.response.headers["retry-after"] == "3" and err.value.body["message"] == "slow down"
    fake_responses.script(error_after=3, message="boom")
    stream = await client.responses.create(model="gpt-5", input="x", stream=True)
    last = [e async for e in stream][-1]
    assert last.type == "response.failed" and last.response.error.message == "boom"
    fake_responses.script()
    with pytest.raises(openai.BadRequestError, match="not found"):
        await client.responses.create(model="gpt-5", input="x", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError, match="No tool call found"):
        await client.responses.create(model="gpt-5", input=[{"type": "function_call_output", "call_id": "call_x", "output": "hi"}])


# == Gemini =======================================================================================

SHELL_DECL = types.FunctionDeclaration(
    name="run_shell_command",
    description="Runs a shell command",
    parameters_json_schema={"type": "object", "properties": {"command": {"type": "string"}, "description": {"type": "string"}}, "required": ["command"]},
)
NO_AFC = types.AutomaticFunctionCallingConfig(disable=True)


async def test_gemini_generate_and_count(fake_gemini: FakeGemini) -> None:
    client = gem(fake_gemini)
    config = types.GenerateContentConfig(system_instruction="be brief")
    response = await client.models.generate_content(model="gemini-2.5-flash", contents="say hi", config=config)
    assert response.text == DEFAULT_TEXT and response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage.candidates_token_count == len(split_text(DEFAULT_TEXT)) and usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    count = await client.models.count_tokens(model="gemini-2.5-flash", contents="say hi")
    assert count.total_tokens and fake_gemini.last.path == "/v1beta/models/gemini-2.5-flash:countTokens"
    assert fake_gemini.requests[0].key == KEY and fake_gemini.requests[0].model == "gemini-2.5-flash"
    assert fake_gemini.for_model("gemini-2.5-flash") == fake_gemini.requests


async def test_gemini_stream_sse(fake_gemini: FakeGemini) -> None:
    client = gem(fake_gemini)
    chunks = [c async for c in await client.models.generate_content_stream(model="gemini-2.5-flash", contents="say hi")]
    assert "".join(c.text for c in chunks) == DEFAULT_TEXT and len(chunks) == len(split_text(DEFAULT_TEXT))
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    raw = fake_gemini.last
    assert raw.query == {"alt": "sse"} and raw.sent.endswith(b"}\r\n\r\n") and b"event:" not in raw.sent


async def test_gemini_tool_scenario_and_thoughts(fake_gemini: FakeGemini) -> None:
    fake_gemini.script(tool_scenario=True)
    client = gem(fake_gemini)
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[SHELL_DECL])],
        automatic_function_calling=NO_AFC,
        thinking_config=types.ThinkingConfig(include_thoughts=True, thinking_budget=1024),
    )
    contents: list[Any] = [types.Content(role="user", parts=[types.Part(text="run echo hi")])]
    chunks = [c async for c in await client.models.generate_content_stream(model="gemini-3-pro-preview", contents=contents, config=config)]
    parts = [p for c in chunks for p in c.candidates[0].content.parts]
    assert parts[0].thought and parts[0].text == DEFAULT_THINKING
    call_part = parts[1]
    assert call_part.function_call.name == "run_shell_command" and call_part.function_call.args == {"command": "echo hi"}
    assert call_part.function_call.id and call_part.thought_signature
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP and chunks[-1].usage_metadata.thoughts_token_count

    contents += [
        types.Content(role="model", parts=[call_part]),
        types.Content(
            role="user",
            parts=[types.Part(function_response=types.FunctionResponse(id=call_part.function_call.id, name="run_shell_command", response={"output": "hi"}))],
        ),
    ]
    final = await client.models.generate_content(model="gemini-3-pro-preview", contents=contents, config=config)
    assert final.text == ECHO
    # Gemini 3 refuses a function call turn that lost its thought signature.
    contents[1] = types.Content(role="model", parts=[types.Part(function_call=call_part.function_call)])
    with pytest.raises(genai_errors.ClientError, match="thought_signature") as err:
        await client.models.generate_content(model="gemini-3-pro-preview", contents=contents, config=config)
    assert err.value.code == 400 and err.value.status == "INVALID_ARGUMENT"


async def test_gemini_json_and_generic_tools(fake_gemini: FakeGemini) -> None:
    client = gem(fake_gemini)
    parsed = await client.models.generate_content(
        model="gemini-2.5-flash", contents="rate", config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=Answer)
    )
    assert parsed.parsed == Answer(answer=DEFAULT_TEXT, confidence=1)
    # Gemini CLI's router: responseJsonSchema with upper-case types and a minimum.
    schema = {"type": "OBJECT", "properties": {"reason": {"type": "STRING"}, "score": {"type": "INTEGER", "minimum": 3}}, "required": ["score"]}
    routed = await client.models.generate_content(
        model="gemini-2.5-flash", contents="route", config=types.GenerateContentConfig(response_mime_type="application/json", response_json_schema=schema)
    )
    assert json.loads(routed.text) == {"reason": DEFAULT_TEXT, "score": 3}
    weather = types.FunctionDeclaration(
        name="get_weather", parameters=types.Schema(type=types.Type.OBJECT, properties={"days": types.Schema(type=types.Type.INTEGER, minimum=2)})
    )
    tools = [types.Tool(function_declarations=[weather, SHELL_DECL])]
    both = await client.models.generate_content(
        model="gemini-2.5-flash", contents="go", config=types.GenerateContentConfig(tools=tools, automatic_function_calling=NO_AFC)
    )
    calls = [(c.name, c.args) for c in both.function_calls]
    assert calls == [("get_weather", {"days": 2}), ("run_shell_command", {"command": "echo hi", "description": DEFAULT_TEXT})]
    forced = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="ANY", allowed_function_names=["run_shell_command"]))
    one = await client.models.generate_content(
        model="gemini-2.5-flash", contents="go", config=types.GenerateContentConfig(tools=tools, tool_config=forced, automatic_function_calling=NO_AFC)
    )
    assert [c.name for c in one.function_calls] == ["run_shell_command"]


async def test_gemini_errors_and_raw_wire(fake_gemini: FakeGemini) -> None:
    client = gem(fake_gemini)
    fake_gemini.script(status=429, message="quota", retry_after="2")
    with pytest.raises(genai_errors.ClientError) as err:
        await client.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert err.value.code == 429 and err.value.status == "RESOURCE_EXHAUSTED" and err.value.message == "quota"
    assert fake_gemini.last.status == 429 and json.loads(fake_gemini.last.sent)["error"]["details"][0]["retryDelay"] == "2s"
    fake_gemini.script(status=503, message="busy")
    with pytest.raises(genai_errors.ServerError):
        await client.models.generate_content(model="gemini-2.5-flash", contents="x")
    fake_gemini.script()
    base = fake_gemini.base_url + "/models/gemini-2.5-flash"
    # Without alt=sse the stream is one JSON array; ?key= carries the key.
    status, body = await post(base + ":streamGenerateContent?key=qkey", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    chunks = json.loads(body)
    assert status == 200 and isinstance(chunks, list) and b"\n,\r\n" in body and fake_gemini.last.key == "qkey"
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == DEFAULT_TEXT
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    status, body = await post(base + ":generateContent", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "stream": True})
    assert status == 400 and json.loads(body)["error"]["status"] == "INVALID_ARGUMENT" and "Unknown name \"stream\"" in json.loads(body)["error"]["message"]
    request = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "systemInstruction": {"parts": [{"text": "s"}]}}
    status, body = await post(base + ":countTokens", {"generateContentRequest": {"model": "models/gemini-2.5-flash", **request}})
    _, answer = await post(base + ":generateContent", request)
    assert json.loads(body)["totalTokens"] == json.loads(answer)["usageMetadata"]["promptTokenCount"]
    status, body = await post(base + ":batchEmbedContents", {"requests": [{"model": "models/e", "content": {"parts": [{"text": "a"}]}}] * 2})
    assert status == 200 and len(json.loads(body)["embeddings"]) == 2
    fake_gemini.script(error_after=2, message="stream died")
    status, body = await post(base + ":streamGenerateContent?alt=sse", request)
    assert json.loads(body.split(b"data: ")[-1])["error"]["message"] == "stream died"


# == the shared fault scripting, on every fake ====================================================

FAKES = {"openai": FakeOpenAI, "anthropic": FakeAnthropic, "responses": FakeResponses, "gemini": FakeGemini}


def stream_request(kind: str, fake: Any) -> tuple[str, dict[str, Any], dict[str, str]]:
    user = "say hi"
    if kind == "openai":
        return fake.base_url + "/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": user}]}, {}
    if kind == "anthropic":
        body = {"model": "m", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": user}]}
        return fake.base_url + "/v1/messages", body, {"anthropic-version": "2023-06-01", "x-api-key": KEY}
    if kind == "responses":
        return fake.base_url + "/responses", {"model": "m", "stream": True, "input": user}, {}
    return fake.base_url + "/models/m:streamGenerateContent?alt=sse", {"contents": [{"role": "user", "parts": [{"text": user}]}]}, {}


@pytest.mark.parametrize("kind", FAKES)
async def test_faults_on_every_fake(kind: str) -> None:
    async with FAKES[kind]() as fake:
        url, body, headers = stream_request(kind, fake)
        fake.script(break_after=2)
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(url, body, headers)
        assert fake.last.events and len(fake.last.events) == 2
        fake.script(malformed=True)
        status, raw = await post(url, body, headers)
        assert status == 200 and raw.count(b"data: ") > 3
        with pytest.raises(ValueError):
            fake.last.events
        fake.script(hang_after=1)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                async with session.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=0.3)) as response:
                    await response.read()
        await asyncio.wait_for(fake.last.disconnected.wait(), 2)
        fake.script(model="m", status=401, message="bad key {key}")
        status, raw = await post(url, body, {**headers, "Authorization": "Bearer leaked"} if kind != "anthropic" else {**headers, "x-api-key": "leaked"})
        assert status == 401 and b"bad key leaked" in raw and fake.for_model("m")[-1].status == 401


@pytest.mark.parametrize("kind", FAKES)
async def test_tool_scenario_on_every_fake(kind: str) -> None:
    """The same scenario on the four wire formats: one shell call, then the result quoted."""
    async with FAKES[kind](tool_scenario=True) as fake:
        properties = {"command": {"type": "array", "items": {"type": "string"}}, "workdir": {"type": "string"}}
        schema = {"type": "object", "properties": properties, "required": ["command"]}
        if kind == "openai":
            tools: Any = [
                {"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "shell", "parameters": schema}},
            ]
            first = await oai(fake).chat.completions.create(model="m", messages=[{"role": "user", "content": "run"}], tools=tools)
            call = first.choices[0].message.tool_calls
            assert [(c.function.name, json.loads(c.function.arguments)) for c in call] == [("shell", {"command": ["echo", "hi"]})]
            follow: Any = [
                {"role": "user", "content": "run"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call[0].id, "content": "hi\n"},
            ]
            second = await oai(fake).chat.completions.create(model="m", messages=follow, tools=tools)
            assert second.choices[0].message.content == ECHO
        elif kind == "anthropic":
            tool = {"name": "shell", "input_schema": schema}
            first = await claude(fake).messages.create(model="m", max_tokens=64, tools=[READ, tool], messages=[{"role": "user", "content": "run"}])
            assert [(b.name, b.input) for b in first.content] == [("shell", {"command": ["echo", "hi"]})]
        elif kind == "responses":
            tool = {"type": "function", "name": "shell", "parameters": schema}
            first = await oai(fake).responses.create(model="m", input="run", tools=[WEATHER, tool])
            assert [(i.name, json.loads(i.arguments)) for i in first.output] == [("shell", {"command": ["echo", "hi"]})]
        else:
            decl = types.FunctionDeclaration(name="shell", parameters_json_schema=schema)
            config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[decl])], automatic_function_calling=NO_AFC)
            first = await gem(fake).models.generate_content(model="m", contents="run", config=config)
            assert [(c.name, c.args) for c in first.function_calls] == [("shell", {"command": ["echo", "hi"]})]


async def test_scripting_for_repair_and_blocking_plugins(fake_openai: FakeOpenAI) -> None:
    """raw_text, tool_arguments, shell_command and script_next (what the tool_repair,
    json_repair and dangerous_commands tests script the fakes with)."""
    tools: Any = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object", "properties": {"command": {"type": "array"}}}}}]
    ask = [{"role": "user", "content": "run"}]
    fake_openai.script(raw_text=True, text='<tool_call>{"name": "shell"}</tool_call>')  # tools offered, but text
    first = await oai(fake_openai).chat.completions.create(model="m", messages=ask, tools=tools, response_format={"type": "json_object"})
    assert first.choices[0].message.content == '<tool_call>{"name": "shell"}</tool_call>' and not first.choices[0].message.tool_calls
    fake_openai.script(tool_scenario=True, shell_command="rm -rf /tmp/x")
    fake_openai.script_next(tool_scenario=True, tool_arguments='{"command": ["ls",')  # only the next request
    broken = await oai(fake_openai).chat.completions.create(model="m", messages=ask, tools=tools)
    assert broken.choices[0].message.tool_calls[0].function.arguments == '{"command": ["ls",'
    scripted = await oai(fake_openai).chat.completions.create(model="m", messages=ask, tools=tools)
    assert json.loads(scripted.choices[0].message.tool_calls[0].function.arguments) == {"command": ["bash", "-lc", "rm -rf /tmp/x"]}


# == every request the real clients made is one the fakes accept =================================

CAPTURES = Path("/work/shared/clients/captures")
_DROP = {"host", "content-length", "accept-encoding", "connection", "transfer-encoding"}


@pytest.mark.skipif(not CAPTURES.is_dir(), reason=f"no client captures at {CAPTURES}")
async def test_fakes_accept_every_captured_client_request() -> None:
    """The fakes are strict like the real APIs; the real clients' own requests (Claude Code,
    Codex CLI, Gemini CLI, the SDKs) must all still get a 200."""
    async with FakeOpenAI() as chat, FakeAnthropic() as messages, FakeResponses() as responses, FakeGemini() as gemini:
        refused = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for capture in sorted(CAPTURES.glob("*/*.jsonl")):
                for line in capture.read_text().splitlines():
                    record = json.loads(line)
                    if record["method"] != "POST":
                        continue
                    path = record["path"]
                    prefixes = (("/v1/messages", messages), ("/v1/responses", responses), ("/v1/chat", chat))
                    fake: Any = next((f for prefix, f in prefixes if path.startswith(prefix)), gemini)
                    query = {k: v[0] if isinstance(v, list) else v for k, v in (record.get("query") or {}).items()}
                    headers = {k: v for k, v in record["headers"] if k.lower() not in _DROP}
                    async with session.post(fake.url + path, params=query, json=record["json"], headers=headers) as response:
                        if response.status != 200:
                            refused.append((capture.name, record["seq"], response.status, (await response.read())[:200]))
        assert refused == []
        assert len(messages.requests) > 20 and len(responses.requests) > 5 and len(gemini.requests) > 5
