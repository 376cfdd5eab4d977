"""Fake OpenAI upstreams with random faults, in their own process (so the soak test's
counts of tasks, descriptors and memory are the proxy's alone).

Run as ``python tests/soak/upstreams.py N SEED``: starts N upstreams and prints their base
URLs as one JSON line, then serves until stdin closes. Each request draws one behaviour:
mostly healthy, else a 500, a 429 with Retry-After, a hang before the headers, a hang
mid-stream, a connection dropped mid-stream or mid-body, a malformed body, or slowness.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the fakes

from fakes.common import Behaviour  # noqa: E402
from fakes.openai_upstream import FakeOpenAI  # noqa: E402

FAULTS: list[tuple[float, dict[str, Any]]] = [
    (0.80, {}),
    (0.03, {"status": 500, "message": "soak: internal error"}),
    (0.02, {"status": 503, "message": "soak: overloaded"}),
    (0.02, {"status": 429, "message": "soak: slow down", "retry_after": "1"}),
    (0.02, {"hang_after": 0}),
    (0.02, {"hang_after": 3}),
    (0.02, {"break_after": 2}),
    (0.02, {"cut_body": True}),
    (0.02, {"malformed": True}),
    (0.03, {"event_delay": 0.02, "delay": 0.05}),
]


class FaultyOpenAI(FakeOpenAI):
    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.drawn: dict[str, int] = {}

    def behaviour_for(self, model: Any) -> Behaviour:
        pick, weights = [f for _, f in FAULTS], [w for w, _ in FAULTS]
        fields = self.rng.choices(pick, weights)[0]
        name = ",".join(fields) or "ok"
        self.drawn[name] = self.drawn.get(name, 0) + 1
        del self.requests[:-100]  # a soak runs for minutes: keep only the recent requests
        return replace(Behaviour(), **fields)


async def main(count: int, seed: int) -> None:
    rng = random.Random(seed)
    fakes = [FaultyOpenAI(rng) for _ in range(count)]
    for fake in fakes:
        await fake.start()
    print(json.dumps([fake.base_url for fake in fakes]), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    print(json.dumps([fake.drawn for fake in fakes]), flush=True)
    for fake in fakes:
        await fake.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
