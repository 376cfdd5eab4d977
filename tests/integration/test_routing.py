"""Routing and key reliability, over real sockets: aiohttp or the ``openai`` SDK → llmproxy (a
real aiohttp server) → fake upstreams (real aiohttp servers, tests/fakes).

- alias strategies (``round_robin``, ``weighted``, ``random``, ``least_busy``; the first target
  is chosen, the others stay fallbacks in their listed order) and wildcard alias names;
- many keys per backend: ``key_strategy``, the rest (cooldown) a 429 gives a key, honouring
  Retry-After, and trying the backend's other keys before the next target;
- ``proxy.response_headers``;
- ``GET /readyz``.

Which target and which key served a request is read from what the fake upstream received
(``Received.model``, ``Received.key``), never from the proxy's own account.
"""

from __future__ import annotations

import json
import asyncio
import datetime
import email.utils
import random
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import llmproxy_offline
import llmproxy_openai
import openai
import pytest

from fakes.openai_upstream import FakeOpenAI
from llmproxy.errors import retry_after_seconds
from llmproxy.testing import RunningProxy, free_port, start_proxy

BOUND = 10.0  # seconds: no test waits longer than this for anything
KEYS = {"ROUTE_KEY_0": "sk-route-zero-1f2e3d", "ROUTE_KEY_1": "sk-route-one-4c5b6a", "ROUTE_KEY_2": "sk-route-two-7a8b9c"}
K0, K1, K2 = KEYS.values()
HI = [{"role": "user", "content": "say hi"}]

Start = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[RunningProxy] = []

    async def start(config: dict[str, Any]) -> RunningProxy:
        config = {"proxy": {"drain_timeout": 1, **config.pop("proxy", {})}, **config}
        proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("offline", llmproxy_offline)], entry_points=False)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()



def backend(fake: FakeOpenAI | None, keys: int = 1, **settings: Any) -> dict[str, Any]:
    base_url = fake.base_url if fake is not None else f"http://127.0.0.1:{free_port()}/v1"
    return {"type": "openai", "base_url": base_url, "api_keys": [f"${{{name}}}" for name in list(KEYS)[:keys]], **settings}


async def chat(http: aiohttp.ClientSession, proxy: RunningProxy, model: str, stream: bool = False) -> tuple[int, Any, Any]:
    """(status, headers, body — parsed JSON, or the stream's raw text)."""
    body = {"model": model, "messages": HI, "stream": stream}
    async with http.post(proxy.url + "/v1/chat/completions", json=body) as response:
        payload = await response.text() if stream else await response.json()
        return response.status, response.headers, payload


async def models_served(http: aiohttp.ClientSession, proxy: RunningProxy, fake: FakeOpenAI, model: str, count: int) -> list[str]:
    """Send ``count`` requests for ``model`` one after another; the model of the first
    upstream request each one made."""
    firsts = []
    for _ in range(count):
        before = len(fake.requests)
        status, _, _ = await chat(http, proxy, model)
        assert status == 200
        firsts.append(fake.requests[before].model)
    return firsts


def pool(strategy: str, *targets: Any) -> dict[str, Any]:
    return {"strategy": strategy, "targets": list(targets)}


def two_backends(fake: FakeOpenAI, **models: Any) -> dict[str, Any]:
    """Backends ``a`` and ``b`` on one fake (their targets differ by model name)."""
    return {"backends": {"a": backend(fake), "b": backend(fake)}, "models": models}


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- alias strategies ---------------------------------------------------------------------


async def test_order_always_starts_with_the_first_target(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(two_backends(fake_openai, fast=pool("order", "a:m-a", "b:m-b")))
    assert await models_served(http, proxy, fake_openai, "fast", 4) == ["m-a"] * 4


async def test_round_robin_alternates_and_keeps_the_others_as_fallbacks(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(two_backends(fake_openai, fast=pool("round_robin", "a:m-a", "b:m-b", "a:m-c")))
    assert await models_served(http, proxy, fake_openai, "fast", 6) == ["m-a", "m-b", "m-c"] * 2

    # The chosen target failing hands over to the others, in their listed order.
    fake_openai.script(model="m-b", status=503, message="b is down")
    fake_openai.requests.clear()
    for _ in range(3):
        status, _, _ = await chat(http, proxy, "fast")
        assert status == 200
    assert [r.model for r in fake_openai.requests] == ["m-a", "m-b", "m-a", "m-c"]


async def test_weighted_is_smooth_and_proportional(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(two_backends(fake_openai, mix=pool("weighted", {"target": "a:m-a", "weight": 3}, {"target": "b:m-b", "weight": 1})))
    served = await models_served(http, proxy, fake_openai, "mix", 12)
    # Smooth weighted round robin: deterministic and interleaved, 3:1 exactly per cycle.
    assert served == ["m-a", "m-a", "m-b", "m-a"] * 3


async def test_random_follows_the_weights(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(two_backends(fake_openai, lucky=pool("random", {"target": "a:m-a", "weight": 1}, {"target": "b:m-b", "weight": 3})))
    proxy.context.router.random = random.Random(20240611)  # fixed seed: the same draw every run
    served = await models_served(http, proxy, fake_openai, "lucky", 80)
    share = served.count("m-b") / len(served)
    assert 0.6 < share < 0.9, share  # 0.75 expected
    assert "m-a" in served


async def test_least_busy_picks_the_idle_target(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(two_backends(fake_openai, calm=pool("least_busy", "a:m-a", "b:m-b")))
    router = proxy.context.router
    # Idle: the first listed.
    assert await models_served(http, proxy, fake_openai, "calm", 2) == ["m-a", "m-a"]

    # Hold a:m-a (it never answers): the next request goes to the idle b:m-b.
    fake_openai.script(model="m-a", hang_after=0)
    held = asyncio.ensure_future(chat(http, proxy, "calm"))
    await until(lambda: router.inflight.get("a:m-a") == 1, "the held request to reach a")
    fake_openai.requests.clear()
    status, _, _ = await chat(http, proxy, "calm")
    assert status == 200 and [r.model for r in fake_openai.requests] == ["m-b"]

    # The held request ends (the client gives up): a is idle again and first again.
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    await until(lambda: not router.inflight, "the cancelled request to leave the books")
    fake_openai.script(model="m-a")
    assert await models_served(http, proxy, fake_openai, "calm", 1) == ["m-a"]


async def test_least_busy_counts_a_stream_until_it_ends(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(two_backends(fake_openai, calm=pool("least_busy", "a:m-a", "b:m-b")))
    router = proxy.context.router
    # A stream on a that has begun (headers and two events sent) but not ended.
    fake_openai.script(model="m-a", hang_after=2)
    body = {"model": "calm", "messages": HI, "stream": True}
    async with http.post(proxy.url + "/v1/chat/completions", json=body) as streaming:
        assert streaming.status == 200
        await streaming.content.readuntil(b"\n\n")  # the stream is flowing
        assert router.inflight == {"a:m-a": 1}
        fake_openai.requests.clear()
        status, _, _ = await chat(http, proxy, "calm")
        assert status == 200 and [r.model for r in fake_openai.requests] == ["m-b"]
    await until(lambda: not router.inflight, "the closed stream to leave the books")


# -- wildcard aliases ------------------------------------------------------------------------


async def test_wildcard_aliases(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    config = two_backends(
        fake_openai,
        **{
            "claude-haiku-*": pool("order", "a:haiku-served"),
            "claude-*": pool("order", "b:claude-served"),  # later in the file: haiku names never reach it
            "claude-haiku-special": pool("order", "b:special-served"),  # exact names win over patterns
        },
    )
    config["default_backend"] = "a"
    proxy = await start(config)
    for asked, served in (
        ("claude-haiku-4-5", "haiku-served"),
        ("claude-haiku-special", "special-served"),
        ("claude-sonnet-4", "claude-served"),
        ("b:claude-haiku-4-5", "claude-haiku-4-5"),  # an explicit backend:model is never a pattern's
        ("gpt-4o-mini", "gpt-4o-mini"),  # no alias matches: the default backend
    ):
        assert await models_served(http, proxy, fake_openai, asked, 1) == [served], asked
    async with http.get(proxy.url + "/v1/models") as response:
        ids = [m["id"] for m in (await response.json())["data"]]
    assert "claude-haiku-special" in ids and not any("*" in i for i in ids)


async def test_a_name_no_pattern_matches_is_unknown(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start(two_backends(fake_openai, **{"claude-*": pool("order", "a:x")}))
    status, _, body = await chat(http, proxy, "gpt-4o")
    assert status == 404 and "claude-*" in body["error"]["message"]
    assert fake_openai.requests == []


# -- many keys per backend ----------------------------------------------------------------------


async def test_round_robin_keys_rotate(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai, keys=3, key_strategy="round_robin")}, "default_backend": "up"})
    await models_served(http, proxy, fake_openai, "gpt-4o-mini", 6)
    assert [r.key for r in fake_openai.requests] == [K0, K1, K2, K0, K1, K2]


async def test_keys_from_the_os_keyring_rotate_with_the_others(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    """``keyring:service/name`` through the real keyring package, with an in-memory backend
    standing in for the OS's: resolved once, sent as any key, never shown."""
    import keyring
    from keyring.backend import KeyringBackend

    class MemoryKeyring(KeyringBackend):
        priority = 1  # type: ignore[assignment]

        def __init__(self) -> None:
            super().__init__()
            self.store: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.store.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.store[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            self.store.pop((service, username), None)

    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    try:
        keyring.set_password("llmproxy", "openai-spare", "sk-from-the-keyring-5e6f")
        settings = backend(fake_openai, keys=1, key_strategy="round_robin")
        settings["api_keys"].append("keyring:llmproxy/openai-spare")
        proxy = await start({"backends": {"up": settings}, "default_backend": "up"})
        await models_served(http, proxy, fake_openai, "gpt-4o-mini", 4)
        assert [r.key for r in fake_openai.requests] == [K0, "sk-from-the-keyring-5e6f"] * 2
        assert "sk-from-the-keyring" not in json.dumps(proxy.context.backend_status(), default=str)
    finally:
        keyring.set_keyring(previous)


async def test_fill_first_uses_the_first_key(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai, keys=3)}, "default_backend": "up"})
    await models_served(http, proxy, fake_openai, "gpt-4o-mini", 3)
    # A key whose variable is unset is passed over, not an error.
    monkeypatch.delenv("ROUTE_KEY_0")
    await models_served(http, proxy, fake_openai, "gpt-4o-mini", 1)
    assert [r.key for r in fake_openai.requests] == [K0, K0, K0, K1]


async def test_a_429_tries_the_next_key_at_once_and_rests_the_key(fake_openai: FakeOpenAI, start: Start) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai, keys=2)}, "default_backend": "up", "proxy": {"response_headers": True}})
    fake_openai.script_next(status=429, message="slow down", retry_after="120")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="any", max_retries=0, timeout=BOUND)
    try:
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
        assert raw.parse().choices[0].message.content
        assert [(r.key, r.status) for r in fake_openai.requests] == [(K0, 429), (K1, 200)]
        assert raw.headers["x-llmproxy-attempts"] == "2" and raw.headers["x-llmproxy-key"] == "up#1"
        # K0 rests for the 120 s its 429 asked for: the next requests use K1.
        for _ in range(2):
            await client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
        assert [r.key for r in fake_openai.requests[2:]] == [K1, K1]
    finally:
        await client.close()


async def test_every_key_limited_hands_over_to_the_next_target(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    async with FakeOpenAI() as other:
        proxy = await start({
            "backends": {"up": backend(fake_openai, keys=2), "spare": backend(other)},
            "models": {"smart": pool("order", "up:gpt-4o-mini", "spare:gpt-4o-mini")},
            "proxy": {"response_headers": True},
        })
        fake_openai.script(status=429, message="quota", retry_after="60")
        status, headers, _ = await chat(http, proxy, "smart")
        assert status == 200
        assert [r.key for r in fake_openai.requests] == [K0, K1] and [r.key for r in other.requests] == [K0]
        assert headers["x-llmproxy-backend"] == "spare" and headers["x-llmproxy-attempts"] == "3"


async def test_a_resting_key_is_used_again_after_its_cooldown(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai, keys=2, key_cooldown=0.3)}, "default_backend": "up"})
    fake_openai.script_next(status=429, message="slow down")  # no Retry-After: key_cooldown applies
    await models_served(http, proxy, fake_openai, "gpt-4o-mini", 2)
    assert [r.key for r in fake_openai.requests] == [K0, K1, K1]
    await until_key_used(http, proxy, fake_openai, K0)


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_honoured_over_the_default_cooldown(
    fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession, form: str
) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai, keys=2, key_cooldown=0)}, "default_backend": "up"})
    if form == "seconds":
        retry_after = "2"
    else:
        retry_after = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3), usegmt=True)
    fake_openai.script_next(status=429, message="slow down", retry_after=retry_after)
    await models_served(http, proxy, fake_openai, "gpt-4o-mini", 1)
    # key_cooldown is 0, yet K0 rests as long as Retry-After says.
    await asyncio.sleep(0.2)
    await models_served(http, proxy, fake_openai, "gpt-4o-mini", 2)
    assert [r.key for r in fake_openai.requests] == [K0, K1, K1, K1]
    await until_key_used(http, proxy, fake_openai, K0)


async def until_key_used(http: aiohttp.ClientSession, proxy: RunningProxy, fake: FakeOpenAI, key: str) -> None:
    deadline = time.monotonic() + BOUND
    while fake.last.key != key:
        assert time.monotonic() < deadline, "the resting key was never used again"
        await asyncio.sleep(0.05)
        await models_served(http, proxy, fake, "gpt-4o-mini", 1)


async def test_a_single_key_429_reaches_the_client_and_opens_the_breaker(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    """The backend's 429 reaches the client with its Retry-After; the target's breaker then
    stays open that long, so the next request is answered 429 by llmproxy without asking."""
    proxy = await start({"backends": {"up": backend(fake_openai)}, "default_backend": "up"})
    fake_openai.script_next(status=429, message="slow down", retry_after="30")
    status, headers, body = await chat(http, proxy, "gpt-4o-mini")
    assert status == 429 and headers["Retry-After"] == "30" and body["error"]["message"] == "slow down"
    status, headers, body = await chat(http, proxy, "gpt-4o-mini")
    assert status == 429 and body["error"]["code"] == "targets_unavailable"
    assert 28 <= int(headers["Retry-After"]) <= 30 and "circuit breaker open (rate_limit)" in body["error"]["message"]
    assert len(fake_openai.requests) == 1


async def test_without_the_breaker_every_request_is_sent(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    """With every key resting the backend is still asked (the one resting least long)."""
    proxy = await start({"backends": {"up": {**backend(fake_openai), "breaker": {"enabled": False}}}, "default_backend": "up"})
    fake_openai.script_next(status=429, message="slow down", retry_after="30")
    status, headers, body = await chat(http, proxy, "gpt-4o-mini")
    assert status == 429 and headers["Retry-After"] == "30" and body["error"]["message"] == "slow down"
    status, _, _ = await chat(http, proxy, "gpt-4o-mini")
    assert status == 200 and [r.key for r in fake_openai.requests] == [K0, K0]


def test_retry_after_forms() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(" 1.5 ") == 1.5
    assert retry_after_seconds(None) is None and retry_after_seconds("") is None
    assert retry_after_seconds("soon") is None and retry_after_seconds("nan") is None
    assert retry_after_seconds("-3") == 0.0
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=90)
    assert 80 < retry_after_seconds(email.utils.format_datetime(future, usegmt=True)) <= 90  # type: ignore[operator]
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_keys_stay_references_in_the_config(fake_openai: FakeOpenAI) -> None:
    from llmproxy.config import BackendConfig, parse_config

    section = backend(fake_openai, keys=3, key_strategy="round_robin")
    parse_config({"backends": {"up": section}})
    settings = BackendConfig.model_validate(section)
    dumped = repr(settings) + repr(settings.model_dump())
    assert "ROUTE_KEY_2" in dumped and not any(value in dumped for value in KEYS.values())


# -- response headers -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_response_headers_when_on(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession, stream: bool) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai, keys=2, key_strategy="round_robin")}, "models": {"m": pool("order", "up:gpt-5")},
                         "proxy": {"response_headers": True}})
    for expected_key in ("up#0", "up#1"):
        status, headers, _ = await chat(http, proxy, "m", stream=stream)
        assert status == 200
        assert (headers["x-llmproxy-backend"], headers["x-llmproxy-model"], headers["x-llmproxy-key"], headers["x-llmproxy-attempts"]) == (
            "up", "gpt-5", expected_key, "1")
        assert not any(key in value for value in headers.values() for key in KEYS.values())


async def test_response_headers_on_errors_and_local_backends(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai, models=["gpt-4o-mini"]), "local": {"type": "offline"}},
                         "default_backend": "up", "proxy": {"response_headers": True}})
    fake_openai.script_next(status=400, message="bad")
    status, headers, _ = await chat(http, proxy, "gpt-4o-mini")
    assert status == 400 and headers["x-llmproxy-attempts"] == "1" and headers["x-llmproxy-key"] == "up#0"
    status, headers, _ = await chat(http, proxy, "local:anything", stream=True)
    assert status == 200 and headers["x-llmproxy-backend"] == "local" and "x-llmproxy-key" not in headers
    status, headers, _ = await chat(http, proxy, "gpt-unlisted")  # refused before any attempt
    assert status == 404 and headers["x-llmproxy-attempts"] == "0" and "x-llmproxy-backend" not in headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_response_headers_off_by_default(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession, stream: bool) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai)}, "default_backend": "up"})
    status, headers, _ = await chat(http, proxy, "gpt-4o-mini", stream=stream)
    assert status == 200 and not [h for h in headers if h.lower().startswith("x-llmproxy-")]


# -- /readyz ------------------------------------------------------------------------------------


async def test_readyz_ready_with_one_reachable_backend(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"up": backend(fake_openai), "gone": backend(None)}})
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "ready"
    assert body["backends"]["up"]["state"] == "reachable" and body["backends"]["gone"]["state"] == "unreachable"


async def test_readyz_not_ready_when_nothing_is_reachable(start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"gone": backend(None), "also-gone": backend(None)}})
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "not ready" and body["reason"] == "no backend is reachable"
    assert {name: state["state"] for name, state in body["backends"].items()} == {"gone": "unreachable", "also-gone": "unreachable"}
    assert "127.0.0.1:" in body["backends"]["gone"]["detail"]


async def test_readyz_local_backends_and_none(start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": {"type": "offline"}, "gone": backend(None)}})
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 200 and (await response.json())["backends"]["local"]["state"] == "reachable"
    empty = await start({})
    async with http.get(empty.url + "/readyz") as response:
        assert response.status == 503 and (await response.json())["reason"] == "no backends are configured"


async def test_readyz_caches_and_follows_the_backend(start: Start, http: aiohttp.ClientSession) -> None:
    fake = await FakeOpenAI().start()
    proxy = await start({"backends": {"up": backend(fake)}})
    provider = proxy.context.providers["up"]
    try:
        async with http.get(proxy.url + "/readyz") as response:
            assert response.status == 200
    finally:
        await fake.close()
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 200  # cached for probe_ttl seconds
    provider._probe_cache = None  # as if probe_ttl had passed
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 503


async def test_readyz_details_need_a_client_key(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTE_CLIENT_KEY", "client-key-route")
    proxy = await start({"backends": {"up": backend(fake_openai)}, "auth": {"api_keys": [{"name": "t", "key": "${ROUTE_CLIENT_KEY}"}]}})
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 200 and (await response.json())["backends"]["up"] == {"state": "reachable"}
    async with http.get(proxy.url + "/readyz", headers={"Authorization": "Bearer client-key-route"}) as response:
        assert fake_openai.url.removeprefix("http://") in (await response.json())["backends"]["up"]["detail"]


async def test_backend_status_names_keys_and_rest_times_never_values(fake_openai: FakeOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    """ProxyContext.backend_status(): what the admin API and metrics read."""
    proxy = await start({"backends": {"up": backend(fake_openai, keys=2)}, "default_backend": "up"})
    fake_openai.script_next(status=429, message="slow down", retry_after="120")
    status, _, _ = await chat(http, proxy, "gpt-4o-mini")
    assert status == 200
    report = proxy.context.backend_status()
    up = report["up"]
    assert up["type"] == "openai" and up["protocol"] == "openai_chat" and up["base_url"].startswith(fake_openai.url)
    assert [k["name"] for k in up["keys"]] == ["up#0", "up#1"]
    assert 100 < up["keys"][0]["resting_for"] <= 120 and up["keys"][1]["resting_for"] == 0
    assert up["inflight"] == {} and up["capabilities"]["tools"] is True
    dumped = json.dumps(report)
    assert K0 not in dumped and K1 not in dumped
