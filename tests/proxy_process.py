"""llmproxy run as a real process (``python -m llmproxy ...``), for CLI and packaging tests.

Output is read by background threads, so the pipes never fill up and a test can look at
what the process printed while it runs. Every wait is bounded; :meth:`ProxyProcess.stop`
(also the context-manager exit) kills whatever is still running.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

READY = re.compile(r"ready on (http://\S+)")

# Variables that would change which config llmproxy loads, or add real backends to its
# built-in default: every process here starts without them unless a test sets them.
_AMBIENT = ("LLMPROXY_CONFIG", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AMBIENT}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``llmproxy ARGS`` to completion (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=timeout,
    )


class ProxyProcess:
    """A running ``llmproxy`` process; ``url`` once :meth:`ready` returned."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmproxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env if env is not None else clean_env(),
            cwd=cwd,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.url: str | None = None
        self.ready_after: float | None = None  # seconds from process start to the ready line
        self._threads = [self._reader(self.proc.stdout, self.stdout), self._reader(self.proc.stderr, self.stderr)]

    def _reader(self, stream: IO[str] | None, into: list[str]) -> threading.Thread:
        def pump() -> None:
            assert stream is not None
            for line in stream:
                if self.ready_after is None and READY.search(line):
                    self.ready_after = time.perf_counter() - self.started
                into.append(line)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    @property
    def output(self) -> str:
        """Everything printed so far, stdout then stderr."""
        return "".join(self.stdout) + "".join(self.stderr)

    async def ready(self, timeout: float = 20) -> str:
        """Wait for the ready line and return the URL it names."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr):
                match = READY.search(line)
                if match:
                    self.url = match.group(1)
                    return self.url
            if self.proc.poll() is not None:
                await self._drain_output()
                raise AssertionError(f"llmproxy exited with {self.proc.returncode} before it was ready:\n{self.output}")
            await asyncio.sleep(0.02)
        raise AssertionError(f"llmproxy was not ready within {timeout}s:\n{self.output}")

    async def exited(self, timeout: float) -> int:
        """Wait (bounded) for the process to exit; its exit code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"llmproxy still running {timeout}s later:\n{self.output}")
            await asyncio.sleep(0.02)
        await self._drain_output()
        return self.proc.returncode

    async def _drain_output(self) -> None:
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 5)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> "ProxyProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def write_config(directory: Path, text: str, name: str = "llmproxy.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path
