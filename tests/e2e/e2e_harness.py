"""Helpers of the end-to-end tests (see conftest.py here for what they do and how to run them)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy_process import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]
NPM_PREFIX = Path(os.environ.get("LLMPROXY_E2E_NPM_PREFIX") or ROOT / ".e2e-npm").resolve()
HOMES = ROOT / ".e2e-homes"
INSTALL_HINT = "bash tests/e2e/install_clients.sh (or tox -e e2e)"
AGENT_TIMEOUT = 120.0  # seconds for one agent run, start to exit
CLIENT_KEY = "e2e-client-key-3b9f"  # what the agent sends; llmproxy requires it
UPSTREAM_KEY = "e2e-upstream-key-81c2"  # what llmproxy sends the fake; the agent never sees it

# package, pinned version (the one shared/clients/captures was recorded with), its bin name
CLIENTS = {
    "claude": ("@anthropic-ai/claude-code", "2.1.197", "claude"),
    "codex": ("@openai/codex", "0.169.0", "codex"),
    "gemini": ("@google/gemini-cli", "0.61.0", "gemini"),
}

# llmproxy backend type → (fake module, its server class, path suffix of a model turn there)
UPSTREAMS = {
    "openai": ("fakes.openai_upstream", "FakeOpenAI", "/chat/completions"),
    "openai-responses": ("fakes.responses_upstream", "FakeResponses", "/responses"),
    "anthropic": ("fakes.anthropic_upstream", "FakeAnthropic", "/v1/messages"),
    "gemini": ("fakes.gemini_upstream", "FakeGemini", "enerateContent"),
}


# -- the CLIs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    name: str
    version: str
    executable: Path


def find_client(name: str) -> Client | str:
    """The CLI, or why it cannot be used."""
    package, pinned, bin_name = CLIENTS[name]
    manifest = NPM_PREFIX / "node_modules" / package / "package.json"
    executable = NPM_PREFIX / "node_modules" / ".bin" / bin_name
    if not manifest.is_file() or not executable.exists():
        return f"{package} is not installed under {NPM_PREFIX}; run: {INSTALL_HINT}"
    version = json.loads(manifest.read_text())["version"]
    if version != pinned:
        # Not a skip: a different version is a different client than the captures describe.
        pytest.fail(f"{package} {version} is installed under {NPM_PREFIX}, the tests pin {pinned}; rerun {INSTALL_HINT}")
    return Client(name, version, executable)


def require_client(agent_clients: dict[str, Client | str], name: str) -> Client:
    """The CLI; a skip when it is not installed — a failure instead where it must be
    (``LLMPROXY_E2E_REQUIRE_CLIENTS=1``, as in ``tox -e e2e``, which has just installed it)."""
    found = agent_clients[name]
    if isinstance(found, str):
        if os.environ.get("LLMPROXY_E2E_REQUIRE_CLIENTS"):
            pytest.fail(f"{found} (LLMPROXY_E2E_REQUIRE_CLIENTS is set: a missing client is a failure)")
        pytest.skip(found)
    return found


# -- the fake upstream -------------------------------------------------------------------------


def with_tool_scenario(cls: type) -> Any:
    """An instance of the fake scripted to play the tool scenario
    (``fake.script(tool_scenario=True)``, see tests/fakes/common.py); fails — never skips —
    when the fake has no such scenario: these tests need it."""
    fake = cls()
    try:
        fake.script(tool_scenario=True)
    except TypeError:
        pass
    if getattr(getattr(fake, "behaviour", None), "tool_scenario", False) is not True:
        pytest.fail(
            f"{cls.__module__}.{cls.__name__} has no tool scenario (script(tool_scenario=True)): when a shell-like "
            "tool is offered and no tool result is in the conversation it must answer with one call running "
            "`echo hi`, and afterwards with text quoting the tool output"
        )
    return fake


def backend_base_url(fake: Any) -> str:
    """What the backend's ``base_url`` must be for llmproxy to reach the fake."""
    return str(fake.base_url)


def model_turns(fake: Any) -> list[Any]:
    """The requests that asked the fake for a model turn (not token counts or model lists)."""
    suffix = UPSTREAMS[fake.backend_type][2]
    return [r for r in fake.requests if r.method == "POST" and r.path.endswith(suffix)]


def dump_requests(fake: Any, path: Path) -> None:
    with path.open("w") as out:
        for r in fake.requests:
            out.write(json.dumps({"method": r.method, "path": r.path, "query": dict(r.query), "headers": dict(r.headers),
                                  "json": r.json, "sent": bytes(getattr(r, "sent", b"")).decode(errors="replace")}) + "\n")


# -- llmproxy ----------------------------------------------------------------------------------


@dataclass
class Proxy:
    url: str
    process: ProxyProcess
    log_path: Path

    @property
    def log(self) -> str:
        return self.process.output


# -- running an agent --------------------------------------------------------------------------


@dataclass
class AgentRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def describe(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.returncode} after {self.seconds:.1f}s"
                f"{' (TIMED OUT, killed)' if self.timed_out else ''}\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: nothing from the caller's but PATH (for node) and the locale,
    so no ambient API key, base URL or config reaches the agent."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TERM": "dumb",
        "NO_COLOR": "1",
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        # The agent's cwd is inside this repository's work tree: without a ceiling, Claude
        # Code and Gemini CLI would find llmproxy's git repo and put its status in the prompt.
        "GIT_CEILING_DIRECTORIES": str(HOMES),
    }
    env.update(extra)
    return env


async def run_agent(argv: list[str], env: dict[str, str], cwd: Path, logs: Path, timeout: float = AGENT_TIMEOUT) -> AgentRun:
    """Run the agent to completion with stdin closed, killing its whole process group after
    ``timeout`` seconds. The event loop keeps serving the fake upstream meanwhile."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=cwd, start_new_session=True,
    )
    timed_out = False
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        timed_out = True
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = await process.communicate()
    finally:
        if process.returncode is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await process.wait()
    returncode = -9 if timed_out else (process.returncode if process.returncode is not None else -1)
    run = AgentRun([str(a) for a in argv], returncode, out.decode(errors="replace"),
                   err.decode(errors="replace"), time.monotonic() - started, timed_out)
    (logs / "agent.out").write_text(run.stdout)
    (logs / "agent.err").write_text(run.stderr)
    return run
