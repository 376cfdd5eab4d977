"""The metrics plugin over real sockets: the official openai and anthropic SDKs (and aiohttp)
→ llmproxy (a real server) → fake upstreams (real aiohttp servers, tests/fakes); ``/metrics``
scraped with aiohttp and parsed with prometheus_client's own parser.

Every count asserted is exact: each test starts its own proxy, whose registry is its own.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import anthropic
import llmproxy_commands
import llmproxy_metrics
import llmproxy_openai
import openai
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fakes.openai_upstream import FakeOpenAI
from llmproxy import ProxyError, hookimpl
from llmproxy.config import ConfigError
from llmproxy_metrics.access import BAD_TOKEN, NEEDS_TOKEN, refusal
from llmproxy_metrics.backends import BackendStatusCollector
from llmproxy.testing import RunningProxy, start_proxy

BOUND = 10.0
CLIENT_KEY = "client-key-metrics-5e6f"
TOKEN = "metrics-token-9a8b7c"
BACKEND_KEY = "sk-metrics-backend-1a2b"
HI = [{"role": "user", "content": "say hi"}]

Start = Callable[..., Awaitable[RunningProxy]]


class Guard:
    """Refuses model "forbidden" (a plugin's ProxyError) and breaks on model "crash"."""

    @hookimpl
    def request(self, flow: Any) -> None:
        if flow.model == "forbidden":
            raise ProxyError(403, "this model is not for you")
        if flow.model == "crash":
            raise RuntimeError("a bug in a plugin")


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_CLIENT_KEY", CLIENT_KEY)
    monkeypatch.setenv("METRICS_TOKEN", TOKEN)
    monkeypatch.setenv("METRICS_BACKEND_KEY", BACKEND_KEY)


@pytest.fixture
async def second_fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def start(proxies: Any) -> Start:
    def start(config: dict[str, Any], extra: list[tuple[str, Any]] | None = None) -> Awaitable[RunningProxy]:
        config = {"proxy": {"drain_timeout": 1, **config.pop("proxy", {})}, **config}
        return proxies(config, [("openai", llmproxy_openai), ("commands", llmproxy_commands), ("metrics", llmproxy_metrics), *(extra or [])])

    return start



def backend(fake: FakeOpenAI) -> dict[str, Any]:
    return {"type": "openai", "base_url": fake.base_url, "api_keys": ["${METRICS_BACKEND_KEY}"]}


def config(good: FakeOpenAI, bad: FakeOpenAI, **metrics: Any) -> dict[str, Any]:
    return {
        "auth": {"api_keys": [{"name": "laptop", "key": "${METRICS_CLIENT_KEY}"}]},
        "backends": {"good": backend(good), "bad": backend(bad)},
        "default_backend": "good",
        "models": {"duo": {"targets": ["bad:gpt-4o-mini", "good:gpt-4o-mini"]}},
        "plugins": {"metrics": {"collect": "always", **metrics}},
    }


class Scrape:
    """One scrape, parsed: ``value(name, **labels)`` sums the samples whose labels include those given."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        return sum(found)

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}

    def has(self, name: str, **labels: str) -> bool:
        return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in self.samples)


async def scrape(http: aiohttp.ClientSession, proxy: RunningProxy, token: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(proxy.url + "/metrics", headers=headers) as response:
        text = await response.text()
        assert response.status == 200, text
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(text)


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)


async def test_success_failover_stream_refusals_and_tokens(
    start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI
) -> None:
    good, bad = fake_openai, second_fake
    bad.script(status=500, message="upstream broke")
    proxy = await start(config(good, bad, stream_tokens=True), extra=[("guard", Guard())])
    client = openai_client(proxy)

    # success, non-streamed, OpenAI SDK
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    assert answer.usage is not None
    # failover: the alias's first target answers 500, the second serves
    failed_over = await client.chat.completions.create(model="duo", messages=HI)  # type: ignore[arg-type]
    assert failed_over.choices[0].message.content == good.behaviour.text
    assert [r.model for r in bad.requests] == ["gpt-4o-mini"]
    # a stream, with usage (OpenAI SDK)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True})  # type: ignore[arg-type]
    streamed_usage = None
    async for chunk in stream:
        streamed_usage = chunk.usage or streamed_usage
    assert streamed_usage is not None
    # the Anthropic SDK, translated to the OpenAI backend
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    message = await claude.messages.create(model="gpt-4o-mini", max_tokens=50, messages=HI)  # type: ignore[arg-type]
    # refused by a plugin, and a plugin that breaks
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="forbidden", messages=HI)  # type: ignore[arg-type]
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="crash", messages=HI)  # type: ignore[arg-type]
    # refused by the core: a wrong client key (no client name)
    async with http.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}, headers={"Authorization": "Bearer nope"}) as response:
        assert response.status == 401

    m = await scrape(http, proxy)
    requests = "llmproxy_requests_total"
    assert m.value(requests) == 7
    assert m.value(requests, frontend="openai_chat", backend="good", model="gpt-4o-mini", client="laptop", stream="false", status="200") == 1
    assert m.value(requests, frontend="openai_chat", backend="good", model="duo", client="laptop", status="200") == 1
    assert m.value(requests, frontend="openai_chat", stream="true", status="200", client="laptop") == 1
    assert m.value(requests, frontend="anthropic", backend="good", client="laptop", status="200") == 1
    assert m.value(requests, model="forbidden", backend="none", status="403") == 1
    assert m.value(requests, client="anonymous", status="401") == 1

    errors = "llmproxy_errors_total"
    assert m.value(errors) == 3
    assert m.value(errors, plugin="guard", status="403", model="forbidden", client="laptop") == 1
    assert m.value(errors, plugin="guard", status="500", model="crash") == 1
    assert m.value(errors, plugin="none", status="401", client="anonymous") == 1

    attempts = "llmproxy_attempts_total"
    assert m.value(attempts, backend="bad", upstream_model="gpt-4o-mini", outcome="500") == 1
    assert m.value(attempts, backend="good", outcome="200") == 4
    assert m.value(attempts, key="good#0") + m.value(attempts, key="bad#0") == 5, m.labels(attempts, "key")
    assert m.value("llmproxy_failovers_total", from_target="bad:gpt-4o-mini", to_target="good:gpt-4o-mini") == 1
    assert m.value("llmproxy_failovers_total") == 1

    # histograms: one observation per finished flow; TTFT for the stream only
    assert m.value("llmproxy_request_duration_seconds_count") == 7
    assert m.value("llmproxy_request_duration_seconds_count", backend="good", model="gpt-4o-mini", stream="true") == 1
    assert m.value("llmproxy_request_duration_seconds_bucket", backend="good", model="duo", le="+Inf") == 1
    assert m.value("llmproxy_time_to_first_token_seconds_count") == 1
    assert 0 < m.value("llmproxy_time_to_first_token_seconds_sum") < BOUND

    # tokens, exactly what the backend reported through each client
    tokens = "llmproxy_tokens_total"
    usages = [answer.usage, failed_over.usage, streamed_usage]
    assert m.value(tokens, type="input", client="laptop", backend="good") == sum(u.prompt_tokens for u in usages) + message.usage.input_tokens  # type: ignore[union-attr]
    assert m.value(tokens, type="output", client="laptop") == sum(u.completion_tokens for u in usages) + message.usage.output_tokens  # type: ignore[union-attr]
    assert m.value(tokens, type="input", model="duo") == failed_over.usage.prompt_tokens  # type: ignore[union-attr]

    # streams: opened once, closed at the end
    assert m.value("llmproxy_streams_open", frontend="openai_chat") == 0
    assert m.has("llmproxy_streams_open", frontend="openai_chat")
    # nothing in flight now, and the backend key is not resting
    assert m.value("llmproxy_backend_inflight") == 0
    assert m.value("llmproxy_backend_key_resting_seconds", backend="good", key="good#0") == 0
    # never a key's value, anywhere
    for secret in (CLIENT_KEY, BACKEND_KEY, TOKEN):
        assert secret not in m.text


async def test_streams_open_and_inflight_while_a_stream_runs(start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI) -> None:
    fake_openai.script(event_delay=0.3)
    proxy = await start(config(fake_openai, second_fake))
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    async with http.post(proxy.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
        assert response.status == 200
        await response.content.readline()  # the first frame has arrived: the stream is open
        during = await scrape(http, proxy)
        rest = await response.read()
    assert during.value("llmproxy_streams_open", frontend="openai_chat") == 1
    assert during.value("llmproxy_backend_inflight", backend="good", target="good:gpt-4o-mini") == 1
    assert during.value("llmproxy_requests_total") == 0
    assert b"[DONE]" in rest
    await asyncio.sleep(0.05)  # flow_done runs once the answer is complete
    after = await scrape(http, proxy)
    assert after.value("llmproxy_streams_open", frontend="openai_chat") == 0
    assert after.value("llmproxy_backend_inflight") == 0
    assert after.value("llmproxy_requests_total", stream="true", status="200") == 1
    # stream_tokens is off: a pass-through stream's tokens are not decoded for metrics
    assert after.value("llmproxy_tokens_total") == 0


async def test_a_stream_the_client_left_keeps_its_200_and_is_an_error_499(
    start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI
) -> None:
    """requests_total counts the status the client was sent (the 200 of a stream begun),
    errors_total the way it ended (499: the client went away)."""
    fake_openai.script(event_delay=0.3)
    proxy = await start(config(fake_openai, second_fake))
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    async with http.post(proxy.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
        assert response.status == 200
        await response.content.readline()
        response.close()  # gone after the first frame
    for _ in range(50):  # the proxy sees it at its next write
        after = await scrape(http, proxy)
        if after.value("llmproxy_requests_total"):
            break
        await asyncio.sleep(0.1)
    assert after.value("llmproxy_requests_total", stream="true", status="200") == 1
    assert after.value("llmproxy_errors_total", status="499") == 1
    assert after.value("llmproxy_streams_open", frontend="openai_chat") == 0


class History:
    """Reads every flow's answer at flow_done, as a history plugin does."""

    def __init__(self) -> None:
        self.outputs: list[int] = []

    @hookimpl
    def flow_done(self, flow: Any) -> None:
        if flow.response is not None:
            self.outputs.append(flow.response.usage.output_tokens)


async def test_stream_tokens_are_free_once_another_plugin_read_the_answer(fake_openai: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    # History is registered before metrics, so pluggy would call it after metrics' flow_done
    # if metrics were not trylast: then the stream's tokens would not be counted.
    history = History()
    proxy = await start_proxy(
        {"backends": {"good": backend(fake_openai)}, "default_backend": "good", "proxy": {"drain_timeout": 1},
         "plugins": {"metrics": {"collect": "always"}}},
        plugins=[("openai", llmproxy_openai), ("history", history), ("metrics", llmproxy_metrics)], entry_points=False,
    )
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=BOUND)
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True})  # type: ignore[arg-type]
        async for _ in stream:
            pass
        for _ in range(100):  # flow_done runs just after the client has the end of the stream
            if history.outputs:
                break
            await asyncio.sleep(0.01)
        m = await scrape(http, proxy)
    finally:
        await proxy.stop()
    assert history.outputs and history.outputs[0] > 0
    assert m.value("llmproxy_tokens_total", type="output", client="anonymous", backend="good") == history.outputs[0]


async def test_model_labels_are_capped(start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI) -> None:
    proxy = await start(config(fake_openai, second_fake, max_models=2))
    client = openai_client(proxy)
    for model in ("m-one", "m-two", "m-three", "m-four", "m-one"):
        await client.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
    m = await scrape(http, proxy)
    assert m.labels("llmproxy_requests_total", "model") == {"m-one", "m-two", "other"}
    assert m.value("llmproxy_requests_total", model="m-one") == 2
    assert m.value("llmproxy_requests_total", model="other") == 2
    assert m.labels("llmproxy_attempts_total", "upstream_model") == {"m-one", "m-two", "other"}


async def test_commands_and_plugin_answers(start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI) -> None:
    proxy = await start(config(fake_openai, second_fake))
    client = openai_client(proxy)
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "!/help"}])
    assert "help" in (reply.choices[0].message.content or "")
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "!/model(good:gpt-5) hello"}])
    m = await scrape(http, proxy)
    assert m.value("llmproxy_commands_total", command="help") == 1
    assert m.value("llmproxy_commands_total", command="model") == 1
    assert m.value("llmproxy_plugin_answers_total", plugin="commands") == 1
    assert m.value("llmproxy_plugin_actions_total", plugin="commands") >= 2
    assert m.value("llmproxy_requests_total", backend="none", status="200") == 1  # answered without a backend
    assert [r.model for r in fake_openai.requests] == ["gpt-5"]


async def test_a_resting_key_is_shown(start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI) -> None:
    fake_openai.script(status=429, message="slow down", retry_after="30")
    proxy = await start(config(fake_openai, second_fake))
    with pytest.raises(openai.RateLimitError):
        await openai_client(proxy).chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    m = await scrape(http, proxy)
    assert 20 < m.value("llmproxy_backend_key_resting_seconds", backend="good", key="good#0") <= 30
    assert m.value("llmproxy_attempts_total", backend="good", outcome="429") == 1


# -- access ----------------------------------------------------------------------------------


def test_the_access_decision() -> None:
    token = TOKEN.encode()
    assert refusal("", None, loopback_only=True) is None
    assert refusal("", None, loopback_only=False) == (403, NEEDS_TOKEN)
    assert refusal(f"Bearer {TOKEN}", None, loopback_only=False) == (403, NEEDS_TOKEN)
    for loopback in (True, False):
        assert refusal(f"Bearer {TOKEN}", token, loopback) is None
        assert refusal(f"bearer  {TOKEN} ", token, loopback) is None
        assert refusal("", token, loopback) == (401, BAD_TOKEN)
        assert refusal("Bearer wrong", token, loopback) == (401, BAD_TOKEN)
        assert refusal(TOKEN, token, loopback) == (401, BAD_TOKEN)  # not as a bearer token


async def test_a_token_is_required_once_set(start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI) -> None:
    proxy = await start(config(fake_openai, second_fake, token="${METRICS_TOKEN}"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        async with http.get(proxy.url + "/metrics", headers=headers) as response:
            body = await response.json()
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert body["error"]["message"] == BAD_TOKEN
    m = await scrape(http, proxy, token=TOKEN)
    assert m.has("llmproxy_backend_key_resting_seconds", backend="good")


async def test_beyond_loopback_without_a_token_metrics_stay_shut(start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI) -> None:
    # start_proxy listens on 127.0.0.1 whatever proxy.host says; the plugin decides from the config
    proxy = await start({**config(fake_openai, second_fake), "proxy": {"host": "0.0.0.0"}})
    async with http.get(proxy.url + "/metrics") as response:
        assert response.status == 403
        assert "plugins.metrics.token" in (await response.json())["error"]["message"]
    bound = await start({**config(fake_openai, second_fake, token="${METRICS_TOKEN}"), "proxy": {"host": "0.0.0.0"}})
    await scrape(http, bound, token=TOKEN)


async def test_settings_are_checked(start: Start, fake_openai: FakeOpenAI, second_fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METRICS_TOKEN")
    with pytest.raises(ConfigError, match=r"plugins.metrics: token: environment variable METRICS_TOKEN is not set"):
        await start(config(fake_openai, second_fake, token="${METRICS_TOKEN}"))
    with pytest.raises(ConfigError, match=r"plugins.metrics.token"):
        await start(config(fake_openai, second_fake, token="a-literal-token"))
    with pytest.raises(ConfigError, match=r"plugins.metrics.path"):
        await start(config(fake_openai, second_fake, path="/v1/metrics"))


async def test_another_path_and_the_openmetrics_format(start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI) -> None:
    proxy = await start(config(fake_openai, second_fake, path="/internal/metrics"))
    async with http.get(proxy.url + "/internal/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).rstrip().endswith("# EOF")
    async with http.get(proxy.url + "/metrics") as response:
        assert response.status == 404


def test_the_global_registry_is_left_alone() -> None:
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("llmproxy_")]


# -- breaker state, read at scrape time ------------------------------------------------------


def _families(collector: BackendStatusCollector) -> dict[str, list[Any]]:
    return {family.name: family.samples for family in collector.collect()}


def test_breaker_states_are_rendered_when_the_status_has_them() -> None:
    status = {
        "up": {
            "keys": [{"name": "up#0", "resting_for": 0.0}, {"name": "up#1", "resting_for": 12.5}],
            "inflight": {"up:gpt-5": 2},
            "breakers": {"up:gpt-5": {"state": "open", "failures": 5}, "up:gpt-4o": {"state": "half_open"}},
            "limits": {"rpm": {"used": 3, "limit": 60}},
        }
    }
    families = _families(BackendStatusCollector(lambda: status))
    breaker = {(s.labels["target"], s.labels["state"]): s.value for s in families["llmproxy_backend_breaker_state"]}
    assert breaker == {
        ("up:gpt-5", "closed"): 0, ("up:gpt-5", "open"): 1, ("up:gpt-5", "half_open"): 0,
        ("up:gpt-4o", "closed"): 0, ("up:gpt-4o", "open"): 0, ("up:gpt-4o", "half_open"): 1,
    }
    assert {s.labels["key"]: s.value for s in families["llmproxy_backend_key_resting_seconds"]} == {"up#0": 0.0, "up#1": 12.5}
    assert [(s.labels["target"], s.value) for s in families["llmproxy_backend_inflight"]] == [("up:gpt-5", 2.0)]
    assert [(s.labels["window"], s.value) for s in families["llmproxy_backend_rate_used"]] == [("rpm", 3.0)]
    assert [(s.labels["window"], s.value) for s in families["llmproxy_backend_rate_limit"]] == [("rpm", 60.0)]


def test_a_status_without_breakers_or_keys_yields_no_samples() -> None:
    families = _families(BackendStatusCollector(lambda: {"offline": {"type": "offline", "inflight": {}}}))
    assert families["llmproxy_backend_breaker_state"] == []
    assert families["llmproxy_backend_key_resting_seconds"] == []


async def test_breaker_and_rate_windows_of_real_traffic_are_scraped(
    start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI
) -> None:
    good, bad = fake_openai, second_fake
    settings = config(good, bad)
    settings["backends"]["bad"]["breaker"] = {"failures": 1, "cooldown_5xx": 60}
    settings["backends"]["good"]["rpm"] = 100
    bad.script(status=503, message="down")
    proxy = await start(settings)
    client = openai_client(proxy)
    for _ in range(2):
        await client.chat.completions.create(model="duo", messages=HI)  # type: ignore[arg-type]
    assert len(bad.requests) == 1  # the second request skipped bad: its breaker is open
    m = await scrape(http, proxy)
    assert m.value("llmproxy_backend_breaker_state", backend="bad", target="bad:gpt-4o-mini", state="open") == 1
    assert m.value("llmproxy_backend_breaker_state", backend="good", target="good:gpt-4o-mini", state="closed") == 1
    assert m.value("llmproxy_backend_rate_used", backend="good", window="rpm") == 2
    assert m.value("llmproxy_backend_rate_limit", backend="good", window="rpm") == 100


async def test_by_default_flows_are_counted_from_the_first_scrape_on(
    start: Start, http: aiohttp.ClientSession, fake_openai: FakeOpenAI, second_fake: FakeOpenAI
) -> None:
    settings = config(fake_openai, second_fake)
    settings["plugins"] = {}  # the defaults: collect: scraped
    proxy = await start(settings)
    client = openai_client(proxy)
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    assert (await scrape(http, proxy)).value("llmproxy_requests_total") == 0  # before anyone read the metrics
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    assert (await scrape(http, proxy)).value("llmproxy_requests_total") == 2
