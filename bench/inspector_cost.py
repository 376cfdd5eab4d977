"""What the inspector plugin costs per request, measured two ways. A script run by hand, not
a test::

    python bench/inspector_cost.py [--requests 2000] [--rounds 5]
    python bench/inspector_cost.py --hooks [--requests 2000]

The first: CPU time of one process (proxy, fake backend and client together, every thread
counted) for the same requests with ``plugins.inspector`` enabled (its defaults: bodies kept,
in-memory history, tracing off while no browser watches), with nobody watching and with a
browser's event stream open (tracing on), and disabled. The difference between runs is the
inspector's; on a shared machine it is ±20 µs.

The second (``--hooks``) is finer: the time spent in each hook implementation of the
``inspector`` and ``metrics`` plugins (CPU time of the calling thread, wrapped around each call), and the CPU time of the
history's thread, per flow, with the inspector on and nobody watching.

Run from the repository root (it imports tests/fakes).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import aiohttp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import llmproxy_inspector  # noqa: E402
import llmproxy_metrics  # noqa: E402
from fakes.openai_upstream import FakeOpenAI  # noqa: E402
from llmproxy.testing import start_proxy  # noqa: E402

KEY = "bench-admin-key-0000"
HOOKS = {"inspector": (llmproxy_inspector, ("request", "flow_done")), "metrics": (llmproxy_metrics, ("stream_start", "flow_done"))}


def history_thread_cpu() -> float:
    """CPU seconds the inspector's history thread has used so far (0 if it has none)."""
    for thread in threading.enumerate():
        if thread.name.startswith("llmproxy-history") and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return 0.0


async def run(mode: str, requests: int, stream: bool, after_warmup: Callable[[], None] | None = None) -> tuple[float, float]:
    """(CPU µs per request for the whole process, of which the history thread's)."""
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
            if after_warmup is not None:
                after_warmup()
            started, thread_started = time.process_time(), history_thread_cpu()
            await asyncio.gather(*(one() for _ in range(requests)))
            if state is not None:
                await state.history.flush()  # the history thread's work counts too
            spent, thread_spent = time.process_time() - started, history_thread_cpu() - thread_started
            if watcher is not None:
                watcher.close()
        await proxy.stop()
    return spent / requests * 1e6, thread_spent / requests * 1e6


def timed_hooks() -> tuple[dict[str, float], Callable[[], None]]:
    """Wrap the plugins' hooks with a timer (before the proxy registers them); returns the
    running totals and a function that zeroes them."""
    totals: dict[str, float] = defaultdict(float)
    for plugin, (module, names) in HOOKS.items():
        for name in names:
            original = getattr(module, name)

            def timer(*args: Any, _original: Any = original, _key: str = f"{plugin}.{name}", **kwargs: Any) -> Any:
                began = time.thread_time()  # CPU: waiting for the GIL is not the hook's cost
                try:
                    return _original(*args, **kwargs)
                finally:
                    totals[_key] += time.thread_time() - began

            setattr(module, name, functools.wraps(original)(timer))
    return totals, totals.clear


async def hooks(requests: int) -> None:
    totals, reset = timed_hooks()
    for stream in (False, True):
        _, thread = await run("on", requests, stream, after_warmup=reset)
        kind = "stream" if stream else "json"
        for key, seconds in sorted(totals.items()):
            print(f"{kind:<6} {key:<22} {seconds / requests * 1e6:6.1f} µs per flow")
        print(f"{kind:<6} {'history thread (CPU)':<22} {thread:6.1f} µs per flow")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hooks", action="store_true", help="time each hook of the inspector and metrics plugins instead")
    args = parser.parse_args()
    if args.hooks:
        await hooks(args.requests)
        return
    for stream in (False, True):
        results: dict[str, list[float]] = {"off": [], "on": [], "watched": []}
        for _ in range(args.rounds):
            for mode in results:
                results[mode].append((await run(mode, args.requests, stream))[0])
        off = statistics.median(results["off"])
        for mode, values in results.items():
            median = statistics.median(values)
            print(f"{'stream' if stream else 'json':<6} inspector {mode:<8} {median:7.0f} µs CPU per request  (+{median - off:5.0f} µs)")


if __name__ == "__main__":
    asyncio.run(main())
