"""The offline backend: answers without a network, so llmproxy works from one command.

``type: offline`` echoes the newest user message back (``mode: echo``) or plays ``replies``
in turn (``mode: scripted``), streaming word by word when the client asks for a stream. A
scripted reply may be text or a tool call, so agents' tool loops can be tried offline too.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmproxy import hookimpl
from llmproxy.canonical import EventKind, Response, StreamEvent, TextPart, ToolCallPart, Usage
from llmproxy.config import BackendConfig
from llmproxy.flow import Attempt, Flow
from llmproxy.providers import Provider, UpstreamReply, UpstreamStream


class ScriptedToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ScriptedReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    tool_call: ScriptedToolCall | None = None


class OfflineSettings(BackendConfig):
    mode: Literal["echo", "scripted"] = Field("echo", description="echo: repeat the user's message; scripted: play replies in turn.")
    replies: list[ScriptedReply | str] = Field(default_factory=list, description="Replies for scripted mode (text, or {tool_call: {name, arguments}}).")
    stream_delay: float = Field(0.0, ge=0, description="Seconds between streamed words.")


def _tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


class OfflineProvider(Provider):
    protocol = "canonical"
    Settings = OfflineSettings
    default_models = ("offline-echo",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._turn = itertools.count()

    def _answer(self, flow: Flow, model: str) -> Response:
        settings: Any = self.settings
        request = flow.request
        prompt = request.last_user_message.text if request.last_user_message else ""
        if settings.mode == "scripted" and settings.replies:
            reply = settings.replies[next(self._turn) % len(settings.replies)]
            reply = ScriptedReply(text=reply) if isinstance(reply, str) else reply
        else:
            reply = ScriptedReply(text=f"You said: {prompt}" if prompt else "Hello from llmproxy's offline backend.")
        parts: list[Any] = []
        if reply.text:
            parts.append(TextPart(reply.text))
        stop = "end_turn"
        if reply.tool_call is not None:
            from llmproxy.codecs.base import dumps

            name, arguments = reply.tool_call.name, dumps(reply.tool_call.arguments).decode()
            if any(tool.name == name for tool in request.tools):
                parts.append(ToolCallPart(id=f"call_{uuid.uuid4().hex[:12]}", name=name, arguments=arguments))
                stop = "tool_use"
            else:  # a call to a tool the request does not offer would break a strict client
                parts.append(TextPart(f"(scripted call to {name}, which this request does not offer: {arguments})"))
        text_in = "".join(m.text for m in request.messages) + "".join(p.text for p in request.system)
        usage = Usage(input_tokens=_tokens(text_in), output_tokens=sum(_tokens(getattr(p, "text", "")) for p in parts))
        return Response(model=model, parts=parts, stop_reason=stop, usage=usage, id=f"offline-{uuid.uuid4().hex[:12]}")

    async def complete(self, flow: Flow, target: Any) -> UpstreamReply:
        flow.attempts.append(Attempt(backend=self.name, model=target.model, status=200))
        return UpstreamReply("canonical", response=self._answer(flow, target.model))

    async def stream(self, flow: Flow, target: Any, passthrough: bool) -> UpstreamStream:
        flow.attempts.append(Attempt(backend=self.name, model=target.model, status=200))
        response = self._answer(flow, target.model)
        delay = self.settings.stream_delay  # type: ignore[attr-defined]

        async def batches() -> AsyncIterator[list[StreamEvent]]:
            yield [StreamEvent(EventKind.START, id=response.id, model=response.model)]
            for index, part in enumerate(response.parts):
                if isinstance(part, TextPart):
                    words = part.text.split(" ")
                    for i, word in enumerate(words):
                        if delay:
                            await asyncio.sleep(delay)
                        yield [StreamEvent(EventKind.TEXT, index=index, text=word if i == 0 else " " + word)]
                elif isinstance(part, ToolCallPart):
                    yield [
                        StreamEvent(EventKind.TOOL_CALL_START, index=index, id=part.id, name=part.name),
                        StreamEvent(EventKind.TOOL_CALL_DELTA, index=index, text=part.arguments),
                    ]
                yield [StreamEvent(EventKind.BLOCK_STOP, index=index)]
            yield [StreamEvent(EventKind.USAGE, usage=response.usage), StreamEvent(EventKind.STOP, stop_reason=response.stop_reason, usage=response.usage)]

        return UpstreamStream("canonical", batches=batches())


@hookimpl
def register_providers(register: Callable[[str, type], None]) -> None:
    register("offline", OfflineProvider)
