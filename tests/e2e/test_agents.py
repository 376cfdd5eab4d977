"""The real agents through llmproxy, each doing a task that needs one shell tool call.

All twelve cells, agent × backend protocol, are tested; * marks those the issue requires:

| agent (front-end protocol) | OpenAI Chat | OpenAI Responses | Anthropic | Gemini |
| --- | --- | --- | --- | --- |
| Claude Code ``claude -p`` (Anthropic Messages) | * | tested | tested (same protocol) | * |
| Codex CLI ``codex exec`` (OpenAI Responses) | * | tested (same protocol) | * | tested |
| Gemini CLI ``gemini -p`` (Gemini) | * | tested | tested | tested (same protocol) |

plus variants that change what crosses llmproxy: Gemini CLI's model-router call (JSON by a
schema), Codex with a reasoning effort to Anthropic, Claude Code's haiku (a thinking budget).

The prompt is "run echo hi". The fake upstream asks for one shell call running ``echo hi``;
the agent runs it for real and sends the output back; the fake answers with text quoting
it, which the agent prints. A test passes when:

1. the agent exits 0 within the time limit and its stdout carries the fake's final text;
2. the fake saw its own protocol only: its path, only top-level keys the real API accepts,
   llmproxy's upstream key and never the agent's — so llmproxy translated both ways;
3. the first turn offered a shell tool and held no tool result; a later turn carried back
   exactly one call and its result, holding the real output ``hi``;
4. llmproxy's log shows each turn as ``<front-end> → fake:<model> 200``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from e2e_harness import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    Client,
    Proxy,
    agent_env,
    model_turns,
    run_agent,
)

PROMPT = "run echo hi"
SHELL_TOOLS = frozenset(("Bash", "exec_command", "shell", "shell_command", "run_shell_command", "local_shell"))
HI = re.compile(r"(?<![A-Za-z])hi(?![A-Za-z])")

# -- each agent: its argv and environment, configured as shared/clients/README.md says ---------


def claude(client: Client, proxy: Proxy, home: Path, model: str | None = None) -> tuple[list[str], dict[str, str]]:
    env = agent_env(
        home,
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
        ANTHROPIC_BASE_URL=proxy.url,  # no /v1: the client appends /v1/messages?beta=true
        ANTHROPIC_API_KEY=CLIENT_KEY,  # sent as x-api-key
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        DISABLE_BUG_COMMAND="1",
    )
    argv = [str(client.executable), "-p", PROMPT, "--allowedTools", "Bash"]
    if model:  # haiku: thinking with a budget (31999) instead of adaptive thinking + effort
        argv += ["--model", model]
    return argv, env


def codex(client: Client, proxy: Proxy, home: Path, effort: str | None = None) -> tuple[list[str], dict[str, str]]:
    codex_home = home / ".codex"
    codex_home.mkdir()
    # A custom provider: the built-in one ignores OPENAI_BASE_URL and tries WebSockets first.
    (codex_home / "config.toml").write_text(
        'model = "gpt-5.1-codex"\n'
        + (f'model_reasoning_effort = "{effort}"\n' if effort else "")
        + 'model_provider = "llmproxy"\n'
        "check_for_update_on_startup = false\n"
        "[model_providers.llmproxy]\n"
        'name = "llmproxy"\n'
        f'base_url = "{proxy.url}/v1"\n'  # the client appends /responses
        'env_key = "LLMPROXY_KEY"\n'  # sent as Authorization: Bearer
        'wire_api = "responses"\n'  # "chat" is refused by Codex 0.169.0
        "request_max_retries = 0\n"
        "stream_max_retries = 0\n"
        "[analytics]\n"
        "enabled = false\n"
    )
    env = agent_env(home, CODEX_HOME=str(codex_home), LLMPROXY_KEY=CLIENT_KEY)
    return [str(client.executable), "exec", "--skip-git-repo-check", PROMPT], env


def gemini(client: Client, proxy: Proxy, home: Path, router: bool = False) -> tuple[list[str], dict[str, str]]:
    settings = home / ".gemini" / "settings.json"
    settings.parent.mkdir()
    # Without selectedType the base-URL variable makes the auth type "gateway", which -p refuses.
    settings.write_text(json.dumps({
        "security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
        "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False},
        "general": {"disableAutoUpdate": True, "disableUpdateNag": True, "enableAutoUpdate": False, "enableAutoUpdateNotification": False},
    }))
    env = agent_env(home, GEMINI_API_KEY=CLIENT_KEY, GOOGLE_GEMINI_BASE_URL=proxy.url, GEMINI_CLI_NO_RELAUNCH="true", NO_BROWSER="true")
    argv = [str(client.executable), "-p", PROMPT, "--yolo"]
    if not router:
        # -m skips the model router: a generateContent asking for JSON by a schema (in
        # Gemini's upper-case types) before every prompt; a non-JSON answer costs ~96 s of retries.
        argv += ["-m", "gemini-2.5-pro"]
    return argv, env


AGENTS: dict[str, tuple[Callable[..., tuple[list[str], dict[str, str]]], str]] = {
    # agent → (set-up, llmproxy front-end protocol as its log names it)
    "claude": (claude, "anthropic"),
    "codex": (codex, "openai_responses"),
    "gemini": (gemini, "gemini"),
}

# -- reading the fake's requests, in the fake's own protocol -----------------------------------


def _text_of(content: Any) -> str:
    """Text of a tool result's content in any protocol's shape (string, parts, dict)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    if isinstance(content, dict):
        for key in ("text", "output", "content", "result"):
            if key in content:
                return _text_of(content[key])
        return json.dumps(content)
    return "" if content is None else str(content)


def offered_tools(backend: str, body: dict[str, Any]) -> list[str]:
    tools = body.get("tools") or []
    if backend == "openai":
        return [t["function"]["name"] for t in tools if t.get("type") == "function"]
    if backend == "openai-responses":
        return [t["name"] for t in tools if t.get("type") == "function"]
    if backend == "anthropic":
        return [t["name"] for t in tools if "name" in t]
    if backend == "gemini":
        return [d["name"] for t in tools for d in t.get("functionDeclarations") or ()]
    raise AssertionError(backend)


def tool_calls(backend: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, arguments) of every tool call echoed back in the conversation."""
    calls: list[tuple[str, Any]] = []
    if backend == "openai":
        for m in body.get("messages") or ():
            for c in m.get("tool_calls") or ():
                calls.append((c["function"]["name"], json.loads(c["function"]["arguments"])))
    elif backend == "openai-responses":
        for item in body.get("input") or ():
            if isinstance(item, dict) and item.get("type") == "function_call":
                calls.append((item["name"], json.loads(item["arguments"])))
    elif backend == "anthropic":
        for m in body.get("messages") or ():
            for b in m.get("content") if isinstance(m.get("content"), list) else ():
                if b.get("type") == "tool_use":
                    calls.append((b["name"], b["input"]))
    elif backend == "gemini":
        for c in body.get("contents") or ():
            for p in c.get("parts") or ():
                if "functionCall" in p:
                    calls.append((p["functionCall"]["name"], p["functionCall"].get("args")))
    return calls


def tool_results(backend: str, body: dict[str, Any]) -> list[str]:
    """The text of every tool result in the conversation."""
    results: list[str] = []
    if backend == "openai":
        results = [_text_of(m.get("content")) for m in body.get("messages") or () if m.get("role") == "tool"]
    elif backend == "openai-responses":
        results = [_text_of(i.get("output")) for i in body.get("input") or () if isinstance(i, dict) and i.get("type") == "function_call_output"]
    elif backend == "anthropic":
        for m in body.get("messages") or ():
            for b in m.get("content") if isinstance(m.get("content"), list) else ():
                if b.get("type") == "tool_result":
                    results.append(_text_of(b.get("content")))
    elif backend == "gemini":
        for c in body.get("contents") or ():
            for p in c.get("parts") or ():
                if "functionResponse" in p:
                    results.append(_text_of(p["functionResponse"].get("response")))
    return results


# Every top-level request key each real API accepts (from its API reference): a key outside
# these makes the real service answer 400 ("Unrecognized request argument"), however lenient
# a fake is.
API_KEYS = {
    "openai": frozenset((
        "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
        "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
        "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
        "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
        "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
    )),
    "openai-responses": frozenset((
        "model", "input", "background", "client_metadata", "conversation", "include", "instructions", "max_output_tokens",
        "max_tool_calls", "metadata", "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key",
        "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier", "store", "stream", "stream_options",
        "temperature", "text", "tool_choice", "tools", "top_logprobs", "top_p", "truncation", "user",
    )),
    "anthropic": frozenset((
        "model", "messages", "max_tokens", "container", "context_management", "inference_geo", "mcp_servers", "metadata",
        "output_config", "service_tier", "stop_sequences", "stream", "system", "temperature", "thinking", "tool_choice",
        "tools", "top_k", "top_p",
    )),
    "gemini": frozenset((
        "contents", "tools", "toolConfig", "safetySettings", "systemInstruction", "generationConfig", "cachedContent",
        "labels",
    )),
}
REQUIRED_KEYS = {
    "openai": {"model", "messages"},
    "openai-responses": {"model", "input"},
    "anthropic": {"model", "messages", "max_tokens"},
    "gemini": {"contents"},
}


def protocol_shape(backend: str, received: Any) -> list[str]:
    """What is wrong with a request for the fake's protocol (empty: nothing)."""
    body, problems = received.json, []
    if not isinstance(body, dict):
        return [f"{received.path}: body is not a JSON object"]
    missing = REQUIRED_KEYS[backend] - body.keys()
    unknown = body.keys() - API_KEYS[backend]
    if missing:
        problems.append(f"missing {sorted(missing)}")
    if unknown:
        problems.append(f"keys the real {backend} API refuses: {sorted(unknown)}")
    if backend == "anthropic" and (body.get("thinking") or {}).get("type") in ("enabled", "adaptive"):
        assistant = [m for m in body.get("messages") or () if m.get("role") == "assistant"]
        last = assistant[-1].get("content") if assistant else None
        if isinstance(last, list) and any(b.get("type") == "tool_use" for b in last) and last[0].get("type") not in ("thinking", "redacted_thinking"):
            # The real API: "Expected `thinking` or `redacted_thinking`, but found `tool_use`.
            # When `thinking` is enabled, a final `assistant` message must start with a thinking block"
            problems.append("thinking is enabled but the last assistant turn calls a tool without its thinking block first")
    key = received.headers.get("x-api-key") or received.headers.get("x-goog-api-key") or received.headers.get("Authorization", "").removeprefix("Bearer ")
    if key != UPSTREAM_KEY:
        problems.append(f"upstream key {key!r}, expected llmproxy's {UPSTREAM_KEY!r}")
    if CLIENT_KEY in json.dumps(dict(received.headers)):
        problems.append("the agent's own key reached the upstream")
    return problems


def answer_text(received: Any) -> str:
    """The visible text the fake sent back for one request (any protocol, stream or JSON)."""
    raw = bytes(getattr(received, "sent", b"")).decode(errors="replace")
    payloads: list[Any] = []
    if "data:" in raw:
        for line in raw.splitlines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                try:
                    payloads.append(json.loads(line[5:]))
                except ValueError:
                    pass
    else:
        try:
            whole = json.loads(raw)
        except ValueError:
            return ""
        payloads = whole if isinstance(whole, list) else [whole]
    text = []
    for p in payloads:
        if not isinstance(p, dict):
            continue
        for choice in p.get("choices") or ():  # OpenAI chat
            text.append((choice.get("delta") or choice.get("message") or {}).get("content") or "")
        if p.get("type") == "content_block_delta" and (p.get("delta") or {}).get("type") == "text_delta":  # Anthropic
            text.append(p["delta"]["text"])
        if p.get("type") == "message":  # Anthropic JSON
            text += [b.get("text", "") for b in p.get("content") or () if b.get("type") == "text"]
        if p.get("type") == "response.output_text.delta":  # Responses
            text.append(p.get("delta") or "")
        for cand in p.get("candidates") or ():  # Gemini
            text += [part.get("text", "") for part in (cand.get("content") or {}).get("parts") or () if not part.get("thought")]
    return "".join(text)


# -- the matrix --------------------------------------------------------------------------------

# Every agent × every backend protocol. The issue requires Claude Code → OpenAI Chat and
# Gemini, Codex → Anthropic and OpenAI Chat, Gemini CLI → OpenAI Chat; the other cells cost
# a second or two each and back the rest of docs/clients.md's matrix.
BACKENDS = {"openai": "openai_chat", "openai-responses": "openai_responses", "anthropic": "anthropic", "gemini": "gemini"}
AGENT_IDS = {"claude": "claude_code", "codex": "codex", "gemini": "gemini_cli"}
MATRIX = [pytest.param(agent, backend, {}, id=f"{AGENT_IDS[agent]}-{BACKENDS[backend]}") for agent in AGENTS for backend in BACKENDS]
# The agents as they are often set up, where that changes what crosses llmproxy.
VARIANTS = [
    # Gemini CLI's default: the router call first, answered with JSON by its schema.
    pytest.param("gemini", "openai", {"router": True}, id="gemini_cli-openai_chat-model_router"),
    # Reasoning across families: Anthropic's signed thinking cannot come back through Codex.
    pytest.param("codex", "anthropic", {"effort": "high"}, id="codex-anthropic-reasoning_effort"),
    # A thinking budget (not an effort) must still become OpenAI's reasoning_effort.
    pytest.param("claude", "openai", {"model": "haiku"}, id="claude_code-openai_chat-thinking_budget"),
]


def check_variant(options: dict[str, Any], backend: str, turns: list[Any], where: str) -> list[Any]:
    """The variant's own checks; returns the turns of the tool loop."""
    if options.get("router"):
        router, turns = turns[0], turns[1:]
        schema = ((router.json.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
        assert not router.json.get("stream") and not router.json.get("tools"), f"the first turn is not the router call{where}"
        assert json.dumps(schema).count('"type": "') >= 3 and "STRING" not in json.dumps(schema), f"router schema not turned into JSON Schema: {schema}{where}"
        assert len(turns) == 2 and all(t.json["model"] != router.json["model"] for t in turns), f"router answer not used (retries or fallback){where}"
    if options.get("effort") and backend == "anthropic":
        assert (turns[0].json.get("thinking") or {}).get("type") == "enabled", f"no thinking asked for: {turns[0].json.get('thinking')}{where}"
    if options.get("model") == "haiku" and backend == "openai":
        assert turns[0].json.get("reasoning_effort") == "high", f"thinking budget 31999 not sent as reasoning_effort: {turns[0].json.get('reasoning_effort')!r}{where}"
    return turns


@pytest.mark.parametrize(("agent", "upstream", "options"), MATRIX + VARIANTS, indirect=["upstream"])
async def test_agent_runs_one_shell_call_through_llmproxy(
    agent: str, client: Client, upstream: Any, options: dict[str, Any], proxy: Proxy, e2e_home: Path
) -> None:
    backend = upstream.backend_type
    setup, frontend = AGENTS[agent]
    workdir = e2e_home / "work"
    workdir.mkdir()
    argv, env = setup(client, proxy, e2e_home, **options)

    run = await run_agent(argv, env, workdir, e2e_home)
    turns = model_turns(upstream)
    where = f"\n{run.describe()}\n--- upstream saw {len(upstream.requests)} request(s): {[r.path for r in upstream.requests]}\n--- llmproxy log (tail) ---\n{proxy.log[-6000:]}"

    # 1. the agent finished and printed the fake's final answer
    assert not run.timed_out, f"{agent} did not finish within its time limit{where}"
    assert run.returncode == 0, f"{agent} failed{where}"
    assert len(turns) >= 2, f"expected a tool-call turn and an answer turn at the upstream, got {len(turns)}{where}"
    final = answer_text(turns[-1]).strip()
    assert HI.search(final), f"the fake's last answer does not quote the tool output: {final!r}{where}"
    assert final in run.stdout, f"{agent}'s stdout lacks the fake's final answer {final!r}{where}"

    # 2. the fake only ever saw its own protocol
    for received in turns:
        problems = protocol_shape(backend, received)
        assert not problems, f"request {received.path} is not clean {backend}: {problems}{where}"
    carried_turns = len(turns)
    turns = check_variant(options, backend, turns, where)

    # 3. one shell call, executed for real, its output sent back
    first = turns[0].json
    assert SHELL_TOOLS & set(offered_tools(backend, first)), f"first turn offered no shell tool: {offered_tools(backend, first)}{where}"
    assert not tool_results(backend, first), f"first turn already had a tool result{where}"
    last = turns[-1].json
    calls = tool_calls(backend, last)
    results = tool_results(backend, last)
    assert len(calls) == 1 and calls[0][0] in SHELL_TOOLS, f"expected one shell call echoed back, got {calls}{where}"
    assert "echo hi" in json.dumps(calls[0][1]) or calls[0][1] in ({"command": ["echo", "hi"]}, {"cmd": ["echo", "hi"]}), f"call arguments {calls[0][1]}{where}"
    assert len(results) == 1 and HI.search(results[0]), f"expected one tool result holding 'hi', got {results}{where}"

    # 4. llmproxy carried every turn from the agent's protocol to the backend's
    carried = re.findall(rf" {frontend} \S+ → fake:\S+ 200 ", proxy.log)
    assert len(carried) >= carried_turns, f"llmproxy logged {len(carried)} {frontend} → fake flows for {carried_turns} upstream turns{where}"
    print(f"\n{agent} → llmproxy → {backend}: exit 0 in {run.seconds:.1f}s, {carried_turns} upstream turns; answer {final!r}")
