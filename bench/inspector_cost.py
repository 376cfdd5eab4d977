"""What the inspector plugin costs per request: CPU time of one process (proxy, fake backend and
client together, every thread counted) for the same requests with ``plugins.inspector``
enabled (its defaults: bodies kept, in-memory history, tracing off while no browser watches),
with nobody watching and with a browser's event stream open (tracing on), and disabled.
The difference between runs is the inspector's. A script run by hand, not a test::

    python bench/inspector_cost.py [--requests 2000] [--rounds 5]

Run from the repository root (it imports tests/fakes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

import aiohttp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from fakes.openai_upstream import FakeOpenAI  # noqa: E402
from llmproxy.testing import start_proxy  # noqa: E402

KEY = "bench-admin-key-0000"


async def run(mode: str, requests: int, stream: bool) -> float:
    os.environ["BENCH_ADMIN_KEY"] = KEY
    os.environ["BENCH_UPSTREAM_KEY"] = "sk-bench"
    async with FakeOpenAI() as fake:
        inspector: dict[str, Any] = {"admin_key": "${BENCH_ADMIN_KEY}"} if mode != "off" else {"enabled": False}
        config = {"backends": {"up": {"type": "openai", "base_url": fake.base_url, "api_keys": ["${BENCH_UPSTREAM_KEY}"]}},
                  "default_backend": "up", "proxy": {"log_level": "warning"}, "plugins": {"inspector": inspector}}
        proxy = await start_proxy(config)
        async with aiohttp.ClientSession() as http:
            watcher = None
            if mode == "watched":
                watcher = await http.get(proxy.url + "/admin/api/events", headers={"Authorization": f"Bearer {KEY}"})
                await watcher.content.readline()
            body = {"model": "gpt-x", "messages": [{"role": "user", "content": "hello " * 200}], "stream": stream}
            semaphore = asyncio.Semaphore(4)

            async def one() -> None:
                async with semaphore:
                    async with http.post(proxy.url + "/v1/chat/completions", json=body) as response:
                        assert response.status == 200
                        await response.read()

            await asyncio.gather(*(one() for _ in range(50)))  # warm up
            state = proxy.context.state.get("inspector")
            if state is not None:
                await state.history.flush()
            started = time.process_time()
            await asyncio.gather(*(one() for _ in range(requests)))
            if state is not None:
                await state.history.flush()  # the history thread's work counts too
            spent = time.process_time() - started
            if watcher is not None:
                watcher.close()
        await proxy.stop()
    return spent / requests * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for stream in (False, True):
        results: dict[str, list[float]] = {"off": [], "on": [], "watched": []}
        for _ in range(args.rounds):
            for mode in results:
                results[mode].append(await run(mode, args.requests, stream))
        off = statistics.median(results["off"])
        for mode, values in results.items():
            median = statistics.median(values)
            print(f"{'stream' if stream else 'json':<6} inspector {mode:<8} {median:7.0f} µs CPU per request  (+{median - off:5.0f} µs)")


if __name__ == "__main__":
    asyncio.run(main())
