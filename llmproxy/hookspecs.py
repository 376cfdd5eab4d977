"""The plugin contract: every hook llmproxy calls, and what it means.

A plugin is a module or object whose functions are named after these hooks and decorated
with ``llmproxy.hookimpl``. It is found through the ``llmproxy`` entry-point group (built-ins
and third-party packages alike) or named in the config under ``plugins.load``. Implement only
the hooks you need, with only the arguments you need: pluggy passes arguments by name.

Order. Within a chain, implementations marked ``tryfirst=True`` run first and
``trylast=True`` last. Among the tryfirst ones and among the unmarked ones, plugins
registered later run earlier; among the trylast ones, later run later (pluggy's rule).
``llmproxy plugins`` prints every chain in the order it runs.

Async. Hooks marked *may be async* accept implementations that return an awaitable (write
them as ``async def``); llmproxy calls the chain one implementation at a time and awaits
each before calling the next, so a chain always sees its predecessors' changes. The other
hooks are called synchronously and must not block.

Errors. Raise :class:`llmproxy.ProxyError` to refuse a flow with a client-visible error in the
client's protocol. Any other exception from a flow hook (``request``, ``upstream_request``,
``response``, a stream processor) fails closed: the flow ends with a 500 naming the plugin, so
a broken redaction or blocking plugin never lets a request through. Exceptions in
``error`` and ``flow_done`` are logged and ignored.

Streams. ``stream_start`` is called once per streamed response and collects *stream
processors*: callables ``processor(event) -> StreamEvent | list[StreamEvent] | None``, called
for every canonical :class:`~llmproxy.canonical.StreamEvent` in order. Return the event (the
same object, or a changed one) to pass it on, ``None`` to drop or hold it, a list to emit
zero or more events (inject, split, release what was held). When the stream ends the
processor is called once more with ``None`` and returns what it still holds (a list, or
``None``). Emitting an event of kind ``stop`` or ``error`` ends the stream: llmproxy stops
reading the backend. An event passed on belongs to llmproxy: do not change it afterwards
(``flow.response`` of a stream is folded from the events the client was sent, when first
read). A stream with no processors is forwarded without decoding when the
backend speaks the client's protocol, so a plugin that has nothing to do for a stream should
return ``None`` from ``stream_start`` and costs nothing per event.

Cost. Every flow calls every implementation in its chains, about a microsecond each even
when it returns at once. An implementation that has nothing to do under its plugin's
settings, or for requests that offer no tools, says so from ``configure`` (below) and is
left out of those flows' chains. ``llmproxy plugins`` shows the chains as the config makes
them.

Tracing. A plugin that shows what the others did (the inspector) calls
``flow.trace_changes()`` from a ``tryfirst`` ``request`` implementation; the core then records
in ``flow.changes`` a ``(hook, plugin, before, after)`` entry for each later ``request`` or
``response`` implementation that changed the flow (snapshots from ``Flow.snapshot``: the
model and canonical request, or the canonical response, as JSON bytes). Untraced flows pay
nothing for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, Union

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .canonical import StreamEvent
    from .context import ProxyContext
    from .flow import Flow, UpstreamRequest
    from .providers import Provider

hookspec = pluggy.HookspecMarker("llmproxy")
hookimpl = pluggy.HookimplMarker("llmproxy")

StreamProcessorResult = Union["StreamEvent", list["StreamEvent"], None]


class StreamProcessor(Protocol):
    """Per-stream callable returned by ``stream_start`` (see the module docstring)."""

    def __call__(self, event: Optional["StreamEvent"]) -> StreamProcessorResult: ...


# -- registration and life cycle ---------------------------------------------------------


@hookspec
def register_providers(register: Callable[[str, type["Provider"]], None]) -> None:
    """Add backend types: call ``register("openai", OpenAIProvider)`` once per type.

    The type name is what ``backends.<name>.type`` selects in the config. The class
    subclasses :class:`llmproxy.providers.Provider`; its ``Settings`` model validates the
    backend's config section. Called once at start-up.
    """


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Add in-chat commands: ``register(name, handler, help)`` once per command.

    A user types ``!/name`` or ``!/name(arguments)`` in a message; the ``commands`` plugin
    finds it, strips it, and calls ``handler(call)`` with a
    :class:`llmproxy.commands.CommandCall` (``name``, ``args`` — the raw text between the
    parentheses, ``flow``, ``session``). The handler changes ``call.session`` (settings
    that last) or ``call.flow`` (this request only) and returns a short reply for the user,
    or None. Raise ``ValueError`` with a message to report bad arguments. May be async.
    Called once at start-up.
    """


@hookspec
def register_cli_commands(cli: Any) -> None:
    """Add sub-commands to the ``llmproxy`` command: ``cli`` is its click group, so
    ``@cli.command()`` works. Called when the command line is built."""


@hookspec
def register_routes(register: Callable[..., None], context: "ProxyContext") -> None:
    """Add HTTP routes to the proxy's server: ``register(method, path, handler)`` once per
    route, with an aiohttp handler ``async def handler(request) -> web.StreamResponse``
    (``path`` may hold aiohttp's ``{name}`` variables; ``method`` ``"*"`` is every method).
    For admin APIs, a UI, ``/metrics``. The core does not authenticate these routes: the
    plugin checks its own credentials, and a route beginning with ``/v1`` is refused
    (those are the protocol routes). Called once per app, before ``startup``.
    """


@hookspec
def plugin_settings() -> Optional[type["BaseModel"]]:
    """Return the pydantic model for this plugin's config section, ``plugins.<plugin name>``.

    Each field should have a default and a description (it becomes the reference docs and
    ``llmproxy config validate`` reports errors against it). Every section also accepts
    ``enabled: false``, which unregisters the plugin. Called once at start-up.
    """


@hookspec
def configure(settings: Optional["BaseModel"], context: "ProxyContext") -> Optional[Mapping[str, str]]:
    """Receive this plugin's validated settings (an instance of its ``plugin_settings``
    model, or None when it has none) and the proxy context. Called at start-up, on every
    config reload and by ``llmproxy config validate`` and ``llmproxy plugins``, so keep it free of side effects
    beyond remembering the settings (open files in ``startup``). Raise ``ValueError`` to
    reject the settings: the message becomes a config error naming ``plugins.<name>``. Per
    flow, read them back with ``flow.context.settings("<name>")``.

    Optionally return when your flow hooks have work under these settings: a mapping from
    some of the flow hooks you implement (``request``, ``upstream_request``, ``response``,
    ``stream_start``, ``error``, ``flow_done``) to ``"always"`` (the default for a hook not
    named), ``"tools"`` or ``"never"`` — say ``{"request": "never"}`` for a rewrite plugin
    with no rules. ``"tools"``: only for flows whose client offers tools, that is a non-empty
    ``tools`` array in the body the client sent (any protocol; Gemini's built-in tools count,
    the legacy OpenAI ``functions`` field does not). It is judged from that wire body, so a
    ``request`` hook that adds tools to ``flow.request`` does not bring ``"tools"``
    implementations into the flow. The core leaves an implementation out of the chains of
    the flows it has nothing to do for (see "Cost" above), rebuilding them after every
    ``configure``. A mapping naming a hook you do not implement, or a word not among those
    three, stops start-up as a bug in the plugin; a return value that is no mapping is
    ignored with a warning (plugins written before the declaration). Keep your own
    checks as well: a hook called directly (``llmproxy.testing.make_flow`` tests) or by a
    version of llmproxy that ignores the declaration runs for every flow.
    """


@hookspec
def startup(context: "ProxyContext") -> Any:
    """The server is about to accept connections. *May be async.* Open files, start
    background tasks here; ``context.config`` is the validated config. An exception stops
    start-up with a config error naming the plugin."""


@hookspec
def shutdown(context: "ProxyContext") -> Any:
    """The server has drained and is stopping. *May be async.* Flush and close here."""


# -- the flow ----------------------------------------------------------------------------


@hookspec
def request(flow: "Flow") -> Any:
    """A client request has been received and authenticated. *May be async.*

    Change ``flow.request`` (the canonical request) or ``flow.model`` to reroute; set
    ``flow.response`` to a :class:`~llmproxy.canonical.Response` to answer without calling
    a backend (streamed to the client if it asked for a stream), which also ends this chain;
    raise ``ProxyError`` to refuse. Reading ``flow.request`` decodes the wire body, so check
    cheap fields (``flow.model``, ``flow.frontend``, ``flow.client``) first when you can.
    """


@hookspec
def upstream_request(flow: "Flow", upstream: "UpstreamRequest") -> None:
    """A provider is about to send ``upstream`` (method, url, headers, JSON body) to its
    backend, once per attempt. Edit headers or body in place. Synchronous. The headers
    hold the backend key: never log them."""


@hookspec
def response(flow: "Flow") -> Any:
    """A complete, non-streamed answer is in ``flow.response``. *May be async.* Change or
    replace it, or raise ``ProxyError`` to send the client an error instead. To ask the
    backend again (say, with a hint added to ``flow.request``), use
    ``flow.response = await flow.context.resend(flow)``."""


@hookspec
def stream_start(flow: "Flow") -> Optional[StreamProcessor]:
    """A streamed answer is about to begin. Return a stream processor for this stream, or
    None. Called once per stream, before the backend is called, so the request is final.
    A processor that raises ``llmproxy.errors.RetryStream`` before anything reached the
    client has the backend asked again; this hook is then called again for the new stream."""


@hookspec
def error(flow: "Flow") -> Any:
    """The flow failed: ``flow.error`` holds the ProxyError the client will see. *May be
    async.* Replace ``flow.error`` to change it; set ``flow.response`` to answer instead
    (only honoured before anything was sent to the client)."""


@hookspec
def flow_done(flow: "Flow") -> Any:
    """The flow has ended, successfully or not (``flow.error``, ``flow.status``), and the
    client has its answer. *May be async.* For capture, history, metrics and usage; a
    streamed answer is available folded as ``flow.response``. Must not change the flow."""
