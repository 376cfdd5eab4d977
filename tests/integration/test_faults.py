"""Fault injection: every way a backend fails, over real sockets, and what each client sees.

aiohttp clients → llmproxy (a real server) → fake OpenAI upstreams (real servers,
tests/fakes) scripted to answer 429 with and without Retry-After, 500/502/503, hang before
the headers, after the headers, mid-stream, drop the connection mid-body and mid-stream,
send malformed JSON or SSE, or be slow. Each test asserts the client-visible result, the
attempts made (what the fakes *received*, and ``x-llmproxy-attempts``), the breaker and
limiter state (``ProxyContext.backend_status()``), and that the time taken respects the
configured bounds (generous upper bounds only: this machine is shared).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import llmproxy_openai
import pytest
from fakes.openai_upstream import FakeOpenAI

from llmproxy.testing import RunningProxy, start_proxy

BOUND = 15.0
SLACK = 3.0  # seconds allowed beyond a configured bound before a test calls it a hang
HI = [{"role": "user", "content": "say hi"}]
Start = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULT_KEY", "sk-fault-0a1b2c")


@pytest.fixture
def start(proxies: Any) -> Start:
    def start(config: dict[str, Any]) -> Awaitable[RunningProxy]:
        config = {"proxy": {"drain_timeout": 0, "response_headers": True, **config.pop("proxy", {})}, **config}
        return proxies(config, [("openai", llmproxy_openai)])

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND)) as session:
        yield session


@pytest.fixture
async def a() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def b() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


def up(fake: FakeOpenAI, **settings: Any) -> dict[str, Any]:
    return {"type": "openai", "base_url": fake.base_url, "api_keys": ["${FAULT_KEY}"], **settings}


def pair(a: FakeOpenAI, b: FakeOpenAI, a_settings: dict[str, Any] | None = None, **proxy: Any) -> dict[str, Any]:
    """An alias ``m`` over a then b."""
    return {
        "backends": {"a": up(a, **(a_settings or {})), "b": up(b)},
        "models": {"m": {"targets": ["a:gpt-4o-mini", "b:gpt-4o-mini"]}},
        "proxy": proxy,
    }


async def ask(http: aiohttp.ClientSession, proxy: RunningProxy, model: str = "m", stream: bool = False) -> tuple[int, Any, Any, float]:
    """(status, headers, JSON body or the stream's text, seconds taken)."""
    started = time.monotonic()
    async with http.post(proxy.url + "/v1/chat/completions", json={"model": model, "messages": HI, "stream": stream}) as response:
        body = await response.text() if stream else await response.json()
        return response.status, response.headers, body, time.monotonic() - started


def breaker(proxy: RunningProxy, label: str) -> dict[str, Any]:
    backend = label.partition(":")[0]
    return proxy.context.backend_status()[backend]["breakers"][label]


def stream_text(sse: str) -> str:
    import json

    text = []
    for line in sse.splitlines():
        if line.startswith("data: {"):
            data = json.loads(line[6:])
            for choice in data.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


# -- 429 -----------------------------------------------------------------------------------


async def test_429_with_retry_after_fails_over_and_opens_the_breaker_for_that_long(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b))
    a.script_next(status=429, message="slow down", retry_after="20")
    status, headers, body, _ = await ask(http, proxy)
    assert status == 200 and headers["x-llmproxy-backend"] == "b" and headers["x-llmproxy-attempts"] == "2"
    state = breaker(proxy, "a:gpt-4o-mini")
    assert state["state"] == "open" and state["last_failure"] == "rate_limit" and 18 < state["retry_in"] <= 20
    # while open, a is not asked at all
    for _ in range(3):
        status, headers, _, _ = await ask(http, proxy)
        assert status == 200 and headers["x-llmproxy-attempts"] == "1" and headers["x-llmproxy-backend"] == "b"
    assert len(a.requests) == 1 and len(b.requests) == 4


async def test_429_without_retry_after_is_retried_with_backoff_then_fails_over(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    retry = {"attempts": 2, "base_delay": 0.2, "max_delay": 0.4}
    proxy = await start(pair(a, b, {"retry": retry}))
    a.script(status=429, message="busy")
    status, headers, _, took = await ask(http, proxy)
    assert status == 200 and headers["x-llmproxy-backend"] == "b" and headers["x-llmproxy-attempts"] == "4"
    assert len(a.requests) == 3 and len(b.requests) == 1
    # two backoffs of at most 0.2 and 0.4 s (full jitter: possibly almost nothing)
    assert took < 0.6 + SLACK
    state = breaker(proxy, "a:gpt-4o-mini")
    assert state["state"] == "closed" and state["failures"] == 3 and state["last_failure"] == "rate_limit"


async def test_retry_after_is_waited_for_on_the_same_target_when_short(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, retry={"attempts": 1}, breaker={"enabled": False})}, "default_backend": "a"})
    a.script_next(status=429, message="wait a second", retry_after="1")
    status, headers, _, took = await ask(http, proxy, "gpt-4o-mini")
    assert status == 200 and headers["x-llmproxy-attempts"] == "2" and len(a.requests) == 2
    assert 1.0 <= took < 1.0 + SLACK


async def test_a_long_retry_after_is_not_waited_for(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, retry={"attempts": 3, "max_retry_after": 5})}, "default_backend": "a"})
    a.script_next(status=429, message="come back in a minute", retry_after="60")
    status, headers, body, took = await ask(http, proxy, "gpt-4o-mini")
    assert status == 429 and headers["Retry-After"] == "60" and body["error"]["message"] == "come back in a minute"
    assert len(a.requests) == 1 and took < SLACK


# -- 5xx -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 503])
async def test_server_errors_fail_over_and_open_the_breaker_after_the_threshold(code: int, a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b, {"breaker": {"failures": 2, "cooldown_5xx": 0.5}}))
    a.script(status=code, message="upstream trouble")
    for expected_attempts in ("2", "2", "1"):
        status, headers, _, _ = await ask(http, proxy)
        assert status == 200 and headers["x-llmproxy-backend"] == "b" and headers["x-llmproxy-attempts"] == expected_attempts
    assert len(a.requests) == 2  # the third request skipped a: its breaker opened after two failures
    assert breaker(proxy, "a:gpt-4o-mini")["state"] == "open"
    # after the cooldown: half-open, one trial request; a is healthy again, so it closes
    a.script()
    await asyncio.sleep(0.6)
    assert breaker(proxy, "a:gpt-4o-mini")["state"] == "half_open"
    status, headers, _, _ = await ask(http, proxy)
    assert status == 200 and headers["x-llmproxy-backend"] == "a"
    assert breaker(proxy, "a:gpt-4o-mini")["state"] == "closed"


async def test_a_failed_trial_reopens_the_breaker(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b, {"breaker": {"failures": 1, "cooldown_5xx": 0.3}}))
    a.script(status=500)
    await ask(http, proxy)
    await asyncio.sleep(0.4)
    status, headers, _, _ = await ask(http, proxy)  # the trial fails, b answers
    assert status == 200 and headers["x-llmproxy-attempts"] == "2"
    state = breaker(proxy, "a:gpt-4o-mini")
    assert state["state"] == "open" and state["opened"] == 2


async def test_every_breaker_open_answers_503_with_retry_after_without_asking(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, breaker={"failures": 1, "cooldown_5xx": 30})}, "default_backend": "a"})
    a.script(status=502, message="bad gateway")
    status, _, body, _ = await ask(http, proxy, "gpt-4o-mini")
    assert status == 502 and body["error"]["message"] == "bad gateway"
    status, headers, body, took = await ask(http, proxy, "gpt-4o-mini")
    assert status == 503 and body["error"]["code"] == "targets_unavailable" and 28 <= int(headers["Retry-After"]) <= 30
    assert "a:gpt-4o-mini: circuit breaker open (server)" in body["error"]["message"]
    assert len(a.requests) == 1 and took < SLACK


async def test_a_client_error_neither_fails_over_nor_counts_against_the_backend(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b, {"breaker": {"failures": 1}}))
    a.script_next(status=400, message="bad request: messages[0]")
    status, _, body, _ = await ask(http, proxy)
    assert status == 400 and body["error"]["message"] == "bad request: messages[0]"
    assert len(b.requests) == 0 and breaker(proxy, "a:gpt-4o-mini")["state"] == "closed"


# -- hangs and timeouts ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hang_before_the_headers_times_out_per_attempt_and_fails_over(stream: bool, a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b, {"timeout": {"attempt": 0.5}}))
    a.script(hang_after=0)
    status, headers, body, took = await ask(http, proxy, stream=stream)
    assert status == 200 and headers["x-llmproxy-backend"] == "b" and headers["x-llmproxy-attempts"] == "2"
    if stream:
        assert stream_text(body) and body.rstrip().endswith("data: [DONE]")
    assert 0.5 <= took < 0.5 + SLACK
    assert breaker(proxy, "a:gpt-4o-mini")["failures"] == 1 and breaker(proxy, "a:gpt-4o-mini")["last_failure"] == "network"
    await asyncio.wait_for(a.requests[0].disconnected.wait(), BOUND)  # the hung request was abandoned


async def test_the_total_timeout_bounds_every_attempt_together(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b, total_timeout=0.8))
    a.script(hang_after=0)
    b.script(hang_after=0)
    status, _, body, took = await ask(http, proxy)
    assert status == 504 and "did not begin answering within" in body["error"]["message"]
    assert 0.8 <= took < 0.8 + SLACK
    assert len(a.requests) == 1 and len(b.requests) <= 1


async def test_a_stream_silent_after_its_headers_is_asked_again_without_streaming(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, timeout={"read": 0.5})}, "default_backend": "a"})
    a.script_next(hang_after_headers=True)
    status, headers, body, took = await ask(http, proxy, "gpt-4o-mini", stream=True)
    assert status == 200 and headers["x-llmproxy-attempts"] == "2"
    assert [r.json["stream"] for r in a.requests] == [True, False]
    assert stream_text(body) == "Hello from the fake upstream." or stream_text(body)
    assert body.rstrip().endswith("data: [DONE]") and 0.5 <= took < 0.5 + SLACK


async def test_without_stream_fallback_a_silent_stream_fails_over(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b, {"timeout": {"read": 0.5}, "stream_fallback": False}))
    a.script(hang_after_headers=True)
    status, headers, body, _ = await ask(http, proxy, stream=True)
    assert status == 200 and headers["x-llmproxy-backend"] == "b" and len(a.requests) == 1
    assert body.rstrip().endswith("data: [DONE]")


async def test_a_hang_mid_stream_ends_with_an_error_event_after_the_idle_timeout(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b, {"timeout": {"read": 0.5}}))
    a.script(hang_after=3)
    status, _, body, took = await ask(http, proxy, stream=True)
    assert status == 200  # the stream had begun: never retried, ended with an error event
    assert stream_text(body)  # what was sent before the hang reached the client
    assert '"error"' in body and "went silent mid-stream" in body and "[DONE]" not in body
    assert len(b.requests) == 0 and 0.5 <= took < 0.5 + SLACK


# -- dropped connections -----------------------------------------------------------------------


async def test_a_body_cut_short_fails_over(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b))
    a.script_next(cut_body=True)
    status, headers, body, _ = await ask(http, proxy)
    assert status == 200 and headers["x-llmproxy-backend"] == "b" and body["choices"][0]["message"]["content"]
    assert a.requests[0].cut and breaker(proxy, "a:gpt-4o-mini")["last_failure"] == "network"


async def test_a_stream_dropped_before_its_first_event_is_asked_again_without_streaming(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a)}, "default_backend": "a"})
    a.script_next(break_after=0)
    status, headers, body, _ = await ask(http, proxy, "gpt-4o-mini", stream=True)
    assert status == 200 and headers["x-llmproxy-attempts"] == "2" and stream_text(body)
    assert [r.json["stream"] for r in a.requests] == [True, False]


async def test_a_stream_dropped_mid_way_ends_with_an_error_event_and_is_not_retried(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b))
    a.script(break_after=3)
    status, _, body, _ = await ask(http, proxy, stream=True)
    assert status == 200 and stream_text(body) and '"error"' in body and "[DONE]" not in body
    assert len(a.requests) == 1 and len(b.requests) == 0


# -- malformed answers --------------------------------------------------------------------------


async def test_a_body_that_is_not_json_fails_over(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(pair(a, b))
    a.script(malformed=True)
    status, headers, body, _ = await ask(http, proxy)
    assert status == 200 and headers["x-llmproxy-backend"] == "b" and headers["x-llmproxy-attempts"] == "2"


async def test_only_a_body_that_is_not_json_is_a_502(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a)}, "default_backend": "a"})
    a.script(malformed=True)
    status, _, body, _ = await ask(http, proxy, "gpt-4o-mini")
    assert status == 502 and body["error"]["message"] == "backend 'a' sent a body that is not JSON"


@pytest.mark.parametrize("decoded", [False, True], ids=["forwarded", "translated"])
async def test_malformed_sse_reaches_the_client_as_a_well_formed_end(decoded: bool, a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    """A frame that is not JSON, mid-stream: forwarded streams pass the backend's bytes on
    and end; translated ones (an Anthropic client) end with Anthropic's error event. (Garbage
    before anything reached the client fails over instead: the next test.)"""
    proxy = await start({"backends": {"a": up(a)}, "default_backend": "a"})
    a.script(malformed=True, event_delay=0.05)  # one frame per read: the garbage comes after the first events
    if not decoded:
        status, _, body, _ = await ask(http, proxy, "gpt-4o-mini", stream=True)
        assert status == 200 and stream_text(body.replace('data: {"id": "chatcmpl-broken"', "")) is not None
        return
    request = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": HI, "stream": True}
    async with http.post(proxy.url + "/v1/messages", json=request) as response:
        text = await response.text()
    assert response.status == 200 and "event: error" in text and "event: message_stop" not in text


# -- slow backends ----------------------------------------------------------------------------------


async def test_a_slow_stream_is_passed_on_as_it_comes_within_the_idle_timeout(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, timeout={"read": 1.0})}, "default_backend": "a"})
    a.script(event_delay=0.15)
    status, headers, body, took = await ask(http, proxy, "gpt-4o-mini", stream=True)
    events = body.count("data: ")
    assert status == 200 and headers["x-llmproxy-attempts"] == "1" and body.rstrip().endswith("data: [DONE]")
    assert took >= 0.15 * (events - 1) * 0.9


async def test_a_slow_answer_beyond_the_attempt_timeout_is_a_504(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, timeout={"attempt": 0.4})}, "default_backend": "a"})
    a.script(delay=2)
    status, _, body, took = await ask(http, proxy, "gpt-4o-mini")
    assert status == 504 and body["error"]["type"] == "timeout_error" and 0.4 <= took < 0.4 + SLACK


# -- rate limits ------------------------------------------------------------------------------------


async def test_a_target_over_its_rpm_is_skipped(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    config = pair(a, b)
    config["models"]["m"]["targets"] = [{"target": "a:gpt-4o-mini", "rpm": 2}, "b:gpt-4o-mini"]
    proxy = await start(config)
    served = [(await ask(http, proxy))[1]["x-llmproxy-backend"] for _ in range(4)]
    assert served == ["a", "a", "b", "b"] and len(a.requests) == 2
    assert proxy.context.target_limits()["models.m[0]"]["rpm"] == {"used": 2, "limit": 2}


async def test_every_target_over_its_limit_is_a_429_with_retry_after(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, rpm=1)}, "default_backend": "a"})
    assert (await ask(http, proxy, "gpt-4o-mini"))[0] == 200
    status, headers, body, _ = await ask(http, proxy, "gpt-4o-mini")
    assert status == 429 and body["error"]["code"] == "targets_unavailable" and 55 <= int(headers["Retry-After"]) <= 60
    assert "over its rate limit" in body["error"]["message"] and len(a.requests) == 1
    assert proxy.context.backend_status()["a"]["limits"]["rpm"] == {"used": 1, "limit": 1}


async def test_rate_limit_wait_queues_until_the_window_frees_up(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, rpm=1)}, "default_backend": "a", "proxy": {"rate_window": 1.0, "rate_limit_wait": 3}})
    assert (await ask(http, proxy, "gpt-4o-mini"))[0] == 200
    status, _, _, took = await ask(http, proxy, "gpt-4o-mini")
    assert status == 200 and 0.5 <= took < 1.0 + SLACK and len(a.requests) == 2


async def test_the_wait_queue_is_bounded(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, rpm=1)}, "default_backend": "a", "proxy": {"rate_window": 2.0, "rate_limit_wait": 5, "rate_limit_queue": 1}})
    assert (await ask(http, proxy, "gpt-4o-mini"))[0] == 200
    first = asyncio.ensure_future(ask(http, proxy, "gpt-4o-mini"))
    await asyncio.sleep(0.3)  # the first waiter holds the only queue place
    status, _, body, took = await ask(http, proxy, "gpt-4o-mini")
    assert status == 429 and took < 1.0
    assert (await first)[0] == 200


async def test_tpm_counts_the_reported_usage(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, tpm=100_000)}, "default_backend": "a"})
    await ask(http, proxy, "gpt-4o-mini")
    usage = a.requests[0]
    used = proxy.context.backend_status()["a"]["limits"]["tpm"]["used"]
    import json

    reported = json.loads(bytes(usage.sent))["usage"]
    assert used == reported["prompt_tokens"] + reported["completion_tokens"]


# -- capabilities -----------------------------------------------------------------------------------


async def test_a_request_with_tools_skips_a_target_declared_without_them(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    config = pair(a, b, {"capabilities": {"tools": False}})
    proxy = await start(config)
    tools = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]
    async with http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": HI, "tools": tools}) as response:
        assert response.status == 200 and response.headers["x-llmproxy-backend"] == "b"
    assert (await ask(http, proxy))[1]["x-llmproxy-backend"] == "a"  # no tools: a serves
    # and when b fails, a request with tools never fails over to a
    b.script(status=503)
    async with http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": HI, "tools": tools}) as response:
        assert response.status == 503
    assert len(a.requests) == 1


async def test_a_request_too_long_for_every_target_is_a_400_saying_why(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, capabilities={"max_context": 100})}, "default_backend": "a"})
    long = [{"role": "user", "content": "word " * 400}]
    async with http.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": long}) as response:
        body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "no_capable_target"
    assert "exceeds its context (capabilities.max_context: 100)" in body["error"]["message"] and not a.requests


async def test_a_target_declared_unable_to_stream_is_asked_whole_and_re_streamed(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a, capabilities={"streaming": False})}, "default_backend": "a"})
    status, _, body, _ = await ask(http, proxy, "gpt-4o-mini", stream=True)
    assert status == 200 and stream_text(body) and body.rstrip().endswith("data: [DONE]")
    assert not a.requests[0].json.get("stream")


async def test_a_pinned_key_is_the_only_one_used(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULT_KEY_WORK", "sk-work-77")
    backend = up(a, api_keys=["${FAULT_KEY}", {"name": "work", "key": "${FAULT_KEY_WORK}"}], key_strategy="round_robin")
    proxy = await start({"backends": {"a": backend}, "models": {"w": {"targets": [{"target": "a:gpt-4o-mini", "key": "work"}]}}})
    for _ in range(3):
        status, headers, _, _ = await ask(http, proxy, "w")
        assert status == 200 and headers["x-llmproxy-key"] == "work"
    assert [r.key for r in a.requests] == ["sk-work-77"] * 3


async def test_an_unknown_pinned_key_is_a_config_error(a: FakeOpenAI, start: Start) -> None:
    from llmproxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"models.w.targets\[0\].key: backend 'a' has no key named 'home' \(its keys: a#0\)"):
        await start({"backends": {"a": up(a)}, "models": {"w": {"targets": [{"target": "a:gpt-4o-mini", "key": "home"}]}}})


async def test_a_stream_broken_before_anything_reached_the_client_fails_over(a: FakeOpenAI, b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    """An Anthropic client, translated from OpenAI Chat: a's first read holds garbage, so
    nothing was written yet; b serves the whole stream, and a's breaker counts it."""
    proxy = await start(pair(a, b))
    a.script(malformed=True, malformed_at=0)  # garbage first: nothing can have been written
    request = {"model": "m", "max_tokens": 50, "messages": HI, "stream": True}
    async with http.post(proxy.url + "/v1/messages", json=request) as response:
        text = await response.text()
        assert response.status == 200 and response.headers["x-llmproxy-backend"] == "b"
    assert "event: message_stop" in text and "event: error" not in text
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert breaker(proxy, "a:gpt-4o-mini")["failures"] == 1


async def test_a_stream_broken_before_anything_reached_the_client_with_no_other_target_is_an_http_error(a: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"a": up(a)}, "default_backend": "a"})
    a.script(malformed=True, malformed_at=0)
    request = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": HI, "stream": True}
    async with http.post(proxy.url + "/v1/messages", json=request) as response:
        body = await response.json()
    assert response.status == 502 and body["type"] == "error" and body["error"]["message"]


async def test_a_stream_of_nothing_but_done_fails_over_and_alone_is_an_error(b: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    """A backend that answers a stream with `data: [DONE]` and nothing else sent no answer:
    the next target serves it; with none, the client gets an error in its own protocol."""
    from aiohttp import web

    from llmproxy.testing import start_app

    async def done_only(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", done_only)
    url, runner = await start_app(app)
    try:
        empty = {"type": "openai", "base_url": url + "/v1", "api_keys": ["${FAULT_KEY}"]}
        proxy = await start({"backends": {"a": empty, "b": up(b)}, "models": {"m": {"targets": ["a:gpt-4o-mini", "b:gpt-4o-mini"]}}})
        request = {"model": "m", "max_tokens": 50, "messages": HI, "stream": True}
        async with http.post(proxy.url + "/v1/messages", json=request) as response:
            text = await response.text()
        assert response.status == 200 and response.headers["x-llmproxy-backend"] == "b" and "event: message_stop" in text
        async with http.post(proxy.url + "/v1/messages", json={**request, "model": "a:gpt-4o-mini"}) as response:
            body = await response.json()
        assert response.status == 502 and body["type"] == "error" and "before sending any answer" in body["error"]["message"]
    finally:
        await runner.cleanup()


async def test_a_timeout_reaches_an_anthropic_client_as_its_timeout_error(a: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    """Anthropic's own type for a 504 is ``timeout_error`` (its SDKs and agents tell it from
    an ``api_error``); a Gemini client gets ``DEADLINE_EXCEEDED``."""
    import llmproxy_anthropic
    import llmproxy_gemini

    a.script(delay=5)
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]
    proxy = await start_proxy({"proxy": {"drain_timeout": 0}, "backends": {"a": up(a, timeout={"read": 0.3})}, "default_backend": "a"},
                              plugins=plugins, entry_points=False)
    try:
        body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": HI}
        async with http.post(proxy.url + "/v1/messages", json=body) as response:
            anthropic_error = (response.status, await response.json())
        gemini = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
        async with http.post(proxy.url + "/v1beta/models/gpt-4o-mini:generateContent", json=gemini) as response:
            gemini_error = (response.status, await response.json())
    finally:
        await proxy.stop()
    assert anthropic_error[0] == 504 and anthropic_error[1]["error"]["type"] == "timeout_error"
    assert gemini_error[0] == 504 and gemini_error[1]["error"]["status"] == "DEADLINE_EXCEEDED"
