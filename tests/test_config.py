"""llmproxy.config on its own: interpolation, secret references, parsing and its messages,
and the built-in default config."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from llmproxy.config import (
    BackendConfig,
    Config,
    ConfigError,
    SecretRef,
    default_config,
    format_validation_error,
    interpolate,
    is_loopback_host,
    load_config,
    parse_config,
)

SECRET = "sk-unit-test-value-7d3f"


# -- interpolate -------------------------------------------------------------------------------


def test_interpolate_replaces_variables_anywhere_in_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPROXY_T_HOST", "127.0.0.1")
    monkeypatch.setenv("LLMPROXY_T_PORT", "8123")
    data = {"proxy": {"host": "${LLMPROXY_T_HOST}", "port": "${LLMPROXY_T_PORT}"}, "x": ["a-${LLMPROXY_T_PORT}-b", 5, None, True]}
    assert interpolate(data) == {"proxy": {"host": "127.0.0.1", "port": "8123"}, "x": ["a-8123-b", 5, None, True]}


def test_interpolate_defaults_apply_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_T_UNSET", raising=False)
    monkeypatch.setenv("LLMPROXY_T_EMPTY", "")
    monkeypatch.setenv("LLMPROXY_T_SET", "given")
    assert interpolate("${LLMPROXY_T_UNSET:-fallback}") == "fallback"
    assert interpolate("${LLMPROXY_T_EMPTY:-fallback}") == "fallback"  # as in the shell
    assert interpolate("${LLMPROXY_T_SET:-fallback}") == "given"
    assert interpolate("${LLMPROXY_T_UNSET:-}") == ""
    assert interpolate("${LLMPROXY_T_EMPTY}") == ""  # set but empty is not missing
    assert interpolate("${LLMPROXY_T_UNSET:-http://127.0.0.1:11434/v1}") == "http://127.0.0.1:11434/v1"


def test_interpolate_keeps_digit_strings_as_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    # A header or model name made of digits must stay text; pydantic converts where a number is wanted.
    monkeypatch.setenv("LLMPROXY_T_ORG", "12345")
    assert interpolate({"headers": {"X-Org": "${LLMPROXY_T_ORG}"}}) == {"headers": {"X-Org": "12345"}}
    config = parse_config(
        {"proxy": {"port": "${LLMPROXY_T_ORG}"}, "backends": {"x": {"type": "openai", "headers": {"X-Org": "${LLMPROXY_T_ORG}"}}}}
    )
    assert config.proxy.port == 12345
    assert config.backends["x"]["headers"] == {"X-Org": "12345"}


def test_interpolate_reports_each_missing_variable_with_its_key_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_T_NOPE", raising=False)
    monkeypatch.delenv("LLMPROXY_T_NADA", raising=False)
    missing: list[str] = []
    interpolate({"proxy": {"host": "${LLMPROXY_T_NOPE}"}, "models": {"m": {"targets": ["a:${LLMPROXY_T_NADA}"]}}}, missing=missing)
    assert missing == [
        "proxy.host: environment variable LLMPROXY_T_NOPE is not set",
        "models.m.targets[0]: environment variable LLMPROXY_T_NADA is not set",
    ]


def test_interpolate_leaves_secret_fields_as_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPROXY_T_KEY", SECRET)
    data = {"backends": {"x": {"api_keys": ["${LLMPROXY_T_KEY}"]}}, "auth": {"api_keys": [{"name": "n", "key": "${LLMPROXY_T_KEY}"}]}}
    assert interpolate(data) == data
    assert SECRET not in repr(interpolate(data))


# -- SecretRef ---------------------------------------------------------------------------------


def test_secret_ref_env_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPROXY_T_KEY", SECRET)
    for text in ("${LLMPROXY_T_KEY}", "env:LLMPROXY_T_KEY"):
        ref = SecretRef(text)
        assert (ref.kind, ref.name) == ("env", "LLMPROXY_T_KEY")
        assert ref.get() == SECRET
        assert ref.describe() == "environment variable LLMPROXY_T_KEY"


def test_secret_ref_missing_or_empty_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_T_GONE", raising=False)
    assert SecretRef("${LLMPROXY_T_GONE}").get() is None
    monkeypatch.setenv("LLMPROXY_T_GONE", "")
    assert SecretRef("env:LLMPROXY_T_GONE").get() is None


def test_secret_ref_resolves_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_T_LATE", raising=False)
    ref = SecretRef("${LLMPROXY_T_LATE}")
    monkeypatch.setenv("LLMPROXY_T_LATE", "later")
    assert ref.get() == "later"


@pytest.mark.parametrize(
    "literal",
    [
        "sk-abc123",
        "",
        "env:",
        "env:sk-live-abc123",  # a key pasted after env: is not taken for a variable name
        "${LLMPROXY_T_KEY:-sk-inline-default}",
        "keyring:no-slash",
        "prefix ${LLMPROXY_T_KEY}",
        "$LLMPROXY_T_KEY",
    ],
)
def test_secret_ref_refuses_anything_but_a_reference(literal: str) -> None:
    with pytest.raises(ValueError, match="refuses keys written into the file") as caught:
        SecretRef(literal)
    assert "sk-" not in str(caught.value)


def test_secret_ref_keyring_parsing_without_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = SecretRef("keyring:llmproxy/openai")
    assert (ref.kind, ref.name) == ("keyring", "llmproxy/openai")
    assert ref.describe() == "keyring entry llmproxy/openai"
    monkeypatch.setitem(sys.modules, "keyring", None)  # makes `import keyring` fail
    assert ref.get() is None
    assert "the keyring package is not installed: pip install 'llmproxy[keyring]'" in ref.describe()


def test_secret_ref_keyring_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, str]] = []
    fake = types.ModuleType("keyring")

    def get_password(service: str, user: str) -> str:
        asked.append((service, user))
        return SECRET

    fake.get_password = get_password  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keyring", fake)
    assert SecretRef("keyring:llmproxy/openai/work").get() == SECRET
    assert asked == [("llmproxy", "openai/work")]


def test_secret_ref_never_shows_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPROXY_T_KEY", SECRET)
    ref = SecretRef("${LLMPROXY_T_KEY}")
    for shown in (repr(ref), str(ref), f"{ref}", f"{ref!r}", ref.describe()):
        assert SECRET not in shown
    assert repr(ref) == "SecretRef('${LLMPROXY_T_KEY}')"
    config = parse_config(
        {
            "auth": {"api_keys": [{"name": "me", "key": "${LLMPROXY_T_KEY}"}]},
            "backends": {"x": {"type": "openai", "api_keys": ["${LLMPROXY_T_KEY}"]}},
        }
    )
    assert SECRET not in repr(config) and SECRET not in str(config.model_dump())


# -- parse_config ------------------------------------------------------------------------------


def test_parse_config_defaults() -> None:
    for data in (None, {}):
        config = parse_config(data, "<t>")
        assert config.source == "<t>"
        assert config.proxy.host == "127.0.0.1" and config.proxy.port == 8000
        assert config.backends == {} and config.default_backend is None and config.auth.api_keys == []


def test_parse_config_full_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPROXY_T_KEY", SECRET)
    config = parse_config(
        {
            "proxy": {"host": "localhost", "port": 0, "drain_timeout": 2.5, "log_level": "debug"},
            "auth": {"api_keys": [{"name": "laptop", "key": "env:LLMPROXY_T_KEY"}]},
            "backends": {"a": {"type": "openai", "api_keys": "${LLMPROXY_T_KEY}"}, "b": {"type": "offline"}},
            "default_backend": "b",
            "models": {"coding": {"targets": ["a:gpt-x", {"target": "b:echo", "weight": 2}]}},
            "plugins": {"load": ["some.module"], "wire_capture": {"path": "w.jsonl"}},
        },
        "f.yaml",
    )
    assert config.proxy.is_loopback()
    assert config.auth.api_keys[0].key.get() == SECRET
    assert [t.target for t in config.models["coding"].targets] == ["a:gpt-x", "b:echo"]
    assert config.models["coding"].targets[1].weight == 2
    assert config.plugins.load == ["some.module"]
    assert config.plugin_section("wire_capture") == {"path": "w.jsonl"}
    assert config.plugin_section("absent") == {}


def problems_of(data: object, text: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "c.yaml", text)
    assert caught.value.source == "c.yaml"
    assert str(caught.value) == "\n".join(f"c.yaml: {p}" for p in caught.value.problems)
    return caught.value.problems


def test_parse_config_errors_name_the_key_path() -> None:
    assert problems_of({"proxy": {"prot": 1}}) == ["proxy.prot: unknown key"]
    assert problems_of({"bogus": 1}) == ["bogus: unknown key"]
    assert problems_of({"source": "x"}) == ["source: unknown key"]
    assert problems_of({"auth": {"api_keys": [{"name": "n", "key": "${K}", "nme": 1}]}}) == ["auth.api_keys[0].nme: unknown key"]
    assert problems_of(["not", "a", "mapping"]) == ["the top level must be a mapping (proxy:, backends:, ...)"]
    [port] = problems_of({"proxy": {"port": "abc"}})
    assert port.startswith("proxy.port: ") and "integer" in port
    [port] = problems_of({"proxy": {"port": 70000}})
    assert port.startswith("proxy.port: ") and "65535" in port
    [level] = problems_of({"proxy": {"log_level": "loud"}})
    assert level.startswith("proxy.log_level: ") and "'debug'" in level


def test_parse_config_reference_errors_each_at_their_own_path() -> None:
    assert problems_of({"backends": {"x": {"type": "offline"}}, "default_backend": "y"}) == [
        "default_backend: 'y' is not one of backends (x)"
    ]
    assert problems_of(
        {"backends": {"x": {"type": "offline"}, "a:b": {"type": "offline"}, "t": {}}, "models": {"m": {"targets": ["nope:1", "x"]}}}
    ) == [
        "backends.a:b: backend names cannot contain ':'",
        "backends.t.type: every backend needs a type",
        "models.m.targets[0]: no backend named 'nope' (backends: x, a:b, t)",
        "models.m.targets[1]: 'x' must be written backend:model",
    ]


def test_parse_config_points_at_lines_when_given_the_text() -> None:
    text = "proxy:\n  port: 1\n  prot: 2\ndefault_backend: y\nbackends:\n  x: {type: offline}\n"
    problems = problems_of(yaml.safe_load(text), text)
    assert problems == ["line 3: proxy.prot: unknown key"]
    text = "backends:\n  x: {type: offline}\ndefault_backend: y\n"
    assert problems_of(yaml.safe_load(text), text) == ["line 3: default_backend: 'y' is not one of backends (x)"]


def test_parse_config_missing_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_T_NOPE", raising=False)
    text = "proxy:\n  host: ${LLMPROXY_T_NOPE}\n"
    assert problems_of(yaml.safe_load(text), text) == ["line 2: proxy.host: environment variable LLMPROXY_T_NOPE is not set"]


def test_literal_keys_are_refused_without_echoing_them() -> None:
    [problem] = problems_of({"auth": {"api_keys": [{"name": "me", "key": "sk-literal-xyz"}]}})
    assert problem.startswith("auth.api_keys[0].key: secrets are written as references")
    assert "sk-literal-xyz" not in problem
    # Backend sections are validated by their provider's model (a BackendConfig subclass).
    with pytest.raises(ValidationError) as caught:
        BackendConfig.model_validate({"type": "openai", "api_keys": ["sk-literal-xyz"]})
    assert "refuses keys written into the file" in str(caught.value)
    [item] = format_validation_error(caught.value, "backends.x", {"backends.x.api_keys": 7})
    assert item.startswith("line 7: backends.x.api_keys: secrets are written as references")
    assert "sk-literal-xyz" not in item


def test_config_source_and_lines_without_a_file() -> None:
    config = parse_config({}, "here")
    assert config.source == "here"
    assert config.lines == {}
    assert config.where("proxy.port") == ""


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com", ""):
        assert not is_loopback_host(host), host


# -- load_config -------------------------------------------------------------------------------


def test_load_config_reads_and_locates(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("proxy:\n  port: 9001\nbackends:\n  x: {type: offline}\ndefault_backend: x\n")
    config = load_config(path)
    assert config.source == str(path) and config.proxy.port == 9001
    assert config.lines["proxy.port"] == 2 and config.where("backends.x") == "line 4: "


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert caught.value.problems == ["cannot read the file: No such file or directory"]
    assert caught.value.source == str(tmp_path / "absent.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy:\n  port: 1\n   host: x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    [problem] = caught.value.problems
    assert problem.startswith("line 3, column 8: invalid YAML: "), problem


# -- default_config ----------------------------------------------------------------------------


def test_default_config_without_keys_is_offline_only() -> None:
    config = default_config({"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}, environ={})
    assert list(config.backends) == ["offline"]
    assert config.default_backend == "offline"
    assert config.source == "<built-in defaults>"
    assert config.proxy.host == "127.0.0.1"


def test_default_config_adds_backends_whose_key_is_set_and_type_is_installed() -> None:
    environ = {"OPENAI_API_KEY": SECRET, "ANTHROPIC_API_KEY": SECRET, "GEMINI_API_KEY": "", "OPENROUTER_API_KEY": SECRET}
    config = default_config({"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}, environ=environ)
    # gemini: empty key; openrouter: its provider type is not installed here.
    assert list(config.backends) == ["offline", "openai", "anthropic"]
    assert config.default_backend == "offline"
    assert config.backends["openai"] == {"type": "openai", "api_keys": ["${OPENAI_API_KEY}"]}
    assert SECRET not in repr(config) and SECRET not in str(config.model_dump())


def test_default_config_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert "openai" in default_config({"openai": "OPENAI_API_KEY"}).backends
    monkeypatch.delenv("OPENAI_API_KEY")
    assert "openai" not in default_config({"openai": "OPENAI_API_KEY"}).backends


def test_default_config_is_a_valid_config() -> None:
    config = default_config({"openai": "OPENAI_API_KEY"}, environ={"OPENAI_API_KEY": "x"})
    assert isinstance(config, Config)
    assert Config.model_validate(config.model_dump()).backends == config.backends
