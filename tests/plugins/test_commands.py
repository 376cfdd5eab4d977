"""The ``commands`` plugin: the parser on its own, then end to end through a real llmproxy on
a real socket, driven by the official SDKs (OpenAI Chat, OpenAI Responses, Anthropic; see
tests/clients.py) against two fake upstreams — ``oa`` (OpenAI Chat, the default backend) and
``an`` (Anthropic) — so a request that reaches the wrong backend, or any backend at all when
llmproxy should have answered, shows in what the fakes received.

Sessions are identified from what clients really send; the shapes used here (headers and
``metadata.user_id``) are copied from captures of Claude Code 2.1 and Codex CLI 0.169.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import anthropic
import llmproxy_anthropic
import llmproxy_commands
import llmproxy_openai
import openai
import pytest

from clients import CLIENTS, Client
from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import DEFAULT_TEXT
from fakes.openai_upstream import FakeOpenAI
from llmproxy import hookimpl
from llmproxy.commands import CommandCall, split_arguments
from llmproxy.config import parse_config
from llmproxy.context import ProxyContext
from llmproxy.manager import PluginHost
from llmproxy.testing import RunningProxy, build_flow, start_proxy
from llmproxy_commands import CommandsSettings, find_commands, remove_commands

BOUND = 10.0
UPSTREAM_KEY = "sk-upstream-commands-91c2"
MARKER = "[llmproxy] "
SDK_CLIENTS = ("chat", "anthropic", "responses")
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
ALL_CLIENTS = pytest.mark.parametrize("kind", SDK_CLIENTS)

# Real shapes: Claude Code 2.1.197 sends both the header and metadata.user_id (a JSON string).
CLAUDE_SESSION = "51f700a8-7e4b-4b67-8a9e-a6c562a29ed4"
CLAUDE_HEADERS = {"User-Agent": "claude-cli/2.1.197 (external, sdk-cli)", "X-Claude-Code-Session-Id": CLAUDE_SESSION, "x-app": "cli",
                  "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}


def claude_metadata(session: str) -> dict[str, str]:
    return {"user_id": json.dumps({"device_id": "c712c52f44c8ee2a7d443fcca446e12e3f567f3f8e6f8930b35f7fa6d521f656", "account_uuid": "", "session_id": session})}


# Codex CLI 0.169 (Responses): a session-id header, and the same id as prompt_cache_key.
CODEX_SESSION = "01a2006e-e273-7b12-b2da-a1276908dabe"
CODEX_HEADERS = {"User-Agent": "codex_exec/0.169.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.169.0)", "originator": "codex_exec",
                 "session-id": CODEX_SESSION, "thread-id": CODEX_SESSION, "x-client-request-id": CODEX_SESSION}


# -- the parser ------------------------------------------------------------------------------


def names(text: str, prefix: str = "!/", tags: tuple[str, ...] = ()) -> list[tuple[str, str | None]]:
    return [(c.name, c.args) for c in find_commands(text, prefix, tags)]


def test_parser_finds_commands_alone_with_arguments_and_mid_text() -> None:
    assert names("!/status") == [("status", None)]
    assert names("!/model(gpt-5-mini)") == [("model", "gpt-5-mini")]
    assert names("!/model(openrouter:qwen/qwen3-coder)") == [("model", "openrouter:qwen/qwen3-coder")]
    assert names("please !/oneoff(an:claude-sonnet-4-5) fix the bug") == [("oneoff", "an:claude-sonnet-4-5")]
    assert names("!/backend(openai) !/model(gpt-5) and !/set(temperature=0.2, top_p=0.9)") == [
        ("backend", "openai"), ("model", "gpt-5"), ("set", "temperature=0.2, top_p=0.9")]
    assert names("line one\n!/help\nline three") == [("help", None)]
    assert names("!/STATUS, then go") == [("status", None)]  # names ignore case
    assert names("!/help.") == [("help", None)]
    assert names(" !/status") == [("status", None)]  # how to type one in a TUI where a leading ! means shell


def test_parser_leaves_bad_syntax_as_text() -> None:
    assert names("!/model(gpt-5") == []  # never closed
    assert names("!/model(gpt\n-5)") == []  # arguments end on their line
    assert names("a!/status") == []  # glued to a word
    assert names("\\!/status") == []  # escaped
    assert names("`!/status`") == []  # quoted as code
    assert names("!/usr/bin/env") == []  # a path, not a command
    assert names("!/ status") == [] and names("!/(x)") == [] and names("!/9lives") == []
    assert names("no commands here") == [] and names("") == []
    # A broken one does not hide a good one after it.
    assert names("!/model(x !/status") == [("status", None)]


def test_parser_quoted_and_escaped_arguments() -> None:
    assert names('!/set(stop=")") rest') == [("set", 'stop=")"')]
    assert names("!/set(stop=',', seed=1)") == [("set", "stop=',', seed=1")]
    assert names("!/set(note=a\\)b) x") == [("set", "note=a\\)b")]
    assert names("!/model(fn(x)) y") == [("model", "fn(x)")]  # nested parentheses balance
    assert names("!/set(note=it's fine)") == [("set", "note=it's fine")]  # an apostrophe mid-word is no quote
    assert names('!/set(stop="never closed)') == []
    call = CommandCall("set", 'stop=", ", seed = 7, note=a\\,b, empty=""', None, None)  # type: ignore[arg-type]
    assert call.pairs() == {"stop": ", ", "seed": "7", "note": "a,b", "empty": ""}
    assert split_arguments(' a , "b,c" ,, d\\)') == ["a", "b,c", "d)"]
    with pytest.raises(ValueError, match="key=value"):
        CommandCall("set", "temperature", None, None).pairs()  # type: ignore[arg-type]


def test_parser_prefix_and_ignored_tags() -> None:
    assert names("##model(x) and !/status", prefix="##") == [("model", "x")]
    assert names("%%help", prefix="%%") == [("help", None)]
    reminder = "<system-reminder>\nthe docs say !/backend(x)\n</system-reminder>\n!/status"
    assert names(reminder, tags=("system-reminder",)) == [("status", None)]
    assert names(reminder) == [("backend", "x"), ("status", None)]
    with pytest.raises(ValueError):
        CommandsSettings(prefix="model")
    with pytest.raises(ValueError):
        CommandsSettings(prefix="!(")
    with pytest.raises(ValueError):
        CommandsSettings(ignore_tags=["<system-reminder>"])


def test_remove_commands_keeps_the_rest_of_the_text() -> None:
    def strip(text: str) -> str:
        return remove_commands(text, find_commands(text))

    assert strip("!/oneoff(a:b) fix the bug") == "fix the bug"
    assert strip("please !/model(x) fix it") == "please fix it"
    assert strip("fix it !/model(x)") == "fix it"
    assert strip("!/a !/b") == ""
    assert strip("keep  spacing\n!/status\nhere") == "keep  spacing\n\nhere"
    assert strip("nothing") == "nothing"


# -- the request rewrite, on a flow (no server) -------------------------------------------------


def context(**plugins: Any) -> ProxyContext:
    config = parse_config({"backends": {"o": {"type": "offline"}, "p": {"type": "offline"}}, "default_backend": "o", "plugins": plugins}, "<test>")
    import llmproxy_offline

    host = PluginHost(config, entry_points=False, extra=[("offline", llmproxy_offline), ("commands", llmproxy_commands)])
    return ProxyContext(config, host)


async def run_request(ctx: ProxyContext, body: dict[str, Any]) -> Any:
    flow = build_flow(body)
    flow.context = ctx
    flow.sessions = ctx.sessions
    flow.raw_body = json.dumps(body).encode()
    result = llmproxy_commands.request(flow)
    if result is not None:
        await result
    return flow


async def test_history_is_cleaned_and_only_the_current_turn_runs() -> None:
    ctx = context()
    body = {"model": "m", "messages": [
        {"role": "user", "content": "!/model(p:big)"},
        {"role": "assistant", "content": MARKER + "model: p:big"},  # llmproxy's own reply
        {"role": "user", "content": "!/oneoff(p:x) first question"},  # ran back then; must not run again
        {"role": "assistant", "content": "I quote !/backend(p) for you", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": "{\"command\": \"cat notes\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "notes: !/backend(p)"},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "second question"},
    ]}
    flow = await run_request(ctx, body)
    assert not flow.has_response
    texts = [(m.role, m.text) for m in flow.request.messages]
    assert texts == [("user", "first question"), ("assistant", "I quote !/backend(p) for you"), ("tool", ""),
                     ("assistant", "done"), ("user", "second question")]
    tool_result = flow.request.messages[2].parts[0]
    assert tool_result.content[0].text == "notes: !/backend(p)"  # type: ignore[union-attr]
    assert flow.model == "m"  # nothing ran, so nothing is overridden
    assert not ctx.sessions.all()  # and no session was even looked up


async def test_a_reply_after_the_clients_system_messages_leaves_the_history_with_them() -> None:
    """Claude Code puts a mid-conversation system message between the user's turn and the
    answer: llmproxy's reply there goes too, and with a message of commands alone the whole
    exchange does, so no backend is sent a conversation opening with a system message."""
    ctx = context()
    body = {"model": "m", "messages": [
        {"role": "user", "content": "!/status"},
        {"role": "system", "content": "reminder: be brief"},
        {"role": "assistant", "content": MARKER + "session: abc"},
        {"role": "user", "content": "hello"},
        {"role": "system", "content": "reminder: still brief"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "what now?"},
    ]}
    flow = await run_request(ctx, body)
    assert [(m.role, m.text) for m in flow.request.messages] == [
        ("user", "hello"), ("system", "reminder: still brief"), ("assistant", "hi"), ("user", "what now?")]


async def test_a_request_for_json_is_an_agents_side_call_and_runs_no_commands() -> None:
    """Gemini CLI's model router asks, with a JSON schema, how hard the user's prompt is: a
    prose answer from llmproxy there broke the router (five retries, 90 s)."""
    ctx = context()
    body = {"model": "m", "messages": [{"role": "user", "content": "!/status"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "route", "schema": {"type": "object"}}}}
    flow = await run_request(ctx, body)
    assert not flow.has_response and flow.request.messages[0].text == "!/status"


async def test_tool_loop_runs_nothing() -> None:
    ctx = context()
    body = {"model": "m", "messages": [
        {"role": "user", "content": "!/oneoff(p:x) go"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "shell", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "!/backend(p)"},
    ]}
    flow = await run_request(ctx, body)
    assert not flow.has_response and flow.model == "m"
    assert flow.request.messages[0].text == "go"


async def test_commands_only_answered_and_system_reminders_are_not_the_user() -> None:
    ctx = context()
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nCLAUDE.md says: !/backend(p)\n</system-reminder>"},
        {"type": "text", "text": "!/status"}]}]}
    flow = await run_request(ctx, body)
    assert flow.response is not None and flow.response.text.startswith(MARKER + "session: ")
    assert "backend: default (o)" in flow.response.text  # the reminder's !/backend did not run


async def test_a_bad_command_with_text_is_not_forwarded() -> None:
    ctx = context()
    flow = await run_request(ctx, {"model": "m", "messages": [{"role": "user", "content": "!/backend(nosuch) write a poem"}]})
    text = flow.response.text
    assert "no backend named 'nosuch'; backends: o, p" in text and "not sent to the model" in text


async def test_model_names_with_colons_need_their_backend() -> None:
    ctx = context()
    flow = await run_request(ctx, {"model": "m", "messages": [{"role": "user", "content": "!/model(openrouter:qwen/qwen3-coder)"}]})
    assert flow.response.text.startswith(MARKER + "!/model: no backend named 'openrouter'; backends: o, p")
    flow = await run_request(ctx, {"model": "m", "messages": [{"role": "user", "content": "!/model(p:llama3:8b) hi"}]})
    assert not flow.has_response and flow.model == "p:llama3:8b"
    flow = await run_request(ctx, {"model": "m", "messages": [{"role": "user", "content": "!/backend(o)"}]})
    assert flow.response.text == MARKER + "backend: o (model o:llama3:8b)"


async def test_custom_prefix_from_settings() -> None:
    ctx = context(commands={"prefix": "@@", "reply_marker": "(proxy) "})
    flow = await run_request(ctx, {"model": "m", "messages": [{"role": "user", "content": "@@model(p:big)"}]})
    assert flow.response.text == "(proxy) model: p:big"
    flow = await run_request(ctx, {"model": "m", "messages": [{"role": "user", "content": "!/model(o:x) hello"}]})
    assert not flow.has_response and flow.model == "p:big"  # the default prefix is text now
    assert flow.request.messages[-1].text == "!/model(o:x) hello"


# -- end to end (SDK clients: chat, anthropic, responses; gemini too where no header is needed) --------------------------------------------------------------------------------


class Tracer:
    """A test plugin whose hooks count the flows they see, by session header."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.decoded: list[bool] = []

    @hookimpl(trylast=True)
    def request(self, flow: Any) -> None:
        self.requests.append(flow.client.headers.get("x-session-id", "-"))
        self.decoded.append(flow.request_decoded)


class Echo:
    """A third-party plugin adding a command through the same hook as the built-ins."""

    @hookimpl
    def register_commands(self, register: Any) -> None:
        async def echo(call: CommandCall) -> str:
            return "echo: " + " | ".join(call.arguments())

        register("echo", echo, "echo(text, …) — say it back")

        def broken(call: CommandCall) -> str:
            raise RuntimeError("a bug in a third-party handler")

        register("broken", broken, "broken — always fails")


@dataclass
class Rig:
    proxy: RunningProxy
    oa: FakeOpenAI
    an: FakeAnthropic
    tracer: Tracer
    clients: list[Any] = field(default_factory=list)

    def client(self, kind: str, headers: dict[str, str] | None = None) -> Client:
        client = CLIENTS[kind](self.proxy.url)
        if headers:
            client.sdk = client.sdk.with_options(default_headers=headers)  # type: ignore[attr-defined]
        self.clients.append(client)
        return client

    @property
    def upstream(self) -> list[Any]:
        return [*self.oa.requests, *self.an.requests]


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMD_UPSTREAM_KEY", UPSTREAM_KEY)


@pytest.fixture
async def rig(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> AsyncIterator[Rig]:
    config = {
        "proxy": {"drain_timeout": 0},
        "backends": {
            "oa": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${CMD_UPSTREAM_KEY}"]},
            "an": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${CMD_UPSTREAM_KEY}"]},
        },
        "default_backend": "oa",
    }
    tracer = Tracer()
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("commands", llmproxy_commands), ("tracer", tracer), ("echo", Echo())]
    proxy = await start_proxy(config, plugins=plugins, entry_points=False)
    rig = Rig(proxy, fake_openai, fake_anthropic, tracer)
    try:
        yield rig
    finally:
        for client in rig.clients:
            await client.close()
        await proxy.stop()


def user_texts(received: Any) -> list[str]:
    """The user-authored text of each user turn the backend received (either protocol)."""
    out = []
    for message in received.json["messages"]:
        if message["role"] != "user":
            continue
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            texts = [b.get("text", "") for b in content if b.get("type") == "text"]
            if texts:
                out.append("".join(texts))
    return out


@pytest.mark.parametrize("kind", [*SDK_CLIENTS, "gemini"])
@STREAM
async def test_commands_only_message_is_answered_without_a_backend(rig: Rig, kind: str, stream: bool) -> None:
    client = rig.client(kind)
    reply = await client.ask("gpt-4o-mini", stream, client.user("!/model(an:claude-sonnet-4-5) !/set(temperature=0.1)"))
    assert reply.text == MARKER + "model: an:claude-sonnet-4-5\ntemperature: 0.1"
    assert reply.stop == "end_turn"
    assert rig.upstream == []  # no backend was called
    reply = await client.ask("gpt-4o-mini", stream, client.user("!/help"))
    assert reply.text.startswith(MARKER + "commands:")
    for name in ("backend", "model", "oneoff", "set", "unset", "status", "help"):
        assert f"\n!/{name}" in reply.text
    assert "!/echo(text, …) — say it back [plugin echo]" in reply.text  # another plugin's command
    assert rig.upstream == []


@ALL_CLIENTS
@STREAM
async def test_model_then_message_goes_to_the_chosen_backend(rig: Rig, kind: str, stream: bool) -> None:
    client = rig.client(kind)
    history = client.user("!/model(an:claude-sonnet-4-5)")
    first = await client.ask("gpt-4o-mini", stream, history)
    assert first.text == MARKER + "model: an:claude-sonnet-4-5"
    history += first.turn + client.user("what is up?")
    reply = await client.ask("gpt-4o-mini", stream, history)
    assert reply.text == DEFAULT_TEXT
    assert rig.oa.requests == [] and len(rig.an.requests) == 1
    sent = rig.an.last
    assert sent.json["model"] == "claude-sonnet-4-5"
    # The command exchange never reaches the model: neither the command nor llmproxy's reply.
    assert user_texts(sent) == ["what is up?"]
    assert [m["role"] for m in sent.json["messages"]] == ["user"]


@pytest.mark.parametrize("kind", ["chat", "anthropic"])
@STREAM
async def test_oneoff_affects_only_the_next_request(rig: Rig, kind: str, stream: bool) -> None:
    client = rig.client(kind)
    history = client.user("!/oneoff(an:claude-haiku-4-5)")
    reply = await client.ask("gpt-4o-mini", stream, history)
    assert reply.text == MARKER + "oneoff: the next request goes to an:claude-haiku-4-5"
    history += reply.turn + client.user("one")
    reply = await client.ask("gpt-4o-mini", stream, history)
    history += reply.turn + client.user("two")
    await client.ask("gpt-4o-mini", stream, history)
    assert [r.model for r in rig.an.requests] == ["claude-haiku-4-5"]
    assert [r.model for r in rig.oa.requests] == ["gpt-4o-mini"]
    assert user_texts(rig.oa.last) == ["one", "two"]  # the oneoff's own message is gone too


@pytest.mark.parametrize("kind", ["chat", "anthropic"])
async def test_oneoff_with_text_applies_to_this_request(rig: Rig, kind: str) -> None:
    client = rig.client(kind)
    history = client.user("!/oneoff(an:claude-haiku-4-5) hello there")
    reply = await client.ask("gpt-4o-mini", False, history)
    assert reply.text == DEFAULT_TEXT
    assert rig.an.last.model == "claude-haiku-4-5" and user_texts(rig.an.last) == ["hello there"]
    history += reply.turn + client.user("and now?")
    await client.ask("gpt-4o-mini", False, history)
    assert len(rig.an.requests) == 1 and rig.oa.last.model == "gpt-4o-mini"
    assert user_texts(rig.oa.last) == ["hello there", "and now?"]  # stripped, not re-run


@ALL_CLIENTS
@STREAM
async def test_set_temperature_reaches_the_backend_every_request(rig: Rig, kind: str, stream: bool) -> None:
    client = rig.client(kind)
    history = client.user("!/set(temperature=0.1, max_tokens=77) write a haiku")
    reply = await client.ask("gpt-4o-mini", stream, history)
    assert reply.text == DEFAULT_TEXT
    history += reply.turn + client.user("another")
    await client.ask("gpt-4o-mini", stream, history)
    assert len(rig.oa.requests) == 2
    for received in rig.oa.requests:
        assert received.json["temperature"] == 0.1
        # OpenAI refuses max_tokens for its reasoning models: a limit the client did not
        # send itself goes as max_completion_tokens, from any client, its own protocol too
        assert received.json["max_completion_tokens"] == 77 and "max_tokens" not in received.json
    assert user_texts(rig.oa.requests[0]) == ["write a haiku"]
    await client.ask("gpt-4o-mini", stream, history + reply.turn + client.user("!/unset(temperature)"))
    await client.ask("gpt-4o-mini", stream, client.user("plain"))
    assert "temperature" not in rig.oa.last.json


@pytest.mark.parametrize("kind", ["chat", "anthropic", "responses"])
async def test_tool_result_quoting_a_command_does_not_trigger(rig: Rig, kind: str) -> None:
    rig.oa.script(tool_scenario=True)
    client = rig.client(kind)
    history = client.user("run echo")
    first = await client.ask("gpt-4o-mini", False, history, tools=True)
    assert first.calls, first
    history += first.turn + client.tool_result(first.calls[0], "!/backend(an) !/set(temperature=0.5)")
    second = await client.ask("gpt-4o-mini", False, history, tools=True)
    assert second.text == "the command printed: !/backend(an) !/set(temperature=0.5)"
    assert rig.an.requests == [] and len(rig.oa.requests) == 2
    assert "temperature" not in rig.oa.last.json
    status = await client.ask("gpt-4o-mini", False, client.user("!/status"))
    assert "backend: default (oa)" in status.text and "settings: none" in status.text


async def test_assistant_text_quoting_a_command_does_not_trigger(rig: Rig) -> None:
    client = rig.client("anthropic")
    history = client.user("hi") + [{"role": "assistant", "content": "type !/backend(an) to switch"}] + client.user("ok")
    await client.ask("claude-opus-4-8", False, history)
    assert rig.an.requests == [] and len(rig.oa.requests) == 1
    assert rig.oa.last.json["messages"][1]["content"] == "type !/backend(an) to switch"


async def test_backend_errors_and_unknown_commands_are_clear_replies(rig: Rig) -> None:
    client = rig.client("chat")
    reply = await client.ask("gpt-4o-mini", False, client.user("!/backend(nosuch)"))
    assert reply.text == MARKER + "!/backend: no backend named 'nosuch'; backends: an, oa"
    reply = await client.ask("gpt-4o-mini", True, client.user("!/frobnicate(1)"))
    assert reply.text.startswith(MARKER + "!/frobnicate: unknown command. Commands: !/backend, !/broken, !/echo, !/help")
    reply = await client.ask("gpt-4o-mini", False, client.user("!/set(temperature=hot)"))
    assert "temperature takes a number from 0 to 2, not 'hot'" in reply.text
    reply = await client.ask("gpt-4o-mini", False, client.user("!/set(colour=blue)"))
    assert "unknown setting 'colour'; settable: backend, model, temperature" in reply.text
    reply = await client.ask("gpt-4o-mini", False, client.user("!/oneoff() tell me"))
    assert "not sent to the model" in reply.text
    reply = await client.ask("gpt-4o-mini", False, client.user("!/echo(a, \"b, c\")"))
    assert reply.text == MARKER + "echo: a | b, c"
    reply = await client.ask("gpt-4o-mini", True, client.user("!/broken then text"))
    assert reply.text.startswith(MARKER + "!/broken: failed in plugin 'echo' (RuntimeError); see the proxy log, flow ")
    assert "not sent to the model" in reply.text
    assert rig.upstream == []


async def test_backend_then_bare_models_go_there(rig: Rig) -> None:
    client = rig.client("chat")
    history = client.user("!/backend(an)")
    reply = await client.ask("gpt-4o-mini", False, history)
    assert reply.text.startswith(MARKER + "backend: an")
    await client.ask("claude-opus-4-8", True, history + reply.turn + client.user("hi"))
    assert rig.an.last.model == "claude-opus-4-8" and rig.oa.requests == []
    await client.ask("oa:gpt-5", False, client.user("explicit"))  # an explicit backend: is the client's choice
    assert rig.oa.last.model == "gpt-5"


async def test_plain_requests_are_not_decoded(rig: Rig) -> None:
    client = rig.client("chat")
    await client.ask("gpt-4o-mini", False, client.user("hello"))
    await client.ask("gpt-4o-mini", True, client.user("hello"))
    assert rig.tracer.decoded == [False, False]
    assert rig.proxy.context.sessions.all() == []  # nobody looked a session up either


async def test_sessions_are_separated_by_claude_code_session(rig: Rig) -> None:
    a = rig.client("anthropic", {**CLAUDE_HEADERS, "X-Claude-Code-Session-Id": "session-a"})
    b = rig.client("anthropic", {**CLAUDE_HEADERS, "X-Claude-Code-Session-Id": "session-b"})
    reply = await a.ask("claude-opus-4-8", True, a.user("!/model(an:claude-sonnet-4-5)"))
    assert reply.text == MARKER + "model: an:claude-sonnet-4-5"
    await a.ask("claude-opus-4-8", True, a.user("from a"))
    await b.ask("claude-opus-4-8", True, b.user("from b"))
    assert [(r.model, user_texts(r)) for r in rig.an.requests] == [("claude-sonnet-4-5", ["from a"])]
    assert [(r.model, user_texts(r)) for r in rig.oa.requests] == [("claude-opus-4-8", ["from b"])]
    status = await a.ask("claude-opus-4-8", False, a.user("!/status"))
    assert "session: claude-code:session-a (identified by claude-code;" in status.text


async def test_claude_code_metadata_user_id_identifies_the_session(rig: Rig, http: aiohttp.ClientSession) -> None:
    # Without the header, Claude Code's metadata.user_id carries the session.
    headers = {k: v for k, v in CLAUDE_HEADERS.items() if k != "X-Claude-Code-Session-Id"}
    body = {"model": "claude-opus-4-8", "max_tokens": 64000, "metadata": claude_metadata("meta-session"), "stream": False,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, you can use the following context:\n"
                                         "# currentDate\nToday's date is 2026-11-21.\n</system-reminder>\n"},
                {"type": "text", "text": "!/status", "cache_control": {"type": "ephemeral"}}]}]}
    async with http.post(rig.proxy.url + "/v1/messages?beta=true", json=body, headers=headers) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["type"] == "message" and answer["content"][0]["text"].startswith(MARKER + "session: claude-code:meta-session (identified by claude-code;")
    assert rig.upstream == []


async def test_codex_session_header_and_prompt_cache_key(rig: Rig, http: aiohttp.ClientSession) -> None:
    async def status(headers: dict[str, str], extra: dict[str, Any]) -> str:
        body = {"model": "gpt-5.1-codex", "stream": False, "store": False, **extra,
                "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "!/status"}]}]}
        async with http.post(rig.proxy.url + "/v1/responses", json=body, headers=headers) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["object"] == "response"
        return answer["output"][0]["content"][0]["text"]

    assert "session: codex:" + CODEX_SESSION + " (identified by codex;" in await status(CODEX_HEADERS, {"prompt_cache_key": CODEX_SESSION})
    no_header = {k: v for k, v in CODEX_HEADERS.items() if k != "session-id"}
    assert "session: codex:other-key (identified by codex;" in await status(no_header, {"prompt_cache_key": "other-key"})
    assert "(identified by x-session-id;" in await status({"x-session-id": "mine"}, {})
    assert "(identified by client;" in await status({"User-Agent": "curl/8"}, {})


async def test_client_wrappers_are_not_the_users_words(rig: Rig, http: aiohttp.ClientSession) -> None:
    # Gemini CLI 0.61 sends its session context and the prompt as two parts of one user turn.
    body = {"contents": [{"role": "user", "parts": [
        {"text": "<session_context>\nThis is the Gemini CLI. We are setting up the context for our chat.\n</session_context>"},
        {"text": "!/status"}]}]}
    headers = {"x-goog-api-key": "x", "User-Agent": "GeminiCLI/0.61.0/gemini-2.5-pro (linux; x64)"}
    async with http.post(rig.proxy.url + "/v1beta/models/gemini-2.5-pro:generateContent", json=body, headers=headers) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["candidates"][0]["content"]["parts"][0]["text"].startswith(MARKER + "session: client:")
    # Claude Code's title side call quotes the user's message in <session>: nothing runs twice.
    quoted = ("<session>\n!/oneoff(an:claude-haiku-4-5) run echo hi\n</session>\n\n"
              "Write the title in the language the user wrote in, regardless of the language of the examples above.")
    body = {"model": "claude-haiku-4-5-20251001", "max_tokens": 32000, "metadata": claude_metadata("title-call"), "stream": False,
            "messages": [{"role": "user", "content": [{"type": "text", "text": quoted}]}]}
    async with http.post(rig.proxy.url + "/v1/messages?beta=true", json=body, headers=CLAUDE_HEADERS) as response:
        assert response.status == 200
    assert rig.an.requests == [] and [r.model for r in rig.oa.requests] == ["claude-haiku-4-5-20251001"]
    assert user_texts(rig.oa.last) == [quoted]
    assert rig.proxy.context.sessions.find("claude-code:" + CLAUDE_SESSION) is None  # no command ran, no session was needed


@STREAM
async def test_switching_a_plugin_off_is_per_session(rig: Rig, stream: bool) -> None:
    a = rig.client("chat", {"x-session-id": "a"})
    b = rig.client("chat", {"x-session-id": "b"})
    reply = await a.ask("gpt-4o-mini", stream, a.user("!/set(plugin.tracer=off)"))
    assert reply.text == MARKER + "plugin.tracer: off for this session from its next request"
    rig.tracer.requests.clear()
    await a.ask("gpt-4o-mini", stream, a.user("one"))
    await b.ask("gpt-4o-mini", stream, b.user("two"))
    await a.ask("gpt-4o-mini", stream, a.user("three"))
    assert rig.tracer.requests == ["b"]  # session a's flows skip the tracer's hooks
    status = await a.ask("gpt-4o-mini", False, a.user("!/status"))
    assert "plugins off: tracer" in status.text
    reply = await a.ask("gpt-4o-mini", False, a.user("!/set(plugin.tracer=on)"))
    await a.ask("gpt-4o-mini", stream, a.user("four"))
    assert rig.tracer.requests[-1] == "a"
    reply = await a.ask("gpt-4o-mini", False, a.user("!/set(plugin.commands=off)"))
    assert "commands cannot switch itself off" in reply.text
    reply = await a.ask("gpt-4o-mini", False, a.user("!/set(plugin.nosuch=off)"))
    assert "no plugin named 'nosuch'" in reply.text


async def test_status_shows_what_is_in_force(rig: Rig) -> None:
    client = rig.client("anthropic", {"x-session-id": "status-test"})
    history = client.user("!/model(gpt-5) !/oneoff(an:claude-haiku-4-5) !/set(temperature=0.3, stop=\"END, now\", reasoning_effort=low)")
    reply = await client.ask("claude-opus-4-8", False, history)
    assert reply.text == MARKER + "model: gpt-5\noneoff: the next request goes to an:claude-haiku-4-5\ntemperature: 0.3\nstop: END, now\nreasoning_effort: low"
    status = (await client.ask("claude-opus-4-8", False, client.user("!/status"))).text
    assert "session: x-session-id:status-test (identified by x-session-id;" in status
    assert "backend: default (oa)" in status and "model: gpt-5" in status and "oneoff: an:claude-haiku-4-5" in status
    assert "settings: temperature=0.3, stop=['END, now'], reasoning_effort='low'" in status
    await client.ask("claude-opus-4-8", False, client.user("go"))
    assert rig.an.last.model == "claude-haiku-4-5" and rig.an.last.json["stop_sequences"] == ["END, now"]
    await client.ask("claude-opus-4-8", False, client.user("go again"))
    assert rig.oa.last.model == "gpt-5" and rig.oa.last.json["reasoning_effort"] == "low"
    reply = await client.ask("claude-opus-4-8", False, client.user("!/unset(*)"))
    await client.ask("claude-opus-4-8", False, client.user("plain"))
    assert rig.oa.last.model == "claude-opus-4-8" and "temperature" not in rig.oa.last.json


async def test_sessions_expire_after_the_ttl(fake_openai: FakeOpenAI) -> None:
    config = {"proxy": {"drain_timeout": 0, "session_ttl": 0.001},
              "backends": {"oa": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${CMD_UPSTREAM_KEY}"]}},
              "default_backend": "oa"}
    proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("commands", llmproxy_commands)], entry_points=False)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=BOUND, default_headers={"x-session-id": "s"})
    try:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "!/model(gpt-5)"}])
        session = proxy.context.sessions.find("x-session-id:s")
        assert session is not None and session.settings == {"model": "gpt-5"}
        session.last_seen -= 1  # a second idle: past the TTL
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert fake_openai.last.model == "gpt-4o-mini"
    finally:
        await client.close()
        await proxy.stop()


async def test_anthropic_client_to_openai_backend_stream_reply_is_well_formed(rig: Rig) -> None:
    # The commands-only reply is a complete Anthropic stream: the SDK's own accumulator is happy.
    sdk = anthropic.AsyncAnthropic(base_url=rig.proxy.url, api_key="x", max_retries=0, timeout=BOUND)
    try:
        async with sdk.messages.stream(model="claude-opus-4-8", max_tokens=100, messages=[{"role": "user", "content": "!/status"}]) as stream:
            kinds = [event.type async for event in stream]
            message = await stream.get_final_message()
    finally:
        await sdk.close()
    assert kinds[0] == "message_start" and "message_stop" in kinds
    assert message.stop_reason == "end_turn" and message.content[0].text.startswith(MARKER + "session: ")
    assert rig.upstream == []



def test_builtins_registered_through_the_hook() -> None:
    config = parse_config({}, "<test>")
    host = PluginHost(config, entry_points=False, extra=[("commands", llmproxy_commands)])
    assert {name: c.plugin for name, c in host.commands.items()} == {
        n: "commands" for n in ("backend", "model", "oneoff", "set", "unset", "status", "help")}
    assert all(c.help for c in host.commands.values())
