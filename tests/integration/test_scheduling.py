"""Model-affinity scheduling over real sockets: aiohttp clients → llmproxy (a real server) →
fake OpenAI-compatible upstreams that hold every request until the test releases it
(``tests/fakes/held_openai.py``), so the upstream itself tells how many requests it served at
once and in which order the models arrived.

The proxy's scheduler state is read only to know that a request has joined a queue before
sending the next one (the order of arrival is what is being tested); every outcome is read
from what the upstream received and what the clients got.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import llmproxy_openai
import pytest

from fakes.held_openai import HeldOpenAI
from llmproxy.scheduling import ModelScheduler
from llmproxy.testing import RunningProxy

BOUND = 10.0
HI = [{"role": "user", "content": "say hi"}]

Start = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def start(proxies: Any) -> Start:
    return lambda config: proxies({"proxy": {"drain_timeout": 1}, **config}, [("openai", llmproxy_openai)])


@pytest.fixture
async def held() -> AsyncIterator[HeldOpenAI]:
    async with HeldOpenAI() as fake:
        yield fake



def local(fake: HeldOpenAI, **settings: Any) -> dict[str, Any]:
    return {"type": "openai", "base_url": fake.base_url, **settings}


async def chat(http: aiohttp.ClientSession, proxy: RunningProxy, model: str) -> tuple[int, Any]:
    async with http.post(proxy.url + "/v1/chat/completions", json={"model": model, "messages": HI}) as response:
        return response.status, await response.json()


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def scheduler(proxy: RunningProxy, backend: str = "local") -> ModelScheduler:
    found = proxy.context.providers[backend].scheduler
    assert found is not None
    return found


async def queue_up(http: aiohttp.ClientSession, proxy: RunningProxy, models: list[str], backend: str = "local") -> list["asyncio.Future[tuple[int, Any]]"]:
    """Send one request per model, each only once the one before has joined the queue."""
    sched = scheduler(proxy, backend)
    calls = []
    for model in models:
        before = sched.queued
        calls.append(asyncio.ensure_future(chat(http, proxy, model)))
        await until(lambda: sched.queued == before + 1, f"a request for {model} to queue")
    return calls


async def test_without_max_concurrency_there_is_no_scheduler(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held)}, "default_backend": "local"})
    assert proxy.context.providers["local"].scheduler is None
    calls = [asyncio.ensure_future(chat(http, proxy, "m")) for _ in range(4)]
    await held.until_held(4)  # all four reach the upstream at once
    await held.serve_all(4)
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 4


async def test_the_concurrency_limit_holds(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held, max_concurrency=2)}, "default_backend": "local"})
    calls = [asyncio.ensure_future(chat(http, proxy, "m")) for _ in range(6)]
    await held.until_held(2)
    await until(lambda: scheduler(proxy).queued == 4, "four requests to queue")
    assert held.active == 2 and len(held.order) == 2  # the other four never reached the upstream
    await held.serve_all(6)
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 6
    assert held.peak == 2 and len(held.order) == 6
    assert scheduler(proxy).active == 0


async def test_queued_requests_for_the_loaded_model_go_first(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held, max_concurrency=1)}, "default_backend": "local"})
    first = asyncio.ensure_future(chat(http, proxy, "model-a"))
    await held.until_held(1)  # model-a is loaded and running
    queued = await queue_up(http, proxy, ["model-b", "model-a", "model-a"])
    await held.serve_all(4)
    results = await asyncio.gather(first, *queued)
    assert [status for status, _ in results] == [200] * 4
    # B arrived before the two A's, yet they ran first: no switch while A has waiters.
    assert held.order == ["model-a", "model-a", "model-a", "model-b"]
    assert held.peak == 1


async def test_model_switch_after_bounds_the_wait_of_other_models(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held, max_concurrency=1, model_switch_after=2)}, "default_backend": "local"})
    first = asyncio.ensure_future(chat(http, proxy, "model-a"))
    await held.until_held(1)
    queued = await queue_up(http, proxy, ["model-b", "model-a", "model-a", "model-a", "model-a"])
    await held.serve_all(6)
    assert [status for status, _ in await asyncio.gather(first, *queued)] == [200] * 6
    # Two more A's while B waited, then B; then the A's left.
    assert held.order == ["model-a", "model-a", "model-a", "model-b", "model-a", "model-a"]


async def test_a_client_that_leaves_the_queue_is_removed(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held, max_concurrency=1)}, "default_backend": "local"})
    sched = scheduler(proxy)
    first = asyncio.ensure_future(chat(http, proxy, "model-a"))
    await held.until_held(1)
    [leaving] = await queue_up(http, proxy, ["model-b"])
    leaving.cancel()  # the client hangs up while queued
    await asyncio.gather(leaving, return_exceptions=True)
    await until(lambda: sched.queued == 0 and sched.waiting() == {}, "the waiter to leave the queue")
    held.release()
    assert (await first)[0] == 200
    # The slot is free again and goes to the next request; model-b never reached the upstream.
    after = asyncio.ensure_future(chat(http, proxy, "model-c"))
    await held.serve_all(1)
    assert (await after)[0] == 200
    assert held.order == ["model-a", "model-c"]
    assert sched.active == 0


async def test_a_full_queue_answers_503_and_a_timeout_too(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held, max_concurrency=1, max_queue=1, queue_timeout=0.3)}, "default_backend": "local"})
    sched = scheduler(proxy)
    first = asyncio.ensure_future(chat(http, proxy, "model-a"))
    await held.until_held(1)
    [waiting] = await queue_up(http, proxy, ["model-a"])
    status, body = await chat(http, proxy, "model-a")  # the queue holds one: refused at once
    assert status == 503
    message = body["error"]["message"]
    assert "'local' is busy" in message and "max_queue 1" in message and "max_concurrency 1" in message
    # The queued one waits longer than queue_timeout: 503 too, and it never reached the upstream.
    status, body = await waiting
    assert status == 503 and "no free slot" in body["error"]["message"] and "0.3s" in body["error"]["message"]
    assert sched.queued == 0
    held.release()
    assert (await first)[0] == 200
    assert held.order == ["model-a"]


async def test_a_full_backend_hands_over_to_the_next_target(start: Start, http: aiohttp.ClientSession) -> None:
    async with HeldOpenAI() as busy, HeldOpenAI() as spare:
        proxy = await start({
            "backends": {"local": local(busy, max_concurrency=1, max_queue=0), "spare": local(spare)},
            "models": {"m": {"targets": ["local:m", "spare:m"]}},
        })
        first = asyncio.ensure_future(chat(http, proxy, "m"))
        await busy.until_held(1)
        second = asyncio.ensure_future(chat(http, proxy, "m"))
        await spare.serve_all(1)
        assert (await second)[0] == 200
        busy.release()
        assert (await first)[0] == 200
        assert busy.order == ["m"] and spare.order == ["m"]


async def test_a_stream_holds_its_slot_until_it_closes(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held, max_concurrency=1)}, "default_backend": "local"})
    held.script(model="model-a", hang_after=2)  # the stream begins, then goes silent
    body = {"model": "model-a", "messages": HI, "stream": True}
    opening = asyncio.ensure_future(http.post(proxy.url + "/v1/chat/completions", json=body))
    await held.serve_all(1)
    streaming = await opening
    try:
        assert streaming.status == 200
        await streaming.content.readuntil(b"\n\n")  # the stream is flowing
        [waiting] = await queue_up(http, proxy, ["model-b"])
        assert held.order == ["model-a"]  # still queued behind the open stream
    finally:
        streaming.close()
    # Closing the stream frees the slot: model-b runs.
    await held.serve_all(1)
    assert (await waiting)[0] == 200
    assert held.order == ["model-a", "model-b"] and held.peak == 1


async def test_affinity_spreads_a_model_over_backends_and_prefers_the_loaded_one(start: Start, http: aiohttp.ClientSession) -> None:
    async with HeldOpenAI() as one, HeldOpenAI() as two:
        proxy = await start({
            "backends": {"one": local(one, max_concurrency=1), "two": local(two, max_concurrency=1)},
            "models": {"qwen": {"strategy": "affinity", "targets": ["one:qwen", "two:qwen"]}},
        })
        # Spreading: a free backend first, then the shortest queue.
        calls = [asyncio.ensure_future(chat(http, proxy, "qwen"))]
        await one.until_held(1)
        calls.append(asyncio.ensure_future(chat(http, proxy, "qwen")))
        await two.until_held(1)  # one is busy: two serves
        calls += await queue_up(http, proxy, ["qwen"], backend="one")  # both busy, queues equal: the first
        calls += await queue_up(http, proxy, ["qwen"], backend="two")  # the shorter queue
        await asyncio.gather(one.serve_all(2), two.serve_all(2))
        assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 4
        assert one.order == ["qwen", "qwen"] and two.order == ["qwen", "qwen"]
        assert one.peak == two.peak == 1

        # Affinity: backend one now holds llama; both are free, so qwen goes to two, where it is loaded.
        llama = asyncio.ensure_future(chat(http, proxy, "one:llama"))
        await one.serve_all(1)
        assert (await llama)[0] == 200
        qwen = asyncio.ensure_future(chat(http, proxy, "qwen"))
        await two.serve_all(1)
        assert (await qwen)[0] == 200
        assert one.order == ["qwen", "qwen", "llama"] and two.order == ["qwen", "qwen", "qwen"]


async def test_scheduler_state_in_backend_status(held: HeldOpenAI, start: Start, http: aiohttp.ClientSession) -> None:
    proxy = await start({"backends": {"local": local(held, max_concurrency=1)}, "default_backend": "local"})
    first = asyncio.ensure_future(chat(http, proxy, "model-a"))
    await held.until_held(1)
    queued = await queue_up(http, proxy, ["model-b", "model-b"])
    status = proxy.context.backend_status()["local"]["scheduler"]
    assert status == {"max_concurrency": 1, "active": 1, "loaded": "model-a", "queued": {"model-b": 2}}
    await held.serve_all(3)
    await asyncio.gather(first, *queued)


async def test_a_slot_granted_as_its_waiter_leaves_is_handed_on() -> None:
    # The race no socket test can time: the slot is granted, and the waiter is cancelled
    # before it resumes. The slot must go to the next waiter, not be lost.
    sched = ModelScheduler("local", 1)
    release_first = await sched.acquire("model-a")
    leaving = asyncio.ensure_future(sched.acquire("model-b"))
    staying = asyncio.ensure_future(sched.acquire("model-c"))
    await until(lambda: sched.queued == 2, "both to queue")
    release_first()  # grants model-b's waiter ...
    leaving.cancel()  # ... which leaves before it runs
    await asyncio.gather(leaving, return_exceptions=True)
    release_staying = await asyncio.wait_for(staying, BOUND)
    assert sched.loaded == "model-c" and sched.active == 1 and sched.queued == 0
    release_staying()
    release_staying()  # a second call changes nothing
    assert sched.active == 0
