"""The offline backend (``type: offline``) over real sockets with the official openai SDK:
echo mode, and scripted replies played in turn — a scripted tool call only to a request
that offers that tool (a strict client refuses a call to a tool it never offered)."""

from __future__ import annotations

import json

import llmproxy_offline
import llmproxy_openai
import openai

from llmproxy.testing import start_proxy

SHELL = {"type": "function", "function": {"name": "Bash", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}


async def test_echo_and_scripted_replies_in_turn() -> None:
    config = {
        "backends": {
            "offline": {"type": "offline"},
            "scripted": {"type": "offline", "mode": "scripted", "replies": ["Hello!", {"tool_call": {"name": "Bash", "arguments": {"command": "echo hi"}}}]},
        },
        "default_backend": "offline",
    }
    proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("offline", llmproxy_offline)], entry_points=False)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        hi = [{"role": "user", "content": "hi there"}]
        echo = await client.chat.completions.create(model="anything", messages=hi)
        assert echo.choices[0].message.content == "You said: hi there"
        first = await client.chat.completions.create(model="scripted:any", messages=hi, tools=[SHELL])
        assert first.choices[0].message.content == "Hello!" and first.choices[0].finish_reason == "stop"
        call = await client.chat.completions.create(model="scripted:any", messages=hi, tools=[SHELL])
        (tool_call,) = call.choices[0].message.tool_calls
        assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == ("Bash", {"command": "echo hi"})
        assert call.choices[0].finish_reason == "tool_calls"
        await client.chat.completions.create(model="scripted:any", messages=hi)  # "Hello!" again
        no_tools = await client.chat.completions.create(model="scripted:any", messages=hi)
        assert no_tools.choices[0].message.tool_calls is None and no_tools.choices[0].finish_reason == "stop"
        assert "scripted call to Bash, which this request does not offer" in no_tools.choices[0].message.content
    finally:
        await proxy.stop()
