"""How much CPU llmproxy spends per request and per streamed event, next to a bare aiohttp proxy.

A script run by hand, not a test. Run it with the Python that has llmproxy installed::

    python bench/proxy_bench.py --quick               # about 35 s: a smoke run, rough numbers
    python bench/proxy_bench.py                       # about 4 min: the numbers for docs/performance.md
    python bench/proxy_bench.py --json bench.json     # also save every slice and the summary

What runs, each in its own process, all on 127.0.0.1:

- a fake OpenAI Chat Completions backend. Non-streamed requests get a small
  ``chat.completion`` JSON body. Streamed requests get ``chat.completion.chunk`` events ending
  in ``data: [DONE]``, in one of two modes: **burst** writes many events per write, **paced**
  writes one event per write (``--paced-group``) and sleeps ``--pace-ms`` in between, as real
  models do. The text is a fixed pseudo-random sequence of words, not one sentence repeated
  (which the built-in loop_detection plugin would rightly cut short).
- (a) **llmproxy**, the ``llmproxy`` console script, with a generated config.yaml: one
  ``type: openai`` backend pointing at the fake backend, every built-in plugin enabled, and
  ``log_level: warning``.
- (b) **bare**, an aiohttp pass-through written like Home Assistant's ingress proxy: one shared
  ClientSession, the request body streamed with ``data=request.content``, a small response read
  whole, a streamed one forwarded with ``iter_chunks()`` into a ``web.StreamResponse``.
- (c) **direct**: the load generator calls the backend itself, with no proxy in between.

The proxy under test is pinned to one core, the backend and the load generator (this process)
to the other (``taskset -c``; ``os.sched_setaffinity`` if taskset is missing). The load is a
fixed number of requests started at a fixed rate, at most ``--concurrency`` in flight, well
below what saturates the proxy core (the table shows how busy it was).
Every round runs each workload once per configuration, in a short slice, alternating the order
of configurations; each figure is the median over rounds. The CPU time of a process is the sum
of its threads' run time from ``/proc/<pid>/task/*/schedstat``, in nanoseconds, so short slices
measure well (``/proc/<pid>/stat`` counts in 10 ms ticks; ``--clock stat`` uses it anyway).

Workloads, per slice: ``json`` (non-streamed), ``burst-short`` and ``burst-long`` (streams of
``--short-events`` and ``--burst-events`` events), ``paced-short`` and ``paced-long``. The cost of
one event is the slope between the short and the long stream of the same mode, so the cost of
setting up a stream is not counted as event cost; the table shows it separately.

Every response is checked (status, JSON, the text, the number of events, the final ``[DONE]``),
so a broken proxy cannot look fast: any failed check ends the run with exit status 1.

Also measured for llmproxy: the time from spawning the process to the first 200 from
``/healthz`` and the resident memory (VmRSS) when idle after start-up, over ``--starts`` fresh
starts, and the time a SIGTERM takes to stop it (exit status 0).

``--cross`` measures the cross-protocol path: the load generator speaks Anthropic Messages
(``POST /v1/messages``, streamed answers checked event by event: every ``event:`` line,
``message_start`` … ``message_stop``, the text) while llmproxy's backend stays the OpenAI Chat
fake, so llmproxy decodes every chunk, maps it to canonical events and encodes Anthropic
events. The bare proxy cannot translate: it forwards the same request to the backend, which
answers in OpenAI Chat on ``/v1/messages`` too, so the ratios are then llmproxy translating vs
bare forwarding. ``--burst-size N`` (alias of ``--burst-group``) sets the events per write of
burst streams; 100 is the harshest case for a proxy that decodes every event. A proxy slower
than the backend reads several of those writes at once, though; ``--paced-group N`` makes
each paced write N events, read on its own (the backend waits ``--pace-ms`` between writes),
which is how "a few events per read" from a real model looks to both proxies.

``--profile-llmproxy out.prof`` runs llmproxy under cProfile instead (its CPU figures are then
inflated by the profiler; read the profile with ``python -m pstats out.prof``).

Standard library and aiohttp only (uvloop is used where llmproxy would use it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
from aiohttp import web

# -- the fake backend's answers ----------------------------------------------------------------

CHAT_PATH = "/v1/chat/completions"
# --cross: the load generator speaks Anthropic Messages (see cross_request_body).
MESSAGES_PATH = "/v1/messages"
ANTHROPIC_VERSION = "2023-06-01"
MODEL = "gpt-4o-mini"
SERVED_MODEL = "gpt-4o-mini-2024-07-18"
FINGERPRINT = "fp_0ba0d124f1"
WORDS = ("The", " proxy", " forwards", " each", " event", " as", " it", " arrives", ",", " without",
         " buffering", " the", " stream", " or", " changing", " a", " byte", " of", " it", ".")
JSON_ANSWER_WORDS = 40
# role chunk, at least one content chunk, the finish chunk, [DONE]
MIN_EVENTS = 4


def answer_words(words: int) -> list[str]:
    """The first ``words`` words of the fake answer: ``WORDS`` in a fixed pseudo-random order.
    Not the sentence over and over: a text that repeats itself is what the built-in
    loop_detection plugin stops (it would cut long streams short, rightly)."""
    rng = random.Random(20241122)  # the same words in every process, and a prefix of any longer answer
    return [rng.choice(WORDS) for _ in range(words)]


def answer_text(words: int) -> str:
    return "".join(answer_words(words))


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012",
        "object": "chat.completion.chunk",
        "created": 1730000000,
        "model": SERVED_MODEL,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def stream_frames(events: int) -> list[bytes]:
    """``events`` SSE frames: a role chunk, content chunks, a finish chunk and ``[DONE]``."""
    frames = [_chunk({"role": "assistant", "content": "", "refusal": None})]
    frames += [_chunk({"content": word}) for word in answer_words(events - 3)]
    frames.append(_chunk({}, "stop"))
    frames.append(b"data: [DONE]\n\n")
    return frames


def json_answer() -> bytes:
    body = {
        "id": "chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012",
        "object": "chat.completion",
        "created": 1730000000,
        "model": SERVED_MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer_text(JSON_ANSWER_WORDS), "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 61, "completion_tokens": JSON_ANSWER_WORDS, "total_tokens": 61 + JSON_ANSWER_WORDS,
                  "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
        "system_fingerprint": FINGERPRINT,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# In --cross mode the workload travels in the prompt: translating to another protocol keeps
# the messages but drops the unknown top-level fields ``bench_mode`` and ``bench_events``.
BENCH_MARKER = re.compile(rb"\[bench mode=(\w+) events=(\d+)\]")


def workload_of(raw: bytes, body: dict[str, Any]) -> tuple[str, int]:
    """(mode, events) a streamed request asks for: the extra fields, else the prompt marker."""
    if "bench_mode" in body:
        return body["bench_mode"], int(body.get("bench_events", 8))
    found = BENCH_MARKER.search(raw)
    if found is None:
        return "burst", 8
    return found.group(1).decode(), int(found.group(2))


def serve_backend(args: argparse.Namespace) -> None:
    """The fake backend. The request's extra fields ``bench_mode`` and ``bench_events`` (or,
    in --cross mode, a marker in the prompt) say what to send; an OpenAI-compatible proxy
    passes unknown fields through. It answers in OpenAI Chat on both of its paths:
    ``/v1/chat/completions``, and ``/v1/messages``, where a bare proxy in --cross mode
    forwards the Anthropic client's request unchanged (it cannot translate)."""
    answer = json_answer()
    frames_cache: dict[int, list[bytes]] = {}
    pace = args.pace_ms / 1000

    async def completions(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        if not body.get("stream"):
            return web.Response(body=answer, content_type="application/json")
        mode, events = workload_of(raw, body)
        frames = frames_cache.get(events) or frames_cache.setdefault(events, stream_frames(events))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if mode == "paced":
            group = args.paced_group
            for i in range(0, len(frames), group):
                await response.write(b"".join(frames[i:i + group]))
                if i + group < len(frames):
                    await asyncio.sleep(pace)
        else:
            group = args.burst_group
            for i in range(0, len(frames), group):
                await response.write(b"".join(frames[i:i + group]))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT_PATH, completions)
    app.router.add_post(MESSAGES_PATH, completions)
    _serve_and_report(app, args.loop)


# -- the bare pass-through (b) -------------------------------------------------------------------

# As Home Assistant's ingress proxy: hop-by-hop and length/encoding headers are not forwarded.
REQUEST_HEADERS_FILTER = frozenset(("host", "content-length", "content-encoding", "transfer-encoding",
                                    "accept-encoding", "connection", "keep-alive"))
RESPONSE_HEADERS_FILTER = frozenset(("transfer-encoding", "content-length", "content-type", "content-encoding",
                                     "connection", "keep-alive"))
MAX_SIMPLE_RESPONSE_SIZE = 4194000
SESSION = web.AppKey("session", aiohttp.ClientSession)


def serve_bare(args: argparse.Namespace) -> None:
    upstream = args.upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in REQUEST_HEADERS_FILTER}
        try:
            async with request.app[SESSION].request(
                request.method, upstream + request.path_qs, headers=headers, data=request.content,
                allow_redirects=False, skip_auto_headers={aiohttp.hdrs.CONTENT_TYPE},
            ) as result:
                out = {k: v for k, v in result.headers.items() if k.lower() not in RESPONSE_HEADERS_FILTER}
                length = result.headers.get(aiohttp.hdrs.CONTENT_LENGTH)
                if result.status in (204, 304) or (length is not None and int(length) <= MAX_SIMPLE_RESPONSE_SIZE):
                    return web.Response(headers=out, status=result.status, content_type=result.content_type, body=await result.read())
                response = web.StreamResponse(status=result.status, headers=out)
                response.content_type = result.content_type
                await response.prepare(request)
                async for data, _ in result.content.iter_chunks():
                    await response.write(data)
                return response
        except aiohttp.ClientError as error:
            raise web.HTTPBadGateway(text=str(error)) from None

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    _serve_and_report(app, args.loop)


def _serve_and_report(app: web.Application, loop_name: str) -> None:
    """Serve ``app`` on a free loopback port, print ``READY <port>``, stop on SIGTERM."""

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(f"READY {port}", flush=True)
        await stop.wait()
        await runner.cleanup()

    _run(main(), loop_name)


def _run(coro: Any, loop_name: str) -> Any:
    factory = None
    if loop_name == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# -- processes -------------------------------------------------------------------------------------

def cpu_seconds(pid: int, clock: str) -> float:
    """User + system CPU time of a process and all its threads."""
    if clock == "schedstat":
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended between listdir and open
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> tuple[int | None, float]:
        """SIGTERM; return (exit status, seconds to exit)."""
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None, time.perf_counter() - started
        return code, time.perf_counter() - started


class Spawner:
    def __init__(self, workdir: Path, use_taskset: bool) -> None:
        self.workdir = workdir
        self.taskset = shutil.which("taskset") if use_taskset else None
        self.children: list[Child] = []
        self._count = 0

    def spawn(self, name: str, argv: list[str], cpus: set[int] | None, stdout_pipe: bool = False, env: dict[str, str] | None = None) -> Child:
        self._count += 1
        log = self.workdir / f"{self._count:02d}-{name}.log"
        preexec: Callable[[], None] | None = None
        if cpus is not None:
            if self.taskset:
                argv = [self.taskset, "-c", ",".join(map(str, sorted(cpus)))] + argv
            else:
                preexec = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE if stdout_pipe else out, stderr=out,
                                    stdin=subprocess.DEVNULL, preexec_fn=preexec, cwd=self.workdir, env=env)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.stop(timeout=5)


def wait_ready_line(child: Child, timeout: float = 20) -> int:
    """Wait for the child's ``READY <port>`` line; return the port."""
    assert child.proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.proc.stdout], [], [], 0.1)
        if ready:
            data = os.read(child.proc.stdout.fileno(), 4096)
            if not data:
                break
            buffered += data
            if b"\n" in buffered:
                line = buffered.split(b"\n", 1)[0].decode()
                if line.startswith("READY "):
                    return int(line.split()[1])
        if child.proc.poll() is not None:
            break
    raise SystemExit(f"{child.name} did not start:\n{child.tail()}")


def wait_healthz(port: int, child: Child, timeout: float = 20, interval: float = 0.002) -> float:
    """Poll GET /healthz until it answers 200; return the time at which it did (perf_counter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return time.perf_counter()
        except OSError:
            pass
        if child.proc.poll() is not None:
            raise SystemExit(f"{child.name} exited with status {child.proc.returncode} during start-up:\n{child.tail()}")
        time.sleep(interval)
    raise SystemExit(f"{child.name} did not answer /healthz within {timeout:.0f} s:\n{child.tail()}")


def llmproxy_env(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """The environment llmproxy runs in. An installed llmproxy starts from cached bytecode; where
    PYTHONDONTWRITEBYTECODE is set (or the tree is read-only) every start would compile llmproxy's
    modules again, so the cache goes to a directory of the run's own."""
    env = dict(os.environ)
    if args.noop_processor:  # where the bench plugin module is written
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH")]))
    if not args.no_bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    return env


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def llmproxy_command(args: argparse.Namespace, config: Path, profile: str | None) -> list[str]:
    if profile:
        code = (
            "import cProfile, sys\n"
            "from llmproxy.cli import main\n"
            "profiler = cProfile.Profile()\n"
            "profiler.enable()\n"
            "try:\n"
            "    main(['--config', sys.argv[1]], standalone_mode=False)\n"
            "finally:\n"
            "    profiler.disable()\n"
            "    profiler.dump_stats(sys.argv[2])\n"
        )
        return [sys.executable, "-c", code, str(config), str(Path(profile).resolve())]
    if args.llmproxy:
        return [args.llmproxy, "--config", str(config)]
    script = Path(sys.executable).with_name("llmproxy")
    if not script.exists():
        found = shutil.which("llmproxy")
        if not found:
            raise SystemExit("cannot find the llmproxy console script; install llmproxy into this Python or pass --llmproxy PATH")
        script = Path(found)
    return [str(script), "--config", str(config)]


def entry_point_plugins() -> dict[str, bool]:
    """Every plugin in the ``llmproxy`` entry-point group: name → shipped with llmproxy itself.
    The built-ins are what is measured; third-party plugins installed here are disabled."""
    plugins = {}
    for ep in importlib.metadata.entry_points(group="llmproxy"):
        plugins[ep.name] = ep.dist is not None and ep.dist.metadata["Name"].lower() == "llmproxy"
    return dict(sorted(plugins.items()))


NOOP_PROCESSOR_PLUGIN = "bench_noop_processor"
NOOP_PROCESSOR_SOURCE = '''"""Bench plugin: watches every stream and changes nothing (switches on decode → processor → encode)."""

from llmproxy import hookimpl


@hookimpl
def stream_start(flow):
    return lambda event: event
'''


def write_llmproxy_config(path: Path, port: int, backend_url: str, plugins: dict[str, bool], noop_processor: bool = False, alias: int = 0) -> None:
    # JSON is YAML; written as JSON so this script needs no YAML library.
    backend = {"type": "openai", "base_url": backend_url + "/v1", "timeout": {"connect": 5, "read": 60}}
    config: dict[str, Any] = {
        "proxy": {"host": "127.0.0.1", "port": port, "log_level": "warning", "drain_timeout": 5},
        "backends": {"fake": backend},
        "default_backend": "fake",
        "plugins": {name: {"enabled": builtin} for name, builtin in plugins.items()},
    }
    if alias:
        # --alias N: the model the load asks for is an alias over N backends (the same fake
        # server), round robin, each target with an rpm window and every backend its
        # breaker: the routing, limiter and breaker bookkeeping of every request.
        for i in range(1, alias + 1):
            config["backends"][f"fake{i}"] = {**backend, "rpm": 10_000_000}
        config["models"] = {MODEL: {"strategy": "round_robin",
                                    "targets": [{"target": f"fake{i}:{MODEL}", "rpm": 10_000_000} for i in range(1, alias + 1)]}}
    if noop_processor:
        (path.parent / f"{NOOP_PROCESSOR_PLUGIN}.py").write_text(NOOP_PROCESSOR_SOURCE)
        config["plugins"]["load"] = [NOOP_PROCESSOR_PLUGIN]
    path.write_text(json.dumps(config, indent=2) + "\n")


def describe_plugins(args: argparse.Namespace, config: Path) -> dict[str, Any]:
    """What ``llmproxy plugins --json`` says about this config: the plugins and the hook chains."""
    command = llmproxy_command(args, config, None)
    result = subprocess.run(command + ["plugins", "--json"], capture_output=True, text=True, timeout=60, env=llmproxy_env(args, config.parent))
    if result.returncode != 0:
        raise SystemExit(f"llmproxy plugins failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def source_digest() -> str | None:
    """A digest of the llmproxy sources in use (package and built-in plugins), to tell runs
    on different working trees apart."""
    try:
        dist = importlib.metadata.distribution("llmproxy")
    except importlib.metadata.PackageNotFoundError:
        return None
    roots = []
    for module in ["llmproxy"] + [name for name, builtin in entry_point_plugins().items() if builtin]:
        spec = importlib.util.find_spec(module if module == "llmproxy" else f"llmproxy_{module}")
        if spec is not None and spec.origin:
            roots.append(Path(spec.origin).parent)
    digest = hashlib.sha256(dist.version.encode())
    for root in roots:
        for file in sorted(root.rglob("*.py")):
            digest.update(str(file.relative_to(root.parent)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


# -- the load ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    name: str
    stream: bool
    mode: str = ""
    events: int = 0
    requests: int = 0
    rate: float | None = None  # requests started per second; None: as fast as the concurrency allows


def request_body(workload: Workload) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one paragraph."},
            {"role": "user", "content": "Explain in a few sentences what an intercepting proxy for LLM traffic does, "
                                        "and why a developer might put one between a coding agent and its model."},
        ],
        "temperature": 0.2,
        "stream": workload.stream,
    }
    if workload.stream:
        body["bench_mode"] = workload.mode
        body["bench_events"] = workload.events
    return json.dumps(body).encode()


def cross_request_body(workload: Workload) -> bytes:
    """The same request as an Anthropic Messages client writes it (--cross). What to stream
    is said in the prompt: llmproxy keeps the messages when it translates, not unknown fields."""
    prompt = ("Explain in a few sentences what an intercepting proxy for LLM traffic does, "
              "and why a developer might put one between a coding agent and its model.")
    if workload.stream:
        prompt += f" [bench mode={workload.mode} events={workload.events}]"
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 1024,
        "system": "You are a concise assistant. Answer in one paragraph.",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.2,
        "stream": workload.stream,
    }
    return json.dumps(body).encode()


class CheckFailed(Exception):
    pass


def check_json(status: int, body: bytes, expected_text: str) -> None:
    if status != 200:
        raise CheckFailed(f"status {status}: {body[:300]!r}")
    data = json.loads(body)
    text = data["choices"][0]["message"]["content"]
    if text != expected_text:
        raise CheckFailed(f"wrong text: {text[:80]!r}")


def check_stream(status: int, body: bytes, events: int, expected_text: str, sent: bytes = b"",
                 verified: dict[str, bytes] | None = None) -> None:
    """An OpenAI Chat stream with the backend's events and text. A stream llmproxy decoded
    and encoded again (stream processors are loaded) is not byte for byte what the backend
    sent, and may have fewer events (a read's run of text chunks becomes one); parsing every
    such 4000-event answer would make the load generator the bottleneck, so one equal to the
    answer last checked in full in this slice passes as it is."""
    if status != 200:
        raise CheckFailed(f"status {status}: {body[:300]!r}")
    if body == sent:
        return  # forwarded byte for byte: nothing more to check, and cheap enough for long bursts
    if verified is not None and verified.get("body") == body:
        return
    if not body.endswith(b"\n\n"):
        raise CheckFailed(f"stream does not end with a blank line: {body[-80:]!r}")
    frames = body.replace(b"\r\n", b"\n")[:-2].split(b"\n\n")
    # Re-encoded, the text of a read's run of chunks comes as one chunk: fewer events, never more.
    if not min(events, 4) <= len(frames) <= events:
        raise CheckFailed(f"{len(frames)} events received, {events} sent")
    if frames[-1] != b"data: [DONE]":
        raise CheckFailed(f"last event is not data: [DONE]: {frames[-1][:80]!r}")
    text = []
    finish = None
    for frame in frames[:-1]:
        if not frame.startswith(b"data: "):
            raise CheckFailed(f"not a data event: {frame[:80]!r}")
        choice = json.loads(frame[6:])["choices"][0]
        text.append(choice["delta"].get("content") or "")
        finish = choice.get("finish_reason") or finish
    if "".join(text) != expected_text:
        raise CheckFailed(f"wrong text: {''.join(text)[:80]!r}")
    if finish != "stop":
        raise CheckFailed(f"finish_reason {finish!r}, expected 'stop'")
    if verified is not None:
        verified["body"] = body


def check_anthropic_json(status: int, body: bytes, expected_text: str) -> None:
    """A non-streamed Anthropic ``message`` with the expected text (--cross, llmproxy)."""
    if status != 200:
        raise CheckFailed(f"status {status}: {body[:300]!r}")
    data = json.loads(body)
    if data.get("type") != "message" or data.get("role") != "assistant":
        raise CheckFailed(f"not an Anthropic message: {body[:200]!r}")
    text = "".join(block["text"] for block in data["content"] if block["type"] == "text")
    if text != expected_text:
        raise CheckFailed(f"wrong text: {text[:80]!r}")
    if data.get("stop_reason") != "end_turn":
        raise CheckFailed(f"stop_reason {data.get('stop_reason')!r}, expected 'end_turn'")


# The order of Anthropic stream events for one text block: message_start, ping, the block's
# start, its deltas and its stop, message_delta (stop reason, usage), message_stop.
ANTHROPIC_HEAD = ("message_start", "ping", "content_block_start")
ANTHROPIC_TAIL = ("content_block_stop", "message_delta", "message_stop")


def check_anthropic_stream(status: int, body: bytes, events: int, expected_text: str, verified: dict[str, bytes]) -> None:
    """An Anthropic Messages stream carrying the backend's ``events`` (--cross, llmproxy).

    Every frame needs its ``event:`` line, matching the ``type`` of its data; the events come
    in Anthropic's order; between one ``text_delta`` per content chunk the backend sent and
    one in all (llmproxy passes the text of a read's run of chunks on as one delta), joining
    to the expected text; stop reason ``end_turn``. Parsing a 4000-event stream per answer
    would make the load generator the bottleneck, so an answer equal byte for byte to the
    last one checked in full, after ``message_start``, is not parsed again: that frame is
    the only one that differs between answers cut into the same reads (its message id is
    minted per stream) and is checked on its own every time.
    """
    if status != 200:
        raise CheckFailed(f"status {status}: {body[:300]!r}")
    first_end = body.find(b"\n\n")
    first, rest = body[: first_end + 2], body[first_end + 2 :]
    _, start = _anthropic_frame(first[:-2])
    message = start.get("message") or {}
    if start.get("type") != "message_start" or message.get("role") != "assistant" or not str(message.get("id", "")).startswith("msg_"):
        raise CheckFailed(f"first event is not a valid message_start: {first[:200]!r}")
    if verified.get("rest") == rest:
        return
    if not body.endswith(b"\n\n"):
        raise CheckFailed(f"stream does not end with a blank line: {body[-80:]!r}")
    frames = [_anthropic_frame(frame) for frame in body[:-2].split(b"\n\n")]
    names = [name for name, _ in frames]
    deltas = events - 3  # the backend's role chunk, finish chunk and [DONE] carry no text
    middle = names[len(ANTHROPIC_HEAD) : len(names) - len(ANTHROPIC_TAIL)]
    if (
        tuple(names[: len(ANTHROPIC_HEAD)]) != ANTHROPIC_HEAD
        or tuple(names[len(names) - len(ANTHROPIC_TAIL) :]) != ANTHROPIC_TAIL
        or not 1 <= len(middle) <= deltas
        or set(middle) != {"content_block_delta"}
    ):
        raise CheckFailed(f"events out of order or missing: got {len(names)}, starting {names[:4]}, ending {names[-4:]}")
    text = []
    for name, data in frames:
        if name == "content_block_delta":
            if data["index"] != 0 or data["delta"]["type"] != "text_delta":
                raise CheckFailed(f"unexpected delta: {data!r}")
            text.append(data["delta"]["text"])
        elif name in ("content_block_start", "content_block_stop") and data["index"] != 0:
            raise CheckFailed(f"unexpected block index: {data!r}")
    if "".join(text) != expected_text:
        raise CheckFailed(f"wrong text: {''.join(text)[:80]!r}")
    stop = frames[-2][1]["delta"]["stop_reason"]
    if stop != "end_turn":
        raise CheckFailed(f"stop_reason {stop!r}, expected 'end_turn'")
    verified["rest"] = rest


def _anthropic_frame(frame: bytes) -> tuple[str, dict[str, Any]]:
    """(event name, data) of one Anthropic SSE frame: an ``event:`` line, then one ``data:`` line."""
    lines = frame.split(b"\n")
    if len(lines) != 2 or not lines[0].startswith(b"event: ") or not lines[1].startswith(b"data: "):
        raise CheckFailed(f"not an 'event:' + 'data:' frame: {frame[:120]!r}")
    name = lines[0][7:].decode()
    data = json.loads(lines[1][6:])
    if data.get("type") != name:
        raise CheckFailed(f"event: {name} carries data of type {data.get('type')!r}")
    return name, data


@dataclass
class SliceResult:
    config: str
    workload: str
    round: int
    requests: int
    wall_s: float
    proxy_cpu_s: float | None
    backend_cpu_s: float
    loadgen_cpu_s: float
    latencies_ms: list[float] = field(default_factory=list)


async def run_slice(session: aiohttp.ClientSession, url: str, workload: Workload, concurrency: int,
                    cross: bool = False, translated: bool = False) -> list[float]:
    """Start ``workload.requests`` requests at ``workload.rate`` per second, at most
    ``concurrency`` in flight; check every answer. Returns the latencies in ms.

    ``cross``: send Anthropic Messages requests. ``translated``: the answer comes back as
    Anthropic Messages (llmproxy translated it); otherwise it is the backend's OpenAI Chat
    answer, forwarded."""
    body = cross_request_body(workload) if cross else request_body(workload)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    if cross:
        headers |= {"x-api-key": "sk-bench", "anthropic-version": ANTHROPIC_VERSION}
    verified: dict[str, bytes] = {}
    expected = answer_text(workload.events - 3) if workload.stream else answer_text(JSON_ANSWER_WORDS)
    sent = b"".join(stream_frames(workload.events)) if workload.stream else b""
    latencies: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        try:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                data = await response.read()
                status = response.status
            latencies.append((time.perf_counter() - started) * 1000)
            if translated and workload.stream:
                check_anthropic_stream(status, data, workload.events, expected, verified)
            elif translated:
                check_anthropic_json(status, data, expected)
            elif workload.stream:
                check_stream(status, data, workload.events, expected, sent, verified)
            else:
                check_json(status, data, expected)
        finally:
            slots.release()

    loop = asyncio.get_running_loop()
    begin = loop.time()
    tasks = []
    for i in range(workload.requests):
        if workload.rate:
            delay = begin + i / workload.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    return latencies


# -- orchestration ----------------------------------------------------------------------------------

CONFIGS = ("llmproxy", "bare", "direct")
TARGETS = {"request": 1.3, "paced_event": 1.3, "burst_event": 3.0, "idle_rss_mb": 80.0, "ready_s": 1.0}


def workloads(args: argparse.Namespace) -> list[Workload]:
    return [
        Workload("json", False, requests=args.requests, rate=args.json_rate or None),
        Workload("burst-short", True, "burst", args.short_events, args.stream_requests, args.burst_rate or None),
        Workload("burst-long", True, "burst", args.burst_events, args.stream_requests, args.burst_rate or None),
        Workload("paced-short", True, "paced", args.short_events, args.stream_requests, args.paced_rate or None),
        Workload("paced-long", True, "paced", args.paced_events, args.paced_requests, args.paced_rate or None),
    ]


def measure_startup(args: argparse.Namespace, spawner: Spawner, backend_url: str, plugins: dict[str, bool], proxy_cpus: set[int] | None) -> dict[str, Any]:
    """Fresh llmproxy starts: time to ready, idle RSS, and a clean SIGTERM. The first start
    fills the bytecode cache and is reported apart."""
    runs = []
    env = llmproxy_env(args, spawner.workdir)
    for i in range(args.starts + 1):
        port = free_port()
        config = spawner.workdir / f"startup-{i}.yaml"
        write_llmproxy_config(config, port, backend_url, plugins)
        started = time.perf_counter()
        child = spawner.spawn("llmproxy-startup", llmproxy_command(args, config, None), proxy_cpus, env=env)
        ready_at = wait_healthz(port, child)
        time.sleep(args.idle_wait)
        rss = rss_mb(child.proc.pid)
        code, stop_s = child.stop()
        if code != 0:
            raise SystemExit(f"llmproxy exited with status {code} on SIGTERM:\n{child.tail()}")
        runs.append({"ready_s": ready_at - started, "idle_rss_mb": rss, "stop_s": stop_s})
        label = "first start (empty bytecode cache)" if i == 0 else f"start {i}/{args.starts}"
        print(f"  {label}: ready in {(ready_at - started) * 1000:.0f} ms, idle RSS {rss:.1f} MB, "
              f"SIGTERM → exit 0 in {stop_s * 1000:.0f} ms", flush=True)
    first, runs = runs[0], runs[1:]
    return {
        "first": first,
        "runs": runs,
        "ready_s": statistics.median(r["ready_s"] for r in runs),
        "idle_rss_mb": statistics.median(r["idle_rss_mb"] for r in runs),
        "stop_s": statistics.median(r["stop_s"] for r in runs),
    }


async def measure_load(args: argparse.Namespace, pids: dict[str, int | None], urls: dict[str, str], backend_pid: int) -> list[SliceResult]:
    loads = workloads(args)
    results: list[SliceResult] = []
    sessions = {
        name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency), timeout=aiohttp.ClientTimeout(total=120))
        for name in CONFIGS
    }
    clock = args.clock
    try:
        for round_ in range(-1, args.rounds):  # round -1 warms up connections and caches; not kept
            order = CONFIGS if round_ % 2 == 0 else tuple(reversed(CONFIGS))
            for workload in loads:
                for config in order:
                    pid = pids[config]
                    await asyncio.sleep(args.settle)
                    p0 = cpu_seconds(pid, clock) if pid else None
                    b0 = cpu_seconds(backend_pid, clock)
                    l0 = time.process_time()
                    w0 = time.perf_counter()
                    try:
                        latencies = await run_slice(sessions[config], urls[config], workload, args.concurrency,
                                                    cross=args.cross, translated=args.cross and config == "llmproxy")
                    except (CheckFailed, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as error:
                        raise SystemExit(f"check failed for {config}, workload {workload.name}: {type(error).__name__}: {error}")
                    w1 = time.perf_counter()
                    l1 = time.process_time()
                    # let the proxy finish what it does after the last answer (flow_done, closing)
                    await asyncio.sleep(args.settle)
                    p1 = cpu_seconds(pid, clock) if pid else None
                    b1 = cpu_seconds(backend_pid, clock)
                    if round_ >= 0:
                        results.append(SliceResult(config, workload.name, round_, workload.requests, w1 - w0,
                                                   None if p0 is None else p1 - p0,  # type: ignore[operator]
                                                   b1 - b0, l1 - l0, latencies))
            if round_ >= 0:
                done = [r for r in results if r.round == round_ and r.config in ("llmproxy", "bare")]
                brief = "  ".join(f"{r.config[:4]}/{r.workload}={r.proxy_cpu_s / r.requests * 1e6:.0f}µs" for r in done  # type: ignore[operator]
                                  if r.workload in ("json", "burst-long", "paced-long"))
                print(f"  round {round_ + 1}/{args.rounds}: {brief}", flush=True)
    finally:
        for session in sessions.values():
            await session.close()
    return results


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(args: argparse.Namespace, results: list[SliceResult]) -> dict[str, Any]:
    """Per configuration: medians over rounds of CPU per request and per event."""
    by: dict[tuple[str, str, int], SliceResult] = {(r.config, r.workload, r.round): r for r in results}
    rounds = sorted({r.round for r in results})
    summary: dict[str, Any] = {}
    for config in CONFIGS:
        entry: dict[str, Any] = {}
        for process, attr in (("proxy", "proxy_cpu_s"), ("backend", "backend_cpu_s"), ("loadgen", "loadgen_cpu_s")):
            if process == "proxy" and config == "direct":
                continue

            def per_request(workload: str, r: int) -> float:
                s = by[(config, workload, r)]
                return getattr(s, attr) / s.requests * 1e6  # µs

            series: dict[str, list[float]] = {}
            for workload in ("json", "burst-short", "burst-long", "paced-short", "paced-long"):
                series[f"{workload}_us_per_request"] = [per_request(workload, r) for r in rounds]
            for mode, long_events in (("burst", args.burst_events), ("paced", args.paced_events)):
                span = long_events - args.short_events
                series[f"{mode}_us_per_event"] = [(per_request(f"{mode}-long", r) - per_request(f"{mode}-short", r)) / span for r in rounds]
                series[f"{mode}_us_per_event_amortized"] = [per_request(f"{mode}-long", r) / long_events for r in rounds]
            metrics: dict[str, Any] = {key: _median(values) for key, values in series.items()}
            metrics["spread"] = {key: [min(values), max(values)] for key, values in series.items() if values}
            metrics["per_round"] = series
            entry[process] = metrics
        entry["latency_ms_median"] = {
            w: _median([x for r in rounds for x in by[(config, w, r)].latencies_ms])
            for w in ("json", "burst-short", "burst-long", "paced-short", "paced-long")
        }
        if config != "direct":
            entry["proxy_utilization"] = {
                w: _median([by[(config, w, r)].proxy_cpu_s / by[(config, w, r)].wall_s for r in rounds])  # type: ignore[operator]
                for w in ("json", "burst-long", "paced-long")
            }
        entry["requests_per_s"] = {
            w: _median([by[(config, w, r)].requests / by[(config, w, r)].wall_s for r in rounds])
            for w in ("json", "burst-long", "paced-long")
        }
        summary[config] = entry
    return summary


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": version("uvloop"),
        "orjson": version("orjson"),
        "pluggy": version("pluggy"),
        "llmproxy": version("llmproxy"),
        "commit": commit,
        "llmproxy_source_digest": source_digest(),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(args: argparse.Namespace, summary: dict[str, Any], startup: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    a, b = summary["llmproxy"]["proxy"], summary["bare"]["proxy"]

    def ratio(key: str) -> float | None:
        """Median over rounds of llmproxy/bare in the same round: slow spells of the machine
        hit both slices of a round alike and cancel out."""
        pairs = [x / y for x, y in zip(a["per_round"][key], b["per_round"][key]) if y > 0]
        return _median(pairs)

    def ratio_of_medians(key: str) -> float | None:
        return a[key] / b[key] if a[key] and b[key] and b[key] > 0 else None

    ratios = {
        "request": ratio("json_us_per_request"),
        "paced_event": ratio("paced_us_per_event"),
        "burst_event": ratio("burst_us_per_event"),
        "stream_setup": ratio("burst-short_us_per_request"),
    }
    ratios_of_medians = {
        "request": ratio_of_medians("json_us_per_request"),
        "paced_event": ratio_of_medians("paced_us_per_event"),
        "burst_event": ratio_of_medians("burst_us_per_event"),
        "stream_setup": ratio_of_medians("burst-short_us_per_request"),
    }
    verdicts = {
        "request": ratios["request"] is not None and ratios["request"] <= TARGETS["request"],
        "paced_event": ratios["paced_event"] is not None and ratios["paced_event"] <= TARGETS["paced_event"],
        "burst_event": ratios["burst_event"] is not None and ratios["burst_event"] <= TARGETS["burst_event"],
        "idle_rss_mb": startup["idle_rss_mb"] < TARGETS["idle_rss_mb"],
        "ready_s": startup["ready_s"] < TARGETS["ready_s"],
    }
    print()
    print(f"Proxy CPU, µs of the proxy process: median of {args.rounds} rounds [min–max]. "
          "Ratio: median of the rounds' llmproxy/bare (in brackets: ratio of the medians). "
          f"Burst streams: {args.burst_group} events per write; paced: {args.paced_group} per write, {args.pace_ms:g} ms apart.")
    if args.cross:
        print("Cross-protocol run: llmproxy translates Anthropic Messages ⇄ OpenAI Chat; the bare proxy cannot translate "
              "and only forwards bytes, so the ratios are llmproxy translating vs bare forwarding.")
    head = f"{'':<30}{'llmproxy':>22}{'bare':>22}{'llmproxy/bare':>17}  target"
    print(head)
    print("-" * len(head))

    def row(label: str, key: str, target: str = "", spread: bool = True) -> None:
        def cell(m: dict[str, Any]) -> str:
            value = m[key]
            text = _fmt(value, 0 if value is not None and abs(value) >= 100 else 1 if abs(value) >= 1 else 2)
            if spread:
                lo, hi = m["spread"][key]
                text += f" [{lo:.0f}–{hi:.0f}]" if abs(value) >= 10 else f" [{lo:.1f}–{hi:.1f}]" if abs(value) >= 1 else f" [{lo:.2f}–{hi:.2f}]"
            return text

        ratio_text = f"{_fmt(ratio(key), 2)} ({_fmt(ratio_of_medians(key), 2)})"
        print(f"{label:<30}{cell(a):>22}{cell(b):>22}{ratio_text:>17}  {target}")

    row("per non-streamed request", "json_us_per_request", f"≤ {TARGETS['request']}")
    row("per paced event", "paced_us_per_event", f"≤ {TARGETS['paced_event']}")
    row("per burst event", "burst_us_per_event", f"≤ {TARGETS['burst_event']}")
    row(f"per stream of {args.short_events} events", "burst-short_us_per_request")
    row(f"per paced stream, {args.paced_events} ev.", "paced-long_us_per_request")
    row(f"per burst stream, {args.burst_events} ev.", "burst-long_us_per_request")
    print()
    print(f"{'other processes (µs per request)':<34}{'json':>10}{'burst-long':>12}{'paced-long':>12}")
    for config in CONFIGS:
        for process in ("backend", "loadgen"):
            m = summary[config][process]
            print(f"  {config + ' / ' + process:<32}{_fmt(m['json_us_per_request'], 0):>10}{_fmt(m['burst-long_us_per_request'], 0):>12}{_fmt(m['paced-long_us_per_request'], 0):>12}")
    print(f"{'latency, median ms':<34}{'json':>10}{'burst-long':>12}{'paced-long':>12}")
    for config in CONFIGS:
        lat = summary[config]["latency_ms_median"]
        print(f"  {config:<32}{_fmt(lat['json'], 2):>10}{_fmt(lat['burst-long'], 2):>12}{_fmt(lat['paced-long'], 1):>12}")
    print(f"{'requests/s offered (proxy busy)':<34}{'json':>10}{'burst-long':>12}{'paced-long':>12}")
    for config in CONFIGS:
        rps = summary[config]["requests_per_s"]
        u = summary[config].get("proxy_utilization")
        cells = [f"{rps[w]:.0f}" + (f" ({u[w]:.0%})" if u else "") for w in ("json", "burst-long", "paced-long")]
        print(f"  {config:<32}{cells[0]:>10}{cells[1]:>12}{cells[2]:>12}")
    busiest = max(summary[c]["proxy_utilization"][w] for c in ("llmproxy", "bare") for w in ("json", "burst-long", "paced-long"))
    if busiest > 0.7:
        print(f"warning: a proxy core was {busiest:.0%} busy: near saturation, CPU per request is not comparable; lower the rates")
    print()
    print(f"llmproxy start-up (median of {args.starts}, after a first start that fills the bytecode cache: "
          f"{startup['first']['ready_s'] * 1000:.0f} ms): ready {startup['ready_s'] * 1000:.0f} ms (target < {TARGETS['ready_s'] * 1000:.0f} ms), "
          f"idle RSS {startup['idle_rss_mb']:.1f} MB (target < {TARGETS['idle_rss_mb']:.0f} MB), SIGTERM → exit 0 in {startup['stop_s'] * 1000:.0f} ms")
    print(f"RSS after the load: llmproxy {extra['rss_after_load_mb']['llmproxy']:.1f} MB, bare {extra['rss_after_load_mb']['bare']:.1f} MB "
          f"(bare idle {extra['bare_idle_rss_mb']:.1f} MB)")
    print()
    for name, ok in verdicts.items():
        print(f"  {'MET    ' if ok else 'NOT MET'} {name}")
    return {"ratios": ratios, "ratios_of_medians": ratios_of_medians, "verdicts": verdicts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests: under a minute, rough numbers")
    parser.add_argument("--rounds", type=int, help="rounds of slices (default 20; --quick 4)")
    parser.add_argument("--requests", type=int, help="non-streamed requests per slice (default 400; --quick 150)")
    parser.add_argument("--stream-requests", type=int, help="burst streams and short paced streams per slice (default 120; --quick 60)")
    parser.add_argument("--paced-requests", type=int, help="long paced streams per slice (default 48; --quick 16)")
    parser.add_argument("--json-rate", type=float, default=1000, help="non-streamed requests started per second (default 1000; 0: no limit)")
    parser.add_argument("--burst-rate", type=float,
                        help="burst streams started per second (default 200; 50 when llmproxy decodes streams: with --cross, "
                             "or when a plugin implements stream_start, a 4000-event stream takes milliseconds of CPU and "
                             "200/s would saturate the proxy core; 0: no limit)")
    parser.add_argument("--paced-rate", type=float, default=0, help="paced streams started per second (default 0: as the concurrency allows)")
    parser.add_argument("--burst-events", type=int, default=4000, help="events in a long burst stream (default 4000, about 1 MB)")
    parser.add_argument("--paced-events", type=int, default=100, help="events in a long paced stream (default 100)")
    parser.add_argument("--short-events", type=int, default=MIN_EVENTS, help=f"events in a short stream (default {MIN_EVENTS})")
    parser.add_argument("--burst-group", "--burst-size", dest="burst_group", type=int, default=100,
                        help="events per write in burst mode (default 100)")
    parser.add_argument("--pace-ms", type=float, default=1.0, help="sleep between writes in paced mode (default 1 ms)")
    parser.add_argument("--paced-group", type=int, default=1,
                        help="events per write in paced mode (default 1). Unlike a burst, each group is read on its own "
                             "(the backend waits --pace-ms between writes), so this measures N events per read for every proxy")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--starts", type=int, help="fresh llmproxy starts for time-to-ready and idle RSS (default 5; --quick 2)")
    parser.add_argument("--idle-wait", type=float, default=2.0, help="seconds idle after ready before reading RSS (default 2)")
    parser.add_argument("--settle", type=float, default=0.02, help="seconds of quiet before and after each slice (default 0.02)")
    parser.add_argument("--proxy-cpu", type=int, default=1, help="core for the proxy under test (default 1)")
    parser.add_argument("--load-cpu", type=int, default=0, help="core for the backend and load generator (default 0)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--no-taskset", action="store_true", help="pin with os.sched_setaffinity instead of taskset")
    parser.add_argument("--clock", choices=("schedstat", "stat"), default="schedstat" if Path("/proc/self/schedstat").exists() else "stat",
                        help="where CPU time is read from (default schedstat: ns resolution)")
    parser.add_argument("--bare-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop of the bare proxy; auto = the one llmproxy uses (uvloop when installed)")
    parser.add_argument("--llmproxy", metavar="PATH", help="the llmproxy command (default: the console script next to this Python)")
    parser.add_argument("--profile-llmproxy", metavar="FILE", help="run llmproxy under cProfile and write the profile here (inflates its CPU)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="start llmproxy in this environment as it is (with PYTHONDONTWRITEBYTECODE set, it compiles its modules on every start)")
    parser.add_argument("--noop-processor", action="store_true",
                        help="also load a bench plugin whose stream processor passes every event unchanged: measures the "
                             "decode → processors → encode path that any plugin watching streams switches on")
    parser.add_argument("--cross", action="store_true",
                        help="cross-protocol: the load generator speaks Anthropic Messages (POST /v1/messages) and llmproxy "
                             "translates to and from its OpenAI Chat backend; the bare proxy cannot translate and forwards "
                             "the same request to the backend, which answers in OpenAI Chat")
    parser.add_argument("--without", action="append", default=[], metavar="PLUGIN",
                        help="disable this built-in plugin (repeatable), to see what it costs")
    parser.add_argument("--alias", type=int, default=0, metavar="N",
                        help="route the load through an alias of N targets (round robin, rpm windows, breakers) instead of the default backend")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs and logs)")
    parser.add_argument("--json", metavar="FILE", help="also write every slice and the summary as JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (4 if quick else 20)
    args.requests = args.requests or (150 if quick else 400)
    args.stream_requests = args.stream_requests or (60 if quick else 120)
    args.paced_requests = args.paced_requests or (16 if quick else 48)
    args.starts = args.starts or (2 if quick else 5)
    if min(args.short_events, args.burst_events, args.paced_events) < MIN_EVENTS:
        parser.error(f"streams need at least {MIN_EVENTS} events")
    if args.short_events >= min(args.burst_events, args.paced_events):
        parser.error("--short-events must be fewer than --burst-events and --paced-events")
    uvloop_ok = _has_uvloop()
    loop_name = "uvloop" if uvloop_ok else "asyncio"
    bare_loop = loop_name if args.bare_loop == "auto" else args.bare_loop

    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if not pin and not args.no_pin:
        print("warning: fewer than 2 cores; running unpinned", file=sys.stderr)
    proxy_cpus = {args.proxy_cpu} if pin else None
    load_cpus = {args.load_cpu} if pin else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)

    began = time.perf_counter()
    load_before = loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    spawner = Spawner(workdir, use_taskset=not args.no_taskset)
    me = str(Path(__file__).resolve())
    plugins = entry_point_plugins()
    for name in args.without:
        if name not in plugins:
            parser.error(f"--without {name}: no such plugin (installed: {', '.join(sorted(plugins))})")
        plugins[name] = False
    enabled = [name for name, builtin in plugins.items() if builtin]
    disabled = [name for name, builtin in plugins.items() if not builtin]
    print(f"llmproxy bench: {args.rounds} rounds, concurrency {args.concurrency}; built-in plugins enabled: {', '.join(enabled) or 'none'}"
          f"{'; third-party plugins disabled: ' + ', '.join(disabled) if disabled else ''}; "
          f"proxy on cpu {args.proxy_cpu if pin else '-'}, load on cpu {args.load_cpu if pin else '-'}; clock {args.clock}; "
          f"loops: llmproxy {loop_name}, bare {bare_loop}; load average {load_before}; work dir {workdir}", flush=True)
    try:
        backend = spawner.spawn("backend", [sys.executable, me, "_backend", "--loop", loop_name, "--pace-ms", str(args.pace_ms),
                                            "--burst-group", str(args.burst_group), "--paced-group", str(args.paced_group)],
                                load_cpus, stdout_pipe=True)
        backend_url = f"http://127.0.0.1:{wait_ready_line(backend)}"

        print("start-up:", flush=True)
        startup = measure_startup(args, spawner, backend_url, plugins, proxy_cpus)

        port = free_port()
        config = workdir / "llmproxy.yaml"
        write_llmproxy_config(config, port, backend_url, plugins, args.noop_processor, args.alias)
        plugin_info = describe_plugins(args, config)
        chains = {hook: order for hook, order in plugin_info.get("chains", {}).items() if order}
        print("flow hook chains: " + ("; ".join(f"{hook}: {' → '.join(order)}" for hook, order in chains.items()) or "none"), flush=True)
        if args.burst_rate is None:
            decoded = args.cross or bool(chains.get("stream_start"))
            args.burst_rate = 50 if decoded else 200
            print(f"burst streams: {args.burst_rate:.0f} started per second"
                  + (" (llmproxy decodes streams here, so fewer than the 200/s of the pass-through path)" if decoded else ""), flush=True)
        proxy = spawner.spawn("llmproxy", llmproxy_command(args, config, args.profile_llmproxy), proxy_cpus, env=llmproxy_env(args, workdir))
        wait_healthz(port, proxy)
        bare = spawner.spawn("bare", [sys.executable, me, "_bare", "--loop", bare_loop, "--upstream", backend_url], proxy_cpus, stdout_pipe=True)
        bare_url = f"http://127.0.0.1:{wait_ready_line(bare)}"
        time.sleep(args.idle_wait)
        bare_idle_rss = rss_mb(bare.proc.pid)
        pids = {"llmproxy": proxy.proc.pid, "bare": bare.proc.pid, "direct": None}
        path = MESSAGES_PATH if args.cross else CHAT_PATH
        urls = {"llmproxy": f"http://127.0.0.1:{port}{path}", "bare": bare_url + path, "direct": backend_url + path}
        if args.cross:
            print("cross-protocol: Anthropic Messages client → llmproxy → OpenAI Chat backend. The bare proxy cannot translate: "
                  "it forwards the Anthropic request to the backend's /v1/messages, which answers in OpenAI Chat, so every "
                  "ratio below is llmproxy translating vs bare forwarding.", flush=True)

        print("load (per round: proxy CPU per request):", flush=True)
        results = _run(measure_load(args, pids, urls, backend.proc.pid), loop_name)
        extra = {"rss_after_load_mb": {"llmproxy": rss_mb(proxy.proc.pid), "bare": rss_mb(bare.proc.pid)}, "bare_idle_rss_mb": bare_idle_rss}
        code, _ = proxy.stop()
        if code != 0:
            print(f"warning: llmproxy exited with status {code} after the load:\n{proxy.tail()}", file=sys.stderr)
        summary = summarize(args, results)
        outcome = report(args, summary, startup, extra)
        elapsed = time.perf_counter() - began
        load_after = loadavg()
        print(f"\nrun took {elapsed:.0f} s; load average before {load_before}, after {load_after} (on {os.cpu_count()} cores)")
        if args.profile_llmproxy:
            print(f"profile written to {args.profile_llmproxy} (CPU figures above include the profiler's overhead)")
        if args.json:
            out = {
                "machine": machine(),
                "parameters": {k: v for k, v in vars(args).items() if k != "json"} | {"loop": loop_name, "bare_loop": bare_loop,
                                                                                       "plugins": plugins, "pinned": pin},
                "llmproxy_plugins": plugin_info,
                "targets": TARGETS,
                "startup": startup,
                "summary": summary,
                **outcome,
                **extra,
                "elapsed_s": elapsed,
                "loadavg": {"before": load_before, "after": load_after},
                "slices": [vars(r) | {"latencies_ms": None} for r in results],
            }
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            print(f"saved {args.json}")
    finally:
        spawner.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _child_main(role: str, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"proxy_bench.py {role}")
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--pace-ms", type=float, default=1.0)
    parser.add_argument("--burst-group", type=int, default=50)
    parser.add_argument("--paced-group", type=int, default=1)
    parser.add_argument("--upstream", default="")
    args = parser.parse_args(argv)
    if role == "_backend":
        serve_backend(args)
    else:
        serve_bare(args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_backend", "_bare"):
        _child_main(sys.argv[1], sys.argv[2:])
    else:
        sys.exit(main())
