"""CPU per streamed event of each step of llmproxy's decode → processors → encode path.

A script run by hand, not a test, next to ``proxy_bench.py`` (which measures whole processes).
This one times the steps in-process, without a profiler, on the stream the bench's fake
backend sends (OpenAI Chat chunks of about 270 bytes), cut into reads of ``--per-read``
events::

    python bench/stream_steps.py                  # 100 events per read, as the bench's bursts
    python bench/stream_steps.py --per-read 1     # one event per read, as paced streams

Each figure is the fastest of ``--repeats`` runs over a ``--events``-event stream, divided by
the number of events. Pin it to a quiet core (``taskset -c 1``) for steady numbers.

Steps: ``split`` (SSE framing), ``json`` (``orjson.loads`` of every payload), ``map`` (the rest
of the OpenAI Chat decoder's general path: chunks to canonical events), ``decode`` (the whole
decoder as it runs, bulk fast path included: a read of plain text chunks is mapped without a
parse per chunk, so the three steps before do not add up to it), ``fold`` (``ResponseBuilder``, paid
only when someone reads ``flow.response`` of a stream), ``encode`` (each front-end's stream
encoder). ``relay`` is the whole path through the pipeline (``Writer.relay``, the client
write replaced by a no-op) for an Anthropic and an OpenAI Chat client, with no processor and
with one that passes every event unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Callable

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench  # noqa: E402  (the fake backend's stream)

from llmproxy import pipeline  # noqa: E402
from llmproxy.canonical import ResponseBuilder  # noqa: E402
from llmproxy.codecs import get_codec  # noqa: E402
from llmproxy.codecs.base import SSESplitter  # noqa: E402
from llmproxy.flow import Flow  # noqa: E402
from llmproxy.providers import UpstreamStream  # noqa: E402

FRONTENDS = ("anthropic", "openai_chat", "openai_responses", "gemini")


class _NullResponse:
    """Stands in for the client's StreamResponse: writes cost nothing here."""

    async def write(self, data: bytes) -> None:
        pass

    async def write_eof(self) -> None:
        pass


def _best(run: Callable[[], Any], repeats: int, events: int) -> float:
    """µs per event: the fastest of ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) / events * 1e6


def _relay(reads: list[bytes], frontend: str, processors: list[tuple[str, Any]]) -> None:
    body = {"model": proxy_bench.MODEL, "stream": True, "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}
    flow = Flow(frontend, body, proxy_bench.MODEL, True)
    writer = pipeline.Writer(None, get_codec(frontend), flow)  # type: ignore[arg-type]
    writer.response = _NullResponse()  # type: ignore[assignment]
    writer.started = True

    pending = reads[::-1]

    async def read() -> bytes:  # as a provider reading a socket gives them: one call per read
        return pending.pop() if pending else b""

    asyncio.run(writer.relay(UpstreamStream("openai_chat", read=read), processors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=4000, help="events in the stream (default 4000)")
    parser.add_argument("--per-read", type=int, default=100, help="events per upstream read (default 100)")
    parser.add_argument("--repeats", type=int, default=30, help="runs per step; the fastest counts (default 30)")
    args = parser.parse_args()
    frames = proxy_bench.stream_frames(args.events)
    reads = [b"".join(frames[i : i + args.per_read]) for i in range(0, len(frames), args.per_read)]
    n, repeats = args.events, args.repeats

    def split() -> None:
        splitter = SSESplitter()
        for read in reads:
            splitter.feed(read)

    payloads = [data for read in reads for _, data in SSESplitter().feed(read) if data != b"[DONE]"]

    def parse() -> None:
        for data in payloads:
            orjson.loads(data)

    def general() -> None:
        decoder = get_codec("openai_chat").stream_decoder()
        decoder._learn = 0  # never learns the stream's chunk shape: every read takes the general path
        for read in reads:
            decoder.feed(read)

    def decode() -> None:
        decoder = get_codec("openai_chat").stream_decoder()
        for read in reads:
            decoder.feed(read)

    decoder = get_codec("openai_chat").stream_decoder()
    batches = [decoder.feed(read) for read in reads]
    events = [event for batch in batches for event in batch]

    def fold() -> None:
        builder = ResponseBuilder(proxy_bench.MODEL)
        for event in events:
            builder.add(event)
        builder.build()

    steps = {"split": _best(split, repeats, n), "json": _best(parse, repeats, n)}
    steps["map"] = _best(general, repeats, n) - steps["split"] - steps["json"]
    steps["decode"] = _best(decode, repeats, n)
    steps["fold"] = _best(fold, repeats, n)
    body = {"model": proxy_bench.MODEL, "stream": True, "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}
    for frontend in FRONTENDS:
        codec = get_codec(frontend)

        def encode() -> None:
            encoder = codec.stream_encoder(Flow(frontend, body, proxy_bench.MODEL, True))
            for batch in batches:
                encoder.encode(batch)

        steps[f"encode {frontend}"] = _best(encode, repeats, n)
    noop = [("noop", lambda event: event)]
    short = [b"".join(frames[:2]), b"".join(frames[-2:])]  # a 4-event stream: what setting up a stream costs
    for frontend in ("anthropic", "openai_chat"):
        for label, processors in (("", []), (", one no-op processor", noop)):
            whole = _best(lambda: _relay(reads, frontend, list(processors)), max(5, repeats // 3), 1)
            setup = _best(lambda: _relay(short, frontend, list(processors)), max(5, repeats // 3), 1)
            steps[f"relay to {frontend}{label}"] = (whole - setup) / (n - 4)
    print(f"µs per event, {n} events, {args.per_read} per read (fastest of {repeats} runs):")
    for name, value in steps.items():
        print(f"  {name:<42}{value:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
