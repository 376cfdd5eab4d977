"""The ``identity_headers`` plugin: settings validation (credential and framing headers are
refused), the per-backend plan, then end to end through a real llmproxy with the official SDKs
against fake upstreams — which header value each mode puts on the wire, streamed and not,
and across protocols.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import anthropic
import llmproxy_anthropic
import llmproxy_identity_headers
import llmproxy_openai
import openai
import pytest
from pydantic import ValidationError

from fakes.anthropic_upstream import FakeAnthropic
from fakes.openai_upstream import FakeOpenAI
from llmproxy.config import ConfigError
from llmproxy.flow import UpstreamRequest
from llmproxy.testing import RunningProxy, build_flow, plugin_context, start_proxy
from llmproxy_identity_headers import HeaderRule, IdentityHeadersSettings, set_header

BOUND = 10.0
CLIENT_KEY = "client-key-identity"
UPSTREAM_KEY = "sk-upstream-identity-8c2f"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])


def settings(backends: dict[str, Any]) -> IdentityHeadersSettings:
    return IdentityHeadersSettings.model_validate({"backends": backends})


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Authorization", "x-api-key", "X-Goog-Api-Key", "api-key", "Cookie", "Proxy-Authorization", "X-Auth-Token", "OpenAI-Secret"])
def test_credential_headers_are_refused(header: str) -> None:
    with pytest.raises(ValidationError) as error:
        settings({"openrouter": {header: {"mode": "pass-through"}}})
    assert f"backends.openrouter.{header}: {header!r} carries credentials" in str(error.value)
    assert "never sets or forwards credential headers" in str(error.value)


@pytest.mark.parametrize("header", ["Host", "Content-Length", "content-type", "Transfer-Encoding"])
def test_framing_headers_are_refused(header: str) -> None:
    with pytest.raises(ValidationError, match="frames the HTTP request"):
        settings({"*": {header: "x"}})


@pytest.mark.parametrize(
    "rule, complaint",
    [
        ({"mode": "pass-through", "value": "x"}, "pass-through copies the client's value"),
        ({"mode": "override"}, "mode override needs a value"),
        ({"value": "two\nlines"}, "single line"),
        ({"value": "x", "mode": "sometimes"}, "mode"),
    ],
)
def test_rules_that_cannot_work_are_refused(rule: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        settings({"b": {"X-Title": rule}})


def test_bad_header_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a valid HTTP header name"):
        settings({"b": {"X Title": "x"}})


def test_plain_string_is_a_default_and_exact_backend_beats_globs() -> None:
    s = settings({"*": {"User-Agent": "llmproxy/1", "X-Title": "everyone"}, "open*": {"x-title": "globbed"}, "openrouter": {"X-TITLE": {"value": "mine", "mode": "override"}}})
    plan = dict(s.plan("openrouter"))
    assert plan == {"User-Agent": HeaderRule(value="llmproxy/1"), "X-TITLE": HeaderRule(value="mine", mode="override")}
    assert dict(s.plan("local")) == {"User-Agent": HeaderRule(value="llmproxy/1"), "X-Title": HeaderRule(value="everyone")}
    assert s.plan("openai") == [("User-Agent", HeaderRule(value="llmproxy/1")), ("x-title", HeaderRule(value="globbed"))]


def test_set_header_replaces_any_case() -> None:
    headers = {"user-agent": "aiohttp", "x-team": "t"}
    set_header(headers, "User-Agent", "mine")
    assert headers == {"x-team": "t", "User-Agent": "mine"}


async def test_unknown_backend_name_is_refused_at_start() -> None:
    config = {"backends": {"o": {"type": "offline"}}, "default_backend": "o", "plugins": {"identity_headers": {"backends": {"openrouter": {"X-Title": "x"}}}}}
    import llmproxy_offline

    with pytest.raises(ConfigError, match="plugins.identity_headers: backends: no backend named 'openrouter' is configured"):
        await start_proxy(config, plugins=[("offline", llmproxy_offline), ("identity_headers", llmproxy_identity_headers)], entry_points=False)


async def test_hook_modes_on_an_upstream_request() -> None:
    rules = {"User-Agent": "llmproxy", "X-Title": {"value": "ours", "mode": "override"}, "HTTP-Referer": {"mode": "pass-through"}, "X-Extra": "extra"}
    config = {"backends": {"openrouter": {"type": "openrouter"}}, "default_backend": "openrouter", "plugins": {"identity_headers": {"backends": {"openrouter": rules}}}}
    context = await plugin_context(config, plugins=[("openai", llmproxy_openai), ("identity_headers", llmproxy_identity_headers)], entry_points=False)
    flow = build_flow({"model": "qwen/qwen3-coder", "messages": [{"role": "user", "content": "hi"}]}, context=context)
    flow.client.headers = {"user-agent": "claude-cli/2.1.197", "x-title": "client title"}
    flow.target = context.router.resolve(flow.model)[0]
    upstream = UpstreamRequest("POST", "http://x", {"authorization": "Bearer upstream", "HTTP-Referer": "from backend config"})
    llmproxy_identity_headers.upstream_request(flow, upstream)
    assert upstream.headers == {"authorization": "Bearer upstream", "HTTP-Referer": "from backend config", "User-Agent": "claude-cli/2.1.197",
                                "X-Title": "ours", "X-Extra": "extra"}
    assert flow.trace[-1]["headers"] == {"User-Agent": "default", "X-Title": "override", "X-Extra": "default"}


# -- end to end ------------------------------------------------------------------------------


RULES = {
    "User-Agent": {"value": "llmproxy-tests/1.0", "mode": "default"},  # the client sends one: its own goes on
    "HTTP-Referer": "https://example.com/app",  # default, and the client sends none: ours
    "X-Title": {"value": "Our App", "mode": "override"},  # the client sends one: ours anyway
    "X-Client-Tag": {"mode": "pass-through"},  # the client's
    "X-Absent": {"mode": "pass-through"},  # the client sends none: nothing
    "X-Team": {"mode": "pass-through"},  # the client sends none: the backend's own headers: value stays
}
CLIENT_HEADERS = {"User-Agent": "my-agent/2.0", "X-Title": "client title", "X-Client-Tag": "tag-7"}


def check_headers(received: Any) -> None:
    headers = received.headers
    assert headers["User-Agent"] == "my-agent/2.0"
    assert headers["HTTP-Referer"] == "https://example.com/app"
    assert headers["X-Title"] == "Our App"
    assert headers["X-Client-Tag"] == "tag-7"
    assert "X-Absent" not in headers
    assert headers["X-Team"] == "backend-config"
    assert received.key == UPSTREAM_KEY  # the client's key never reaches the backend


@pytest.fixture
async def proxy(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningProxy]:
    monkeypatch.setenv("IDENTITY_UPSTREAM_KEY", UPSTREAM_KEY)
    config = {
        "proxy": {"drain_timeout": 0},
        "backends": {
            "oa": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${IDENTITY_UPSTREAM_KEY}"], "headers": {"X-Team": "backend-config"}},
            "an": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${IDENTITY_UPSTREAM_KEY}"]},
        },
        "default_backend": "oa",
        "plugins": {"identity_headers": {"backends": {"oa": RULES, "a*": {"X-Title": {"value": "Anthropic App", "mode": "override"}}}}},
    }
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("identity_headers", llmproxy_identity_headers)]
    running = await start_proxy(config, plugins=plugins, entry_points=False)
    yield running
    await running.stop()


@STREAM
async def test_openai_client_modes_reach_the_backend(proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND, default_headers=CLIENT_HEADERS)
    messages = [{"role": "user", "content": "say hi"}]
    if stream:
        async for _ in await client.chat.completions.create(model="gpt-4o", messages=messages, stream=True):  # type: ignore[arg-type]
            pass
    else:
        await client.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    await client.close()
    check_headers(fake_openai.last)


@STREAM
async def test_anthropic_client_to_openai_backend(proxy: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, stream: bool) -> None:
    """Cross-protocol: the same rules apply by backend, whatever protocol the client spoke;
    another backend gets its own rules (a glob) and none of this one's."""
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND, default_headers=CLIENT_HEADERS)
    for model in ("gpt-4o", "an:claude-opus-4-8"):
        kwargs: dict[str, Any] = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "say hi"}]}
        if stream:
            async with client.messages.stream(**kwargs) as events:
                await events.get_final_message()
        else:
            await client.messages.create(**kwargs)
    await client.close()
    check_headers(fake_openai.last)
    headers = fake_anthropic.last.headers
    assert headers["X-Title"] == "Anthropic App"
    assert "HTTP-Referer" not in headers and "X-Client-Tag" not in headers
    assert headers["User-Agent"] != "my-agent/2.0"  # no rule for this backend: not forwarded
    assert fake_anthropic.last.key == UPSTREAM_KEY
