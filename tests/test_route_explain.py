"""``llmproxy route explain``: run as a real process against a config file, and
:func:`llmproxy.explain.explain` against a running proxy's live state (breakers tripped by
real traffic to fake upstreams)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import llmproxy_openai
from fakes.openai_upstream import FakeOpenAI
from proxy_process import clean_env, run_cli, write_config

from llmproxy.explain import explain, guess_protocol, render
from llmproxy.testing import start_proxy

CONFIG = """
backends:
  small: {type: openai, base_url: "http://127.0.0.1:9/v1", api_keys: ["${EXPLAIN_SMALL_KEY}"], capabilities: {tools: false}}
  big: {type: openai, base_url: "http://127.0.0.1:9/v1", api_keys: ["${EXPLAIN_BIG_KEY}"], rpm: 100}
  keyless: {type: openai, base_url: "http://127.0.0.1:9/v1", api_keys: ["${EXPLAIN_UNSET_KEY}"]}
models:
  coding:
    strategy: round_robin
    targets: ["small:qwen3", "big:gpt-5", "keyless:gpt-5-mini"]
"""
TOOLS = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}]


def env() -> dict[str, str]:
    return clean_env(EXPLAIN_SMALL_KEY="sk-small-1", EXPLAIN_BIG_KEY="sk-big-2")


def test_explain_names_every_target_and_why_it_is_skipped(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "coding", "messages": [{"role": "user", "content": "ls"}], "tools": TOOLS}))
    done = run_cli("--config", str(config), "route", "explain", "--file", str(request), env=env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "model 'coding' (openai_chat, alias with strategy round_robin)"
    assert lines[1].startswith("  needs: tools; ~")
    assert lines[2].startswith("  1. small:qwen3") and "skipped" in lines[2]
    assert lines[3] == "       ✗ capability: does not take tools (capabilities.tools: false)"
    assert lines[4].startswith("  2. big:gpt-5") and "eligible" in lines[4]
    assert "       · backend rate window: rpm 0/100" in lines
    keyless = next(i for i, line in enumerate(lines) if line.startswith("  3. keyless:gpt-5-mini"))
    assert "skipped" in lines[keyless] and lines[keyless + 1] == "       ✗ keys: none is set (environment variable EXPLAIN_UNSET_KEY)"
    assert lines[-1] == "  → first try: big:gpt-5"
    for secret in ("sk-small-1", "sk-big-2"):
        assert secret not in done.stdout


def test_explain_json_and_an_unroutable_model(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "nobody", "max_tokens": 10, "system": "x", "messages": [{"role": "user", "content": "hi"}]}))
    done = run_cli("route", "explain", "--config", str(config), "--file", str(request), "--json", env=env())  # --config after the command too
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["protocol"] == "anthropic" and report["first"] is None and "does not exist here" in report["error"]
    # --model routes another model than the body's (and gives a Gemini body, which has none, one)
    done = run_cli("route", "explain", "--config", str(config), "--file", str(request), "--model", "coding", "--json", env=env())
    assert done.returncode == 0 and json.loads(done.stdout)["model"] == "coding", done.stdout
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    done = run_cli("--config", str(config), "route", "explain", "--file", str(broken), env=env())
    assert done.returncode == 2 and "not JSON" in done.stderr and "Traceback" not in done.stderr


def test_protocols_are_told_apart_by_their_fields() -> None:
    assert guess_protocol({"contents": []}) == "gemini"
    assert guess_protocol({"model": "x", "input": "hi"}) == "openai_responses"
    assert guess_protocol({"model": "x", "system": "s", "messages": []}) == "anthropic"
    assert guess_protocol({"model": "x", "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]}) == "anthropic"
    assert guess_protocol({"model": "x", "messages": [{"role": "user", "content": "hi"}]}) == "openai_chat"


def timeless(value: Any) -> Any:
    """``value`` with every number made ``#``: a countdown moves between two calls."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items()}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    if isinstance(value, float):
        return "#"
    if isinstance(value, str):
        return re.sub(r"\d+(\.\d+)?", "#", value)
    return value


async def test_explain_reads_the_live_breakers_and_changes_nothing(monkeypatch: Any) -> None:
    monkeypatch.setenv("EXPLAIN_KEY", "sk-explain-9")
    async with FakeOpenAI() as a, FakeOpenAI() as b:
        config = {
            "proxy": {"drain_timeout": 0},
            "backends": {name: {"type": "openai", "base_url": fake.base_url, "api_keys": ["${EXPLAIN_KEY}"], "breaker": {"failures": 1}}
                         for name, fake in (("a", a), ("b", b))},
            "models": {"m": {"strategy": "round_robin", "targets": ["a:gpt-4o-mini", "b:gpt-4o-mini"]}},
        }
        proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai)], entry_points=False)
        try:
            a.script(status=500)
            async with aiohttp.ClientSession() as http:
                async with http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as response:
                    assert response.status == 200
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            first = explain(proxy.context, body)
            again = explain(proxy.context, body)
            # nothing advanced: the same preview twice (but for the seconds left on the breaker)
            assert timeless(first) == timeless(again)
            rows = {row["target"]: row for row in first["targets"]}
            assert [row["target"] for row in first["targets"]] == ["b:gpt-4o-mini", "a:gpt-4o-mini"]  # round robin's next turn
            assert rows["a:gpt-4o-mini"]["eligible"] is False and rows["a:gpt-4o-mini"]["breaker"]["state"] == "open"
            assert rows["a:gpt-4o-mini"]["skipped"][0].startswith("breaker: open after server failures, retry in")
            assert first["first"] == "b:gpt-4o-mini" and "→ first try: b:gpt-4o-mini" in render(first)
            assert "sk-explain-9" not in json.dumps(first)
        finally:
            await proxy.stop()
