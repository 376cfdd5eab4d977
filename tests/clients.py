"""One small adapter per front-end protocol, each driving the OFFICIAL SDK of that protocol, so
that a test can say "ask, answer the tool call, ask again" once for all four clients.

| adapter | SDK | non-stream | stream |
| --- | --- | --- | --- |
| :class:`Chat` | openai | ``chat.completions.create`` / ``.parse`` | ``chat.completions.stream`` |
| :class:`Responses` | openai | ``responses.create`` / ``.parse`` | ``responses.stream`` |
| :class:`Claude` | anthropic | ``messages.create`` / ``.parse`` | ``messages.stream`` |
| :class:`Gemini` | google-genai | ``models.generate_content`` | ``models.generate_content_stream`` |

Each keeps the conversation in its SDK's own shapes (``history``): :meth:`Client.user` and
:meth:`Client.tool_result` add turns, and :attr:`Reply.turn` is the assistant turn exactly as
that client sends it back next time (thinking blocks and signatures, reasoning items with
``encrypted_content``, Gemini parts with ``thoughtSignature``), as the real agents do. A
:class:`Reply` is the answer folded into protocol-neutral terms (text, thinking, tool calls,
canonical stop reason, token totals) so assertions read the same for every client; stream
replies also count how often a tool call was *begun* on the wire (it must be once).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel

CLIENT_KEY = "client-key-matrix"
BOUND = 10.0  # seconds: no call waits longer than this for anything
SHELL_SCHEMA = {"type": "object", "properties": {"command": {"type": "string", "description": "the command line"}}, "required": ["command"]}
SHELL_DESCRIPTION = "run a shell command"


class Verdict(BaseModel):
    """The JSON-schema answer every client asks for (the fakes fill strings with their text
    and integers with 1)."""

    answer: str
    confidence: int


@dataclass
class Tokens:
    """Token totals, the same way for every protocol: ``input`` counts cache reads and
    writes, ``output`` counts reasoning."""

    input: int
    output: int
    cached: int = 0


@dataclass
class Call:
    id: str
    name: str
    arguments: Any


@dataclass
class Reply:
    text: str = ""
    thinking: str = ""
    calls: list[Call] = field(default_factory=list)
    stop: str | None = None
    """Canonical: end_turn, tool_use or max_tokens."""
    usage: Tokens | None = None
    parsed: Any = None
    """The SDK's own parse of a JSON-schema answer."""
    signatures: list[Any] = field(default_factory=list)
    """The opaque reasoning signatures the client got: Anthropic ``signature``s, Responses
    ``encrypted_content``, Gemini ``thoughtSignature``s (empty ones left out)."""
    call_starts: int = 0
    """Stream only: how many times a tool call was begun on the wire."""
    turn: list[Any] = field(default_factory=list)
    """The assistant turn as this client sends it back."""


class StreamFailed(Exception):
    """The Responses SDK hands an in-stream failure over as events (``error``,
    ``response.failed``), not as an exception; the adapter raises this on seeing them, as
    Codex does."""

    def __init__(self, message: str, events: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.events = events


@dataclass
class Failure:
    """An error as the client saw it."""

    status: int | None
    message: str
    retry_after: str | None = None
    kind: str | None = None


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


class Client:
    name = ""
    status_errors: dict[int, type[Exception]] = {}
    """The SDK's own exception type for an HTTP error status."""
    stream_error: type[Exception] = Exception
    """What the SDK raises for the protocol's in-stream error event."""

    def system(self, text: str) -> list[Any]:
        """A system prompt as leading history (empty for clients that pass it separately)."""
        return []

    def user(self, text: str, image: bytes | None = None) -> list[Any]:
        raise NotImplementedError

    def tool_result(self, call: Call, output: str) -> list[Any]:
        raise NotImplementedError

    async def ask(self, model: str, stream: bool, history: list[Any], *, system: str | None = None, tools: bool = False,
                  reasoning: bool = False, schema: bool = False) -> Reply:
        """One model turn: ``tools`` offers the ``shell`` tool, ``reasoning`` asks for
        reasoning the way this protocol does, ``schema`` asks for a :class:`Verdict`
        through the SDK's own structured-output helper."""
        raise NotImplementedError

    def failure(self, error: Exception) -> Failure:
        """What ``error`` (raised by :meth:`ask`) tells the client."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


# -- OpenAI Chat Completions --------------------------------------------------------------------


class Chat(Client):
    name = "chat"
    status_errors = {400: openai.BadRequestError, 429: openai.RateLimitError}
    stream_error = openai.APIError
    STOPS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}
    TOOL = {"type": "function", "function": {"name": "shell", "description": SHELL_DESCRIPTION, "parameters": SHELL_SCHEMA}}

    def __init__(self, base_url: str) -> None:
        self.sdk = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)

    def system(self, text: str) -> list[Any]:
        return [{"role": "system", "content": text}]

    def user(self, text: str, image: bytes | None = None) -> list[Any]:
        if image is None:
            return [{"role": "user", "content": text}]
        return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url(image)}}]}]

    def tool_result(self, call: Call, output: str) -> list[Any]:
        return [{"role": "tool", "tool_call_id": call.id, "content": output}]

    async def ask(self, model: str, stream: bool, history: list[Any], *, system: str | None = None, tools: bool = False,
                  reasoning: bool = False, schema: bool = False) -> Reply:
        kwargs: dict[str, Any] = {"model": model, "messages": [*(self.system(system) if system else ()), *history]}
        if tools:
            kwargs["tools"] = [self.TOOL]
        if reasoning:
            kwargs["reasoning_effort"] = "low"
        if schema:
            kwargs["response_format"] = Verdict
        if not stream:
            completion = await (self.sdk.chat.completions.parse if schema else self.sdk.chat.completions.create)(**kwargs)
            return self._reply(completion, getattr(completion.choices[0].message, "reasoning_content", None) or "")
        starts = 0
        thinking = ""
        async with self.sdk.chat.completions.stream(stream_options={"include_usage": True}, **kwargs) as events:
            async for event in events:
                if event.type != "chunk":
                    continue
                for choice in event.chunk.choices:
                    starts += sum(1 for call in choice.delta.tool_calls or () if call.id)
                    thinking += getattr(choice.delta, "reasoning_content", None) or ""
            try:
                completion = await events.get_final_completion()
            except openai.LengthFinishReasonError as stopped:  # the helper's way to say "length"
                completion = stopped.completion
        reply = self._reply(completion, thinking)
        reply.call_starts = starts
        return reply

    def _reply(self, completion: Any, thinking: str) -> Reply:
        choice = completion.choices[0]
        message = choice.message
        calls = [Call(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]
        usage = completion.usage
        details = usage.prompt_tokens_details if usage is not None else None
        turn: dict[str, Any] = {"role": "assistant", "content": message.content}
        if message.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}} for c in message.tool_calls]
        if thinking:
            turn["reasoning_content"] = thinking  # as DeepSeek-style clients send it back
        return Reply(
            text=message.content or "",
            thinking=thinking,
            calls=calls,
            stop=self.STOPS.get(choice.finish_reason, choice.finish_reason),
            usage=Tokens(usage.prompt_tokens, usage.completion_tokens, (details.cached_tokens or 0) if details else 0) if usage else None,
            parsed=getattr(message, "parsed", None),
            turn=[turn],
        )

    def failure(self, error: Exception) -> Failure:
        assert isinstance(error, openai.APIError), error
        body = error.body if isinstance(error.body, dict) else {}
        if isinstance(error, openai.APIStatusError):
            return Failure(error.status_code, body.get("message", ""), error.response.headers.get("retry-after"), body.get("type"))
        return Failure(None, error.message, None, body.get("type"))

    async def close(self) -> None:
        await self.sdk.close()


# -- OpenAI Responses ---------------------------------------------------------------------------


class Responses(Client):
    name = "responses"
    status_errors = {400: openai.BadRequestError, 429: openai.RateLimitError}
    stream_error = StreamFailed
    TOOL = {"type": "function", "name": "shell", "description": SHELL_DESCRIPTION, "parameters": SHELL_SCHEMA, "strict": False}

    def __init__(self, base_url: str) -> None:
        self.sdk = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)

    def system(self, text: str) -> list[Any]:
        return [{"type": "message", "role": "developer", "content": text}]  # as Codex sends it

    def user(self, text: str, image: bytes | None = None) -> list[Any]:
        if image is None:
            return [{"type": "message", "role": "user", "content": text}]
        content = [{"type": "input_text", "text": text}, {"type": "input_image", "image_url": data_url(image), "detail": "auto"}]
        return [{"type": "message", "role": "user", "content": content}]

    def tool_result(self, call: Call, output: str) -> list[Any]:
        return [{"type": "function_call_output", "call_id": call.id, "output": output}]

    async def ask(self, model: str, stream: bool, history: list[Any], *, system: str | None = None, tools: bool = False,
                  reasoning: bool = False, schema: bool = False) -> Reply:
        kwargs: dict[str, Any] = {"model": model, "input": [*(self.system(system) if system else ()), *history], "store": False}
        if tools:
            kwargs["tools"] = [self.TOOL]
        if reasoning:
            kwargs["reasoning"] = {"effort": "low", "summary": "auto"}
            kwargs["include"] = ["reasoning.encrypted_content"]
        if schema:
            kwargs["text_format"] = Verdict
        if not stream:
            if schema:
                return self._reply(await self.sdk.responses.parse(**kwargs))
            return self._reply(await self.sdk.responses.create(**kwargs))
        starts = 0
        incomplete = None
        async with self.sdk.responses.stream(**kwargs) as events:
            async for event in events:
                if event.type == "response.output_item.added" and event.item.type == "function_call":
                    starts += 1
                elif event.type == "response.incomplete":
                    incomplete = event.response  # get_final_response() wants response.completed
                elif event.type == "error":
                    raise StreamFailed(event.message, [event.type])
                elif event.type == "response.failed":
                    error = event.response.error
                    raise StreamFailed(error.message if error else "response.failed", [event.type])
            response = incomplete or await events.get_final_response()
        reply = self._reply(response)
        reply.call_starts = starts
        return reply

    def _reply(self, response: Any) -> Reply:
        calls = [Call(item.call_id, item.name, json.loads(item.arguments)) for item in response.output if item.type == "function_call"]
        thinking = "\n\n".join(s.text for item in response.output if item.type == "reasoning" for s in item.summary)
        if response.status == "incomplete":
            stop = "max_tokens" if response.incomplete_details and response.incomplete_details.reason == "max_output_tokens" else "content_filter"
        else:
            stop = "tool_use" if calls else "end_turn"
        usage = response.usage
        turn = []
        for item in response.output:  # echoed back as Codex does (ids, encrypted_content and all)
            data = item.model_dump(mode="json", exclude_none=True)
            data.pop("parsed_arguments", None)
            for part in data.get("content") or ():
                part.pop("parsed", None)
            turn.append(data)
        return Reply(
            text=response.output_text,
            thinking=thinking,
            calls=calls,
            stop=stop,
            usage=Tokens(usage.input_tokens, usage.output_tokens, usage.input_tokens_details.cached_tokens) if usage else None,
            parsed=getattr(response, "output_parsed", None),
            signatures=[item.encrypted_content for item in response.output if item.type == "reasoning" and item.encrypted_content],
            turn=turn,
        )

    def failure(self, error: Exception) -> Failure:
        if isinstance(error, StreamFailed):
            return Failure(None, error.message)
        assert isinstance(error, openai.APIStatusError), error
        body = error.body if isinstance(error.body, dict) else {}
        return Failure(error.status_code, body.get("message", ""), error.response.headers.get("retry-after"), body.get("type"))

    async def close(self) -> None:
        await self.sdk.close()


# -- Anthropic Messages -------------------------------------------------------------------------


class Claude(Client):
    name = "anthropic"
    status_errors = {400: anthropic.BadRequestError, 429: anthropic.RateLimitError}
    stream_error = anthropic.APIStatusError
    TOOL = {"name": "shell", "description": SHELL_DESCRIPTION, "input_schema": SHELL_SCHEMA}

    def __init__(self, base_url: str) -> None:
        self.sdk = anthropic.AsyncAnthropic(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)

    def user(self, text: str, image: bytes | None = None) -> list[Any]:
        if image is None:
            return [{"role": "user", "content": text}]
        source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()}
        return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "source": source}]}]

    def tool_result(self, call: Call, output: str) -> list[Any]:
        return [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": output}]}]

    def _kwargs(self, model: str, history: list[Any], system: str | None, tools: bool, reasoning: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": model, "max_tokens": 1024, "messages": history}
        if system:
            kwargs["system"] = system
        if tools:
            kwargs["tools"] = [self.TOOL]
        if reasoning:
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": 1024}
            kwargs["max_tokens"] = 4096
        return kwargs

    async def ask(self, model: str, stream: bool, history: list[Any], *, system: str | None = None, tools: bool = False,
                  reasoning: bool = False, schema: bool = False) -> Reply:
        kwargs = self._kwargs(model, history, system, tools, reasoning)
        if schema:
            kwargs["output_format"] = Verdict
        if not stream:
            return self._reply(await (self.sdk.messages.parse if schema else self.sdk.messages.create)(**kwargs))
        starts = 0
        async with self.sdk.messages.stream(**kwargs) as events:
            async for event in events:
                if event.type == "content_block_start" and event.content_block.type == "tool_use":
                    starts += 1
            message = await events.get_final_message()
        reply = self._reply(message)
        reply.call_starts = starts
        return reply

    async def count(self, model: str, history: list[Any], system: str | None = None, tools: bool = False) -> int:
        kwargs = self._kwargs(model, history, system, tools, False)
        del kwargs["max_tokens"]
        return (await self.sdk.messages.count_tokens(**kwargs)).input_tokens

    def _reply(self, message: Any) -> Reply:
        blocks: list[dict[str, Any]] = []
        for block in message.content:
            if block.type == "text":
                blocks.append({"type": "text", "text": block.text})
            elif block.type == "thinking":
                blocks.append({"type": "thinking", "thinking": block.thinking, "signature": block.signature})
            elif block.type == "redacted_thinking":
                blocks.append({"type": "redacted_thinking", "data": block.data})
            elif block.type == "tool_use":
                blocks.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
        usage = message.usage
        cached = usage.cache_read_input_tokens or 0
        return Reply(
            text="".join(b.text for b in message.content if b.type == "text"),
            thinking="".join(b.thinking for b in message.content if b.type == "thinking"),
            calls=[Call(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"],
            stop=message.stop_reason,
            usage=Tokens(usage.input_tokens + cached + (usage.cache_creation_input_tokens or 0), usage.output_tokens, cached),
            parsed=getattr(message, "parsed_output", None),
            signatures=[b.signature for b in message.content if b.type == "thinking" and b.signature],
            turn=[{"role": "assistant", "content": blocks}],
        )

    def failure(self, error: Exception) -> Failure:
        assert isinstance(error, anthropic.APIStatusError), error
        body = error.body if isinstance(error.body, dict) else {}
        inner = body.get("error") or {}
        status = error.status_code if error.status_code != 200 else None  # 200: failed mid-stream
        return Failure(status, inner.get("message", ""), error.response.headers.get("retry-after") if status else None, inner.get("type"))

    async def close(self) -> None:
        await self.sdk.close()


# -- Gemini -------------------------------------------------------------------------------------


class Gemini(Client):
    name = "gemini"
    status_errors = {400: genai_errors.ClientError, 429: genai_errors.ClientError}
    stream_error = genai_errors.APIError
    STOPS = {"STOP": "end_turn", "MAX_TOKENS": "max_tokens"}
    TOOL = types.Tool(function_declarations=[types.FunctionDeclaration(name="shell", description=SHELL_DESCRIPTION, parameters_json_schema=SHELL_SCHEMA)])

    def __init__(self, base_url: str) -> None:
        self.client = genai.Client(api_key=CLIENT_KEY, http_options=types.HttpOptions(base_url=base_url, api_version="v1beta", timeout=int(BOUND * 1000)))
        self.sdk = self.client.aio

    def user(self, text: str, image: bytes | None = None) -> list[Any]:
        parts = [types.Part(text=text)]
        if image is not None:
            parts.append(types.Part.from_bytes(data=image, mime_type="image/png"))
        return [types.Content(role="user", parts=parts)]

    def tool_result(self, call: Call, output: str) -> list[Any]:
        response = types.FunctionResponse(id=call.id, name=call.name, response={"output": output})
        return [types.Content(role="user", parts=[types.Part(function_response=response)])]

    def _config(self, system: str | None, tools: bool, reasoning: bool, schema: bool) -> types.GenerateContentConfig:
        config = types.GenerateContentConfig(system_instruction=system)
        if tools:
            config.tools = [self.TOOL]
            config.automatic_function_calling = types.AutomaticFunctionCallingConfig(disable=True)
        if reasoning:
            config.thinking_config = types.ThinkingConfig(include_thoughts=True, thinking_budget=1024)
        if schema:
            config.response_mime_type = "application/json"
            config.response_json_schema = Verdict.model_json_schema()
        return config

    async def ask(self, model: str, stream: bool, history: list[Any], *, system: str | None = None, tools: bool = False,
                  reasoning: bool = False, schema: bool = False) -> Reply:
        config = self._config(system, tools, reasoning, schema)
        if not stream:
            response = await self.sdk.models.generate_content(model=model, contents=history, config=config)
            candidate = response.candidates[0]
            parsed = Verdict.model_validate(response.parsed) if schema else None  # a dict, parsed by the SDK
            return self._reply(list(candidate.content.parts or ()), candidate.finish_reason, response.usage_metadata, parsed)
        chunks = [chunk async for chunk in await self.sdk.models.generate_content_stream(model=model, contents=history, config=config)]
        parts = [p for c in chunks for p in (c.candidates[0].content.parts or ())]
        usage = next((c.usage_metadata for c in reversed(chunks) if c.usage_metadata), None)
        text = "".join(p.text for p in parts if p.text and not p.thought)
        reply = self._reply(parts, chunks[-1].candidates[0].finish_reason, usage, Verdict.model_validate_json(text) if schema else None)
        reply.call_starts = sum(1 for p in parts if p.function_call)
        return reply

    async def count(self, model: str, history: list[Any]) -> int:
        return (await self.sdk.models.count_tokens(model=model, contents=history)).total_tokens

    def _reply(self, parts: list[Any], finish: Any, usage: Any, parsed: Any) -> Reply:
        calls = [Call(p.function_call.id, p.function_call.name, dict(p.function_call.args or {})) for p in parts if p.function_call]
        finish = finish.value if hasattr(finish, "value") else finish
        stop = self.STOPS.get(finish, finish)
        if stop == "end_turn" and calls:
            stop = "tool_use"
        tokens = None
        if usage is not None:
            tokens = Tokens(usage.prompt_token_count or 0, (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0), usage.cached_content_token_count or 0)
        return Reply(
            text="".join(p.text for p in parts if p.text and not p.thought),
            thinking="".join(p.text for p in parts if p.text and p.thought),
            calls=calls,
            stop=stop,
            usage=tokens,
            parsed=parsed,
            signatures=[p.thought_signature for p in parts if p.thought_signature],
            turn=[types.Content(role="model", parts=parts)],
        )

    def failure(self, error: Exception) -> Failure:
        assert isinstance(error, genai_errors.APIError), error
        retry = None
        response = getattr(error, "response", None)
        headers = getattr(response, "headers", None)
        if headers is not None:
            retry = headers.get("retry-after")
        return Failure(error.code, error.message or "", retry, error.status)

    async def close(self) -> None:
        await self.sdk.aclose()
        self.client.close()


CLIENTS: dict[str, type[Client]] = {"chat": Chat, "responses": Responses, "anthropic": Claude, "gemini": Gemini}
