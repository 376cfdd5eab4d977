"""End to end with the real agents: an agent CLI → llmproxy → a fake upstream.

Everything is a real process or a real socket on 127.0.0.1:

- the **fake upstream** (``tests/fakes/*_upstream.py``) is an aiohttp server in the test's
  event loop, speaking one backend protocol, started with its "tool scenario": when the
  request offers a shell-like tool and holds no tool result yet, it answers with one call
  running ``echo hi``; once the result is there it answers with text quoting the output;
- **llmproxy** runs as ``python -m llmproxy --config … --port 0 --log-level debug``, one
  backend of the upstream's type pointing at the fake, and a client key it requires;
- the **agent** — Claude Code, Codex CLI or Gemini CLI, at the versions of
  ``shared/clients/captures`` — runs headless (``-p`` / ``exec``) with stdin closed, a
  bounded timeout and its own HOME, configured the way ``shared/clients/README.md`` says.

Running them::

    bash tests/e2e/install_clients.sh     # npm install of the pinned CLIs (~10-15 s, 740 MB)
    pytest tests/e2e                      # or: tox -e e2e (does both)

Nothing is installed on import. The CLIs are looked up under the npm prefix
``$LLMPROXY_E2E_NPM_PREFIX`` (default ``.e2e-npm`` at the repository root, gitignored);
a test whose CLI is not there is skipped with the command that installs it — and for no
other reason. The plain ``pytest`` run does not collect this folder (``norecursedirs`` in
pyproject.toml): these tests run only when named, as the tox env ``e2e`` does.

Each test's HOME, config files and working directory live in ``.e2e-homes/<test>``
(gitignored) — outside /tmp, because Codex refuses to create its helper binaries under
/tmp. It holds ``llmproxy.log``, ``agent.out``/``agent.err`` and ``upstream.jsonl`` (every
request the fake received and the bytes it answered) for the post-mortem: it is kept when
the test fails (or with ``LLMPROXY_E2E_KEEP=1``) and deleted when it passes.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from e2e_harness import (
    CLIENT_KEY,
    CLIENTS,
    HOMES,
    INSTALL_HINT,
    UPSTREAM_KEY,
    UPSTREAMS,
    Client,
    Proxy,
    find_client,
    require_client,
    with_tool_scenario,
    backend_base_url,
    dump_requests,
)
from proxy_process import ProxyProcess, clean_env


@pytest.fixture(scope="session")
def agent_clients() -> dict[str, Client | str]:
    """Each CLI found under the npm prefix, or the reason it is missing."""
    if shutil.which("node") is None:
        return {name: f"node is not on PATH (the agents need node >= 20); then run: {INSTALL_HINT}" for name in CLIENTS}
    return {name: find_client(name) for name in CLIENTS}


@pytest.fixture
def client(agent: str, agent_clients: dict[str, Client | str]) -> Client:
    """The test's agent CLI (``agent`` is the test's parameter), checked before anything starts."""
    return require_client(agent_clients, agent)


# -- per-test home -----------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def e2e_home(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh folder for this test (HOME, configs, cwd, logs), outside /tmp."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    home = HOMES / slug
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    yield home
    if request.node.stash.get(_FAILED, True) or os.environ.get("LLMPROXY_E2E_KEEP"):
        print(f"\ne2e: kept {home} for the post-mortem")
    else:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """The fake upstream for the backend type in ``request.param``, started."""
    backend_type = request.param
    module_name, class_name, _ = UPSTREAMS[backend_type]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        pytest.fail(f"tests/{module_name.replace('.', '/')}.py does not exist yet: the {backend_type} backend has no fake upstream to test against")
    fake = with_tool_scenario(getattr(module, class_name))
    await fake.start()
    fake.backend_type = backend_type
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def proxy(upstream: Any, e2e_home: Path) -> AsyncIterator[Proxy]:
    """llmproxy as a real process: one backend ``fake`` of the upstream's type, the default
    for every model name; clients must present CLIENT_KEY."""
    config = e2e_home / "llmproxy.yaml"
    config.write_text(
        "proxy: {host: 127.0.0.1, port: 0}\n"
        "auth:\n  api_keys: [{name: agent, key: \"${E2E_CLIENT_KEY}\"}]\n"
        "backends:\n"
        f"  fake:\n    type: {upstream.backend_type}\n    base_url: \"{backend_base_url(upstream)}\"\n"
        "    api_keys: [\"${E2E_UPSTREAM_KEY}\"]\n"
        "default_backend: fake\n"
    )
    env = clean_env(E2E_CLIENT_KEY=CLIENT_KEY, E2E_UPSTREAM_KEY=UPSTREAM_KEY)
    process = ProxyProcess("--config", str(config), "--port", "0", "--log-level", "debug", env=env, cwd=e2e_home)
    log_path = e2e_home / "llmproxy.log"
    try:
        url = await process.ready(timeout=30)
        yield Proxy(url, process, log_path)
    finally:
        process.stop()
        log_path.write_text(process.output)
        dump_requests(upstream, e2e_home / "upstream.jsonl")


