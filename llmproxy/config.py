"""Configuration: YAML → ``${ENV}`` interpolation → pydantic models, with precise errors.

Top-level shape (see docs/configuration.md): ``proxy``, ``auth``, ``backends``,
``default_backend``, ``models``, ``plugins``. Unknown keys are errors. Secrets (backend and
client keys) are written as references — ``${ENV_VAR}``, ``env:ENV_VAR`` or
``keyring:service/name`` — and resolved only when used, so keys are never stored in files
written by llmproxy, and a literal key in the file is refused.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Fields that hold secret references: never interpolated at load (so never a value in the
# parsed config), resolved at use. Plugins' secret settings use these names too.
_SECRET_KEYS = frozenset(("api_keys", "key", "token", "admin_key"))


class ConfigError(Exception):
    """A config problem, worded for the user: file, key path, what is wrong."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class SecretRef:
    """A reference to a secret; ``get()`` resolves it when it is needed, never earlier."""

    __slots__ = ("ref", "kind", "name", "label", "_cached")

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.label: str | None = None  # the key's own name, when the config gives one
        self._cached: str | None = None
        match = _ENV_PATTERN.fullmatch(ref)
        if match and match.group(2) is None:
            self.kind, self.name = "env", match.group(1)
        elif ref.startswith("env:") and _ENV_NAME.fullmatch(ref[4:]):
            self.kind, self.name = "env", ref[4:]
        elif ref.startswith("keyring:") and "/" in ref[8:]:
            self.kind, self.name = "keyring", ref[8:]
        else:
            raise ValueError(
                "secrets are written as references (${ENV_VAR}, env:ENV_VAR or keyring:service/name); "
                "llmproxy refuses keys written into the file"
            )

    def get(self) -> str | None:
        """The secret's value, or None when the variable or keyring entry is missing."""
        if self.kind == "env":
            return os.environ.get(self.name) or None
        if self._cached is None:
            # A keyring lookup blocks (it may talk to a desktop service): once, then cached.
            service, _, user = self.name.partition("/")
            try:
                import keyring  # optional: only needed for keyring: references
            except ImportError:
                return None
            self._cached = keyring.get_password(service, user)
        return self._cached

    def describe(self) -> str:
        if self.kind == "env":
            return f"environment variable {self.name}"
        if importlib.util.find_spec("keyring") is None:
            return f"keyring entry {self.name} (the keyring package is not installed: pip install 'llmproxy[keyring]')"
        return f"keyring entry {self.name}"

    def __repr__(self) -> str:  # never the value
        return f"SecretRef({self.ref!r})"

    __str__ = __repr__


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _secret(value: Any) -> SecretRef:
    if isinstance(value, SecretRef):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string reference such as ${ENV_VAR}")
    return SecretRef(value)


class ProxySettings(_Strict):
    host: str = Field("127.0.0.1", description="Address to bind. Non-loopback addresses require auth.api_keys.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest request body accepted; larger gets 413.")
    drain_timeout: float = Field(10.0, ge=0, description="Seconds to let in-flight requests finish on shutdown.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Console log level.")
    session_ttl: float = Field(24 * 3600, gt=0, description="Seconds a session is kept after its last request.")
    max_sessions: int = Field(10_000, gt=0, description="Sessions kept at most (least recently used go first).")
    anthropic_port: int | None = Field(
        None, ge=0, le=65535, description="A second port serving the same routes, for clients that want a dedicated Anthropic URL."
    )
    response_headers: bool = Field(
        False, description="Add x-llmproxy-backend, -model, -key (the key's name) and -attempts to every answer."
    )
    total_timeout: float | None = Field(
        None, gt=0, description="Seconds a request may spend on attempts, backoffs and waits until its answer begins. None: no limit."
    )
    rate_limit_wait: float = Field(
        0.0, ge=0, description="When every target is over its rpm/tpm, wait up to this many seconds for one to free up (0: answer 429 at once)."
    )
    rate_limit_queue: int = Field(100, ge=0, description="Requests that may wait for a rate limit at once; beyond, 429 at once.")
    rate_window: float = Field(60.0, gt=0, description="Seconds the rpm/tpm windows count over (60: per minute).")
    reload_check: float = Field(
        2.0, ge=0, description="Seconds between checks of the config file for changes, applied without a restart (0: off; SIGHUP still reloads)."
    )

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientKey(_Strict):
    name: str = Field(description="Shown in logs and captures instead of the key.")
    key: SecretRef = Field(description="Reference to the key clients send (Bearer or x-api-key).")

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    _v = field_validator("key", mode="before")(_secret)


class AuthSettings(_Strict):
    api_keys: list[ClientKey] = Field(default_factory=list, description="Client keys; none means loopback-only, no auth.")


class TimeoutSettings(_Strict):
    connect: float = Field(10.0, gt=0, description="Seconds to connect to the backend.")
    read: float = Field(
        300.0, gt=0, description="Seconds allowed between two reads from the backend: a stream's idle timeout, and a silent backend's."
    )
    attempt: float | None = Field(
        None, gt=0,
        description="Seconds one attempt may take until the answer begins (a stream: its first bytes; a non-streamed "
        "answer: the whole body). Past it the attempt fails with 504 and the next target is tried. None: no limit but `read`.",
    )


class RetrySettings(_Strict):
    attempts: int = Field(
        0, ge=0, le=10,
        description="Extra tries of the same target after a 429, 5xx, timeout or network error, before the next target. "
        "0 by default: every official SDK and agent already retries, and retries multiply.",
    )
    base_delay: float = Field(0.5, ge=0, description="Backoff: try n waits a random time in [0, min(max_delay, base_delay * 2^n)] (full jitter).")
    max_delay: float = Field(8.0, ge=0, description="Backoff: the longest wait between two tries.")
    max_retry_after: float = Field(
        30.0, ge=0, description="A Retry-After longer than this is not waited for: the next target is tried instead."
    )


class BreakerSettings(_Strict):
    enabled: bool = Field(True, description="Keep a circuit breaker per target (backend:model).")
    failures: int = Field(5, ge=1, description="Consecutive failures (429, 5xx, timeouts, network) that open the breaker.")
    cooldown_429: float = Field(30.0, ge=0, description="Seconds open after rate limiting (a 429's Retry-After opens it at once, for that long).")
    cooldown_5xx: float = Field(30.0, ge=0, description="Seconds open after server errors (5xx).")
    cooldown_network: float = Field(10.0, ge=0, description="Seconds open after timeouts, refused connections and broken streams.")
    half_open_requests: int = Field(1, ge=1, description="Trial requests let through once the cooldown ends; success closes the breaker.")


class CapabilityOverrides(_Strict):
    """What a backend or an alias target can serve, as the config declares it (enforced)."""

    tools: bool | None = Field(None, description="Serves tool definitions and tool calls.")
    streaming: bool | None = Field(None, description="Streams answers; false: asked without streaming, the answer re-streamed to the client.")
    vision: bool | None = Field(None, description="Accepts images.")
    json_schema: bool | None = Field(None, description="Honours JSON-schema response formats.")
    max_context: int | None = Field(None, gt=0, description="Largest request, in tokens (estimated as body bytes / 4).")

    def declared(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class DiscoverySettings(_Strict):
    interval: float = Field(60.0, gt=0, description="Seconds between two polls of the backend's model list.")
    unhealthy_after: int = Field(3, ge=1, description="Failed polls in a row after which the backend is marked unhealthy.")
    timeout: float = Field(10.0, gt=0, description="Seconds one poll may take before it counts as failed.")


class BackendConfig(_Strict):
    """Settings every backend accepts; a provider's ``Settings`` subclass adds its own."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    type: str = Field(description="Provider type, e.g. openai or offline (`llmproxy plugins` lists them).")
    base_url: str | None = Field(None, description="API base URL; each provider type has a default.")
    api_keys: list[SecretRef] = Field(default_factory=list, description="Key references (several: rotated, see key_strategy).")
    key_strategy: Literal["fill_first", "round_robin"] = Field(
        "fill_first", description="fill_first: the first usable key; round_robin: the next usable key on each request."
    )
    key_cooldown: float = Field(
        60.0, ge=0, description="Seconds a key rests after a 429 without Retry-After (a Retry-After is honoured instead)."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers sent to the backend.")
    models: list[str] = Field(
        default_factory=list, description="Models this backend serves; empty means any name is passed through."
    )
    timeout: TimeoutSettings = Field(default_factory=TimeoutSettings)
    max_connections: int = Field(100, gt=0, description="Connection pool size for this backend.")
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    rpm: int | None = Field(None, gt=0, description="Requests per minute this backend takes (sliding window); over it, the backend is skipped.")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute (input estimated as body bytes / 4, settled with the reported usage).")
    capabilities: CapabilityOverrides | None = Field(
        None, description="What this backend's models can serve; a request needing more skips it (see docs/reliability.md)."
    )
    stream_fallback: bool = Field(
        True, description="When a stream breaks before its first bytes reached the client, ask the same target once more without streaming and re-stream the answer."
    )
    max_concurrency: int | None = Field(
        None, gt=0, description="Requests served at once; more wait in per-model queues (model-affinity scheduling). None: no limit, no queue."
    )
    model_switch_after: int = Field(
        8, ge=1, description="With max_concurrency: queued requests for the loaded model served in a row before another model's waiter gets the slot."
    )
    max_queue: int = Field(100, ge=0, description="With max_concurrency: requests waiting at most; beyond, 503 (the alias's next target is tried).")
    queue_timeout: float = Field(300.0, gt=0, description="With max_concurrency: seconds a request waits for a slot before a 503.")
    discovery: DiscoverySettings | None = Field(
        None, description="Poll the backend's model list (health and discovered models); off when absent, `{}` for the defaults."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, (str, SecretRef, dict)):
            value = [value]
        keys = []
        for v in value:
            if isinstance(v, dict):  # {name: work, key: ${WORK_KEY}}: a key with a name of its own
                if set(v) - {"name", "key"} or not isinstance(v.get("name"), str) or "key" not in v:
                    raise ValueError("a named key is written {name: NAME, key: ${ENV_VAR}}")
                ref = _secret(v["key"])
                ref.label = v["name"]
                keys.append(ref)
            else:
                keys.append(_secret(v))
        return keys


class AliasTarget(_Strict):
    target: str = Field(description="`backend:model`")
    weight: float = Field(1.0, gt=0, description="Share of first picks under the weighted and random strategies.")
    key: str | None = Field(
        None, description="Send with this key of the backend only (its name: `backend#0`, or a named key's name); no rotation."
    )
    rpm: int | None = Field(None, gt=0, description="Requests per minute this target takes (sliding window); over it, it is skipped.")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute this target takes (estimated, settled with the reported usage).")
    capabilities: CapabilityOverrides | None = Field(None, description="What this model can serve (over the backend's own declaration).")


class ModelAlias(_Strict):
    strategy: Literal["order", "round_robin", "weighted", "random", "least_busy", "affinity"] = Field(
        "order", description="How the first target is chosen; the others follow in order as fallbacks."
    )
    targets: list[AliasTarget] = Field(min_length=1)

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"target": v} if isinstance(v, str) else v for v in value]
        return value


class PluginsSection(BaseModel):
    """``plugins:``: ``load`` names extra modules to load; every other key is a plugin's
    own section, validated by that plugin's settings model."""

    model_config = ConfigDict(extra="allow")
    load: list[str] = Field(default_factory=list, description="Python modules to load as plugins.")


class ReferenceProblems(ValueError):
    """Cross-references that do not resolve, each as (key path, what is wrong), so they are
    reported at their own path (and line) rather than at the top level."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


class Config(_Strict):
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    backends: dict[str, dict[str, Any]] = Field(default_factory=dict)
    default_backend: str | None = None
    models: dict[str, ModelAlias] = Field(default_factory=dict)
    plugins: PluginsSection = Field(default_factory=PluginsSection)

    # Private, so that none is a key the file could set.
    _source: str = PrivateAttr("<defaults>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _cli_overrides: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def cli_overrides(self) -> dict[str, Any]:
        """``proxy`` settings given on the command line (``--host``, ``--port``): a reload keeps them."""
        return self._cli_overrides

    @cli_overrides.setter
    def cli_overrides(self, value: dict[str, Any]) -> None:
        self._cli_overrides = dict(value)

    @property
    def source(self) -> str:
        """Where this config came from (a file name, or a description)."""
        return self._source

    @property
    def lines(self) -> dict[str, int]:
        """Key path → line in the file this config was read from (empty for other sources)."""
        return self._lines

    def where(self, path: str) -> str:
        """``"line N: "`` for a key path of the file this config was read from, else ``""``."""
        line = self._lines.get(path)
        return f"line {line}: " if line else ""

    @model_validator(mode="after")
    def _references(self) -> "Config":
        problems: list[tuple[str, str]] = []
        for name, section in self.backends.items():
            if not isinstance(section, dict) or "type" not in section:
                problems.append((f"backends.{name}.type", "every backend needs a type"))
            if ":" in name:
                problems.append((f"backends.{name}", "backend names cannot contain ':'"))
        if self.default_backend is not None and self.default_backend not in self.backends:
            problems.append(("default_backend", f"{self.default_backend!r} is not one of backends ({', '.join(self.backends) or 'none'})"))
        for alias, spec in self.models.items():
            for i, target in enumerate(spec.targets):
                backend, sep, model = target.target.partition(":")
                if not sep or not model:
                    problems.append((f"models.{alias}.targets[{i}]", f"{target.target!r} must be written backend:model"))
                elif backend not in self.backends:
                    problems.append((f"models.{alias}.targets[{i}]", f"no backend named {backend!r} (backends: {', '.join(self.backends) or 'none'})"))
        if problems:
            raise ReferenceProblems(problems)
        return self

    def plugin_section(self, name: str) -> dict[str, Any]:
        section = (self.plugins.model_extra or {}).get(name)
        return dict(section) if isinstance(section, dict) else {}


def interpolate(value: Any, path: str = "", missing: list[str] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in strings, except in secret fields, which
    keep their reference and are resolved at use."""
    if isinstance(value, dict):
        return {k: (v if k in _SECRET_KEYS else interpolate(v, f"{path}.{k}" if path else str(k), missing)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]", missing) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if not found and default is not None:  # as in the shell: unset or empty
                return default
            if found is None:
                if missing is not None:
                    missing.append(f"{path}: environment variable {name} is not set")
                return ""
            return found

        # Always a string: pydantic turns "8000" into 8000 where a number is wanted, while
        # a header or model name made only of digits must stay text.
        return _ENV_PATTERN.sub(substitute, value)
    return value


def format_validation_error(error: ValidationError, prefix: str = "", lines: dict[str, int] | None = None) -> list[str]:
    problems = []
    for item in error.errors():
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, ReferenceProblems):
            for path, message in cause.problems:
                line = (lines or {}).get(path)
                problems.append(f"{f'line {line}: ' if line else ''}{path}: {message}")
            continue
        parts = [prefix] if prefix else []
        for loc in item["loc"]:
            if isinstance(loc, int):
                parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
            else:
                parts.append(str(loc))
        path = ".".join(parts) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        line = (lines or {}).get(path)
        where = f"line {line}: " if line else ""
        problems.append(f"{where}{path}: {message}")
    return problems


def _line_map(text: str) -> dict[str, int]:
    """Key path → 1-based line, so errors can point into the file."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                lines[sub] = key.start_mark.line + 1
                walk(child, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                sub = f"{path}[{i}]"
                lines[sub] = child.start_mark.line + 1
                walk(child, sub)

    walk(root, "")
    return lines


def parse_config(data: Any, source: str = "<config>", text: str | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping (proxy:, backends:, ...)"], source)
    lines = _line_map(text) if text else {}
    missing: list[str] = []
    data = interpolate(data, missing=missing)
    if missing:
        raise ConfigError([_at_line(problem, lines) for problem in missing], source)
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, lines=lines), source) from None
    config._source = source
    config._lines = lines
    return config


def _at_line(problem: str, lines: dict[str, int]) -> str:
    """Prefix ``"path: message"`` with the path's line, when known."""
    line = lines.get(problem.partition(":")[0])
    return f"line {line}: {problem}" if line else problem


def load_config(path: str | os.PathLike[str]) -> Config:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ConfigError([f"cannot read the file: {error.strerror}"], str(file)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(error, 'problem', error)}"], str(file)) from None
    if data is None:
        # Nothing but comments or whitespace: far more often a file caught mid-write by an
        # editor, or truncated by mistake, than a wish for every default (which running
        # llmproxy without --config gives); applied on a reload it would drop every backend.
        raise ConfigError(["the file is empty; write at least one setting (llmproxy without --config runs on its defaults)"], str(file))
    return parse_config(data, str(file), text)


def default_config(env_keys: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The config used when no file is given: the offline backend (default), plus a backend
    for every installed provider type whose key variable is set — ``env_keys`` maps provider
    types to those variables (each provider declares its own ``env_key``)."""
    env = os.environ if environ is None else environ
    backends: dict[str, dict[str, Any]] = {"offline": {"type": "offline"}}
    for type_name, variable in (env_keys or {}).items():
        if env.get(variable) and type_name not in backends:
            backends[type_name] = {"type": type_name, "api_keys": [f"${{{variable}}}"]}
    return parse_config({"backends": backends, "default_backend": "offline"}, "<built-in defaults>")
