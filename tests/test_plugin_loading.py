"""Plugin loading: what stops start-up, and with which message; disabling; plugin settings.

Plugins named in ``plugins.load`` are real modules written to a temporary directory put on
``sys.path``, loaded exactly as a user's would be. Start-up is ``llmproxy.testing.start_proxy``
(the app factory and plugin host the server uses) or the ``llmproxy`` command itself.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import yaml
from click.testing import CliRunner

from llmproxy import hookimpl
from llmproxy.cli import main
from llmproxy.config import ConfigError
from llmproxy.manager import PluginLoadError, describe
from llmproxy.testing import RunningProxy, start_proxy

OFFLINE = {"backends": {"offline": {"type": "offline"}}, "default_backend": "offline"}

REWRITER = '''
"""Rewrites every prompt to "rewritten", so a test can tell whether it ran."""
from llmproxy import hookimpl
from llmproxy.canonical import TextPart


@hookimpl
def request(flow):
    flow.request.last_user_message.parts = [TextPart("rewritten")]
'''

SETTINGS_PLUGIN = '''
from pydantic import BaseModel, ConfigDict, Field
from llmproxy import hookimpl


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(10, ge=1, description="A positive number.")
    mode: str = Field("warn", pattern="^(warn|block)$", description="warn or block.")


@hookimpl
def plugin_settings():
    return Settings
'''


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Write ``source`` as a uniquely named module on sys.path; returns its name, which is
    also the plugin's name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"llmproxy_test_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def proxy() -> AsyncIterator[StartProxy]:
    started: list[RunningProxy] = []

    async def start(config: dict[str, Any], plugins: list[tuple[str, Any]] | None = None) -> RunningProxy:
        running = await start_proxy(config, plugins=plugins)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


async def echo(running: RunningProxy, text: str = "original") -> str:
    body = {"model": "offline-echo", "messages": [{"role": "user", "content": text}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.post(running.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            return (await response.json())["choices"][0]["message"]["content"]


def with_plugins(**plugins: Any) -> dict[str, Any]:
    return {**OFFLINE, "plugins": plugins}


# -- what stops start-up ---------------------------------------------------------------------


async def test_a_misspelled_hook_stops_startup_naming_the_plugin(proxy: StartProxy) -> None:
    class Typo:
        @hookimpl
        def reqeust(self, flow: Any) -> None:
            pass

    with pytest.raises(PluginLoadError) as raised:
        await proxy(OFFLINE, [("typo_plugin", Typo())])
    assert "typo_plugin" in str(raised.value)
    assert "reqeust" in str(raised.value)


async def test_a_misspelled_hook_in_a_configured_module_stops_startup(proxy: StartProxy, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(
        """
        from llmproxy import hookimpl

        @hookimpl
        def flow_don(flow):
            pass
        """
    )
    with pytest.raises(PluginLoadError) as raised:
        await proxy(with_plugins(load=[name]))
    assert name in str(raised.value) and "flow_don" in str(raised.value)


async def test_a_hook_with_an_unknown_argument_stops_startup(proxy: StartProxy) -> None:
    class WrongArgument:
        @hookimpl
        def request(self, flw: Any) -> None:
            pass

    with pytest.raises(PluginLoadError) as raised:
        await proxy(OFFLINE, [("wrong_argument", WrongArgument())])
    assert "wrong_argument" in str(raised.value) and "flw" in str(raised.value)


def test_the_command_line_refuses_a_misspelled_plugin_with_its_name(tmp_path: Path, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(
        """
        from llmproxy import hookimpl

        @hookimpl
        def stream_begin(flow):
            return None
        """
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(with_plugins(load=[name])))
    result = CliRunner().invoke(main, ["--config", str(config), "config", "validate"])
    assert result.exit_code == 2
    assert name in result.output and "stream_begin" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "source, why",
    [
        ("import llmproxy_no_such_dependency\n", "llmproxy_no_such_dependency"),
        ("raise RuntimeError('this plugin is broken')\n", "this plugin is broken"),
        ("def broken(:\n", "SyntaxError"),
    ],
    ids=["missing dependency", "raises", "syntax error"],
)
async def test_a_configured_module_that_fails_to_import_stops_startup(proxy: StartProxy, plugin_module: Callable[[str], str], source: str, why: str) -> None:
    name = plugin_module(source)
    with pytest.raises(PluginLoadError) as raised:
        await proxy(with_plugins(load=[name]))
    message = str(raised.value)
    assert name in message and "failed to import" in message and why in message


async def test_a_configured_module_that_does_not_exist_stops_startup(proxy: StartProxy) -> None:
    with pytest.raises(PluginLoadError) as raised:
        await proxy(with_plugins(load=["llmproxy_plugin_that_is_not_installed"]))
    assert "llmproxy_plugin_that_is_not_installed" in str(raised.value)


async def test_two_plugins_registering_one_provider_type_stop_startup(proxy: StartProxy) -> None:
    from llmproxy_offline import OfflineProvider

    class Impostor:
        @hookimpl
        def register_providers(self, register: Callable[[str, type], None]) -> None:
            register("offline", OfflineProvider)

    # the built-in offline provider comes from the llmproxy entry-point group
    with pytest.raises(PluginLoadError) as raised:
        await proxy(OFFLINE, [("impostor", Impostor())])
    message = str(raised.value)
    assert "'impostor'" in message and "'offline'" in message and "already registered" in message


# -- settings --------------------------------------------------------------------------------


async def test_an_unknown_plugin_section_is_a_config_error_with_its_path(proxy: StartProxy) -> None:
    with pytest.raises(ConfigError) as raised:
        await proxy(with_plugins(no_such_plugin={"level": 3}))
    assert any("plugins.no_such_plugin:" in problem for problem in raised.value.problems)


@pytest.mark.parametrize(
    "section, path",
    [
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"mode": "shout"}, "mode"),
        ({"colour": "red"}, "colour"),
    ],
    ids=["too small", "wrong type", "bad value", "unknown key"],
)
async def test_invalid_plugin_settings_are_a_config_error_with_the_key_path(proxy: StartProxy, plugin_module: Callable[[str], str], section: dict[str, Any], path: str) -> None:
    name = plugin_module(SETTINGS_PLUGIN)
    with pytest.raises(ConfigError) as raised:
        await proxy(with_plugins(load=[name], **{name: section}))
    assert f"plugins.{name}.{path}" in str(raised.value)


async def test_valid_plugin_settings_start(proxy: StartProxy, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(SETTINGS_PLUGIN)
    running = await proxy(with_plugins(load=[name], **{name: {"limit": 3, "mode": "block"}}))
    info = running.context.host.plugins[name]
    assert info.origin == "config"
    assert info.settings is not None and info.settings.model_dump() == {"limit": 3, "mode": "block"}


async def test_settings_for_a_plugin_that_takes_none_are_an_error(proxy: StartProxy, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(REWRITER)
    with pytest.raises(ConfigError) as raised:
        await proxy(with_plugins(load=[name], **{name: {"level": 3}}))
    assert f"plugins.{name}" in str(raised.value)


@pytest.mark.parametrize("value", ["no", 0, None])
async def test_enabled_must_be_true_or_false(proxy: StartProxy, plugin_module: Callable[[str], str], value: Any) -> None:
    name = plugin_module(REWRITER)
    with pytest.raises(ConfigError) as raised:
        await proxy(with_plugins(load=[name], **{name: {"enabled": value}}))
    assert f"plugins.{name}.enabled: must be true or false" in str(raised.value)


# -- enabling and disabling ------------------------------------------------------------------


async def test_a_configured_module_is_loaded_and_its_hooks_run(proxy: StartProxy, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(REWRITER)
    running = await proxy(with_plugins(load=[name], **{name: {"enabled": True}}))
    assert name in running.context.chains.order("request")
    assert await echo(running) == "You said: rewritten"


async def test_enabled_false_disables_a_configured_plugin(proxy: StartProxy, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(REWRITER)
    running = await proxy(with_plugins(load=[name], **{name: {"enabled": False}}))
    assert await echo(running) == "You said: original"  # its request hook did not run
    assert name not in running.context.chains.order("request")
    [listed] = [p for p in describe(running.context.host)["plugins"] if p["name"] == name]
    assert "disabled" in listed["origin"] and listed["hooks"] == []


async def test_enabled_false_disables_a_registered_plugin_object(proxy: StartProxy) -> None:
    calls: list[str] = []

    class Counter:
        @hookimpl
        def request(self, flow: Any) -> None:
            calls.append(flow.model)

    running = await proxy(with_plugins(counter={"enabled": False}), [("counter", Counter())])
    await echo(running)
    assert calls == []
    running = await proxy(OFFLINE, [("counter", Counter())])
    await echo(running)
    assert calls == ["offline-echo"]


async def test_enabled_false_disables_a_builtin_plugin_too(proxy: StartProxy) -> None:
    # Built-ins load through the same entry-point group and obey the same switch: without the
    # openai plugin there is no "openai" backend type.
    config = {"backends": {"gpt": {"type": "openai"}, "offline": {"type": "offline"}}, "default_backend": "offline"}
    running = await proxy(config)
    assert running.context.host.plugins["openai"].origin == "built-in"
    with pytest.raises(ConfigError) as raised:
        await proxy({**config, "plugins": {"openai": {"enabled": False}}})
    assert "backends.gpt.type" in str(raised.value) and "'openai'" in str(raised.value)


def test_plugins_command_lists_a_configured_plugin_and_its_chain(tmp_path: Path, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(REWRITER)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(with_plugins(load=[name])))
    result = CliRunner().invoke(main, ["--config", str(config), "plugins", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    [listed] = [p for p in info["plugins"] if p["name"] == name]
    assert listed["origin"] == "config" and listed["hooks"] == ["request"]
    assert name in info["chains"]["request"]


LAX_SETTINGS_PLUGIN = '''
from pydantic import BaseModel, Field
from llmproxy import hookimpl


class Settings(BaseModel):  # pydantic's default: extra keys are silently ignored
    word: str = Field("hi", description="A word.")


@hookimpl
def plugin_settings():
    return Settings
'''


async def test_a_misspelled_setting_is_an_error_even_when_the_model_would_ignore_it(proxy: StartProxy, plugin_module: Callable[[str], str]) -> None:
    name = plugin_module(LAX_SETTINGS_PLUGIN)
    with pytest.raises(ConfigError) as raised:
        await proxy(with_plugins(load=[name], **{name: {"word": "ok", "wrod": "typo"}}))
    assert f"plugins.{name}.wrod: unknown key" in str(raised.value)


async def test_a_wrapper_on_a_flow_hook_stops_startup(proxy: StartProxy) -> None:
    class Wrapping:
        @hookimpl(wrapper=True)
        def request(self, flow: Any) -> Any:
            return (yield)

    with pytest.raises(PluginLoadError, match="'wrapping': request is a wrapper"):
        await proxy(OFFLINE, plugins=[("wrapping", Wrapping())])
