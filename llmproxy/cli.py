"""The ``llmproxy`` command: serve, validate config, list plugins, check a set-up (``doctor``)
and the backends (``providers check``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import click

from . import __version__
from .config import Config, ConfigError, default_config, load_config
from .manager import PluginHost, PluginLoadError, describe


def _load(config_path: str | None) -> tuple[Config, PluginHost]:
    if config_path:
        config = load_config(config_path)
        return config, PluginHost(config)
    # The default config depends on which provider types are installed.
    probe = PluginHost(default_config())
    config = default_config(probe.env_keys())
    return config, PluginHost(config)


def _fail(error: Exception) -> None:
    click.echo(f"error: {error}" if not isinstance(error, ConfigError) else str(error), err=True)
    sys.exit(2)


def _config_from_argv() -> str | None:
    """``--config`` as typed: ``--help`` is handled before click has parsed it."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


class PluginCommands(click.Group):
    """The built-in sub-commands, plus those installed plugins add through the
    ``register_cli_commands`` hook — loaded only when a command name is not a built-in or
    the list is asked for, so serving never pays for them."""

    _plugins_loaded = False

    def _load_plugins(self, ctx: click.Context) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        path = ctx.params.get("config_path") or _config_from_argv() or os.environ.get("LLMPROXY_CONFIG")
        try:
            config = load_config(path) if path else default_config()
            host = PluginHost(config, check_settings=False)
        except (ConfigError, PluginLoadError) as error:
            click.echo(f"warning: plugin commands unavailable: {error}", err=True)
            return
        host.pm.hook.register_cli_commands(cli=self)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            self._load_plugins(ctx)
            command = super().get_command(ctx, name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins(ctx)
        return super().list_commands(ctx)


@click.group(cls=PluginCommands, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), envvar="LLMPROXY_CONFIG",
              help="YAML config file. Without one: the offline backend plus every backend whose key is in the environment.")
@click.option("--host", help="Bind address (overrides proxy.host).")
@click.option("--port", type=int, help="Port (overrides proxy.port; 0 picks a free one).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Overrides proxy.log_level.")
@click.version_option(__version__, prog_name="llmproxy")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, host: str | None, port: int | None, log_level: str | None) -> None:
    """llmproxy: an intercepting proxy between LLM clients and LLM backends.

    With no sub-command, serve.
    """
    ctx.obj = {"config_path": config_path, "host": host, "port": port, "log_level": log_level}
    if ctx.invoked_subcommand is None:
        serve_command(config_path, host, port, log_level)


def serve_command(config_path: str | None, host: str | None, port: int | None, log_level: str | None) -> None:
    try:
        config, plugin_host = _load(config_path)
    except (ConfigError, PluginLoadError) as error:
        _fail(error)
        return
    overrides = {key: value for key, value in (("host", host or None), ("port", port)) if value is not None}
    for key, value in overrides.items():
        setattr(config.proxy, key, value)
    config.cli_overrides = overrides  # kept by a reload of the file
    level = log_level or config.proxy.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .app import serve

    try:
        _run(serve(config, plugin_host))
    except ConfigError as error:
        _fail(error)
    except KeyboardInterrupt:
        pass


def _run(coro: Any) -> None:
    try:
        import uvloop  # optional: a faster event loop where it is available

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


@main.command("serve")
@click.pass_context
def serve_cmd(ctx: click.Context) -> None:
    """Serve (the same as running llmproxy with no sub-command)."""
    serve_command(ctx.obj["config_path"], ctx.obj["host"], ctx.obj["port"], ctx.obj["log_level"])


@main.group("config")
def config_group() -> None:
    """Inspect configuration."""


@config_group.command("validate")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help="File to check (default: --config of llmproxy).")
@click.pass_context
def validate(ctx: click.Context, config_path: str | None) -> None:
    """Check a config file, plugin sections included; exit 0 when valid, 2 when not."""
    path = config_path or ctx.obj["config_path"]
    try:
        config, host = _load(path)
        from .app import check_bind, client_keys
        from .context import ProxyContext

        check_bind(config)
        client_keys(config)
        asyncio.run(ProxyContext(config, host).configure())  # plugins may refuse their settings
    except (ConfigError, PluginLoadError) as error:
        _fail(error)
        return
    missing = []
    for name, section in config.backends.items():
        for ref in host.provider_types[section["type"]].Settings.model_validate(section).api_keys:
            if ref.get() is None:
                missing.append(f"warning: backends.{name}: {ref.describe()} is not set; requests to {name} will fail")
    for line in missing:
        click.echo(line, err=True)
    click.echo(f"{config.source}: valid ({len(config.backends)} backends, {len(config.models)} aliases, {len(host.plugins)} plugins)")


@main.command("plugins")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help="Config file (default: --config of llmproxy).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plugins_cmd(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """List plugins (name, version, origin, hooks) and each hook chain in run order, as
    this config makes them: some implementations run only for requests that offer tools,
    and some have nothing to do under these settings."""
    try:
        config, host = _load(config_path or ctx.obj["config_path"])
        from .context import ProxyContext

        context = ProxyContext(config, host)
        asyncio.run(context.configure())  # the plugins say what their settings leave them to do
    except (ConfigError, PluginLoadError) as error:
        _fail(error)
        return
    info = describe(host, context.chains)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for plugin in info["plugins"]:
        extra = f"  providers: {', '.join(plugin['providers'])}" if plugin["providers"] else ""
        extra += f"  commands: {', '.join('!/' + c for c in plugin['commands'])}" if plugin["commands"] else ""
        click.echo(f"{plugin['name']:<20} {plugin['version']:<10} {plugin['origin']:<28} hooks: {', '.join(plugin['hooks']) or '-'}{extra}")
    click.echo("\nchains (run order):")
    for hook, order in info["chains"].items():
        tools = info["with_tools_only"][hook]
        shown = [f"{name} (tools)" if name in tools else name for name in order]
        idle = f"   [idle here: {', '.join(info['idle'][hook])}]" if info["idle"][hook] else ""
        click.echo(f"  {hook:<17} {' → '.join(shown) or '-'}{idle}")
    click.echo("\n(tools): runs only for requests that offer tools. idle here: nothing to do under this config, so never called.")


def _load_or_exit(path: str | None, code: int) -> tuple[Config, PluginHost]:
    try:
        return _load(path)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(f"✗ config: {error.source}: {problem}")
    except PluginLoadError as error:
        click.echo(f"✗ plugins: {error}")
    click.echo("  fix: correct the problems above, then run this again")
    sys.exit(code)


@main.command("doctor")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help="File to check (default: --config of llmproxy).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds each backend's model list may take.")
@click.pass_context
def doctor(ctx: click.Context, config_path: str | None, timeout: float) -> None:
    """Check a set-up: the config, the bind, each backend's keys (never printed), reachability
    and authentication, and the offline tokenizer. One line per check, ✓ or ✗ with a fix;
    exit 1 when any check fails."""
    from .checks import doctor_checks

    config, host = _load_or_exit(config_path or ctx.obj["config_path"], 1)
    checks = asyncio.run(doctor_checks(config, host, timeout))
    for check in checks:
        click.echo(check.line())
    failed = sum(1 for check in checks if check.ok is False)
    click.echo(f"\n{failed} of {len(checks)} checks failed" if failed else f"\nall {len(checks)} checks passed")
    sys.exit(1 if failed else 0)


@main.group("providers")
def providers_group() -> None:
    """Inspect the configured backends."""


@providers_group.command("check")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help="Config file (default: --config of llmproxy).")
@click.option("--backend", "-b", "names", multiple=True, help="Check only this backend (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds each backend's model list may take.")
@click.pass_context
def providers_check(ctx: click.Context, config_path: str | None, names: tuple[str, ...], as_json: bool, timeout: float) -> None:
    """Per backend: reachable (TCP connect time), keys accepted, models listed (count and a few
    names) and the list's latency. Exit 1 when a backend fails, 2 for a bad config or name."""
    from .checks import check_backends

    config, host = _load_or_exit(config_path or ctx.obj["config_path"], 2)
    unknown = [name for name in names if name not in config.backends]
    if unknown:
        _fail(ValueError(f"no backend named {', '.join(map(repr, unknown))} (backends: {', '.join(config.backends) or 'none'})"))
    reports = asyncio.run(check_backends(config, host, list(names) or None, timeout))
    if as_json:
        click.echo(json.dumps([report.as_json() for report in reports], indent=2))
    else:
        for report in reports:
            click.echo(_report_line(report))
    sys.exit(0 if all(report.ok for report in reports) else 1)


def _report_line(report: Any) -> str:
    where = f" {report.base_url}" if report.base_url else ""
    head = f"{'✓' if report.ok else '✗'} {report.name} ({report.type}){where}: "
    if report.base_url is None:
        return head + f"{report.reach_detail}, {len(report.models)} models"
    if not report.reachable:
        return head + f"unreachable: {report.reach_detail} — fix: {report.fix}"
    parts = [f"reachable ({report.connect_ms:g} ms)"]
    parts.extend(f"key {key.name}: {key.reference} is not set" for key in report.keys if not key.present)
    if report.listed:
        shown = ", ".join(report.models[:5]) + (", …" if len(report.models) > 5 else "")
        auth = "auth ok" if report.keys and all(key.accepted for key in report.keys if key.present) else None
        parts.extend(p for p in (auth, f"{len(report.models)} models ({shown or 'none'})", f"listed in {report.list_ms:g} ms") if p)
    for key in report.keys:
        if key.present and not key.accepted:
            parts.append(key.detail or "")
    if not report.keys and not report.listed:
        parts.append(report.list_detail or "")
    line = head + ", ".join(parts)
    return f"{line} — fix: {report.fix}" if report.fix else line


@main.group("route")
def route_group() -> None:
    """Ask how requests are routed."""


@route_group.command("explain")
@click.option("--file", "-f", "request_file", type=click.File("r"), required=True, help="A request body, as a client would send it (JSON; - for stdin).")
@click.option("--protocol", type=click.Choice(["auto", "openai_chat", "openai_responses", "anthropic", "gemini"]), default="auto", show_default=True,
              help="The body's wire protocol (auto: guessed from its fields).")
@click.option("--model", help="The model to route, instead of the body's (needed for a Gemini body, which has none: Gemini puts it in the URL).")
@click.option("--url", help="Ask a running llmproxy (its live breakers, rate windows and key rests) through its admin API instead of reading the config.")
@click.option("--admin-key", envvar="LLMPROXY_ADMIN_KEY", help="The admin key for --url (or LLMPROXY_ADMIN_KEY).")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help="Config file (default: --config of llmproxy).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def route_explain(
    ctx: click.Context, request_file: Any, protocol: str, model: str | None, url: str | None, admin_key: str | None, config_path: str | None, as_json: bool
) -> None:
    """The targets a request would be tried on, in order, each eligible or skipped and why:
    capability, health, circuit breaker, rate limit, keys. Changes nothing. Without --url the
    state is a fresh start's (every breaker closed, every window empty)."""
    from .explain import explain, render

    try:
        body = json.load(request_file)
    except ValueError as error:
        _fail(ValueError(f"{request_file.name}: not JSON: {error}"))
        return
    if not isinstance(body, dict):
        _fail(ValueError(f"{request_file.name}: a request body is a JSON object"))
        return
    chosen = None if protocol == "auto" else protocol
    if url:
        report = _remote_explain(url, admin_key, body, chosen, model)
    else:
        config, host = _load_or_exit(config_path or ctx.obj["config_path"], 2)
        from .context import ProxyContext

        report = explain(ProxyContext(config, host), body, chosen, model)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    sys.exit(0 if report.get("first") else 1)


def _remote_explain(url: str, admin_key: str | None, body: dict[str, Any], protocol: str | None, model: str | None) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    payload = json.dumps({"request": body, "protocol": protocol, "model": model}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {admin_key or ''}", "X-LLMProxy-Admin": "1"}
    request = urllib.request.Request(url.rstrip("/") + "/admin/api/route/explain", data=payload, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - the user's own proxy
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        _fail(ValueError(f"{url}: the admin API answered {error.code}: {detail}"))
    except (urllib.error.URLError, OSError) as error:
        _fail(ValueError(f"{url}: cannot reach llmproxy: {getattr(error, 'reason', error)}"))
    raise AssertionError("unreachable")
