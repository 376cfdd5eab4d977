"""The ``model_override`` plugin: rule matching on its own, start-up checks, then end to end
through a real llmproxy with the official SDKs against two fake upstreams — ``an``
(Anthropic, the default backend) and ``oa`` (OpenAI Chat) — so where a request went shows in
what each fake received."""

from __future__ import annotations

from typing import Any, AsyncIterator

import anthropic
import llmproxy_anthropic
import llmproxy_commands
import llmproxy_model_override
import llmproxy_openai
import openai
import pytest

from fakes.anthropic_upstream import FakeAnthropic
from fakes.common import DEFAULT_TEXT
from fakes.openai_upstream import FakeOpenAI
from llmproxy import hookimpl
from llmproxy.config import ConfigError, parse_config
from llmproxy.flow import ClientInfo
from llmproxy.manager import PluginHost
from llmproxy.testing import RunningProxy, build_flow, start_proxy
from llmproxy_model_override import ModelOverrideSettings, Rules

BOUND = 10.0
UPSTREAM_KEY = "sk-upstream-override-3b7e"
HAIKU = "claude-haiku-4-5-20251001"  # Claude Code's dated side-call model
CLAUDE_UA = "claude-cli/2.1.197 (external, sdk-cli)"


# -- matching --------------------------------------------------------------------------------


def flow(model: str, frontend: str = "anthropic", key: str | None = None, agent: str = "") -> Any:
    body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    if frontend == "openai_chat":
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    made = build_flow(body, frontend)
    made.client = ClientInfo(key_name=key, user_agent=agent)
    return made


def rules(*items: dict[str, Any]) -> Rules:
    return Rules(ModelOverrideSettings.model_validate({"rules": list(items)}))


def test_globs_clients_frontends_and_first_match_wins() -> None:
    settings = rules(
        {"match": {"model": "claude-haiku-*"}, "target": "oa:gpt-4o-mini"},
        {"match": {"model": "claude-*", "client": "ci"}, "target": "oa:gpt-5"},
        {"match": {"frontend": "openai_chat", "model": "gpt-?"}, "target": "an:claude-opus-4-8"},
        {"match": {"user_agent": "claude-cli/*"}, "target": "an:claude-sonnet-4-5"},
    )
    assert settings.target_for(flow(HAIKU)) == (0, "oa:gpt-4o-mini")
    assert settings.target_for(flow(HAIKU, key="ci")) == (0, "oa:gpt-4o-mini")  # the first rule wins
    assert settings.target_for(flow("claude-opus-4-8", key="ci")) == (1, "oa:gpt-5")
    assert settings.target_for(flow("claude-opus-4-8", key="laptop")) is None
    assert settings.target_for(flow("gpt-5", "openai_chat")) == (2, "an:claude-opus-4-8")
    assert settings.target_for(flow("gpt-5", "anthropic")) is None  # another front-end
    assert settings.target_for(flow("gpt-55", "openai_chat")) is None  # ? is one character
    assert settings.target_for(flow("Claude-Haiku-4-5")) is None  # globs are case-sensitive
    assert settings.target_for(flow("anything", agent=CLAUDE_UA)) == (3, "an:claude-sonnet-4-5")
    assert rules({"target": "oa:gpt-5"}).target_for(flow("whatever")) == (0, "oa:gpt-5")  # no conditions: all
    assert rules().target_for(flow(HAIKU)) is None


def test_gemini_frontend_covers_both_gemini_stream_forms() -> None:
    settings = rules({"match": {"frontend": "gemini"}, "target": "oa:gpt-5"})
    made = flow("gemini-2.5-pro")
    made.frontend = "gemini_array"
    assert settings.target_for(made) == (0, "oa:gpt-5")


def test_settings_are_validated() -> None:
    config = parse_config({"plugins": {"model_override": {"rules": [{"match": {"frontend": "smtp"}, "target": "x"}]}}}, "<test>")
    with pytest.raises(ConfigError, match="plugins.model_override.rules"):
        PluginHost(config, entry_points=False, extra=[("model_override", llmproxy_model_override)])
    config = parse_config({"plugins": {"model_override": {"rules": [{"match": {"modle": "x"}, "target": "x"}]}}}, "<test>")
    with pytest.raises(ConfigError, match="modle"):
        PluginHost(config, entry_points=False, extra=[("model_override", llmproxy_model_override)])


async def test_unknown_targets_stop_start_up(fake_openai: FakeOpenAI) -> None:
    config = {"backends": {"oa": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${OVR_UPSTREAM_KEY}"], "models": ["gpt-5"]}},
              "plugins": {"model_override": {"rules": [{"target": "oa:gpt-4"}, {"target": "nowhere-without-default"}]}}}
    with pytest.raises(ConfigError) as raised:
        await start_proxy(config, plugins=[("openai", llmproxy_openai), ("model_override", llmproxy_model_override)], entry_points=False)
    message = str(raised.value)
    assert "plugins.model_override: rules[0]" in message
    assert "rules[0].target 'oa:gpt-4'" in message and "serves only gpt-5" in message
    assert "rules[1].target 'nowhere-without-default'" in message and "no default_backend" in message


# -- end to end --------------------------------------------------------------------------------


class Tracer:
    """Records, for each flow, whether the request was decoded and what plugins noted."""

    def __init__(self) -> None:
        self.decoded: list[bool] = []
        self.traces: list[list[dict[str, Any]]] = []

    @hookimpl(trylast=True)
    def request(self, flow: Any) -> None:
        self.decoded.append(flow.request_decoded)

    @hookimpl
    def flow_done(self, flow: Any) -> None:
        self.traces.append([{k: v for k, v in t.items() if k != "at"} for t in flow.trace])


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVR_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("OVR_KEY_CI", "key-ci-1")
    monkeypatch.setenv("OVR_KEY_LAPTOP", "key-laptop-2")


RULES = [
    {"match": {"model": "claude-haiku-*"}, "target": "oa:gpt-4o-mini"},
    {"match": {"client": "ci", "frontend": "openai_chat"}, "target": "an:claude-opus-4-8"},
]


@pytest.fixture
async def proxy(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> AsyncIterator[tuple[RunningProxy, Tracer]]:
    config = {
        "proxy": {"drain_timeout": 0},
        "auth": {"api_keys": [{"name": "ci", "key": "${OVR_KEY_CI}"}, {"name": "laptop", "key": "${OVR_KEY_LAPTOP}"}]},
        "backends": {
            "an": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${OVR_UPSTREAM_KEY}"]},
            "oa": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${OVR_UPSTREAM_KEY}"]},
        },
        "default_backend": "an",
        "plugins": {"model_override": {"rules": RULES}},
    }
    tracer = Tracer()
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("model_override", llmproxy_model_override), ("tracer", tracer)]
    running = await start_proxy(config, plugins=plugins, entry_points=False)
    try:
        yield running, tracer
    finally:
        await running.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
async def test_claude_code_haiku_side_calls_go_to_the_cheap_model(proxy: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, stream: bool) -> None:
    running, tracer = proxy
    sdk = anthropic.AsyncAnthropic(base_url=running.url, api_key="key-laptop-2", max_retries=0, timeout=BOUND, default_headers={"User-Agent": CLAUDE_UA})
    try:
        for model in (HAIKU, "claude-opus-4-8"):
            kwargs: dict[str, Any] = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "title this"}]}
            if stream:
                async with sdk.messages.stream(**kwargs) as events:
                    message = await events.get_final_message()
            else:
                message = await sdk.messages.create(**kwargs)
            assert message.content[0].text == DEFAULT_TEXT and message.stop_reason == "end_turn"  # the client's own protocol
    finally:
        await sdk.close()
    assert [r.model for r in fake_openai.requests] == ["gpt-4o-mini"]  # haiku → the cheap OpenAI model
    assert [r.model for r in fake_anthropic.requests] == ["claude-opus-4-8"]  # the main model untouched
    assert tracer.decoded == [False, False]  # matching never decodes the request
    assert tracer.traces[0] == [{"plugin": "model_override", "what": "model", "from": HAIKU, "to": "oa:gpt-4o-mini", "rule": 0}]
    assert tracer.traces[1] == []


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
async def test_rules_by_client_key_and_frontend(proxy: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, stream: bool) -> None:
    running, tracer = proxy
    for key in ("key-ci-1", "key-laptop-2"):
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0, timeout=BOUND)
        try:
            kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            if stream:
                chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = (await client.chat.completions.create(**kwargs)).choices[0].message.content
            assert text == DEFAULT_TEXT
        finally:
            await client.close()
    # ci's chat is forced to an:claude-opus-4-8; laptop's bare name goes to the default backend as it is
    assert [r.model for r in fake_anthropic.requests] == ["claude-opus-4-8", "gpt-4o-mini"]
    assert fake_openai.requests == []
    assert tracer.traces[0] == [{"plugin": "model_override", "what": "model", "from": "gpt-4o-mini", "to": "an:claude-opus-4-8", "rule": 1}]
    assert tracer.traces[1] == []


async def test_in_chat_choice_is_not_matched_by_a_model_rule(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> None:
    config = {
        "proxy": {"drain_timeout": 0},
        "backends": {
            "an": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${OVR_UPSTREAM_KEY}"]},
            "oa": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${OVR_UPSTREAM_KEY}"]},
        },
        "default_backend": "an",
        "plugins": {"model_override": {"rules": [{"match": {"model": "claude-*"}, "target": "oa:gpt-4o-mini"}]}},
    }
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("commands", llmproxy_commands), ("model_override", llmproxy_model_override)]
    running = await start_proxy(config, plugins=plugins, entry_points=False)
    sdk = anthropic.AsyncAnthropic(base_url=running.url, api_key="x", max_retries=0, timeout=BOUND, default_headers={"x-session-id": "s"})
    try:
        await sdk.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "one"}])
        await sdk.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "!/model(an:claude-opus-4-8)"}])
        await sdk.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "two"}])
        await sdk.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "!/set(plugin.model_override=off)"}])
        await sdk.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "!/model()"}])
        await sdk.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "three"}])
    finally:
        await sdk.close()
        await running.stop()
    assert [r.model for r in fake_openai.requests] == ["gpt-4o-mini"]  # the rule, before any command
    # the in-chat choice (an:…) does not match claude-*; then the rule is switched off for the session
    assert [r.model for r in fake_anthropic.requests] == ["claude-opus-4-8", "claude-opus-4-8"]
