"""Wire capture: every flow, as it crossed the wire, to a JSONL file — one line per flow.

Set ``plugins.wire_capture.path`` and each flow is written with

- the **client request**: its headers and raw body, as received;
- each **upstream attempt**: backend, model, timings, the request sent (URL, headers, body)
  and the answer as it arrived (status, headers, and the body or every stream event with
  the time it arrived);
- the **client response**: status, and the body or events llmproxy wrote back (a
  pass-through answer is byte for byte the backend's, recorded once as
  ``"same_as_attempt": n``);
- **what the plugins changed**: the flow's notes (``flow.note``) and a field-by-field diff of
  the canonical request before and after the request hooks;
- a summary: time, flow id, front-end, model, backend, status, tokens, duration, time to
  first byte, and the request's fingerprint (``llmproxy.canonical.fingerprint``), which the
  ``replay`` backend matches on.

Everything written is masked with the proxy's redactor (``ProxyContext.redactor``): the
credential headers (``Authorization``, ``x-api-key``, ``x-goog-api-key``, ``api-key``,
cookies …) whole, and every backend key, client key, secret added by the ``redaction``
plugin, and common key format wherever it appears — also a secret a stream split over several
events. There is no switch for that.

Cost. Recording keeps references to the bytes that pass anyway (``flow.record_wire()``); the
``flow_done`` hook takes a snapshot and queues it. Parsing, masking, serialising and writing
happen in a writer thread, never on the event loop. The queue is bounded (``queue_size``):
when it is full, finished flows wait for room in the background (their clients already have
their answers) instead of being dropped, and the ``shutdown`` hook writes everything queued
before the proxy exits. Streams stay on the fast path: no stream processor is involved.

Files rotate when the next record would pass ``max_bytes`` or the file is older than
``max_age`` seconds; the old file becomes ``<stem>.<UTC time><suffix>`` beside it, and only
the newest ``max_files`` files are kept.

Reading captures: ``llmproxy capture list FILE…`` (a table) and ``llmproxy capture show FILE
[--flow ID] [--json]``; the ``replay`` backend type serves a capture's answers again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from llmproxy import hookimpl

from .record import FORMAT_VERSION, Snapshot, build_line
from .writer import CaptureFile, Recorder

if TYPE_CHECKING:
    from llmproxy.context import ProxyContext
    from llmproxy.flow import Flow

NAME = "wire_capture"
log = logging.getLogger("llmproxy.wire_capture")

__all__ = ["CaptureSettings", "FORMAT_VERSION", "NAME"]


class CaptureSettings(BaseModel):
    """``plugins.wire_capture``: nothing is captured until ``path`` is set."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        description="JSONL file flows are appended to (its folder is created); unset captures nothing. "
        "Captures hold prompts and answers: keep them where only you can read them.",
    )
    include_bodies: bool = Field(
        True,
        description="Record request and response bodies and stream events; false keeps headers, statuses, "
        "timings, usage and the plugins' notes only (and a capture without bodies cannot be replayed).",
    )
    frontends: list[str] = Field(
        default_factory=list,
        description="Capture only flows of these front-end protocols (openai_chat, openai_responses, "
        "anthropic, gemini, gemini_array, openai_embeddings, openai_completions, openai_images); empty: all.",
    )
    max_bytes: int = Field(100_000_000, ge=0, description="Rotate when the next record would make the file larger than this; 0: no size limit.")
    max_age: float = Field(86_400.0, ge=0, description="Rotate when the file's first record is older than this many seconds; 0: no age limit.")
    max_files: int = Field(10, ge=1, description="Files kept in all, the current one included; older rotated files are deleted.")
    queue_size: int = Field(
        1000,
        ge=1,
        description="Finished flows waiting for the writer at most; beyond it a flow's bookkeeping waits "
        "for room (after its client has the answer) rather than being dropped.",
    )

    def wants(self, frontend: str) -> bool:
        return bool(self.path) and (not self.frontends or frontend in self.frontends)


def _recorder(flow: "Flow") -> tuple[Recorder | None, CaptureSettings | None]:
    context = flow.context
    if context is None:
        return None, None
    recorder = context.state.get(NAME)
    if recorder is None:
        return None, None
    settings: CaptureSettings = context.settings(NAME)
    return (recorder, settings) if settings.wants(flow.frontend) else (None, None)


# -- hooks -------------------------------------------------------------------------------------


@hookimpl
def plugin_settings() -> type[BaseModel]:
    return CaptureSettings


@hookimpl
def configure(settings: CaptureSettings | None) -> dict[str, str]:
    # without a file to write, no flow has anything to record
    when = "always" if settings is not None and settings.path else "never"
    return dict.fromkeys(("request", "upstream_request", "flow_done"), when)


@hookimpl
async def startup(context: "ProxyContext") -> None:
    settings: CaptureSettings | None = context.settings(NAME)
    if settings is None or not settings.path:
        return
    file = CaptureFile(settings.path, settings.max_bytes, settings.max_age, settings.max_files)
    try:
        await asyncio.to_thread(file.check)
    except OSError as error:
        raise ValueError(f"cannot write the capture file {settings.path}: {error.strerror or error}") from None
    recorder = Recorder(file, build_line, settings.queue_size)
    recorder.start()
    context.state[NAME] = recorder
    log.info("capturing flows to %s", settings.path)


@hookimpl
async def shutdown(context: "ProxyContext") -> None:
    recorder: Recorder | None = context.state.get(NAME)
    if recorder is not None:
        await recorder.close()
        log.info("capture %s: %d flow(s) written", recorder.file.path, recorder.written)


@hookimpl(tryfirst=True)
def request(flow: "Flow") -> None:
    recorder, settings = _recorder(flow)
    if recorder is not None and settings is not None and settings.include_bodies:
        flow.record_wire()  # before any plugin can call a backend


@hookimpl(tryfirst=True)
def upstream_request(flow: "Flow") -> None:
    # Flows without request hooks (embeddings, completions, images) start recording here,
    # before their first attempt is sent.
    if flow.sent is None:
        request(flow)


@hookimpl
def flow_done(flow: "Flow") -> Any:
    recorder, settings = _recorder(flow)
    if recorder is None or settings is None:
        return None
    snapshot = Snapshot.of(flow, settings.include_bodies, flow.context.redactor)
    return recorder.submit(snapshot)  # None, or an awaitable when the queue is full


@hookimpl
def register_cli_commands(cli: Any) -> None:
    from .cli import capture

    cli.add_command(capture)
