"""Soak: concurrent streaming and non-streaming clients for minutes, through an alias over
three upstreams that fail at random in every way the fault suite knows.

Every request must end in a success or a well-formed error of its protocol (no hang: each
has a client deadline), and after the load the proxy must hold no more tasks, file
descriptors or memory than after the warm-up. Runs in its own tox environment (``tox -e
soak``); ``LLMPROXY_SOAK_SECONDS`` sets the length (default 90), ``LLMPROXY_SOAK_REPORT`` a
file to write the outcome to (docs/reliability.md quotes one).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import llmproxy_anthropic
import llmproxy_openai

from llmproxy.testing import start_proxy

SECONDS = float(os.environ.get("LLMPROXY_SOAK_SECONDS", "90"))
WORKERS = 16
CLIENT_DEADLINE = 20.0  # seconds: a request still running after this is a hang
HI = [{"role": "user", "content": "say hi"}]
MALFORMED = '{"id": "chatcmpl-broken"'  # the fake upstream's malformed frame (tests/fakes)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def check_openai(status: int, text: str, stream: bool) -> str:
    """The outcome's name, or AssertionError when the answer is not well-formed."""
    if status == 200 and not stream:
        body = json.loads(text)
        assert body["choices"][0]["message"]["content"], text
        return "ok"
    if status == 200:
        frames = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert frames, text
        # A forwarded (same-protocol) stream is passed on byte for byte: the fake's injected
        # malformed frame reaches the client as the backend sent it (docs/reliability.md).
        frames = [frame for frame in frames if not frame.startswith(MALFORMED)]
        if frames[-1] == "[DONE]":
            for frame in frames[:-1]:
                json.loads(frame)  # every other frame before the end is JSON
            return "ok"
        # ended early: the last frame is an error event, every frame is JSON or the
        # backend's own bytes forwarded as they came
        last = json.loads(frames[-1])
        assert "error" in last and last["error"]["message"], text
        return "stream error event"
    body = json.loads(text)
    assert body["error"]["message"] and body["error"]["type"], text
    return f"error {status}"


def check_anthropic(status: int, text: str, stream: bool) -> str:
    if status == 200 and not stream:
        body = json.loads(text)
        assert body["type"] == "message" and body["content"], text
        return "ok"
    if status == 200:
        events = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
        datas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        assert len(events) == len(datas) and [d["type"] for d in datas] == events, text
        assert events[0] == "message_start", text
        if events[-1] == "message_stop":
            return "ok"
        assert events[-1] == "error" and datas[-1]["error"]["message"], text
        return "stream error event"
    body = json.loads(text)
    assert body["type"] == "error" and body["error"]["message"], text
    return f"error {status}"


async def worker(http: aiohttp.ClientSession, url: str, until: float, rng: random.Random, outcomes: Counter, failures: list[str]) -> None:
    while time.monotonic() < until:
        stream = rng.random() < 0.5
        anthropic = rng.random() < 0.3
        if anthropic:
            path, body, check = "/v1/messages", {"model": "soak", "max_tokens": 64, "messages": HI, "stream": stream}, check_anthropic
        else:
            path, body, check = "/v1/chat/completions", {"model": "soak", "messages": HI, "stream": stream}, check_openai
        try:
            async with asyncio.timeout(CLIENT_DEADLINE):
                async with http.post(url + path, json=body) as response:
                    text = await response.text()
            outcome = check(response.status, text, stream)
            outcomes[outcome] += 1
            if response.status in (429, 503):  # as the SDKs do: wait as told (capped), then go on
                await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 1.0))
        except TimeoutError:
            failures.append(f"hang: {path} stream={stream} still running after {CLIENT_DEADLINE}s")
        except (AssertionError, ValueError, KeyError, IndexError) as error:
            failures.append(f"malformed answer to {path} stream={stream}: {error!r}"[:600])
        except aiohttp.ClientError as error:
            failures.append(f"connection error on {path} stream={stream}: {error!r}")


async def load(url: str, seconds: float, seed: int) -> tuple[Counter, list[str], int]:
    outcomes: Counter = Counter()
    failures: list[str] = []
    connector = aiohttp.TCPConnector(limit=WORKERS)
    async with aiohttp.ClientSession(connector=connector) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(*(worker(http, url, until, random.Random(seed + i), outcomes, failures) for i in range(WORKERS)))
    return outcomes, failures, sum(outcomes.values()) + len(failures)


async def test_soak(tmp_path: Path) -> None:
    upstreams = subprocess.Popen([sys.executable, str(Path(__file__).with_name("upstreams.py")), "3", "7"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        urls = json.loads(upstreams.stdout.readline())  # type: ignore[union-attr]
        backends = {
            f"u{i}": {
                "type": "openai", "base_url": url,
                "timeout": {"attempt": 2.0, "read": 1.0},
                "retry": {"attempts": 1, "base_delay": 0.05, "max_delay": 0.2, "max_retry_after": 1},
                "breaker": {"failures": 5, "cooldown_5xx": 1, "cooldown_429": 1, "cooldown_network": 1},
            }
            for i, url in enumerate(urls)
        }
        config = {
            "proxy": {"drain_timeout": 2, "total_timeout": 8, "log_level": "error"},
            "backends": backends,
            "models": {"soak": {"strategy": "round_robin", "targets": [f"u{i}:gpt-4o-mini" for i in range(len(urls))]}},
        }
        proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic)], entry_points=False)
        try:
            warm, warm_failures, _ = await load(proxy.url, min(10.0, SECONDS / 6), 1)
            assert not warm_failures, warm_failures[:5]
            await asyncio.sleep(1.5)  # let upstream hangs be noticed and cleaned up
            gc.collect()
            before = {"tasks": len(asyncio.all_tasks()), "fds": fds(), "rss_mb": rss_mb()}
            middle_rss = None
            half = SECONDS / 2
            outcomes, failures, total = await load(proxy.url, half, 100)
            gc.collect()
            middle_rss = rss_mb()
            more, more_failures, more_total = await load(proxy.url, half, 200)
            outcomes.update(more)
            failures.extend(more_failures)
            total += more_total
            await asyncio.sleep(1.5)
            gc.collect()
            after = {"tasks": len(asyncio.all_tasks()), "fds": fds(), "rss_mb": rss_mb()}
            report = {"seconds": SECONDS, "workers": WORKERS, "requests": total, "outcomes": dict(outcomes), "failures": failures[:20],
                      "before": before, "middle_rss_mb": middle_rss, "after": after,
                      "backend_status": {k: v.get("breakers") for k, v in proxy.context.backend_status().items()}}
        finally:
            await proxy.stop()
    finally:
        upstreams.stdin.close()  # type: ignore[union-attr]
        drawn = upstreams.stdout.readline()  # type: ignore[union-attr]
        upstreams.wait(timeout=10)
    report["faults_drawn"] = json.loads(drawn) if drawn.strip() else None
    print(json.dumps(report, indent=2))
    if os.environ.get("LLMPROXY_SOAK_REPORT"):
        Path(os.environ["LLMPROXY_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))
    assert not failures, failures[:10]
    assert outcomes["ok"] > total * 0.85, outcomes  # retries and failover turn most faults (20 % of draws) into answers
    assert after["tasks"] <= before["tasks"], (before, after)  # no task outlives its request
    assert after["fds"] <= before["fds"] + 4, (before, after)  # nor a connection or file
    assert after["rss_mb"] - before["rss_mb"] < 25, (before, after)  # memory stays flat …
    assert after["rss_mb"] - middle_rss < 10, (middle_rss, after)  # … and stops growing
