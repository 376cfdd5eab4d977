"""llmproxy-shout: an example third-party llmproxy plugin, and a short guide to writing one.

What it does, once configured::

    plugins:
      shout:
        header: X-Shout            # added to every request llmproxy sends to a backend
        header_value: hello
        word: quiet                # rewritten in every answer, streamed or not ...
        replacement: QUIET         # ... to this (default: the word in capitals)

Installed but not configured, it changes nothing: a plugin should never alter traffic just
because it is installed (every setting's default is "off").

Writing a plugin like this one
------------------------------
1. **Package.** One module plus one entry point in your ``pyproject.toml``::

       [project.entry-points.llmproxy]
       shout = "llmproxy_shout"

   The entry-point name is the plugin's name: ``llmproxy plugins`` lists it under that name,
   its settings live under ``plugins.<name>``, and ``plugins.<name>.enabled: false`` turns it
   off. A module that is not installed can be loaded with ``plugins.load: [module]``.
2. **Hooks.** Module-level functions named after the hooks in ``llmproxy.hookspecs``, marked
   with ``@hookimpl``, taking only the arguments they need. A misspelled hook name stops
   start-up with a message naming your plugin. Use only the public API: ``llmproxy.hookimpl``,
   ``llmproxy.ProxyError`` and the types in ``llmproxy.canonical``.
3. **Settings.** ``plugin_settings()`` returns a pydantic model whose every field has a
   default and a description. llmproxy validates ``plugins.<name>`` with it (so
   ``llmproxy config validate`` reports your errors with their key path) and hands the
   instance to ``configure(settings, context)`` at start-up and after a reload.
   ``configure`` may return when each flow hook has work under these settings
   (``"always"``, ``"tools"``, ``"never"``): the core leaves idle ones out of every flow's
   chains, so this plugin, installed but not configured, costs a request nothing.
4. **The flow is the control surface.** ``request`` may change ``flow.request``, answer by
   setting ``flow.response``, or refuse by raising ``ProxyError(status, message)``, which the
   client receives in its own protocol. ``upstream_request`` edits the HTTP request a
   provider is about to send (its headers hold the backend key: never log them).
   ``response`` sees a complete, non-streamed answer. Any other exception from a flow hook
   fails the flow closed with a 500 naming your plugin.
5. **Streams cost nothing unless you ask.** ``stream_start(flow)`` runs once per stream;
   return None to stay out of it (the stream is then forwarded without being decoded), or a
   processor: a callable that gets each canonical ``StreamEvent`` and returns it (changed or
   not), None to drop or hold it, or a list to emit several. At the end it is called once
   with ``None`` and returns what it still holds. Text arrives in arbitrary pieces, so
   anything that matches across pieces must hold a tail, as :class:`WordRewriter` does.
6. **Test it** with the fixtures in ``llmproxy.testing`` (a pytest plugin installed with
   llmproxy): ``make_flow`` for hook-level tests, ``proxy_server`` for a real proxy.

Settings are kept in module state, so one process runs one configuration of this plugin
(the last ``configure`` wins); a plugin that must serve several proxies in one process would
keep per-proxy state in ``context.state`` and register an object instead of a module.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmproxy import Flow, hookimpl
from llmproxy.canonical import EventKind, StreamEvent, TextPart

if TYPE_CHECKING:
    from llmproxy.flow import UpstreamRequest

__version__ = "0.1.0"

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
# Headers that carry the backend key or frame the request: overriding them would break or leak.
_PROTECTED_HEADERS = frozenset(
    ("authorization", "x-api-key", "x-goog-api-key", "content-type", "content-length", "host", "transfer-encoding", "connection")
)


class ShoutSettings(BaseModel):
    """``plugins.shout``: every field is off by default."""

    model_config = ConfigDict(extra="forbid")

    header: Optional[str] = Field(
        None,
        description="Name of an HTTP header added to every request sent to a backend; unset adds none. "
        "Headers that carry keys or frame the request (authorization, content-type, ...) are refused.",
    )
    header_value: str = Field("llmproxy-shout", description="Value of that header.")
    word: str = Field(
        "",
        description="Text rewritten in every answer, streamed or not (exact, case-sensitive match, also "
        "when a stream splits it across events); empty rewrites nothing.",
    )
    replacement: Optional[str] = Field(None, description="What `word` becomes; unset means the word in capitals.")

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        if not _TOKEN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        if value.lower() in _PROTECTED_HEADERS:
            raise ValueError(f"{value!r} carries credentials or framing; choose another header")
        return value

    @field_validator("header_value")
    @classmethod
    def _header_value(cls, value: str) -> str:
        if "\r" in value or "\n" in value:
            raise ValueError("must be a single line")
        return value

    @property
    def rewrite_to(self) -> str:
        return self.word.upper() if self.replacement is None else self.replacement


_settings = ShoutSettings()


# -- registration ----------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return ShoutSettings


@hookimpl
def configure(settings: ShoutSettings) -> dict[str, str]:
    global _settings
    _settings = settings
    # Say which hooks these settings leave with nothing to do: the core then leaves them out
    # of every flow's chains, and installed but not configured, this plugin costs nothing.
    watching = "always" if settings.word else "never"
    return {"upstream_request": "always" if settings.header else "never", "response": watching, "stream_start": watching}


# -- the flow ----------------------------------------------------------------------------------


@hookimpl
def upstream_request(upstream: "UpstreamRequest") -> None:
    if _settings.header:
        upstream.headers[_settings.header] = _settings.header_value


@hookimpl
def response(flow: Flow) -> None:
    word = _settings.word
    if not word or flow.response is None:
        return
    replacement = _settings.rewrite_to
    for part in flow.response.parts:
        if isinstance(part, TextPart) and word in part.text:
            part.text = part.text.replace(word, replacement)


@hookimpl
def stream_start(flow: Flow) -> Optional["WordRewriter"]:
    if not _settings.word:
        return None  # not watching: this stream stays on the fast path
    return WordRewriter(_settings.word, _settings.rewrite_to)


class WordRewriter:
    """Stream processor: rewrites ``word`` in text events, one instance per stream.

    A text event may end with the beginning of the word ("... qui" then "et ..."), so the
    longest end of the text that could still become the word is held back and sent with the
    next text event of the same block — or before the block's stop, or at the final flush.
    """

    __slots__ = ("word", "replacement", "held")

    def __init__(self, word: str, replacement: str) -> None:
        self.word = word
        self.replacement = replacement
        self.held: dict[int, str] = {}  # block index -> text not sent yet

    def __call__(self, event: Optional[StreamEvent]) -> StreamEvent | list[StreamEvent] | None:
        if event is None:  # end of stream: release everything still held
            held, self.held = self.held, {}
            return [StreamEvent(EventKind.TEXT, index=index, text=text) for index, text in held.items()] or None
        kind = event.kind
        if kind == EventKind.TEXT:
            text = self.held.pop(event.index, "") + event.text
            ready, tail = rewrite(text, self.word, self.replacement)
            if tail:
                self.held[event.index] = tail
            if not ready:
                return None
            event.text = ready
            return event
        if kind == EventKind.BLOCK_STOP and event.index in self.held:
            return [StreamEvent(EventKind.TEXT, index=event.index, text=self.held.pop(event.index)), event]
        return event


def rewrite(text: str, word: str, replacement: str) -> tuple[str, str]:
    """Replace every ``word`` in ``text``; return (text to send now, tail to hold back).

    The tail is the longest end of ``text`` after the last match that is the start of
    ``word``: only there can a match continue into the next piece of the stream.
    """
    pieces = []
    start = 0
    while (found := text.find(word, start)) >= 0:
        pieces.append(text[start:found])
        pieces.append(replacement)
        start = found + len(word)
    rest = text[start:]
    keep = 0
    for size in range(min(len(rest), len(word) - 1), 0, -1):
        if word.startswith(rest[-size:]):
            keep = size
            break
    pieces.append(rest[: len(rest) - keep])
    return "".join(pieces), rest[len(rest) - keep :]
