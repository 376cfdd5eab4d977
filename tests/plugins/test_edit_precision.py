"""The ``edit_precision`` plugin: recognising failed edits in each agent's real tool-result
shape (Claude Code's Edit, Codex's apply_patch, Gemini CLI's replace), the sampling change,
the per-session count and its cheap path, then end to end through a real llmproxy with the
official SDKs against fake upstreams: after a failed Edit the next ``calls`` requests of the
session reach the backend with the lowered temperature, and the one after with the client's
own again — streamed and not, same protocol and across protocols.

The Claude Code shapes (the Edit tool's definition, the ``<tool_use_error>`` result with
``is_error``, the session header and ``metadata.user_id``) follow captures of Claude Code 2.1.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import anthropic
import llmproxy_anthropic
import llmproxy_edit_precision
import llmproxy_gemini
import llmproxy_openai
import pytest
from google import genai
from google.genai import types as genai_types
from pydantic import ValidationError

from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from llmproxy.canonical import Request
from llmproxy.context import ProxyContext
from llmproxy.testing import RunningProxy, build_flow, plugin_context, start_proxy
from llmproxy_edit_precision import EditPrecisionSettings, failed_edit, newest_results_text, tune

BOUND = 10.0
CLIENT_KEY = "client-key-precision"
UPSTREAM_KEY = "sk-upstream-precision-77e1"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
SETTINGS = EditPrecisionSettings()

# -- Claude Code's shapes ----------------------------------------------------------------------

EDIT_TOOL = {
    "name": "Edit",
    "description": "Performs exact string replacement in a file.",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "file_path": {"description": "The absolute path to the file to modify", "type": "string"},
            "old_string": {"description": "The text to replace", "type": "string"},
            "new_string": {"description": "The text to replace it with (must be different from old_string)", "type": "string"},
            "replace_all": {"description": "Replace all occurrences of old_string (default false)", "default": False, "type": "boolean"},
        },
        "required": ["file_path", "old_string", "new_string"],
        "additionalProperties": False,
    },
}
BASH_TOOL = {"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
EDIT_FAILED = "<tool_use_error>String to replace not found in file.\nString: def greet(name):\n    print('hi')</tool_use_error>"


def edit_turns(n: int, error: str = EDIT_FAILED, tool: str = "Edit", thinking: bool = False) -> list[dict[str, Any]]:
    """A user request, then the model's Edit call and its failed result (the newest turn)."""
    call_id = f"toolu_01Edit{n:04d}"
    assistant: list[dict[str, Any]] = [{"type": "text", "text": "I'll fix the greeting."}]
    if thinking:
        assistant.insert(0, {"type": "thinking", "thinking": "The file has greet().", "signature": "EqQBCkgIBxABGAIqQJ" + "x" * 40})
    assistant.append({"type": "tool_use", "id": call_id, "name": tool,
                      "input": {"file_path": "/repo/app.py", "old_string": "def greet(name):\n    print('hi')", "new_string": "def greet(name):\n    print('hello')"}})
    return [
        {"role": "assistant", "content": assistant},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": error, "is_error": True}]},
    ]


def claude_body(turns: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-opus-4-8", "max_tokens": 1024, "tools": [BASH_TOOL, EDIT_TOOL],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "make greet say hello"}]}, *turns], **extra}


def decoded(body: dict[str, Any], frontend: str = "anthropic") -> Request:
    return build_flow(body, frontend).request


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("section, complaint", [({"patterns": [" "]}, "must not be empty"), ({"temperature": 3}, "temperature"), ({"calls": 0}, "calls"), ({"top_p": 0}, "top_p")])
def test_bad_settings_are_refused(section: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        EditPrecisionSettings.model_validate(section)


# -- recognising failed edits ----------------------------------------------------------------


def test_claude_code_failed_edit() -> None:
    assert failed_edit(decoded(claude_body(edit_turns(1))), SETTINGS) [:2] == ("Edit", "String to replace not found")
    not_unique = "<tool_use_error>Found 2 matches of the string to replace, but replace_all is false.</tool_use_error>"
    assert failed_edit(decoded(claude_body(edit_turns(1, not_unique))), SETTINGS) [:2] == ("Edit", "matches of the string to replace")


def test_only_the_newest_turn_counts() -> None:
    later = [{"role": "assistant", "content": [{"type": "text", "text": "Fixed it another way."}]}, {"role": "user", "content": "thanks, now run the tests"}]
    assert failed_edit(decoded(claude_body(edit_turns(1) + later)), SETTINGS) is None


def test_other_tools_and_successes_do_not_count() -> None:
    # a Bash command printing the same words is not a failed edit (Bash is not an edit tool)
    assert failed_edit(decoded(claude_body(edit_turns(1, "String to replace not found", tool="Bash"))), SETTINGS) is None
    assert failed_edit(decoded(claude_body(edit_turns(1, "The file /repo/app.py has been updated."))), SETTINGS) is None
    anything = EditPrecisionSettings(tools=[])
    assert failed_edit(decoded(claude_body(edit_turns(1, "String to replace not found", tool="Bash"))), anything) == ("Bash", "String to replace not found", "toolu_01Edit0001")


def test_codex_apply_patch_through_exec_command() -> None:
    body = {"model": "gpt-5-codex", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "rename foo"}]},
        {"type": "function_call", "call_id": "call_1", "name": "exec_command",
         "arguments": json.dumps({"cmd": "apply_patch <<'EOF'\n*** Begin Patch\n*** Update File: a.py\n@@\n-foo\n+bar\n*** End Patch\nEOF"})},
        {"type": "function_call_output", "call_id": "call_1",
         "output": "Chunk ID: 7b26fd\nWall time: 0.0000 seconds\nProcess exited with code 1\nOutput:\napply_patch verification failed: Failed to find expected lines in a.py:\nfoo\n"},
    ]}
    assert failed_edit(decoded(body, "openai_responses"), SETTINGS) == ("exec_command", "apply_patch verification failed", "call_1")


def test_codex_custom_apply_patch_tool() -> None:
    body = {"model": "gpt-5-codex", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "rename foo"}]},
        {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": "*** Begin Patch\n*** End Patch"},
        {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Failed to apply patch: Failed to find context 'def foo' in a.py"},
    ]}
    assert failed_edit(decoded(body, "openai_responses"), SETTINGS) == ("apply_patch", "Failed to apply patch", "call_2")


def test_gemini_cli_replace() -> None:
    body = {"model": "gemini-2.5-pro", "contents": [
        {"role": "user", "parts": [{"text": "make greet say hello"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "replace", "args": {"file_path": "/repo/app.py", "old_string": "x", "new_string": "y"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "replace", "response": {
            "error": "Failed to edit, 0 occurrences found for old_string (x). Original old_string was (x) in /repo/app.py. No edits made."}}}]},
    ]}
    assert failed_edit(decoded(body, "gemini"), SETTINGS)[:2] == ("replace", "0 occurrences found")


def test_newest_results_text_reads_only_the_newest_tool_results() -> None:
    text = newest_results_text(claude_body(edit_turns(1)))
    assert "string to replace not found" in text and "make greet say hello" not in text and "i'll fix" not in text
    assert newest_results_text(claude_body([])) == ""  # a user message, no tool result
    responses = {"input": [{"type": "message", "role": "user", "content": "old"}, {"type": "function_call", "call_id": "c", "name": "x", "arguments": "{}"},
                           {"type": "function_call_output", "call_id": "c", "output": "Failed to apply patch"}]}
    assert newest_results_text(responses) == "function_call_output\nc\nfailed to apply patch"
    chat = {"messages": [{"role": "assistant", "content": None, "tool_calls": []}, {"role": "tool", "tool_call_id": "c", "content": "0 Occurrences found"}]}
    assert "0 occurrences found" in newest_results_text(chat)
    gemini = {"contents": [{"role": "model", "parts": [{"text": "x"}]},
                           {"role": "user", "parts": [{"text": "NOT THIS"}, {"functionResponse": {"name": "replace", "response": {"error": "Could not"}}}]}]}
    assert newest_results_text(gemini) == "replace\ncould not"
    assert newest_results_text({"input": "Just A String"}) == ""
    assert newest_results_text({"prompt": "legacy"}) is None


def test_tune_lowers_and_never_raises() -> None:
    request = Request(model="m", params={"temperature": 1.0, "top_p": 0.95})
    assert tune(request, EditPrecisionSettings(temperature=0.2, top_p=0.5)) == {"temperature": {"from": 1.0, "to": 0.2}, "top_p": {"from": 0.95, "to": 0.5}}
    assert request.params == {"temperature": 0.2, "top_p": 0.5}
    request = Request(model="m", params={"temperature": 0.0})
    assert tune(request, EditPrecisionSettings(temperature=0.2)) == {}
    assert request.params == {"temperature": 0.0}  # top_p unset by default: untouched
    request = Request(model="m")
    tune(request, SETTINGS)
    assert request.params == {"temperature": 0.2}


# -- the session count, at the hook -------------------------------------------------------


def run(ctx: ProxyContext, body: dict[str, Any]) -> Any:
    flow = build_flow(body, "anthropic", context=ctx)
    flow.raw_body = json.dumps(body).encode()
    flow.client.headers = {"x-claude-code-session-id": "51f700a8-7e4b-4b67-8a9e-a6c562a29ed4"}
    llmproxy_edit_precision.request(flow)
    return flow


async def test_count_restore_side_calls_and_cheap_path() -> None:
    config = {"backends": {"oa": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}, "default_backend": "oa", "plugins": {"edit_precision": {"calls": 2}}}
    ctx = await plugin_context(config, plugins=[("openai", llmproxy_openai), ("edit_precision", llmproxy_edit_precision)], entry_points=False)
    history = edit_turns(1)
    flow = run(ctx, claude_body([]))
    assert not flow.request_decoded and ctx.sessions.all() == []  # nothing to look at: no decode, no session
    flow = run(ctx, claude_body(history))
    assert flow.request.params["temperature"] == 0.2 and [t["what"] for t in flow.trace] == ["failed edit seen", "lowered sampling"]
    side = run(ctx, {**claude_body(history), "tools": []})  # a side call: neither tuned nor counted
    assert "temperature" not in side.request.params
    more = history + [{"role": "assistant", "content": [{"type": "text", "text": "retrying"}]}, {"role": "user", "content": "go on"}]
    flow = run(ctx, claude_body(more))
    assert flow.request.params["temperature"] == 0.2 and flow.trace[-1]["calls_left"] == 0
    flow = run(ctx, claude_body(more))  # the old failure is still in the history: not decoded, not tuned
    assert not flow.request_decoded
    (session,) = ctx.sessions.all()
    assert session.data["edit_precision"]["remaining"] == 0 and session.data["edit_precision"]["tool"] == "Edit"
    flow = run(ctx, claude_body(more + edit_turns(2)))  # a new failure starts again
    assert flow.request.params["temperature"] == 0.2 and flow.trace[-1]["calls_left"] == 1


# -- end to end ------------------------------------------------------------------------------


SESSION = "03ed06d1-8b2b-4713-865e-78eaed431a6a"
CLAUDE_HEADERS = {"User-Agent": "claude-cli/2.1.197 (external, sdk-cli)", "X-Claude-Code-Session-Id": SESSION, "x-app": "cli"}
METADATA = {"user_id": json.dumps({"device_id": "c712c52f44c8ee2a7d443fcca446e12e3f567f3f8e6f8930b35f7fa6d521f656", "account_uuid": "", "session_id": SESSION})}


@pytest.fixture
async def proxy(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningProxy]:
    monkeypatch.setenv("PRECISION_UPSTREAM_KEY", UPSTREAM_KEY)
    keys = ["${PRECISION_UPSTREAM_KEY}"]
    config = {
        "proxy": {"drain_timeout": 0},
        "backends": {"an": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": keys},
                     "oa": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": keys},
                     "ge": {"type": "gemini", "base_url": fake_gemini.base_url, "api_keys": keys}},
        "default_backend": "an",
        "plugins": {"edit_precision": {"temperature": 0.1, "calls": 2}},
    }
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini), ("edit_precision", llmproxy_edit_precision)]
    running = await start_proxy(config, plugins=plugins, entry_points=False)
    yield running
    await running.stop()


async def ask(client: anthropic.AsyncAnthropic, stream: bool, model: str, messages: list[dict[str, Any]], thinking: str = "disabled") -> None:
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 1024, "tools": [BASH_TOOL, EDIT_TOOL], "messages": messages, "metadata": METADATA,
                              "extra_body": {"thinking": {"type": thinking}}}
    if stream:
        async with client.messages.stream(**kwargs) as events:
            await events.get_final_message()
    else:
        await client.messages.create(**kwargs)


def conversation(step: int, thinking: bool = False) -> list[dict[str, Any]]:
    """The conversation at ``step``: 0 before any edit, 1 right after the failed edit, then
    one more ordinary exchange per step (the failure stays in the history)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "make greet say hello"}]
    if step >= 1:
        messages += edit_turns(1, thinking=thinking)
    for i in range(2, step + 1):
        messages += [{"role": "assistant", "content": [{"type": "text", "text": f"attempt {i}"}]}, {"role": "user", "content": f"go on {i}"}]
    return messages


@STREAM
async def test_claude_code_failed_edit_lowers_then_restores(proxy: RunningProxy, fake_anthropic: FakeAnthropic, stream: bool) -> None:
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND, default_headers=CLAUDE_HEADERS)
    temperatures = []
    for step in range(5):
        await ask(client, stream, "claude-opus-4-8", conversation(step))
        temperatures.append(fake_anthropic.last.json.get("temperature"))
    await client.close()
    # before: the client's (none); the failure and the next call: lowered; then restored
    assert temperatures == [None, 0.1, 0.1, None, None]


@STREAM
async def test_claude_code_with_thinking_to_an_openai_backend(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, stream: bool) -> None:
    """Cross-protocol: Claude Code's adaptive thinking does not stop the change for an OpenAI
    Chat backend; the same request to an Anthropic backend is left alone (Anthropic refuses a
    temperature with thinking on)."""
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND, default_headers=CLAUDE_HEADERS)
    await ask(client, stream, "oa:gpt-4.1", conversation(1, thinking=True), thinking="adaptive")
    assert fake_openai.last.json["temperature"] == 0.1
    await ask(client, stream, "claude-opus-4-8", conversation(2, thinking=True), thinking="adaptive")
    assert "temperature" not in fake_anthropic.last.json and fake_anthropic.last.json["thinking"] == {"type": "adaptive"}
    await ask(client, stream, "oa:gpt-4.1", conversation(3, thinking=True), thinking="adaptive")  # counted: restored
    assert "temperature" not in fake_openai.last.json
    await client.close()


@STREAM
async def test_gemini_cli_failed_replace(proxy: RunningProxy, fake_gemini: FakeGemini, stream: bool) -> None:
    client = genai.Client(api_key=CLIENT_KEY, http_options=genai_types.HttpOptions(base_url=proxy.url, api_version="v1beta", timeout=int(BOUND * 1000),
                                                                                   headers={"x-session-id": "gemini-cli-run-1"}))
    replace = genai_types.Tool(function_declarations=[genai_types.FunctionDeclaration(
        name="replace", description="replace text in a file",
        parameters_json_schema={"type": "object", "properties": {"file_path": {"type": "string"}, "old_string": {"type": "string"}, "new_string": {"type": "string"}}})])
    contents = [
        genai_types.Content(role="user", parts=[genai_types.Part(text="make greet say hello")]),
        genai_types.Content(role="model", parts=[genai_types.Part(function_call=genai_types.FunctionCall(name="replace", args={"file_path": "/repo/app.py", "old_string": "x", "new_string": "y"}))]),
        genai_types.Content(role="user", parts=[genai_types.Part(function_response=genai_types.FunctionResponse(name="replace", response={
            "error": "Failed to edit, could not find the string to replace."}))]),
    ]
    config = genai_types.GenerateContentConfig(tools=[replace], temperature=1.0, top_p=0.95)
    if stream:
        async for _ in await client.aio.models.generate_content_stream(model="ge:gemini-2.5-pro", contents=contents, config=config):
            pass
    else:
        await client.aio.models.generate_content(model="ge:gemini-2.5-pro", contents=contents, config=config)
    await client.aio.aclose()
    client.close()
    generation = fake_gemini.last.json["generationConfig"]
    assert generation["temperature"] == 0.1 and generation["topP"] == 0.95  # top_p is not configured: the client's


async def test_reasoning_models_are_excluded_but_counted() -> None:
    config = {"backends": {"oa": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}, "default_backend": "oa", "plugins": {"edit_precision": {"calls": 2}}}
    ctx = await plugin_context(config, plugins=[("openai", llmproxy_openai), ("edit_precision", llmproxy_edit_precision)], entry_points=False)
    flow = run(ctx, claude_body(edit_turns(1), model="gpt-5"))
    assert "temperature" not in flow.request.params  # gpt-5 refuses any temperature but 1
    assert flow.trace[-1] == {**flow.trace[-1], "what": "model excluded: sampling left alone", "calls_left": 1}


async def test_a_retried_request_is_not_a_new_failure() -> None:
    config = {"backends": {"oa": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}, "default_backend": "oa", "plugins": {"edit_precision": {"calls": 2}}}
    ctx = await plugin_context(config, plugins=[("openai", llmproxy_openai), ("edit_precision", llmproxy_edit_precision)], entry_points=False)
    body = claude_body(edit_turns(1))
    assert run(ctx, body).trace[-1]["calls_left"] == 1
    retry = run(ctx, body)  # the client sends the same request again (say, after a timeout)
    assert [t["what"] for t in retry.trace] == ["lowered sampling"] and retry.trace[-1]["calls_left"] == 0
    assert "temperature" not in run(ctx, body).request.params  # the count is spent
    again = run(ctx, claude_body(edit_turns(1) + [{"role": "assistant", "content": "retrying"}, {"role": "user", "content": "go"}] + edit_turns(2)))
    assert again.trace[0]["what"] == "failed edit seen"
