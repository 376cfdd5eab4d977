"""The ``llmproxy`` command, run as a real process on real sockets.

Serving on the built-in offline default, overrides, signals and the bounded drain,
``config validate`` (exit codes and precise messages), the bind-address guard, ``plugins``,
and backend keys never showing up in any output.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from llmproxy import __version__
from llmproxy.manager import FLOW_HOOKS
from llmproxy.testing import free_port, start_app
from proxy_process import ProxyProcess, clean_env, run_cli, write_config

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=20)
OFFLINE = "backends:\n  offline: {type: offline}\ndefault_backend: offline\n"


def chat(text: str, stream: bool = False, model: str = "offline-echo") -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}


def sse_text(body: bytes) -> tuple[str, bool]:
    """(the streamed content joined, whether the stream ended with [DONE])."""
    text, done = [], False
    for line in body.decode().splitlines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        for choice in json.loads(data).get("choices", ()):
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text), done


async def ask(url: str, text: str, stream: bool = False, headers: dict[str, str] | None = None, model: str = "offline-echo") -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.post(f"{url}/v1/chat/completions", json=chat(text, stream, model), headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                return response.status, body.decode()
            if stream:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                content, done = sse_text(body)
                assert done, body
                return response.status, content
            return response.status, json.loads(body)["choices"][0]["message"]["content"]


# -- serving ---------------------------------------------------------------------------------


async def test_no_config_serves_the_offline_default(tmp_path: Path, record_property: Any) -> None:
    with ProxyProcess("--port", "0", cwd=tmp_path) as proxy:
        url = await proxy.ready()
        # Not a timing assertion: recorded so the start-up time is visible in every run.
        print(f"\nllmproxy start-up to ready: {proxy.ready_after * 1000:.0f} ms")  # type: ignore[operator]
        record_property("ready_after_seconds", proxy.ready_after)
        assert url.startswith("http://127.0.0.1:")
        assert "backends: offline; default: offline" in proxy.output

        assert await ask(url, "hello there") == (200, "You said: hello there")
        assert await ask(url, "hello streaming world", stream=True) == (200, "You said: hello streaming world")
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{url}/v1/models") as response:
                ids = [m["id"] for m in (await response.json())["data"]]
                assert "offline-echo" in ids and "offline:offline-echo" in ids

        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0
        assert "stopped" in proxy.output


EXAMPLE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_every_example_config_is_valid(path: Path) -> None:
    # Each ${VAR} it refers to is given a stand-in value, as a user would set it.
    variables = re.findall(r"\$\{(\w+)\}", path.read_text())
    result = run_cli("config", "validate", "--config", str(path), env=clean_env(**{name: "stand-in" for name in variables}))
    assert result.returncode == 0, result.stderr
    assert f"{path}: valid" in result.stdout


async def test_the_offline_example_config_serves_its_alias() -> None:
    path = Path(__file__).resolve().parents[1] / "config" / "offline.yaml"
    with ProxyProcess("--config", str(path), "--port", "0") as proxy:
        url = await proxy.ready()
        assert await ask(url, "hello alias", model="demo") == (200, "You said: hello alias")
        assert await ask(url, "hi", model="scripted:any") == (200, "Hello! I am a scripted reply.")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0


async def test_host_port_and_log_level_override_the_file(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        # The file asks for a non-loopback address without keys (refused) and a port that is
        # taken: it only starts if both flags win. --log-level info brings back the ready line.
        config = write_config(tmp_path, f"proxy: {{host: 0.0.0.0, port: {busy_port}, log_level: warning}}\n{OFFLINE}")
        with ProxyProcess("--config", str(config), "--host", "127.0.0.1", "--port", "0", "--log-level", "info") as proxy:
            url = await proxy.ready()
            assert url.startswith("http://127.0.0.1:") and not url.endswith(f":{busy_port}")
            assert await ask(url, "hi") == (200, "You said: hi")

        # Without the flags the file wins, and the port really is taken: a precise error, exit 2.
        config = write_config(tmp_path, f"proxy: {{port: {busy_port}}}\n{OFFLINE}")
        result = run_cli("--config", str(config))
        assert result.returncode == 2, result.stderr
        assert f"proxy.port: cannot listen on 127.0.0.1:{busy_port}" in result.stderr

    # --log-level warning silences the file's info level: no ready line, but it serves.
    port = free_port()
    config = write_config(tmp_path, f"proxy: {{log_level: info}}\n{OFFLINE}")
    with ProxyProcess("--config", str(config), "--port", str(port), "--log-level", "warning") as proxy:
        url = f"http://127.0.0.1:{port}"
        await wait_until_serving(url, proxy)
        assert await ask(url, "quiet please") == (200, "You said: quiet please")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0
        assert "ready on" not in proxy.output and " INFO " not in proxy.output


async def test_serve_subcommand_takes_the_same_overrides(tmp_path: Path) -> None:
    port = free_port()
    with ProxyProcess("--port", str(port), "--log-level", "warning", "serve", cwd=tmp_path) as proxy:
        url = f"http://127.0.0.1:{port}"
        await wait_until_serving(url, proxy)
        assert await ask(url, "hi", stream=True) == (200, "You said: hi")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0
        assert "ready on" not in proxy.output


def test_console_script_and_python_m_agree() -> None:
    script = Path(sys.executable).parent / "llmproxy"
    assert script.exists(), "the llmproxy console script is not installed beside this interpreter"
    installed = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30, env=clean_env())
    module = run_cli("--version")
    assert installed.returncode == module.returncode == 0
    assert installed.stdout == module.stdout == f"llmproxy, version {__version__}\n"


async def wait_until_serving(url: str, proxy: ProxyProcess, attempts: int = 500) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for _ in range(attempts):
            if proxy.proc.poll() is not None:
                raise AssertionError(f"llmproxy exited with {proxy.proc.returncode}:\n{proxy.output}")
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError(f"{url} never answered:\n{proxy.output}")


def slow_config(tmp_path: Path, drain_timeout: float, stream_delay: float) -> Path:
    return write_config(
        tmp_path,
        textwrap.dedent(
            f"""\
            proxy: {{drain_timeout: {drain_timeout}}}
            backends:
              offline: {{type: offline, stream_delay: {stream_delay}}}
            default_backend: offline
            """
        ),
    )


async def test_sigterm_lets_an_inflight_stream_finish_then_exits_0(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(12)]  # about 12 x 0.05 s of streaming
    with ProxyProcess("--config", str(slow_config(tmp_path, drain_timeout=10, stream_delay=0.05)), "--port", "0") as proxy:
        url = await proxy.ready()
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
            async with session.post(f"{url}/v1/chat/completions", json=chat(" ".join(words), stream=True)) as response:
                first = await response.content.readline()
                assert first.startswith(b"data: ")
                proxy.signal(signal.SIGTERM)
                rest = await response.read()
        content, done = sse_text(first + rest)
        assert done
        assert content == "You said: " + " ".join(words)
        assert await proxy.exited(15) == 0
        assert "draining in-flight requests" in proxy.output


async def test_drain_is_bounded_by_drain_timeout(tmp_path: Path) -> None:
    # A stream of ~30 s cannot finish; shutdown must still end within drain_timeout (plus a
    # margin for process exit, well under a second drain_timeout), cutting the stream, and exit 0.
    drain = 3.0
    with ProxyProcess("--config", str(slow_config(tmp_path, drain_timeout=drain, stream_delay=1.0)), "--port", "0") as proxy:
        url = await proxy.ready()
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
            async with session.post(f"{url}/v1/chat/completions", json=chat(" ".join(["w"] * 30), stream=True)) as response:
                assert (await response.content.readline()).startswith(b"data: ")
                proxy.signal(signal.SIGTERM)
                assert await proxy.exited(drain + 2) == 0
                rest = await response.read()
                assert b"[DONE]" not in rest
                # the stream ends with an error frame in its protocol, not just a dropped socket
                assert b'"llmproxy is shutting down"' in rest, rest[-300:]


async def test_sigint_exits_0(tmp_path: Path) -> None:
    with ProxyProcess("--port", "0", cwd=tmp_path) as proxy:
        url = await proxy.ready()
        assert await ask(url, "ping") == (200, "You said: ping")
        proxy.signal(signal.SIGINT)
        assert await proxy.exited(15) == 0
        assert "Traceback" not in proxy.output


# -- config validate -------------------------------------------------------------------------


def validate(path: Path, **env: str) -> tuple[int, str]:
    result = run_cli("config", "validate", "--config", str(path), env=clean_env(**env))
    return result.returncode, result.stdout + result.stderr


def test_validate_refuses_an_empty_file(tmp_path: Path) -> None:
    code, output = validate(write_config(tmp_path, "# nothing yet\n"))
    assert code != 0 and "the file is empty" in output and "Traceback" not in output


def test_validate_accepts_a_valid_file(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        textwrap.dedent(
            """\
            proxy: {host: 127.0.0.1, port: 8000}
            auth:
              api_keys: [{name: laptop, key: "${LLMPROXY_TEST_CLIENT_KEY}"}]
            backends:
              offline: {type: offline, mode: scripted, replies: ["one", "two"]}
              local: {type: openai, base_url: "http://127.0.0.1:11434/v1", api_keys: ["${LLMPROXY_TEST_BACKEND_KEY}"]}
            default_backend: offline
            models:
              coding: {targets: ["local:qwen", "offline:echo"]}
            plugins:
              offline: {enabled: true}
            """
        ),
    )
    code, output = validate(config, LLMPROXY_TEST_CLIENT_KEY="client-key", LLMPROXY_TEST_BACKEND_KEY="backend-key")
    assert code == 0, output
    assert f"{config}: valid (2 backends, 1 aliases" in output
    assert "warning" not in output

    # A backend key that is not set is a warning, not an error: the file itself is valid.
    code, output = validate(config, LLMPROXY_TEST_CLIENT_KEY="client-key")
    assert code == 0, output
    assert "warning: backends.local: environment variable LLMPROXY_TEST_BACKEND_KEY is not set" in output


INVALID = {
    "unknown top-level key": ("proxy:\n  port: 8000\nbogus: 1\n", ["line 3: bogus: unknown key"]),
    "unknown nested key": ("proxy:\n  prot: 8000\n", ["line 2: proxy.prot: unknown key"]),
    "wrong type": ("proxy:\n  host: 127.0.0.1\n  port: abc\n", ["line 3: proxy.port:", "valid integer"]),
    "missing variable": (
        "proxy:\n  host: ${LLMPROXY_TEST_MISSING_VAR}\n",
        ["line 2: proxy.host: environment variable LLMPROXY_TEST_MISSING_VAR is not set"],
    ),
    "literal api key": (
        "backends:\n  x:\n    type: openai\n    api_keys: [sk-literal-0123456789]\n",
        ["line 4: backends.x.api_keys:", "refuses keys written into the file"],
    ),
    "literal client key": (
        "auth:\n  api_keys:\n    - {name: me, key: plain-text-key}\n",
        ["auth.api_keys[0].key:", "refuses keys written into the file"],
    ),
    "default backend not configured": (
        "backends:\n  x: {type: offline}\ndefault_backend: y\n",
        ["line 3: default_backend: 'y' is not one of backends (x)"],
    ),
    "alias target names an unknown backend": (
        "backends:\n  x: {type: offline}\nmodels:\n  coding:\n    targets: [\"nope:m1\"]\n",
        ["line 5: models.coding.targets[0]: no backend named 'nope'"],
    ),
    "alias target without a model": (
        "backends:\n  x: {type: offline}\nmodels:\n  coding: {targets: [x]}\n",
        ["models.coding.targets[0]: 'x' must be written backend:model"],
    ),
    "unknown provider type": (
        "backends:\n  x:\n    type: telepathy\n",
        ["line 3: backends.x.type: unknown provider type 'telepathy' (available:", "offline", "openai"],
    ),
    "backend without a type": ("backends:\n  x: {base_url: 'http://127.0.0.1:1'}\n", ["backends.x.type: every backend needs a type"]),
    "unknown backend setting": ("backends:\n  x: {type: offline, colour: blue}\n", ["backends.x.colour: unknown key"]),
    "invalid yaml": ("proxy:\n  port: [1\n", ["line 3, column 1: invalid YAML"]),
    "top level not a mapping": ("- a\n- b\n", ["the top level must be a mapping"]),
    "unknown plugin section": ("plugins:\n  nosuch: {x: 1}\n", ["line 2: plugins.nosuch: no plugin named 'nosuch' is installed"]),
    "settings for a plugin without settings": ("plugins:\n  offline: {x: 1}\n", ["plugins.offline: this plugin takes no settings"]),
    "non-loopback bind without client keys": ("proxy: {host: 0.0.0.0}\n", ["proxy.host: refusing to listen on 0.0.0.0 without client keys"]),
    "key name 'source' is not a hidden setting": ("source: somewhere\n", ["line 1: source: unknown key"]),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_validate_rejects_with_file_line_and_key_path(tmp_path: Path, case: str) -> None:
    text, expected = INVALID[case]
    config = write_config(tmp_path, text, "broken.yaml")
    code, output = validate(config)
    assert code == 2, output
    assert output.startswith(f"{config}: "), output
    for fragment in expected:
        assert fragment in output, f"{fragment!r} not in {output!r}"
    assert "Traceback" not in output
    assert "sk-literal-0123456789" not in output and "plain-text-key" not in output


def test_validate_reports_every_problem_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, "proxy:\n  prot: 1\n  port: abc\nbogus: true\n")
    code, output = validate(config)
    assert code == 2
    assert "proxy.prot: unknown key" in output and "proxy.port:" in output and "bogus: unknown key" in output


def test_validate_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    code, output = validate(missing)
    assert code == 2
    assert f"{missing}: cannot read the file: No such file or directory" in output

    code, output = validate(tmp_path)  # a directory
    assert code == 2
    assert "is a directory" in output

    if os.geteuid() != 0:  # root reads anything; the two cases above still ran
        locked = write_config(tmp_path, "proxy: {}\n", "locked.yaml")
        locked.chmod(0)
        code, output = validate(locked)
        assert code == 2
        assert f"{locked}: cannot read the file: Permission denied" in output


async def test_interpolation_with_defaults_reaches_the_server_settings(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        'proxy:\n  host: "${LLMPROXY_TEST_UNSET_HOST:-127.0.0.1}"\n  port: ${LLMPROXY_TEST_PORT}\n  log_level: "${LLMPROXY_TEST_LEVEL:-info}"\n',
    )
    assert validate(config, LLMPROXY_TEST_PORT=str(port))[0] == 0
    with ProxyProcess("--config", str(config), env=clean_env(LLMPROXY_TEST_PORT=str(port))) as proxy:
        assert await proxy.ready() == f"http://127.0.0.1:{port}"
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0


# -- the bind guard ----------------------------------------------------------------------------


def test_non_loopback_bind_without_keys_refuses_to_start(tmp_path: Path) -> None:
    result = run_cli("--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "proxy.host: refusing to listen on 0.0.0.0 without client keys; add auth.api_keys or bind 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


async def test_non_loopback_bind_with_keys_starts_and_requires_them(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'auth:\n  api_keys: [{name: laptop, key: "${LLMPROXY_TEST_CLIENT_KEY}"}]\n' + OFFLINE)
    key = "client-key-for-test-0123"
    with ProxyProcess("--config", str(config), "--host", "0.0.0.0", "--port", "0", env=clean_env(LLMPROXY_TEST_CLIENT_KEY=key)) as proxy:
        url = await proxy.ready()
        assert url.startswith("http://0.0.0.0:")
        local = url.replace("0.0.0.0", "127.0.0.1")  # only ever talk to loopback
        status, body = await ask(local, "hi")
        assert status == 401 and "invalid or missing API key" in body
        assert await ask(local, "hi", headers={"Authorization": f"Bearer {key}"}) == (200, "You said: hi")
        assert await ask(local, "hi", headers={"x-api-key": key}) == (200, "You said: hi")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0
        assert key not in proxy.output

    # The keys must resolve: a configured key whose variable is unset stops start-up.
    result = run_cli("--config", str(config), "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert "line 2: auth.api_keys[0] (laptop): environment variable LLMPROXY_TEST_CLIENT_KEY is not set" in result.stderr


# -- plugins -----------------------------------------------------------------------------------


def test_plugins_lists_builtins_with_hooks_and_chains() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    for name in ("offline", "openai"):
        assert name in lines, result.stdout
        assert "0.1.0" in lines[name] and "built-in" in lines[name]
        assert "hooks: " in lines[name] and "register_providers" in lines[name]
        assert f"providers: {name}" in lines[name]
    assert "chains (run order):" in result.stdout
    for hook in FLOW_HOOKS:
        assert any(line.strip().startswith(hook + " ") for line in result.stdout.splitlines()), hook


def test_plugins_json() -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    plugins = {p["name"]: p for p in info["plugins"]}
    for name in ("offline", "openai"):
        plugin = plugins[name]
        assert plugin["origin"] == "built-in"
        assert plugin["version"] == "0.1.0"
        assert plugin["module"] == f"llmproxy_{name}"
        assert "register_providers" in plugin["hooks"]
    assert plugins["offline"]["providers"] == ["offline"]
    assert {"openai", "openrouter"} <= set(plugins["openai"]["providers"])
    assert list(info["chains"]) == list(FLOW_HOOKS)
    assert all(isinstance(order, list) for order in info["chains"].values())


def test_plugins_shows_the_chains_the_config_makes(tmp_path: Path) -> None:
    # The built-ins say from configure where they have work: under the default settings the
    # tool watchers run only for requests offering tools, and a rewrite plugin without rules
    # is in no chain; given rules, it is.
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    request = next(line for line in result.stdout.splitlines() if line.strip().startswith("request "))
    assert "edit_precision (tools)" in request and "commands →" in request
    assert "idle here:" in request and "rewrite" in request.split("idle here:")[1]
    config = write_config(tmp_path, "backends:\n  x: {type: offline}\nplugins:\n  rewrite:\n    rules: [{replace: foo, with: bar}]\n")
    info = json.loads(run_cli("--config", str(config), "plugins", "--json").stdout)
    assert "rewrite" in info["chains"]["request"] and "rewrite" not in info["idle"]["request"]
    assert {"tool_repair", "dangerous_commands"} <= set(info["with_tools_only"]["response"])
    assert "wire_capture" in info["idle"]["flow_done"]  # no capture file configured


def test_plugins_disabled_by_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, "backends:\n  x: {type: offline}\nplugins:\n  openai: {enabled: false}\n")
    for args in (("--config", str(config), "plugins", "--json"), ("plugins", "--config", str(config), "--json")):  # either place
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        openai = next(p for p in json.loads(result.stdout)["plugins"] if p["name"] == "openai")
        assert openai["origin"] == "built-in, disabled" and openai["hooks"] == []


# -- secrets -----------------------------------------------------------------------------------

SECRET = "sk-test-DO-NOT-PRINT-4f1c9a7e"


@pytest.fixture
async def key_checking_upstream() -> AsyncIterator[tuple[str, list[str]]]:
    """A tiny OpenAI-compatible upstream that records the Authorization headers it gets."""
    seen: list[str] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        body = await request.json()
        if body["model"] == "fail":
            return web.json_response({"error": {"message": "model fail is broken", "type": "server_error"}}, status=500)
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "upstream says hi"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta in ({"role": "assistant", "content": ""}, {"content": "upstream "}, {"content": "streams"}):
            chunk = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    url, runner = await start_app(app)
    try:
        yield url, seen
    finally:
        await runner.cleanup()


async def test_backend_keys_never_appear_in_output(tmp_path: Path, key_checking_upstream: tuple[str, list[str]]) -> None:
    upstream, seen = key_checking_upstream
    env = clean_env(OPENAI_API_KEY=SECRET, LLMPROXY_TEST_BACKEND_KEY=SECRET)
    config = write_config(
        tmp_path,
        textwrap.dedent(
            f"""\
            backends:
              local: {{type: openai, base_url: "{upstream}/v1", api_keys: ["${{LLMPROXY_TEST_BACKEND_KEY}}"]}}
              unset: {{type: openai, base_url: "{upstream}/v1", api_keys: ["${{LLMPROXY_TEST_UNSET_KEY}}"]}}
            default_backend: local
            """
        ),
    )
    outputs = []
    # The built-in default picks up OPENAI_API_KEY: every command that reads it.
    for args in (("plugins",), ("plugins", "--json"), ("config", "validate"), ("config", "validate", "--config", str(config))):
        result = run_cli(*args, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert "<built-in defaults>: valid (2 backends" in outputs[2]  # offline + openai, from the key

    with ProxyProcess("--config", str(config), "--port", "0", "--log-level", "debug", env=env) as proxy:
        url = await proxy.ready()
        assert await ask(url, "hi", model="gpt-x") == (200, "upstream says hi")
        assert await ask(url, "hi", stream=True, model="gpt-x") == (200, "upstream streams")
        status, body = await ask(url, "hi", model="fail")
        assert status == 500 and "model fail is broken" in body
        status, body = await ask(url, "hi", model="unset:gpt-x")
        assert status == 500 and "LLMPROXY_TEST_UNSET_KEY" in body and SECRET not in body
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0
        outputs.append(proxy.output)
    with ProxyProcess("--port", "0", "--log-level", "debug", env=env, cwd=tmp_path) as proxy:  # the default, with OPENAI_API_KEY
        url = await proxy.ready()
        assert "openai" in proxy.output
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
            async with session.get(f"{url}/v1/models") as response:
                assert response.status == 200 and SECRET not in await response.text()
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(15) == 0
        outputs.append(proxy.output)

    # The key was really used (so its absence from the output means something) ...
    assert seen and all(header == f"Bearer {SECRET}" for header in seen)
    # ... and appears nowhere in anything llmproxy printed.
    for output in outputs:
        assert SECRET not in output
        assert SECRET[-8:] not in output
