"""Documents across protocols, and content one protocol has and another lacks: translated when
a faithful form exists, else a 400 in the client's protocol — never a request that quietly
arrives without it (nor a setting that arrives as its opposite, a field dropped on the way
back, or a value the backend cannot read).

Clients (aiohttp, real sockets) of each protocol → llmproxy → fake upstreams of another.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import re
from typing import Any, AsyncIterator

import aiohttp
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_openai
import pytest
from aiohttp import web
from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses

from llmproxy.codecs import get_codec
from llmproxy.testing import RunningProxy, start_proxy

PDF_DATA = "JVBERi0xLjQK"
PDF = {"type": "base64", "media_type": "application/pdf", "data": PDF_DATA}
PLUGINS = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]


@pytest.fixture
async def proxy(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_responses: FakeResponses, fake_gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningProxy]:
    monkeypatch.setenv("UNTRANSLATABLE_KEY", "test-key-untranslatable")
    backends = {
        "chat": {"type": "openai", "base_url": fake_openai.base_url},
        "claude": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${UNTRANSLATABLE_KEY}"]},
        "resp": {"type": "openai-responses", "base_url": fake_responses.base_url},
        "gem": {"type": "gemini", "base_url": fake_gemini.base_url, "api_keys": ["${UNTRANSLATABLE_KEY}"]},
    }
    config = {"proxy": {"drain_timeout": 0}, "backends": backends, "default_backend": "chat"}
    running = await start_proxy(config, plugins=PLUGINS, entry_points=False)
    yield running
    await running.stop()


async def post(proxy: RunningProxy, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(proxy.url + path, json=body) as response:
        return response.status, await response.json() if response.content_type == "application/json" else await response.text()


async def anthropic(proxy: RunningProxy, content: list[dict[str, Any]], model: str = "chat:gpt-4o-mini", stream: bool = False) -> tuple[int, Any]:
    return await post(proxy, "/v1/messages", {"model": model, "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": content}]})


def only_user_content(fake: Any) -> Any:
    return fake.last.json["messages"][-1]["content"]


async def test_a_plain_text_document_arrives_as_titled_text(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    document = {"type": "document", "title": "notes.txt", "source": {"type": "text", "media_type": "text/plain", "data": "buy milk"}}
    status, _ = await anthropic(proxy, [{"type": "text", "text": "summarise:"}, document])
    assert status == 200
    content = only_user_content(fake_openai)  # text parts only: joined, or as parts
    texts = content if isinstance(content, str) else "\n".join(part["text"] for part in content)
    assert "summarise:" in texts and "notes.txt:\nbuy milk" in texts


async def test_an_anthropic_pdf_reaches_each_protocol_as_its_own_file_form(
    proxy: RunningProxy, fake_openai: FakeOpenAI, fake_responses: FakeResponses, fake_gemini: FakeGemini, fake_anthropic: FakeAnthropic
) -> None:
    content = [{"type": "text", "text": "see:"}, {"type": "document", "title": "report.pdf", "source": PDF}]
    assert (await anthropic(proxy, content, "chat:gpt-4o-mini"))[0] == 200
    assert only_user_content(fake_openai)[1] == {"type": "file", "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF_DATA}"}}
    assert (await anthropic(proxy, content, "resp:gpt-4o-mini"))[0] == 200
    items = [part for item in fake_responses.last.json["input"] for part in (item.get("content") or []) if isinstance(part, dict)]
    assert {"type": "input_file", "filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF_DATA}"} in items
    assert (await anthropic(proxy, content, "gem:gemini-2.5-flash"))[0] == 200
    parts = fake_gemini.last.json["contents"][-1]["parts"]
    assert {"inlineData": {"mimeType": "application/pdf", "data": PDF_DATA}} in parts
    assert (await anthropic(proxy, content, "claude:claude-sonnet-4-5"))[0] == 200
    assert only_user_content(fake_anthropic)[1] == {"type": "document", "title": "report.pdf", "source": PDF}


async def test_a_gemini_pdf_is_a_file_not_an_image(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "see:"}, {"inlineData": {"mimeType": "application/pdf", "data": PDF_DATA}}]}]}
    assert (await post(proxy, "/v1beta/models/chat:gpt-4o-mini:generateContent", body))[0] == 200
    assert only_user_content(fake_openai)[1]["file"]["file_data"] == f"data:application/pdf;base64,{PDF_DATA}"
    assert (await post(proxy, "/v1beta/models/claude:claude-sonnet-4-5:generateContent", body))[0] == 200
    assert only_user_content(fake_anthropic)[1]["source"] == PDF


async def test_an_openai_file_reaches_anthropic_as_a_document(proxy: RunningProxy, fake_anthropic: FakeAnthropic) -> None:
    file = {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF_DATA}"}}
    body = {"model": "claude:claude-sonnet-4-5", "messages": [{"role": "user", "content": [{"type": "text", "text": "see:"}, file]}]}
    assert (await post(proxy, "/v1/chat/completions", body))[0] == 200
    assert only_user_content(fake_anthropic)[1] == {"type": "document", "title": "a.pdf", "source": PDF}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_document_with_no_form_elsewhere_is_a_400_naming_it(proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool) -> None:
    by_url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    status, body = await anthropic(proxy, [{"type": "text", "text": "see:"}, by_url], stream=stream)
    assert status == 400 and body["type"] == "error" and "by URL" in body["error"]["message"]
    by_id = {"type": "document", "source": {"type": "file", "file_id": "file_011"}}
    status, body = await anthropic(proxy, [{"type": "text", "text": "see:"}, by_id], stream=stream)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "'document'" in body["error"]["message"] and "openai_chat" in body["error"]["message"]
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    "block",
    [{"type": "text"}, {"type": "text", "text": None}, {"type": "image", "source": {"type": "base64", "media_type": "image/png"}},
     {"type": "image", "source": {"type": "url"}}, {"type": "document", "source": {"type": "base64"}}],
    ids=["text-missing", "text-null", "image-without-data", "image-without-url", "document-without-data"],
)
async def test_a_block_missing_its_content_is_a_400(proxy: RunningProxy, fake_openai: FakeOpenAI, block: dict[str, Any]) -> None:
    status, body = await anthropic(proxy, [block])
    assert status == 400 and body["type"] == "error" and "must be a string" in body["error"]["message"]
    assert fake_openai.requests == []


async def test_a_gemini_function_called_twice_pairs_each_response_with_its_call(proxy: RunningProxy, fake_anthropic: FakeAnthropic, fake_openai: FakeOpenAI) -> None:
    """Gemini pairs calls and responses without ids by order; the ids llmproxy makes up for
    the other protocols must pair the same way, even when one function was called twice."""
    body = {"contents": [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a": 1}}}, {"functionCall": {"name": "f", "args": {"a": 2}}},
                                    {"functionCall": {"name": "g", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"r": 1}}}, {"functionResponse": {"name": "g", "response": {"r": 3}}},
                                   {"functionResponse": {"name": "f", "response": {"r": 2}}}]},
    ]}
    assert (await post(proxy, "/v1beta/models/claude:claude-sonnet-4-5:generateContent", body))[0] == 200
    messages = fake_anthropic.last.json["messages"]
    calls = {(block["name"], block["input"].get("a")): block["id"] for block in messages[1]["content"] if block["type"] == "tool_use"}
    results = [(block["tool_use_id"], block["content"]) for block in messages[2]["content"] if block["type"] == "tool_result"]
    assert len(set(calls.values())) == 3
    by_id = dict(results)
    assert '"r":1' in str(by_id[calls[("f", 1)]]).replace(" ", "") and '"r":2' in str(by_id[calls[("f", 2)]]).replace(" ", "")
    assert '"r":3' in str(by_id[calls[("g", None)]]).replace(" ", "")
    assert (await post(proxy, "/v1beta/models/chat:gpt-4o-mini:generateContent", body))[0] == 200
    chat = fake_openai.last.json["messages"]
    call_ids = [call["id"] for call in chat[1]["tool_calls"]]
    assert [m["tool_call_id"] for m in chat[2:5]] == [call_ids[0], call_ids[2], call_ids[1]]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_without_arguments_reaches_a_responses_client_as_json(proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool) -> None:
    """A Chat backend may send a call's arguments as "" (or stream none): a Responses client
    (Codex parses them) gets "{}"."""
    fake_openai.script(tool_arguments="")
    tool = {"type": "function", "name": "list_files", "parameters": {"type": "object", "properties": {}}}
    body = {"model": "chat:gpt-4o-mini", "input": "list them", "tools": [tool], "stream": stream}
    status, answer = await post(proxy, "/v1/responses", body)
    assert status == 200
    sent = fake_openai.last.sent.decode().replace(" ", "")
    assert '"arguments":""' in sent and '"arguments":"{' not in sent  # the backend did send none
    if stream:
        events = [json.loads(line[6:]) for line in answer.splitlines() if line.startswith("data: {")]
        assert [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"] == ["{}"]
        answer = next(e for e in events if e["type"] == "response.completed")["response"]
    calls = [item for item in answer["output"] if item["type"] == "function_call"]
    assert calls and calls[0]["name"] == "list_files" and calls[0]["arguments"] == "{}"


async def test_an_anthropic_stream_keeps_its_input_tokens_when_decoded(fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tools offered and loop_detection on: the stream is decoded and encoded again, and
    message_start still says how many input tokens the backend counted (Claude Code shows
    it as the context used), as a stream forwarded untouched does."""
    import llmproxy_loop_detection

    monkeypatch.setenv("UNTRANSLATABLE_KEY", "test-key-untranslatable")
    config = {"proxy": {"drain_timeout": 0}, "default_backend": "claude",
              "backends": {"claude": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${UNTRANSLATABLE_KEY}"]}}}
    proxy = await start_proxy(config, plugins=[*PLUGINS, ("loop_detection", llmproxy_loop_detection)], entry_points=False)
    try:
        tool = {"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}
        body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
        decoded = start_usage((await post(proxy, "/v1/messages", body))[1])
    finally:
        await proxy.stop()
    sent = start_usage(fake_anthropic.last.sent.decode())
    assert sent["input_tokens"] > 0 and decoded["input_tokens"] == sent["input_tokens"]


def start_usage(text: str) -> dict[str, Any]:
    line = next(line for line in text.splitlines() if line.startswith("data: ") and '"message_start"' in line)
    return json.loads(line[6:])["message"]["usage"]


async def test_an_unknown_block_from_the_user_is_not_dropped_on_the_way(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> None:
    """A block type llmproxy does not know reaches an Anthropic backend as it is; another
    protocol's backend is not sent the message without it."""
    content = [{"type": "text", "text": "look:"}, {"type": "hologram", "data": "xyz"}]
    status, body = await anthropic(proxy, content)
    assert status == 400 and "'hologram'" in body["error"]["message"] and fake_openai.requests == []
    assert (await anthropic(proxy, content, "claude:claude-sonnet-4-5"))[0] == 200
    assert {"type": "hologram", "data": "xyz"} in only_user_content(fake_anthropic)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
async def test_a_compressed_request_is_read_within_the_body_limit(fake_openai: FakeOpenAI, encoding: str) -> None:
    """gzip and deflate bodies are served; one that inflates past max_body_bytes is a 413
    before it is ever held whole (a 300 KB gzip bomb of 300 MB took the proxy from 60 MB
    to 250 MB and more when aiohttp inflated it); other encodings are a 415 in the client's
    protocol."""
    import zlib

    def compress(data: bytes) -> bytes:
        if encoding == "gzip":
            import gzip

            return gzip.compress(data)
        packer = zlib.compressobj(wbits=zlib.MAX_WBITS if encoding == "deflate" else -zlib.MAX_WBITS)
        return packer.compress(data) + packer.flush()

    config = {"proxy": {"drain_timeout": 0, "max_body_bytes": 1_000_000}, "backends": {"chat": {"type": "openai", "base_url": fake_openai.base_url}},
              "default_backend": "chat"}
    proxy = await start_proxy(config, plugins=PLUGINS, entry_points=False)
    header = {"Content-Type": "application/json", "Content-Encoding": "deflate" if encoding == "raw-deflate" else encoding}
    try:
        async with aiohttp.ClientSession() as http:
            small = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
            async with http.post(proxy.url + "/v1/chat/completions", data=compress(small), headers=header) as response:
                assert response.status == 200, await response.text()
            assert fake_openai.last.json["messages"][0]["content"] == "hi"
            bomb = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * 50_000_000 + b'"}]}'
            async with http.post(proxy.url + "/v1/chat/completions", data=compress(bomb), headers=header) as response:
                assert response.status == 413 and "once decompressed" in (await response.json())["error"]["message"]
            async with http.post(proxy.url + "/v1/messages", data=small, headers={**header, "Content-Encoding": "br"}) as response:
                assert response.status == 415 and (await response.json())["type"] == "error"
    finally:
        await proxy.stop()
    assert len(fake_openai.requests) == 1


async def test_an_image_a_tool_returned_reaches_chat_and_gemini_beside_the_result(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_gemini: FakeGemini) -> None:
    """Claude Code's Read tool returns a screenshot as an image in the tool result. Chat's
    tool messages hold text only and Gemini's functionResponse a JSON object: the image
    goes right after, in the user turn, never dropped."""
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    messages = [
        {"role": "user", "content": "look at the screen"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "shot.png"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "the screenshot"}, {"type": "image", "source": png}]}]},
    ]
    tool = {"name": "Read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
    for model in ("chat:gpt-4o-mini", "gem:gemini-2.5-flash"):
        status, _ = await post(proxy, "/v1/messages", {"model": model, "max_tokens": 50, "messages": messages, "tools": [tool]})
        assert status == 200
    chat = fake_openai.last.json["messages"]
    assert chat[-2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "the screenshot"}
    assert chat[-1]["role"] == "user" and {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}} in chat[-1]["content"]
    last = fake_gemini.last.json["contents"][-1]
    assert last["role"] == "user" and last["parts"][0]["functionResponse"]["response"] == {"output": "the screenshot"}
    assert {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}} in last["parts"]


async def test_codex_tools_declared_as_an_input_item_keep_the_system_prompt(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> None:
    """Codex's built-in provider declares tools in an ``additional_tools`` input item (its
    shape, from a recorded request, trimmed) ahead of the developer messages: its functions
    are tools for any backend, its namespace stays for Responses backends, and the developer
    messages after it are still the system prompt, not demoted to an empty user turn."""
    body = {
        "model": "chat:gpt-4o-mini", "stream": False,
        "input": [
            {"type": "additional_tools", "id": "at_1", "role": "developer", "tools": [
                {"type": "namespace", "name": "functions", "description": "", "tools": [{"type": "custom", "name": "exec", "description": "Run JavaScript"}]},
                {"type": "function", "name": "shell", "description": "Run a command", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}},
            ]},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "run echo hi"}]},
        ],
    }
    assert (await post(proxy, "/v1/responses", body))[0] == 200
    chat = fake_openai.last.json
    assert chat["messages"][0] == {"role": "system", "content": "You are Codex."}
    assert [m["role"] for m in chat["messages"]] == ["system", "user"]
    assert [t["function"]["name"] for t in chat["tools"]] == ["shell"]
    assert (await post(proxy, "/v1/responses", {**body, "model": "claude:claude-sonnet-4-5"}))[0] == 200
    sent = fake_anthropic.last.json
    assert "You are Codex." in json.dumps(sent["system"]) and [m["role"] for m in sent["messages"]] == ["user"]
    assert [t["name"] for t in sent["tools"]] == ["shell"]


def test_an_additional_tools_item_goes_back_to_a_responses_backend_as_it_came() -> None:
    from llmproxy.codecs import get_codec

    codec = get_codec("openai_responses")
    item = {"type": "additional_tools", "id": "at_1", "role": "developer", "tools": [
        {"type": "namespace", "name": "functions", "tools": []}, {"type": "function", "name": "shell", "parameters": {"type": "object"}}]}
    body = {"model": "m", "input": [item, {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
                                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}
    request = codec.decode_request(body)
    again = codec.encode_request(request, "m")
    assert again["input"][0] == item and "tools" not in again
    assert [i.get("role") for i in again["input"][1:]] == ["developer", "user"]


# -- what a new user's trial found: reasoning switches, calls without arguments, stop
# -- sequences, error fields, image types, and numbers that are not numbers


@pytest.mark.parametrize("model, expected", [("gem:gemini-2.5-flash", {"thinkingBudget": 0}), ("gem:gemini-3-pro-preview", {"thinkingLevel": "LOW"})])
async def test_asking_for_no_reasoning_gets_the_least_gemini_can_do(proxy: RunningProxy, fake_gemini: FakeGemini, model: str, expected: dict[str, Any]) -> None:
    """effort "none" from OpenAI clients: no thinking on Gemini 2.x, and LOW on Gemini 3
    (which cannot switch it off) — never the HIGH an unknown effort used to get."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "none"}
    assert (await post(proxy, "/v1/chat/completions", chat))[0] == 200
    assert fake_gemini.last.json["generationConfig"]["thinkingConfig"] == expected
    responses = {"model": model, "input": "hi", "reasoning": {"effort": "none"}}
    assert (await post(proxy, "/v1/responses", responses))[0] == 200
    assert fake_gemini.last.json["generationConfig"]["thinkingConfig"] == expected


async def test_gemini_dynamic_thinking_is_a_middle_effort_elsewhere(proxy: RunningProxy, fake_anthropic: FakeAnthropic, fake_openai: FakeOpenAI) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"maxOutputTokens": 100, "thinkingConfig": {"thinkingBudget": -1, "includeThoughts": True}}}
    assert (await post(proxy, "/v1beta/models/claude:claude-sonnet-4-5:generateContent", body))[0] == 200
    assert fake_anthropic.last.json["thinking"] == {"type": "enabled", "budget_tokens": 8192}
    assert (await post(proxy, "/v1beta/models/chat:o4-mini:generateContent", body))[0] == 200
    assert fake_openai.last.json["reasoning_effort"] == "medium"


async def test_a_streamed_anthropic_call_without_input_reaches_chat_clients_as_an_empty_object(proxy: RunningProxy, fake_anthropic: FakeAnthropic) -> None:
    """Anthropic streams a call without arguments as empty input_json_deltas; an OpenAI
    client (which parses the arguments) gets "{}", as OpenAI sends, never ""."""
    fake_anthropic.script(tool_arguments="")
    tool = {"type": "function", "function": {"name": "list_files", "parameters": {"type": "object", "properties": {}}}}
    body = {"model": "claude:claude-sonnet-4-5", "stream": True, "messages": [{"role": "user", "content": "list them"}], "tools": [tool]}
    status, answer = await post(proxy, "/v1/chat/completions", body)
    assert status == 200
    chunks = [json.loads(line[6:]) for line in answer.splitlines() if line.startswith("data: {")]
    pieces = [call["function"].get("arguments") for chunk in chunks for choice in chunk["choices"]
              for call in (choice["delta"].get("tool_calls") or ())]
    assert pieces[0] == "" and "".join(pieces) == "{}"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == ["tool_calls"]


async def test_the_stop_sequence_that_ended_an_answer_survives_a_decoded_stream(fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tools offered and a stream processor on: the Anthropic stream is decoded and encoded
    again, and still says which stop sequence ended it — as does the answer not streamed."""
    import llmproxy_loop_detection

    monkeypatch.setenv("UNTRANSLATABLE_KEY", "test-key-untranslatable")
    fake_anthropic.script(raw_text=True, stop_sequence="END")
    config = {"proxy": {"drain_timeout": 0}, "default_backend": "claude",
              "backends": {"claude": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${UNTRANSLATABLE_KEY}"]}}}
    proxy = await start_proxy(config, plugins=[*PLUGINS, ("loop_detection", llmproxy_loop_detection)], entry_points=False)
    try:
        tool = {"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}
        body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "stop_sequences": ["END"], "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
        status, streamed = await post(proxy, "/v1/messages", {**body, "stream": True})
        status_whole, whole = await post(proxy, "/v1/messages", body)
    finally:
        await proxy.stop()
    assert status == status_whole == 200
    delta = next(json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: ") and '"message_delta"' in line)
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("stop_sequence", "END")


async def test_the_field_an_openai_backend_refused_reaches_the_client() -> None:
    """OpenAI names the request field it refused in ``param``; clients show it."""
    from aiohttp import web

    from llmproxy.testing import start_app

    async def refuse(request: web.Request) -> web.Response:
        error = {"message": "Unsupported value: 'temperature' does not support 0.2 with this model.", "type": "invalid_request_error",
                 "param": "temperature", "code": "unsupported_value"}
        return web.json_response({"error": error}, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    url, runner = await start_app(app)
    proxy = await start_proxy({"proxy": {"drain_timeout": 0}, "backends": {"o": {"type": "openai", "base_url": url + "/v1"}}, "default_backend": "o"},
                              plugins=PLUGINS, entry_points=False)
    try:
        status, answer = await post(proxy, "/v1/chat/completions", {"model": "o3", "temperature": 0.2, "messages": [{"role": "user", "content": "hi"}]})
    finally:
        await proxy.stop()
        await runner.cleanup()
    assert status == 400
    assert answer["error"]["param"] == "temperature" and answer["error"]["code"] == "unsupported_value"


async def test_an_anthropic_overload_reaches_gemini_clients_as_unavailable(proxy: RunningProxy, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(status=529, message="Overloaded")
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    status, answer = await post(proxy, "/v1beta/models/claude:claude-sonnet-4-5:generateContent", body)
    assert status >= 500 and (answer["error"]["code"], answer["error"]["status"]) == (503, "UNAVAILABLE")


async def test_an_image_url_reaches_gemini_with_its_type(proxy: RunningProxy, fake_gemini: FakeGemini) -> None:
    def chat(url: str) -> dict[str, Any]:
        return {"model": "gem:gemini-2.5-flash", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                                                            {"type": "image_url", "image_url": {"url": url}}]}]}

    assert (await post(proxy, "/v1/chat/completions", chat("https://example.com/cat.PNG?size=large")))[0] == 200
    assert {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.PNG?size=large"}} in fake_gemini.last.json["contents"][-1]["parts"]
    calls = len(fake_gemini.requests)
    status, answer = await post(proxy, "/v1/chat/completions", chat("https://example.com/picture"))
    assert status == 400 and "data: URL" in answer["error"]["message"] and len(fake_gemini.requests) == calls


async def test_a_file_only_gemini_can_read_is_refused_elsewhere(proxy: RunningProxy, fake_anthropic: FakeAnthropic, fake_openai: FakeOpenAI) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "what is it?"}, {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/cat.png"}}]}]}
    for model in ("claude:claude-sonnet-4-5", "chat:gpt-4o-mini"):
        status, answer = await post(proxy, f"/v1beta/models/{model}:generateContent", body)
        assert status == 400 and "gs://bucket/cat.png" in answer["error"]["message"]
    assert not fake_anthropic.requests and not fake_openai.requests


@pytest.mark.parametrize("change, param", [({"max_tokens": "lots"}, "max_tokens"), ({"temperature": True}, "temperature"), ({"n": 3}, "n"),
                                           ({"messages": [{"role": "user", "content": None}]}, "messages[0].content")])
async def test_what_the_backend_could_not_read_is_a_400_not_a_guess(proxy: RunningProxy, fake_anthropic: FakeAnthropic, change: dict[str, Any], param: str) -> None:
    body = {"model": "claude:claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}], **change}
    status, answer = await post(proxy, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param
    assert not fake_anthropic.requests


async def test_an_anthropic_request_without_messages_is_a_400_before_another_backend(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    status, answer = await post(proxy, "/v1/messages", {"model": "chat:gpt-4o-mini", "max_tokens": 10, "messages": []})
    assert status == 400 and answer["type"] == "error" and "at least one message" in answer["error"]["message"]
    assert not fake_openai.requests


async def test_gemini_only_schema_keywords_stay_with_gemini(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    """google-genai writes propertyOrdering from a pydantic model; JSON Schema elsewhere has no such keyword."""
    schema = {"type": "OBJECT", "properties": {"b": {"type": "STRING"}, "a": {"type": "INTEGER"}}, "propertyOrdering": ["b", "a"]}
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"responseMimeType": "application/json", "responseSchema": schema}}
    assert (await post(proxy, "/v1beta/models/chat:gpt-4o-mini:generateContent", body))[0] == 200
    sent = fake_openai.last.json["response_format"]["json_schema"]["schema"]
    assert sent == {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}


# -- from a trial with the real agents


@pytest.mark.parametrize("how", ["cut", "error event, translated", "error event, forwarded"])
async def test_a_gemini_stream_that_fails_mid_way_does_not_end_as_if_complete(
    proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_gemini: FakeGemini, how: str
) -> None:
    """Gemini CLI skips an error frame and takes a cleanly ended stream as a whole (cut short)
    answer: after the error frame the connection closes without the stream's end — whether
    the backend dropped the connection, or sent its own error event (translated, or
    forwarded as it came from a Gemini backend)."""
    model = {"cut": "chat:gpt-4o-mini", "error event, translated": "claude:claude-sonnet-4-5", "error event, forwarded": "gem:gemini-2.5-flash"}[how]
    if how == "cut":
        fake_openai.script(break_after=3)
    else:
        (fake_anthropic if "translated" in how else fake_gemini).script(text="one two three four five six", error_after=4, event_delay=0.02)
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    received = b""
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url + f"/v1beta/models/{model}:streamGenerateContent?alt=sse", json=body) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in response.content.iter_any():
                    received += chunk
    frames = [json.loads(line[6:]) for line in received.decode().splitlines() if line.startswith("data: ")]
    assert frames[0]["candidates"] and "error" in frames[-1]


def test_a_temperature_thinking_refuses_goes_when_a_decoded_anthropic_request_thinks() -> None:
    """!/set(temperature=…) on a Claude Code session that thinks: Anthropic refuses a
    temperature other than 1 with thinking, so the request goes without it."""
    codec = get_codec("anthropic")
    body = {"model": "claude-opus-4-5", "max_tokens": 2000, "thinking": {"type": "adaptive"}, "messages": [{"role": "user", "content": "hi"}]}
    request = codec.decode_request(body)
    request.params["temperature"] = 0.2  # what the commands plugin's !/set does
    sent = codec.encode_request(request, "claude-opus-4-5")
    assert sent["thinking"] == {"type": "adaptive"} and "temperature" not in sent
    without = codec.encode_request(codec.decode_request({**body, "thinking": {"type": "disabled"}, "temperature": 0.2}), "claude-opus-4-5")
    assert without["temperature"] == 0.2


@pytest.mark.parametrize("retry_after, delay", [("20", "20s"), ("1.5", "2s"), ("in-30-seconds", None), ("http-date", "about 60s")])
async def test_a_gemini_client_is_told_how_long_to_wait_where_it_looks(
    proxy: RunningProxy, fake_anthropic: FakeAnthropic, retry_after: str, delay: str | None
) -> None:
    if retry_after == "http-date":  # RFC 9110 allows a date too; whole seconds, rounded up
        retry_after = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=60), usegmt=True)
    fake_anthropic.script(status=429, message="rate limited", retry_after=retry_after)
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url + "/v1beta/models/claude:claude-sonnet-4-5:generateContent", json=body) as response:
            answer = await response.json()
            assert response.status == 429 and response.headers["Retry-After"] == retry_after
    if delay is None:
        assert "details" not in answer["error"]
    elif delay == "about 60s":  # a date has whole seconds, and a little time passed
        (info,) = answer["error"]["details"]
        assert info["@type"].endswith("RetryInfo") and 55 <= int(info["retryDelay"].removesuffix("s")) <= 60
    else:
        assert answer["error"]["details"] == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]


BASH_TOOL = {"name": "Bash", "description": "Run a shell command", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}


@pytest.mark.parametrize("thinking", [{"type": "enabled", "budget_tokens": 2048}, {"type": "adaptive"}], ids=["enabled", "adaptive"])
async def test_an_anthropic_client_returns_to_anthropic_after_another_backend_served_a_tool_turn(
    proxy: RunningProxy, fake_gemini: FakeGemini, fake_anthropic: FakeAnthropic, thinking: dict[str, Any]
) -> None:
    """Claude Code's case after a failover or ``!/oneoff``: a Gemini backend served the tool
    turn, so the client holds its thinking without a signature (Google's cannot travel).
    Sent back to Anthropic as it is, the API refuses the unsigned block, and enabled
    thinking refuses a tool turn without its thinking: llmproxy leaves that block out and,
    for enabled thinking only, asks this one request without thinking."""
    body = {"model": "gem:gemini-2.5-flash", "max_tokens": 4096, "thinking": thinking, "tools": [BASH_TOOL],
            "messages": [{"role": "user", "content": "run echo hi"}]}
    fake_gemini.script(tool_scenario=True)
    status, turn = await post(proxy, "/v1/messages", body)
    assert status == 200, turn
    assert [block["type"] for block in turn["content"]] == ["thinking", "tool_use"] and not turn["content"][0]["signature"]
    call = turn["content"][1]
    history = [*body["messages"], {"role": "assistant", "content": turn["content"]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "hi"}]}]
    fake_anthropic.script(tool_scenario=True)
    status, answer = await post(proxy, "/v1/messages", {**body, "model": "claude:claude-sonnet-4-5", "messages": history})
    assert status == 200, answer
    assert any(block.get("text", "").endswith("hi") for block in answer["content"])
    sent = fake_anthropic.last.json
    assert [block["type"] for block in sent["messages"][1]["content"]] == ["tool_use"]  # the unsigned thinking left out
    assert sent.get("thinking") == (None if thinking["type"] == "enabled" else thinking)


async def test_an_anthropic_clients_own_signed_tool_turn_goes_out_as_it_came(proxy: RunningProxy, fake_anthropic: FakeAnthropic) -> None:
    body = {"model": "claude:claude-sonnet-4-5", "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048}, "tools": [BASH_TOOL],
            "messages": [{"role": "user", "content": "run echo hi"}]}
    fake_anthropic.script(tool_scenario=True)
    status, turn = await post(proxy, "/v1/messages", body)
    assert status == 200 and turn["content"][0]["type"] == "thinking" and turn["content"][0]["signature"]
    call = next(block for block in turn["content"] if block["type"] == "tool_use")
    history = [*body["messages"], {"role": "assistant", "content": turn["content"]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "hi"}]}]
    status, answer = await post(proxy, "/v1/messages", {**body, "messages": history})
    assert status == 200, answer
    sent = fake_anthropic.last.json
    assert sent["thinking"] == body["thinking"] and sent["messages"][1]["content"] == turn["content"]


@pytest.mark.parametrize("limit, budget", [(None, 24576), (4000, 2000), (100, 128)])
async def test_an_effort_leaves_the_answer_room_in_geminis_output_limit(proxy: RunningProxy, fake_gemini: FakeGemini, limit: int | None, budget: int) -> None:
    """Gemini counts thinking against maxOutputTokens: a budget made from an effort takes
    at most half of a limit the client set (at least Gemini's minimum of 128)."""
    body = {"model": "gem:gemini-2.5-flash", "reasoning_effort": "high", "messages": [{"role": "user", "content": "hi"}]}
    if limit is not None:
        body["max_completion_tokens"] = limit
    assert (await post(proxy, "/v1/chat/completions", body))[0] == 200
    config = fake_gemini.last.json["generationConfig"]
    assert config["thinkingConfig"]["thinkingBudget"] == budget and config.get("maxOutputTokens") == limit


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_translated_responses_answer_echoes_the_requests_settings(proxy: RunningProxy, fake_anthropic: FakeAnthropic, stream: bool) -> None:
    """The Responses API echoes what the answer was made with (tools, tool_choice,
    parallel_tool_calls, instructions …) in the response object; so does llmproxy when
    another backend served it."""
    tool = {"type": "function", "name": "shell", "description": "Run a command", "parameters": {"type": "object", "properties": {}}, "strict": False}
    body = {"model": "claude:claude-sonnet-4-5", "instructions": "You are Codex.", "input": "hi", "tools": [tool], "tool_choice": "auto",
            "parallel_tool_calls": False, "temperature": 0.3, "max_output_tokens": 500, "stream": stream}
    fake_anthropic.script(raw_text=True)
    async with aiohttp.ClientSession() as http, http.post(proxy.url + "/v1/responses", json=body) as response:
        assert response.status == 200
        raw = await response.text()
    if stream:
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
        answers = [e["response"] for e in events if e["type"] in ("response.created", "response.completed")]
        assert len(answers) == 2
    else:
        answers = [json.loads(raw)]
    for answer in answers:
        assert answer["tools"] == [tool] and answer["tool_choice"] == "auto" and answer["parallel_tool_calls"] is False
        assert answer["instructions"] == "You are Codex." and answer["temperature"] == 0.3 and answer["max_output_tokens"] == 500


GEMINI_QUOTA = {
    "error": {
        "code": 429,
        "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36.2s"},
        ],
    }
}


async def test_a_gemini_backend_says_how_long_to_wait_in_its_body_and_every_client_hears_it(serve: Any, proxies: Any) -> None:
    """The Gemini API sends its delay as RetryInfo in the body and no Retry-After header:
    every client gets a Retry-After (rounded up), a Gemini client the details as they came
    (Gemini CLI tells a daily quota from a short one by them), and the breaker rests the
    target for that long."""
    seen = []

    async def gemini(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response(GEMINI_QUOTA, status=429)

    url = await serve(gemini)
    config = {"backends": {"gem": {"type": "gemini", "base_url": url}}, "default_backend": "gem"}
    proxy = await proxies(config, [("gemini", llmproxy_gemini)])
    asks = [
        ("/v1beta/models/gemini-2.5-pro:generateContent", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
        ("/v1/messages", {"model": "gemini-2.5-pro", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/chat/completions", {"model": "gemini-2.5-pro", "messages": [{"role": "user", "content": "hi"}]}),
    ]
    answers = []
    async with aiohttp.ClientSession() as http:
        for path, body in asks:
            async with http.post(proxy.url + path, json=body) as response:
                answers.append(await response.json())
                assert response.status == 429 and response.headers["Retry-After"] == "37", (path, answers[-1])
    assert answers[0]["error"]["details"] == GEMINI_QUOTA["error"]["details"]  # the Gemini client's, as they came
    assert len(seen) == 1  # the breaker rested the target after the first: the others never reached it


@pytest.mark.parametrize("model, tools_of", [
    ("chat:gpt-4o-mini", lambda body: body["tools"][0]["function"]["parameters"]),
    ("claude:claude-sonnet-4-5", lambda body: body["tools"][0]["input_schema"]),
    ("resp:gpt-5-mini", lambda body: body["tools"][0]["parameters"]),
])
async def test_a_gemini_schemas_int64_strings_become_json_schema_numbers(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_responses: FakeResponses, model: str, tools_of: Any) -> None:
    """proto3 JSON writes int64 fields as strings, and @google/genai types them so: a
    Gemini client's ``minItems: "1"`` is a number in the JSON Schema other APIs get."""
    parameters = {"type": "OBJECT", "properties": {"tags": {"type": "ARRAY", "items": {"type": "STRING", "maxLength": "40"}, "minItems": "1", "maxItems": "5"}}, "required": ["tags"]}
    body = {"contents": [{"role": "user", "parts": [{"text": "tag it"}]}], "tools": [{"functionDeclarations": [{"name": "tag", "description": "Tag", "parameters": parameters}]}]}
    status, answer = await post(proxy, f"/v1beta/models/{model}:generateContent", body)
    assert status == 200, answer
    fake = {"chat": fake_openai, "claude": fake_anthropic, "resp": fake_responses}[model.split(":")[0]]
    tags = tools_of(fake.last.json)["properties"]["tags"]
    assert (tags["minItems"], tags["maxItems"], tags["items"]["maxLength"]) == (1, 5, 40)
    assert tags["type"] == "array" and tags["items"]["type"] == "string"


@pytest.mark.parametrize("model", ["claude:claude-sonnet-4-5", "resp:gpt-5-mini", "gem:gemini-2.5-flash"])
async def test_more_than_one_choice_across_protocols_is_refused_not_dropped(proxy: RunningProxy, model: str) -> None:
    body = {"model": model, "n": 2, "messages": [{"role": "user", "content": "two answers"}]}
    status, answer = await post(proxy, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "n", answer
    assert "translates one choice" in answer["error"]["message"]


CUSTOM_HISTORY = [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix the bug"}]},
    {"type": "custom_tool_call", "call_id": "call_P", "name": "apply_patch", "input": "*** Begin Patch\n*** Update File: a.py\n-x\n+y\n*** End Patch\n"},
    {"type": "custom_tool_call_output", "call_id": "call_P", "output": "Success. Updated a.py"},
    {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "pytest"}},
    {"type": "function_call", "call_id": "call_E", "name": "exec_command", "arguments": '{"cmd": "pytest"}'},
    {"type": "function_call_output", "call_id": "call_E", "output": "1 passed"},
]


@pytest.mark.parametrize("model", ["chat:gpt-4o-mini", "claude:claude-sonnet-4-5", "gem:gemini-2.5-flash"])
async def test_a_custom_tools_history_reads_as_text_to_another_backend(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_gemini: FakeGemini, model: str) -> None:
    """Codex's freeform apply_patch (a custom tool) has no form in another protocol: its call
    and output reach the backend as text, so the conversation keeps what was done; an item
    with no reading (a web search's trace) is left out, never sent as an empty message."""
    tools = [{"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
             {"type": "custom", "name": "apply_patch", "description": "patch", "format": {"type": "grammar", "syntax": "lark", "definition": "start: /(.|\\n)+/"}}]
    status, answer = await post(proxy, "/v1/responses", {"model": model, "input": CUSTOM_HISTORY, "tools": tools})
    assert status == 200, answer  # the fakes refuse what the real APIs refuse (empty messages, bad turns)
    sent = {"chat": fake_openai, "claude": fake_anthropic, "gem": fake_gemini}[model.split(":")[0]].last.json
    wire = json.dumps(sent)
    assert "[called the tool apply_patch (call call_P) with this input]\\n*** Begin Patch" in wire
    assert "[the output of tool call call_P]\\nSuccess. Updated a.py" in wire
    assert "web_search_call" not in wire and "ws_1" not in wire
    if model.startswith("chat:"):
        assert all(m.get("content") or m.get("tool_calls") for m in sent["messages"]), sent["messages"]


VALID_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", ["chat:gpt-4o-mini", "claude:claude-sonnet-4-5", "resp:gpt-5-mini"])
async def test_tool_names_another_api_refuses_are_renamed_there_and_back(
    proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_responses: FakeResponses, model: str, stream: bool
) -> None:
    """Gemini allows "." and ":" in a function's name (MCP tools: github.search); OpenAI and
    Anthropic answer such a name with a 400. The backend gets valid names, kept apart when
    two would meet ("a.b" and "a_b"), and the Gemini client gets its calls by its own names."""
    names = ["github.search:v1", "a.b", "a_b"]
    declarations = [{"name": name, "description": "d", "parameters": {"type": "OBJECT", "properties": {"q": {"type": "STRING"}}}} for name in names]
    body = {"contents": [{"role": "user", "parts": [{"text": "search"}]}], "tools": [{"functionDeclarations": declarations}]}
    path = f"/v1beta/models/{model}:" + ("streamGenerateContent?alt=sse" if stream else "generateContent")
    async with aiohttp.ClientSession() as http, http.post(proxy.url + path, json=body) as response:
        assert response.status == 200, await response.text()
        raw = await response.read()
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")] if stream else [json.loads(raw)]
    called = [part["functionCall"]["name"] for chunk in chunks for part in chunk["candidates"][0]["content"]["parts"] if "functionCall" in part]
    assert sorted(called) == sorted(names)
    fake = {"chat": fake_openai, "claude": fake_anthropic, "resp": fake_responses}[model.split(":")[0]]
    sent = fake.last.json["tools"]
    sent_names = [tool.get("name") or tool["function"]["name"] for tool in sent]
    assert all(VALID_NAME.fullmatch(name) for name in sent_names) and len(set(sent_names)) == 3, sent_names


async def test_a_renamed_tools_history_goes_out_renamed(proxy: RunningProxy, fake_anthropic: FakeAnthropic) -> None:
    declaration = {"name": "github.search", "parameters": {"type": "OBJECT", "properties": {"q": {"type": "STRING"}}}}
    body = {
        "contents": [
            {"role": "user", "parts": [{"text": "search"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "github.search", "args": {"q": "llmproxy"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "github.search", "response": {"result": "3 hits"}}}]},
        ],
        "tools": [{"functionDeclarations": [declaration]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["github.search"]}},
    }
    status, answer = await post(proxy, "/v1beta/models/claude:claude-sonnet-4-5:generateContent", body)
    assert status == 200, answer
    sent = fake_anthropic.last.json
    assert [tool["name"] for tool in sent["tools"]] == ["github_search"]
    assert [b["name"] for m in sent["messages"] for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_use"] == ["github_search"]
    assert sent["tool_choice"] == {"type": "tool", "name": "github_search"}


async def test_a_chat_clients_tool_named_as_gemini_refuses_is_renamed_in_calls_and_results(proxy: RunningProxy, fake_gemini: FakeGemini) -> None:
    """Gemini wants a letter or "_" first, and its functionResponse names the tool: the
    result goes out under the same new name as the declaration and the call."""
    tool = {"type": "function", "function": {"name": "1password", "parameters": {"type": "object", "properties": {}}}}
    messages = [
        {"role": "user", "content": "get the secret"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "1password", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "1password", "content": "done"},
    ]
    status, answer = await post(proxy, "/v1/chat/completions", {"model": "gem:gemini-2.5-flash", "messages": messages, "tools": [tool]})
    assert status == 200, answer
    sent = fake_gemini.last.json
    assert [d["name"] for t in sent["tools"] for d in t["functionDeclarations"]] == ["_1password"]
    parts = [p for c in sent["contents"] for p in c["parts"]]
    assert [p["functionCall"]["name"] for p in parts if "functionCall" in p] == ["_1password"]
    assert [p["functionResponse"]["name"] for p in parts if "functionResponse" in p] == ["_1password"]


async def test_a_gemini_backends_error_details_never_carry_its_key(serve: Any, proxies: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEM_DETAILS_KEY", "AIzaSy-details-key-0123456789abcdef")
    quoted = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": "key AIzaSy-details-key-0123456789abcdef is over quota"},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "5s"},
    ]}}

    async def gemini(request: web.Request) -> web.Response:
        return web.json_response(quoted, status=429)

    config = {"backends": {"gem": {"type": "gemini", "base_url": await serve(gemini), "api_keys": ["${GEM_DETAILS_KEY}"]}}, "default_backend": "gem"}
    running = await proxies(config, [("gemini", llmproxy_gemini)])
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + "/v1beta/models/gemini-2.5-pro:generateContent", json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}) as response:
            text = await response.text()
    assert response.status == 429 and "AIzaSy-details-key" not in text
    assert "RetryInfo" in text and "over quota" in text
