"""The replay backend (``type: replay``): serves the answers of a wire capture again, offline.

Record a session through llmproxy with ``plugins.wire_capture.path`` set, then point a
backend of type ``replay`` at the file::

    backends:
      recorded: {type: replay, path: captures/session.jsonl}
    default_backend: recorded

and run the same client again: each request gets the answer recorded for it, with no
network and no key. What is served is the backend's answer as it arrived (the successful
attempt's body or stream events, in the backend's protocol), so the plugins and the protocol
translation of this run apply to it as they did when it was recorded, and a client of
another protocol can replay it too. A flow served by a canonical backend (``offline``), or
recorded without its upstream answer, is served from what its client received instead.

Which answer: ``match`` decides.

- ``fingerprint``: the recorded flow whose request had the same fingerprint
  (``llmproxy.canonical.fingerprint``: the conversation's user and assistant text, tool
  calls and tool results, in order; not the system prompt, sampling parameters, tools or
  ids). A conversation that repeats a request gets the recorded answers in turn, then the
  last one again. Robust to requests arriving in another order (parallel sub-agents).
- ``order``: the next unused recorded answer for the requested model, in the order they
  were recorded; for clients whose requests change from run to run in ways the
  fingerprint sees (a date or a random id in a user message).
- ``fingerprint_then_order`` (default): the fingerprint when it matches, else the order.

A request with no answer gets a 404 naming the model, the fingerprint and what the file
holds. Only chat flows that succeeded are served (token counts are counted locally). Captures are masked, so a recorded secret is
replayed as its ``[REDACTED:…]`` label. ``timing: recorded`` replays a stream's events with
their recorded spacing (divided by ``speed``); the default sends them at once.
"""

from __future__ import annotations

import asyncio
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import Field

from llmproxy import ProxyError, hookimpl
from llmproxy.canonical import ResponseBuilder, fingerprint
from llmproxy.codecs import CODECS
from llmproxy.codecs.base import dumps, sse_frame
from llmproxy.config import BackendConfig, ConfigError
from llmproxy.flow import Attempt, Flow
from llmproxy.providers import Provider, UpstreamReply, UpstreamStream

Match = Literal["fingerprint", "order", "fingerprint_then_order"]


class ReplaySettings(BackendConfig):
    path: str = Field(description="Capture file written by the wire_capture plugin (JSONL); a glob pattern serves several files in name order.")
    match: Match = Field("fingerprint_then_order", description="How a request finds its recorded answer: fingerprint, order, or fingerprint_then_order.")
    timing: Literal["none", "recorded"] = Field("none", description="none: stream events at once; recorded: with their recorded spacing.")
    speed: float = Field(1.0, gt=0, description="With timing: recorded, replay this many times faster than recorded.")


@dataclass
class Answer:
    """One recorded answer: a complete ``body`` or stream ``frames`` ((seconds, bytes) each,
    from the attempt's start), in ``protocol``."""

    flow_id: str
    models: tuple[str, ...]
    fingerprint: str | None
    protocol: str
    body: bytes | None = None
    frames: list[tuple[float, bytes]] | None = None
    used: bool = False


def answer_of(record: dict[str, Any]) -> Answer | None:
    """The answer a successful capture record holds, or None."""
    if record.get("status") != 200 or record.get("error") or record.get("kind", "chat") != "chat":
        return None
    attempts = record.get("attempts") or []
    source: dict[str, Any] | None = None
    protocol = None
    start = 0.0
    for attempt in reversed(attempts):
        response = attempt.get("response") or {}
        if (attempt.get("status") or 0) < 400 and attempt.get("protocol") in CODECS and ("events" in response or "body" in response):
            source, protocol, start = response, attempt["protocol"], attempt.get("start") or 0.0
            break
    if source is None:
        client = record.get("response") or {}
        if "same_as_attempt" in client:
            return None  # the attempt it points to had nothing usable either
        if ("events" in client or "body" in client) and record.get("frontend") in CODECS:
            source, protocol = client, record["frontend"]
    if source is None or protocol is None:
        return None
    models = tuple(dict.fromkeys(m for m in (record.get("model"), record.get("requested_model"), *(a.get("model") for a in attempts)) if isinstance(m, str) and m))
    answer = Answer(str(record.get("id")), models, record.get("fingerprint"), protocol)
    if "events" in source:
        frames = []
        for event in source["events"]:
            t = max(0.0, float(event.get("t") or 0.0) - start)
            if "raw" in event:
                frames.append((t, str(event["raw"]).encode()))
                continue
            data = event.get("data")
            payload = data.encode() if isinstance(data, str) else dumps(data)
            frames.append((t, sse_frame(payload, event.get("event"))))
        answer.frames = frames
    else:
        body = source["body"]
        answer.body = body.encode() if isinstance(body, str) else dumps(body)
    return answer


class ReplayProvider(Provider):
    protocol = "canonical"  # each answer carries its own wire protocol
    Settings = ReplaySettings

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.answers: list[Answer] = []
        self.by_fingerprint: dict[str, list[Answer]] = {}
        self.by_model: dict[str, list[Answer]] = {}
        self.skipped = 0

    @property
    def models(self) -> list[str]:
        return list(self.settings.models) or sorted(self.by_model)

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _files(self) -> list[str]:
        path: str = self.settings.path  # type: ignore[attr-defined]
        if any(c in path for c in "*?["):
            return sorted(glob.glob(path))
        return [path]

    def _load(self) -> None:
        files = self._files()
        if not files:
            raise ConfigError([f"backends.{self.name}.path: no capture file matches {self.settings.path!r}"])  # type: ignore[attr-defined]
        for name in files:
            try:
                lines = Path(name).read_bytes().splitlines()
            except OSError as error:
                raise ConfigError([f"backends.{self.name}.path: cannot read {name}: {error.strerror}"]) from None
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    self.skipped += 1  # a line cut short by a crash: the rest still serves
                    continue
                answer = answer_of(record) if isinstance(record, dict) else None
                if answer is None:
                    self.skipped += 1
                    continue
                self.answers.append(answer)
                if answer.fingerprint:
                    self.by_fingerprint.setdefault(answer.fingerprint, []).append(answer)
                for model in answer.models:
                    self.by_model.setdefault(model, []).append(answer)

    # -- matching ------------------------------------------------------------------------
    def find(self, flow: Flow, model: str) -> Answer:
        match: Match = self.settings.match  # type: ignore[attr-defined]
        key = fingerprint(flow.request) if flow.frontend in CODECS else None
        if key is not None and match != "order":
            candidates = self.by_fingerprint.get(key)
            if candidates:
                answer = next((a for a in candidates if not a.used), candidates[-1])
                answer.used = True
                return answer
        if match != "fingerprint":
            for name in dict.fromkeys((flow.model, model)):
                answer = next((a for a in self.by_model.get(name, ()) if not a.used), None)
                if answer is not None:
                    answer.used = True
                    return answer
        raise self._miss(flow, model, key)

    def _miss(self, flow: Flow, model: str, key: str | None) -> ProxyError:
        held = ", ".join(f"{name} ({len(items)} recorded, {sum(not a.used for a in items)} unused)" for name, items in sorted(self.by_model.items()))
        how = {"fingerprint": "with this request's fingerprint", "order": "left for this model"}.get(self.settings.match, "with this fingerprint or left for this model")  # type: ignore[attr-defined]
        return ProxyError(
            404,
            f"replay backend {self.name!r} has no recorded answer {how}: model {flow.model!r}"
            + (f" (as {model!r})" if model != flow.model else "")
            + (f", fingerprint {key[:16]}" if key else "")
            + f". {self.settings.path} holds: {held or 'no usable answers'}",  # type: ignore[attr-defined]
            code="replay_miss",
        )

    # -- serving -------------------------------------------------------------------------
    async def complete(self, flow: Flow, target: Any) -> UpstreamReply:
        answer = self.find(flow, target.model)
        flow.attempts.append(Attempt(backend=self.name, model=target.model, status=200))
        if answer.body is not None:
            return UpstreamReply(answer.protocol, body=answer.body)
        # Recorded as a stream, asked for whole: fold the events.
        decoder = CODECS[answer.protocol].stream_decoder()
        builder = ResponseBuilder(target.model, protocol=answer.protocol)
        for _, frame in answer.frames or ():
            for event in decoder.feed(frame):
                builder.add(event)
        for event in decoder.close():
            builder.add(event)
        return UpstreamReply("canonical", response=builder.build())

    async def stream(self, flow: Flow, target: Any, passthrough: bool) -> UpstreamStream:
        answer = self.find(flow, target.model)
        flow.attempts.append(Attempt(backend=self.name, model=target.model, status=200))
        if answer.frames is None:
            return UpstreamStream(answer.protocol, whole=answer.body)  # the pipeline streams it
        frames = answer.frames
        pace = 1.0 / self.settings.speed if self.settings.timing == "recorded" else 0.0  # type: ignore[attr-defined]

        async def chunks() -> AsyncIterator[bytes]:
            previous = 0.0
            for t, frame in frames:
                if pace and t > previous:
                    await asyncio.sleep((t - previous) * pace)
                previous = t
                yield frame

        return UpstreamStream(answer.protocol, chunks=chunks())


@hookimpl
def register_providers(register: Callable[[str, type], None]) -> None:
    register("replay", ReplayProvider)
