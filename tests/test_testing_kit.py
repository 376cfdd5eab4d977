"""The plugin author's kit (llmproxy.testing), and plugins refusing their settings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from pydantic import BaseModel, Field

from llmproxy import hookimpl
from llmproxy.config import ConfigError
from llmproxy.testing import build_flow, plugin_context

OFFLINE = {"backends": {"o": {"type": "offline"}}, "default_backend": "o"}


class Settings(BaseModel):
    word: str = Field("hello", description="A word.")


class Shouter:
    @hookimpl
    def plugin_settings(self):
        return Settings

    @hookimpl
    def configure(self, settings, context):
        if settings.word == "forbidden":
            raise ValueError("word may not be 'forbidden'")

    @hookimpl
    def request(self, flow):
        word = flow.context.settings("shouter").word
        flow.request.last_user_message.parts[0].text += f" {word.upper()}"


async def test_a_plugin_hook_runs_against_a_built_flow_with_its_settings():
    context = await plugin_context({**OFFLINE, "plugins": {"shouter": {"word": "hey"}}}, plugins=[("shouter", Shouter())])
    flow = build_flow({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, context=context)
    Shouter().request(flow)
    assert flow.request.last_user_message.text == "hi HEY"
    assert flow.session.id.startswith("client:")


async def test_a_plugin_refusing_its_settings_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as raised:
        await plugin_context({**OFFLINE, "plugins": {"shouter": {"word": "forbidden"}}}, plugins=[("shouter", Shouter())])
    assert "plugins.shouter: word may not be 'forbidden'" in str(raised.value)


def test_config_validate_runs_configure_and_checks_client_keys(tmp_path):
    (tmp_path / "refusing.py").write_text(textwrap.dedent('''
        from llmproxy import hookimpl

        @hookimpl
        def configure(settings, context):
            raise ValueError("not today")
    '''))
    refusing = tmp_path / "refusing.yaml"
    refusing.write_text("backends: {o: {type: offline}}\nplugins: {load: [refusing]}\n")
    keys = tmp_path / "keys.yaml"
    keys.write_text("backends: {o: {type: offline}}\nauth: {api_keys: [{name: laptop, key: '${LLMPROXY_TEST_UNSET_KEY}'}]}\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "llmproxy", "config", "validate", "--config", str(refusing)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "plugins.refusing: not today" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "llmproxy", "config", "validate", "--config", str(keys)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "LLMPROXY_TEST_UNSET_KEY is not set" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
