"""The registration hooks beside providers: in-chat commands and CLI sub-commands."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from llmproxy import hookimpl
from llmproxy.commands import CommandCall
from llmproxy.config import parse_config
from llmproxy.manager import PluginHost, PluginLoadError
from llmproxy.testing import build_flow

CONFIG = {"backends": {"o": {"type": "offline"}}, "default_backend": "o"}


class Greeter:
    @hookimpl
    def register_commands(self, register):
        register("greet", lambda call: f"hello {call.args or 'there'}", "Say hello.")


def test_commands_are_collected_with_their_plugin_and_help():
    host = PluginHost(parse_config(CONFIG), extra=[("greeter", Greeter())])
    command = host.commands["greet"]
    assert command.plugin == "greeter" and command.help == "Say hello."
    flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert command.handler(CommandCall("greet", "Ada", flow, flow.session)) == "hello Ada"


def test_a_command_name_registered_twice_stops_start_up():
    class Again:
        @hookimpl
        def register_commands(self, register):
            register("greet", lambda call: None, "")

    with pytest.raises(PluginLoadError, match="'greet', already registered"):
        PluginHost(parse_config(CONFIG), extra=[("greeter", Greeter()), ("again", Again())])


def test_a_command_name_must_be_a_lower_case_word():
    class Bad:
        @hookimpl
        def register_commands(self, register):
            register("Not OK", lambda call: None, "")

    with pytest.raises(PluginLoadError, match="lower-case"):
        PluginHost(parse_config(CONFIG), extra=[("bad", Bad())])


def test_command_call_parses_arguments():
    flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    call = CommandCall("set", "temperature=0.2, plugin.loops = off", flow, flow.session)
    assert call.arguments() == ["temperature=0.2", "plugin.loops = off"]
    assert call.pairs() == {"temperature": "0.2", "plugin.loops": "off"}
    with pytest.raises(ValueError, match="key=value"):
        CommandCall("set", "oops", flow, flow.session).pairs()


def test_plugins_add_cli_sub_commands(tmp_path):
    (tmp_path / "hello_cli.py").write_text(
        textwrap.dedent(
            """
            import click
            from llmproxy import hookimpl

            @hookimpl
            def register_cli_commands(cli):
                @cli.command("hello")
                @click.argument("name")
                def hello(name):
                    '''Greet someone.'''
                    click.echo(f"hello {name} from a plugin")
            """
        )
    )
    config = tmp_path / "config.yaml"
    config.write_text("backends: {o: {type: offline}}\nplugins: {load: [hello_cli]}\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "llmproxy", "--config", str(config), "hello", "Ada"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello Ada from a plugin"
    listing = subprocess.run([sys.executable, "-m", "llmproxy", "--config", str(config), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert "hello" in listing.stdout and "Greet someone." in listing.stdout
