"""The built-in commands (``backend``, ``model``, ``oneoff``, ``set``, ``unset``, ``status``,
``help``) and how a session's choices are applied to each of its requests.

What a session carries lives on :class:`llmproxy.sessions.Session`: ``settings["backend"]``,
``settings["model"]`` (without its backend), sampling values under their canonical names,
``settings["plugin.<name>"]`` switches (honoured by the core), and ``oneoff``, a full target
for the next request only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from llmproxy import ProxyError

if TYPE_CHECKING:
    from llmproxy.commands import CommandCall
    from llmproxy.flow import Flow
    from llmproxy.sessions import Session

PLUGIN = "commands"
STATE_KEY = "commands"

# Session settings that become request parameters: name → (parse, check, what it takes).
_FLOAT = float


def _int(text: str) -> int:
    return int(text)


SAMPLING: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "temperature": (_FLOAT, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (_FLOAT, lambda v: 0 < v <= 1, "a number above 0, at most 1"),
    "top_k": (_int, lambda v: v >= 1, "a whole number from 1"),
    "max_tokens": (_int, lambda v: v >= 1, "a whole number from 1"),
    "seed": (_int, lambda v: True, "a whole number"),
    "presence_penalty": (_FLOAT, lambda v: -2 <= v <= 2, "a number from -2 to 2"),
    "frequency_penalty": (_FLOAT, lambda v: -2 <= v <= 2, "a number from -2 to 2"),
    "stop": (lambda text: [text], lambda v: bool(v[0]), "a non-empty stop sequence"),
}
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
ROUTING = ("backend", "model")
OVERRIDES = frozenset((*ROUTING, *SAMPLING, "reasoning_effort"))
"""Session settings this plugin applies to requests (plugin switches are the core's)."""
_ON = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


class ProxyState:
    """Per proxy (``context.state["commands"]``): whether any session has overrides, so that
    a proxy where nobody typed a command never looks sessions up."""

    __slots__ = ("overrides",)

    def __init__(self) -> None:
        self.overrides = False


def proxy_state(context: Any) -> ProxyState:
    state = context.state.get(STATE_KEY)
    if state is None:
        state = context.state[STATE_KEY] = ProxyState()
    return state


def has_overrides(session: "Session") -> bool:
    if session.oneoff:
        return True
    settings = session.settings
    return bool(settings) and not OVERRIDES.isdisjoint(settings)


def _remember(call: "CommandCall") -> None:
    proxy_state(call.flow.context).overrides = True


# -- routing ---------------------------------------------------------------------------------


def _is_bare(context: Any, name: str) -> bool:
    """A model name the router would send to the default backend (no alias, no backend: prefix)."""
    if name in context.config.models:
        return False
    backend, sep, rest = name.partition(":")
    return not (sep and rest and backend in context.providers)


def _qualified(context: Any, model: str, backend: str | None) -> str:
    return f"{backend}:{model}" if backend and _is_bare(context, model) else model


def _check_route(context: Any, name: str) -> None:
    backend, sep, _ = name.partition(":")
    if sep and name not in context.config.models and backend not in context.providers:
        # "openrouter:x" without an openrouter backend is a typo far more often than a model
        # whose own name holds a colon (those are written default:llama3:8b)
        raise ValueError(
            f"no backend named {backend!r}; backends: {_backend_names(context)} "
            f"(for a model whose name holds a colon, name its backend first: backend:{name})"
        )
    try:
        context.router.resolve(name)
    except ProxyError as error:
        raise ValueError(error.message) from None


def _backend_names(context: Any) -> str:
    return ", ".join(sorted(context.providers)) or "none configured"


def set_backend(call: "CommandCall", name: str) -> str:
    context = call.flow.context
    settings = call.session.settings
    if not name:
        settings.pop("backend", None)
        return "backend: back to the default (" + str(context.config.default_backend) + ")"
    if name not in context.providers:
        raise ValueError(f"no backend named {name!r}; backends: {_backend_names(context)}")
    model = settings.get("model")
    if model:
        _check_route(context, _qualified(context, model, name))
    settings["backend"] = name
    _remember(call)
    if model:
        return f"backend: {name} (model {_qualified(context, model, name)})"
    return f"backend: {name} (model names without a backend: prefix now go to {name})"


def set_model(call: "CommandCall", name: str) -> str:
    context = call.flow.context
    settings = call.session.settings
    if not name:
        settings.pop("model", None)
        return "model: back to what the client asks for"
    backend, sep, rest = name.partition(":")
    if sep and rest and backend in context.providers:
        _check_route(context, name)
        settings["backend"] = backend
        settings["model"] = rest
    else:
        _check_route(context, _qualified(context, name, settings.get("backend")))
        settings["model"] = name
    _remember(call)
    return f"model: {_qualified(context, settings['model'], settings.get('backend'))}"


def cmd_backend(call: "CommandCall") -> str:
    args = call.arguments()
    if len(args) > 1:
        raise ValueError("takes one backend name, e.g. !/backend(openai)")
    return set_backend(call, args[0] if args else "")


def cmd_model(call: "CommandCall") -> str:
    args = call.arguments()
    if len(args) > 1:
        raise ValueError("takes one model, e.g. !/model(gpt-5-mini) or !/model(openrouter:qwen/qwen3-coder)")
    return set_model(call, args[0] if args else "")


def cmd_oneoff(call: "CommandCall") -> str:
    args = call.arguments()
    if len(args) != 1:
        raise ValueError("takes one target, e.g. !/oneoff(openai:gpt-5-mini)")
    context = call.flow.context
    target = _qualified(context, args[0], call.session.settings.get("backend"))
    _check_route(context, target)
    call.session.oneoff = target
    _remember(call)
    return f"oneoff: the next request goes to {target}"


# -- settings --------------------------------------------------------------------------------


def _settable(context: Any) -> str:
    return ", ".join((*ROUTING, *SAMPLING, "reasoning_effort", "plugin.<name>"))


def _switch(call: "CommandCall", key: str, value: str | None) -> str:
    name = key[7:]
    context = call.flow.context
    info = context.host.plugins.get(name)
    if info is None:
        raise ValueError(f"no plugin named {name!r}; plugins: {', '.join(sorted(context.host.plugins))}")
    if info.obj is None:
        raise ValueError(f"plugin {name!r} is disabled in the config (plugins.{name}.enabled), so a session cannot switch it")
    owner = context.host.commands.get("set")
    if owner is not None and name == owner.plugin:
        raise ValueError(f"{name} cannot switch itself off: commands would stop working for this session")
    if value is None:
        call.session.settings.pop(key, None)
        return f"{key}: back to on from the next request"
    on = _ON.get(value.lower())
    if on is None:
        raise ValueError(f"{key} takes on or off, not {value!r}")
    call.flow.sessions.switch_plugin(call.session, name, on)
    return f"{key}: {'on' if on else 'off'} for this session from its next request"


def set_value(call: "CommandCall", key: str, value: str) -> str:
    if key == "backend":
        return set_backend(call, value)
    if key == "model":
        return set_model(call, value)
    if key.startswith("plugin.") and len(key) > 7:
        return _switch(call, key, value)
    if key == "reasoning_effort":
        if value.lower() not in EFFORTS:
            raise ValueError(f"reasoning_effort takes one of {', '.join(EFFORTS)}, not {value!r}")
        call.session.settings[key] = value.lower()
        _remember(call)
        return f"reasoning_effort: {value.lower()}"
    spec = SAMPLING.get(key)
    if spec is None:
        raise ValueError(f"unknown setting {key!r}; settable: {_settable(call.flow.context)}")
    parse, check, wanted = spec
    try:
        parsed = parse(value)
        ok = check(parsed)
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise ValueError(f"{key} takes {wanted}, not {value!r}")
    call.session.settings[key] = parsed
    _remember(call)
    return f"{key}: {value}"


def cmd_set(call: "CommandCall") -> str:
    pairs = call.pairs()
    if not pairs:
        raise ValueError(f"takes key=value pairs, e.g. !/set(temperature=0.2); settable: {_settable(call.flow.context)}")
    return "\n".join(set_value(call, key, value) for key, value in pairs.items())


def cmd_unset(call: "CommandCall") -> str:
    keys = call.arguments()
    if not keys:
        raise ValueError("names the settings to forget, e.g. !/unset(temperature), or * for all")
    session = call.session
    if keys == ["*"]:
        session.settings.clear()
        session.oneoff = None
        return "every session setting is forgotten"
    out = []
    for key in keys:
        if key == "oneoff":
            session.oneoff = None
        elif key.startswith("plugin.") and len(key) > 7:
            out.append(_switch(call, key, None))
            continue
        elif key not in OVERRIDES:
            raise ValueError(f"unknown setting {key!r}; settable: {_settable(call.flow.context)}, oneoff")
        else:
            session.settings.pop(key, None)
        out.append(f"{key}: unset")
    return "\n".join(out)


# -- information -----------------------------------------------------------------------------


def _prefix(call: "CommandCall") -> str:
    settings = call.flow.context.settings(PLUGIN)
    return settings.prefix if settings is not None else "!/"


def cmd_status(call: "CommandCall") -> str:
    context = call.flow.context
    session = call.session
    settings = session.settings
    backend = settings.get("backend")
    model = settings.get("model")
    lines = [
        f"session: {session.id} (identified by {session.source}; {session.requests} requests; "
        f"forgotten after {context.sessions.ttl:g}s idle)",
        f"backend: {backend or 'default (' + str(context.config.default_backend) + ')'}",
        f"model: {_qualified(context, model, backend) if model else 'as the client asks (now ' + call.flow.model + ')'}",
        f"oneoff: {session.oneoff or 'none'}",
    ]
    values = [f"{k}={settings[k]!r}" if isinstance(settings[k], str) else f"{k}={settings[k]}" for k in settings if k in OVERRIDES and k not in ROUTING]
    lines.append("settings: " + (", ".join(values) or "none"))
    off = sorted(session.disabled_plugins())
    lines.append("plugins off: " + (", ".join(off) or "none"))
    return "\n".join(lines)


def cmd_help(call: "CommandCall") -> str:
    prefix = _prefix(call)
    commands = call.flow.context.host.commands
    lines = ["commands:"]
    for name in sorted(commands):
        command = commands[name]
        # a help text that starts with the command's name is a usage line: "set(key=value) — …"
        usage = command.help if command.help.startswith(name) else f"{name} — {command.help or 'no description'}"
        owner = "" if command.plugin == commands["help"].plugin else f" [plugin {command.plugin}]"
        lines.append(f"{prefix}{usage}{owner}")
    return "\n".join(lines)


BUILTINS: tuple[tuple[str, Callable[["CommandCall"], Any], str], ...] = (
    ("backend", cmd_backend, "backend(name) — model names without a backend: prefix go to this backend for the session; backend() for the default"),
    ("model", cmd_model, "model(name) or model(backend:model) — this model for every request of the session; model() for the client's own"),
    ("oneoff", cmd_oneoff, "oneoff(backend:model) — the next request only (this one, if the message says more)"),
    ("set", cmd_set, "set(key=value, …) — session settings: temperature, top_p, top_k, max_tokens, seed, stop, "
     "presence_penalty, frequency_penalty, reasoning_effort, backend, model, plugin.<name>=on|off"),
    ("unset", cmd_unset, "unset(key, …) — forget session settings (oneoff too); unset(*) forgets them all"),
    ("status", cmd_status, "status — backend, model, oneoff and settings in force, and how the session was identified"),
    ("help", cmd_help, "help — this list"),
)


# -- applying a session to a request ---------------------------------------------------------


def apply_session(flow: "Flow", session: "Session") -> None:
    """Route and parameterise ``flow`` as ``session`` says (consuming its oneoff)."""
    context = flow.context
    settings = session.settings
    before = flow.model
    if session.oneoff:
        flow.model, session.oneoff = session.oneoff, None
        flow.note(PLUGIN, "oneoff", **{"from": before, "to": flow.model})
    elif settings.get("model"):
        flow.model = _qualified(context, settings["model"], settings.get("backend"))
        if flow.model != before:
            flow.note(PLUGIN, "model", **{"from": before, "to": flow.model})
    elif settings.get("backend") and _is_bare(context, flow.model):
        flow.model = f"{settings['backend']}:{flow.model}"
        flow.note(PLUGIN, "backend", **{"from": before, "to": flow.model})
    params = {key: settings[key] for key in SAMPLING if key in settings}
    effort = settings.get("reasoning_effort")
    if params or effort:
        request = flow.request
        if params:
            request.params.update(params)
            flow.note(PLUGIN, "params", params=params)
        if effort:
            request.reasoning = {**(request.reasoning or {}), "effort": effort}
            flow.note(PLUGIN, "reasoning", effort=effort)
