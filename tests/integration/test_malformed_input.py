"""Bad input never gets a 500, a traceback or an answer outside the client's protocol.

Each front-end gets a valid request in which, one field at a time, every value is replaced by
each JSON type (number, string, null, array, object, boolean). Whatever llmproxy makes of it,
the answer is either a success or a 4xx error in the route's own error shape.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import aiohttp
import llmproxy_offline
import pytest

from llmproxy.testing import start_proxy

VALUES: list[Any] = [5, "x", None, [], {}, True]
TOOL = {"type": "object", "properties": {"command": {"type": "string"}}}
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "openai_chat": ("/v1/chat/completions", {
        "model": "m", "stream": False, "temperature": 0.2, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "Bash", "parameters": TOOL}}],
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
    }),
    "openai_responses": ("/v1/responses", {
        "model": "m", "instructions": "be brief", "tools": [{"type": "function", "name": "Bash", "parameters": TOOL}],
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                  {"type": "function_call", "call_id": "c1", "name": "Bash", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "ok"}],
    }),
    "anthropic": ("/v1/messages", {
        "model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "be brief"}],
        "tools": [{"name": "Bash", "input_schema": TOOL}], "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "Bash", "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "ok"}]}],
    }),
    "gemini": ("/v1beta/models/m:generateContent", {
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "tools": [{"functionDeclarations": [{"name": "Bash", "parametersJsonSchema": TOOL}]}],
        "generationConfig": {"temperature": 0.2, "thinkingConfig": {"thinkingBudget": 100}},
        "contents": [{"role": "user", "parts": [{"text": "hi"}]},
                     {"role": "model", "parts": [{"functionCall": {"name": "Bash", "args": {}}}]},
                     {"role": "user", "parts": [{"functionResponse": {"name": "Bash", "response": {"output": "ok"}}}]}],
    }),
}


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield prefix + (key,)
            yield from paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield prefix + (i,)
            yield from paths(child, prefix + (i,))


def replaced(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    target: Any = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


def error_shape_ok(protocol: str, body: Any) -> bool:
    if protocol == "anthropic":
        return body.get("type") == "error" and isinstance(body["error"].get("message"), str)
    if protocol == "gemini":
        return isinstance(body["error"].get("code"), int) and isinstance(body["error"].get("message"), str)
    return isinstance(body["error"].get("message"), str) and "type" in body["error"]


@pytest.mark.parametrize("protocol", list(BODIES))
async def test_every_field_of_every_type_is_a_success_or_a_protocol_4xx(protocol: str) -> None:
    route, valid = BODIES[protocol]
    proxy = await start_proxy({"backends": {"o": {"type": "offline"}}, "default_backend": "o"}, plugins=[("offline", llmproxy_offline)], entry_points=False)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.post(proxy.url + route, json=valid) as response:
                assert response.status == 200, await response.text()
            failures = []
            for path in paths(valid):
                for value in VALUES:
                    async with session.post(proxy.url + route, json=replaced(valid, path, value)) as response:
                        text = await response.text()
                        if response.status >= 500 or (response.status >= 400 and response.content_type != "application/json"):
                            failures.append((path, value, response.status, text[:200]))
                        elif response.status >= 400 and not error_shape_ok(protocol, await response.json()):
                            failures.append((path, value, response.status, text[:200]))
            assert not failures, failures[:10]
    finally:
        await proxy.stop()
