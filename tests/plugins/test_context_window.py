"""The ``context_window`` plugin: which limit applies to a model (globs, aliases, the backend
type's capabilities), the error each protocol gets, that short requests are never tokenized,
then end to end through a real llmproxy with the official OpenAI, Anthropic and Gemini SDKs:
an over-long request is refused in the client's own error shape — streamed and not — and the
fake backend is never called; a request within the limit goes through.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import anthropic
import llmproxy_context_window
import llmproxy_openai
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from pydantic import ValidationError

from fakes.openai_upstream import FakeOpenAI
from llmproxy.context import ProxyContext
from llmproxy.testing import RunningProxy, build_flow, plugin_context, start_proxy
from llmproxy.tokens import count_request
from llmproxy_context_window import ContextWindowSettings, model_limit, too_long

BOUND = 10.0
CLIENT_KEY = "client-key-context"
UPSTREAM_KEY = "sk-upstream-context-3a9b"
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
LIMIT = 300
LONG = "lorem ipsum dolor " * 200  # about 600 tokens
SHORT = "say hi"


# -- settings and limits -------------------------------------------------------------------


@pytest.mark.parametrize("section, complaint", [({"limits": {"gpt-4o": 0}}, "positive"), ({"safety_margin": 1.0}, "safety_margin"), ({"limit": {}}, "limit")])
def test_bad_settings_are_refused(section: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        ContextWindowSettings.model_validate(section)


async def context(**plugin: Any) -> ProxyContext:
    config = {
        "backends": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}, "groq": {"type": "groq"}, "plain": {"type": "vllm"}},
        "default_backend": "up",
        "models": {"small": {"targets": ["up:gpt-4o-mini"]}},
        "plugins": {"context_window": plugin},
    }
    return await plugin_context(config, plugins=[("openai", llmproxy_openai), ("context_window", llmproxy_context_window)], entry_points=False)


def limit_of(ctx: ProxyContext, model: str) -> int | None:
    flow = build_flow({"model": model, "messages": [{"role": "user", "content": "hi"}]}, context=ctx)
    return model_limit(flow, ctx.settings("context_window"))


async def test_first_matching_glob_wins_and_aliases_use_their_target() -> None:
    ctx = await context(limits={"gpt-4o-mini": 1000, "gpt-4o*": 2000, "groq:*": 3000})
    assert limit_of(ctx, "gpt-4o-mini") == 1000
    assert limit_of(ctx, "gpt-4o-2024-08-06") == 2000
    assert limit_of(ctx, "small") == 1000  # an alias, limited by what it points to
    assert limit_of(ctx, "groq:llama-3.3-70b") == 3000
    assert limit_of(ctx, "claude-opus-4-8") is None
    assert limit_of(ctx, "nobody:unknown") is None  # resolves to the default backend's model name


async def test_capabilities_are_a_fallback_only_when_asked() -> None:
    assert limit_of(await context(), "groq:llama-3.3-70b") is None
    ctx = await context(limits={"groq:special": 5}, use_capabilities=True)
    assert limit_of(ctx, "groq:llama-3.3-70b") == 131_072  # the groq type's max_context
    assert limit_of(ctx, "groq:special") == 5
    assert limit_of(ctx, "up:gpt-4o") == 400_000
    assert limit_of(ctx, "plain:local-model") is None  # a type that declares none


def test_error_shapes() -> None:
    error = too_long("anthropic", "claude-x", 250, 200, 190)
    assert error.status == 400 and error.kind == "invalid_request_error" and error.code == "context_length_exceeded"
    assert error.message.startswith("prompt is too long: 250 tokens > 190 maximum (")
    assert "a limit of 200 less the safety margin" in error.message
    error = too_long("openai_chat", "gpt-4o", 250, 200, 200)
    assert error.message == "request has 250 input tokens; model 'gpt-4o' accepts at most 200, counted by llmproxy before calling the backend"


async def test_short_requests_are_not_tokenized(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[Any] = []
    monkeypatch.setattr(llmproxy_context_window, "count_request", lambda request: counted.append(request) or count_request(request))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": SHORT}]}
    raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "say hi"}]}'
    flow = build_flow(body, context=await context(limits={"gpt-4o": LIMIT}))
    flow.raw_body = raw
    await llmproxy_context_window.request(flow)
    assert counted == [] and not flow.request_decoded
    flow = build_flow(body, context=await context(limits={"gpt-4o": 20}))  # now the body could be over
    flow.raw_body = raw
    await llmproxy_context_window.request(flow)
    assert len(counted) == 1 and flow.trace[-1]["what"] == "counted"
    flow = build_flow(body, context=await context(limits={"claude-*": 1}))  # no limit for this model
    flow.raw_body = raw
    await llmproxy_context_window.request(flow)
    assert len(counted) == 1 and not flow.request_decoded


async def test_safety_margin_lowers_the_limit() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 90}]}
    tokens = count_request(build_flow(body).request)
    for margin, refused in ((0.0, False), (0.5, True)):
        flow = build_flow(body, context=await context(limits={"gpt-4o": tokens + 5}, safety_margin=margin))
        if refused:
            with pytest.raises(llmproxy_context_window.ProxyError, match=f"request has {tokens} input tokens"):
                await llmproxy_context_window.request(flow)
        else:
            await llmproxy_context_window.request(flow)


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture
async def proxy(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningProxy]:
    monkeypatch.setenv("CONTEXT_UPSTREAM_KEY", UPSTREAM_KEY)
    config = {
        "proxy": {"drain_timeout": 0},
        "backends": {"up": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${CONTEXT_UPSTREAM_KEY}"]}},
        "default_backend": "up",
        "plugins": {"context_window": {"limits": {"gpt-4o*": LIMIT, "claude-*": LIMIT, "gemini-*": LIMIT}}},
    }
    running = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("context_window", llmproxy_context_window)], entry_points=False)
    yield running
    await running.stop()


def expected_tokens(frontend: str, body: dict[str, Any]) -> int:
    return count_request(build_flow(body, frontend).request)


@STREAM
async def test_openai_client_gets_context_length_exceeded(proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    messages = [{"role": "user", "content": LONG}]
    with pytest.raises(openai.BadRequestError) as raised:
        if stream:
            async for _ in await client.chat.completions.create(model="gpt-4o", messages=messages, stream=True):  # type: ignore[arg-type]
                pass
        else:
            await client.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    error = raised.value
    tokens = expected_tokens("openai_chat", {"model": "gpt-4o", "messages": messages})
    assert error.status_code == 400 and error.code == "context_length_exceeded" and error.type == "invalid_request_error"
    assert f"request has {tokens} input tokens; model 'gpt-4o' accepts at most {LIMIT}" in error.message
    assert fake_openai.requests == []  # refused before the backend was called
    completion = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": SHORT}])
    assert completion.choices[0].message.content and len(fake_openai.requests) == 1
    await client.close()


async def test_responses_client_gets_context_length_exceeded(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(model="gpt-4o", input=LONG)
    await client.close()
    assert raised.value.code == "context_length_exceeded" and "accepts at most 300" in raised.value.message
    assert fake_openai.requests == []


@STREAM
async def test_anthropic_client_gets_prompt_too_long(proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool) -> None:
    """Cross-protocol (an Anthropic client, an OpenAI backend): Anthropic's own error shape."""
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    kwargs: dict[str, Any] = {"model": "claude-opus-4-8", "max_tokens": 100, "system": "be brief", "messages": [{"role": "user", "content": LONG}]}
    with pytest.raises(anthropic.BadRequestError) as raised:
        if stream:
            async with client.messages.stream(**kwargs) as events:
                await events.get_final_message()
        else:
            await client.messages.create(**kwargs)
    error = raised.value
    tokens = expected_tokens("anthropic", kwargs)
    assert error.status_code == 400
    assert error.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert error.body["error"]["message"].startswith(f"prompt is too long: {tokens} tokens > {LIMIT} maximum")  # type: ignore[index]
    assert fake_openai.requests == []
    message = await client.messages.create(**{**kwargs, "messages": [{"role": "user", "content": SHORT}]})
    assert message.content and len(fake_openai.requests) == 1
    await client.close()


@STREAM
async def test_gemini_client_gets_invalid_argument(proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool) -> None:
    client = genai.Client(api_key=CLIENT_KEY, http_options=genai_types.HttpOptions(base_url=proxy.url, api_version="v1beta", timeout=int(BOUND * 1000)))
    with pytest.raises(genai_errors.ClientError) as raised:
        if stream:
            async for _ in await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents=LONG):
                pass
        else:
            await client.aio.models.generate_content(model="gemini-2.5-flash", contents=LONG)
    error = raised.value
    assert error.code == 400 and error.status == "INVALID_ARGUMENT"
    assert "input tokens; model 'gemini-2.5-flash' accepts at most 300" in (error.message or "")
    assert fake_openai.requests == []
    await client.aio.aclose()
    client.close()


async def test_models_without_a_limit_are_not_checked(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    completion = await client.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": LONG}])
    await client.close()
    assert completion.choices[0].message.content and len(fake_openai.requests) == 1
