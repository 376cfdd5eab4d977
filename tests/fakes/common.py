"""What the fake upstreams share: scripting (:class:`Behaviour`), recording (:class:`Received`),
the server's life cycle and fault injection (:class:`FakeUpstream`), and the decision of what to
answer (:func:`plan`), so that tests can drive all four protocols the same way::

    async with FakeAnthropic() as fake:            # or FakeOpenAI, FakeResponses, FakeGemini
        fake.script(status=529, message="busy")     # every request from now on
        fake.script(model="claude-good")            # ... except this model, which answers
        fake.script(tool_scenario=True)              # the shell-tool scenario (see plan())
        ... point a backend at fake.base_url ...
        assert fake.last.key == "upstream-key"

Each protocol module adds only its wire format: how a request names its tools, tool results
and output format, and how an answer, a stream and an error are written.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, ClassVar, Iterable

from aiohttp import web
from multidict import CIMultiDict

DEFAULT_TEXT = "hello from fake upstream"
DEFAULT_THINKING = "Let me think about this."

SHELL_TOOLS = frozenset({"Bash", "exec_command", "shell", "shell_command", "run_shell_command", "local_shell"})
"""Tool names the tool scenario treats as "run a shell command" (Claude Code, Codex CLI,
Gemini CLI and the SDK examples)."""

QUOTE_PREFIX = "the command printed: "
"""In the tool scenario, the answer after a tool result is this prefix plus the result."""


@dataclass
class Behaviour:
    """How a fake answers. Fields left at their defaults answer like a healthy API."""

    text: str = DEFAULT_TEXT
    """The assistant's text (split at word boundaries into stream chunks)."""
    status: int | None = None
    """Answer with this HTTP error status and the protocol's error body instead."""
    message: str = "scripted upstream error"
    """The error's message (in a status or mid-stream). ``{key}`` is replaced by the key the request carried, to play a
    server that echoes credentials back."""
    error_type: str | None = None
    """The error's type (default: the protocol's type for the status; Gemini: its ``status``)."""
    error_code: str | None = None
    retry_after: str | None = None
    """Sent as the ``Retry-After`` header of the error."""
    malformed: bool = False
    """Answer 200 with a body that is not JSON (a stream: an event that is not JSON)."""
    malformed_at: int = 2
    """Stream: where the malformed event goes (0: before every other)."""
    break_after: int | None = None
    """Stream: drop the connection after this many events."""
    hang_after: int | None = None
    """Go silent: a non-streamed request (or a stream with 0) before anything is sent, a
    stream after this many events. The connection stays open until the peer closes it."""
    event_delay: float = 0.0
    """Seconds to wait before each stream event."""
    delay: float = 0.0
    """Seconds to wait before answering at all (a slow backend)."""
    cut_body: bool = False
    """Non-streamed: send the headers and half the body, then drop the connection."""
    hang_after_headers: bool = False
    """Stream: send the headers, then go silent before the first event."""
    error_after: int | None = None
    """Stream: after this many events send the protocol's in-stream error (Anthropic
    ``event: error``, Responses ``response.failed``, Gemini and OpenAI a ``data:`` frame
    holding an ``error`` object) and end the stream. Uses ``status``-less ``message``."""
    tool_scenario: bool = False
    """The shell-tool scenario (see :func:`plan`): call only the shell-like tool, with
    ``echo hi``, and quote the tool result back once there is one."""
    thinking: str = DEFAULT_THINKING
    """Reasoning text, sent where the request asks for reasoning (Anthropic ``thinking``,
    Responses ``reasoning``, Gemini ``thinkingConfig.includeThoughts``); "" sends none."""
    redacted_thinking: bool = False
    """Anthropic: send the reasoning as a ``redacted_thinking`` block."""
    cached_tokens: int = 0
    """Input tokens reported as read from the prompt cache."""
    cache_write_tokens: int = 0
    """Input tokens reported as written to the prompt cache (Anthropic, Responses)."""
    truncated: bool = False
    """Stop as if ``max_tokens`` ran out (``length`` / ``max_tokens`` / ``incomplete`` /
    ``MAX_TOKENS``)."""
    raw_text: bool = False
    """Answer exactly ``text``: no tool call even when tools are offered, and no JSON shaping
    when JSON output is asked for (a model that writes a tool call as prose, or broken JSON)."""
    tool_arguments: str | None = None
    """The argument JSON of every tool call, sent as it is (it may be broken) instead of
    arguments built from the schema. Where the protocol carries arguments as an object
    (Anthropic non-streamed, Gemini) it must be valid JSON."""
    shell_command: str | None = None
    """Tool scenario: the command the shell call runs instead of ``echo hi``; a schema that
    wants an array (and ``local_shell``) gets ``["bash", "-lc", command]``, as Codex sends."""
    stop_sequence: str | None = None
    """Anthropic: stop as if this one of the request's ``stop_sequences`` had matched
    (``stop_reason: stop_sequence`` and the sequence, in the message and in ``message_delta``)."""
    ignore_results: bool = False
    """Answer as if the conversation held no tool results yet: with tools offered, call them
    again every turn with the same arguments (a model stuck in a tool-call loop)."""


@dataclass
class Received:
    """One request as the fake saw it, and how its answer ended."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes
    json: Any
    sent: bytearray = field(default_factory=bytearray)
    """The body bytes written back (for a stream: every frame, in order)."""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the peer closed the connection before the answer was complete."""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the fake is done with the request, however it ended."""
    model: str | None = None
    """The model asked for (from the body, or Gemini's URL)."""
    status: int = 200
    """The HTTP status answered."""
    cut: bool = False
    """The answer was cut short on purpose (:attr:`Behaviour.cut_body`)."""

    @property
    def key(self) -> str | None:
        """The API key the request carried: ``Authorization: Bearer``, ``x-api-key``,
        ``x-goog-api-key`` or ``?key=``, whichever is present."""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:]
        for header in ("x-api-key", "x-goog-api-key"):
            if header in self.headers:
                return self.headers[header]
        return self.query.get("key")

    @property
    def events(self) -> list[Any]:
        """What was sent back as JSON objects: each SSE ``data:`` (``[DONE]`` left out), or
        the elements of a JSON array, or the one JSON body."""
        text = self.sent.decode(errors="replace")
        datas = re.findall(r"^data: ?(.*)$", text, flags=re.M)
        if datas:
            return [json.loads(d) for d in datas if d.strip() != "[DONE]"]
        value = json.loads(text)
        return value if isinstance(value, list) else [value]

    @property
    def event_names(self) -> list[str]:
        """The ``event:`` lines sent back, in order."""
        return re.findall(r"^event: ?(.*?)\r?$", self.sent.decode(errors="replace"), flags=re.M)


# -- values ------------------------------------------------------------------------------------


def example_value(schema: Any, text: str = DEFAULT_TEXT, key: str = "") -> Any:
    """A value that validates against the JSON ``schema`` (Gemini's upper-case types too):
    the first enum or const, the minimum (or 1) for numbers, ``text`` for strings —
    ``"echo hi"`` for a property named ``command`` or ``cmd`` — every property of an
    object, one item in an array."""
    if not isinstance(schema, dict):
        return text
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf", "allOf", "any_of"):
        if schema.get(combinator):
            return example_value(schema[combinator][0], text, key)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if str(k).lower() != "null"), "null")
    kind = kind.lower() if isinstance(kind, str) else kind
    if kind == "object" or (kind is None and "properties" in schema):
        return {name: example_value(sub, text, name) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        item = example_value(schema.get("items") or {"type": "string"}, text, key)
        return [item] if key not in ("command", "cmd") else ["echo", "hi"]
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "echo hi" if key in ("command", "cmd") else text


def shell_arguments(schema: Any, command: str | None = None) -> dict[str, Any]:
    """Arguments for a shell-like tool that run ``echo hi`` (or ``command``): the ``command``
    (or ``cmd``) property — a string, or ``["echo", "hi"]`` (``["bash", "-lc", command]``)
    when the schema wants an array — plus whatever else the schema requires, and nothing
    optional (so no ``run_in_background``)."""
    schema = schema if isinstance(schema, dict) else {}
    props = schema.get("properties") or {}
    key = next((k for k in ("command", "cmd") if k in props), None)
    if key is None:
        key = next((k for k in schema.get("required") or () if str((props.get(k) or {}).get("type", "string")).lower() in ("string", "array")), "command")
    args: dict[str, Any] = {}
    for name in schema.get("required") or ():
        if name != key and name in props:
            args[name] = example_value(props[name], "print hi", name)
    kind = str((props.get(key) or {}).get("type", "string")).lower()
    if command is None:
        args[key] = ["echo", "hi"] if kind == "array" else "echo hi"
    else:
        args[key] = ["bash", "-lc", command] if kind == "array" else command
    return args


def local_shell_command(behaviour: Behaviour) -> list[str]:
    """The ``command`` of a Responses ``local_shell_call`` in the tool scenario."""
    return ["echo", "hi"] if behaviour.shell_command is None else ["bash", "-lc", behaviour.shell_command]


def arguments_json(behaviour: Behaviour, arguments: Any) -> str:
    """A tool call's argument JSON as sent: ``behaviour.tool_arguments`` when scripted."""
    return behaviour.tool_arguments if behaviour.tool_arguments is not None else json.dumps(arguments)


def arguments_object(behaviour: Behaviour, arguments: Any) -> Any:
    """A tool call's arguments where the protocol sends an object (see ``tool_arguments``)."""
    return json.loads(behaviour.tool_arguments) if behaviour.tool_arguments is not None else arguments


def split_text(text: str) -> list[str]:
    """Word-sized pieces whose concatenation is exactly ``text``."""
    return [p for p in re.split(r"(?<=\S)(?=\s)", text) if p] or [""]


def split_arguments(arguments: str, pieces: int = 3) -> list[str]:
    size = max(1, -(-len(arguments) // pieces))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


def estimate_tokens(*parts: Any) -> int:
    """A stable stand-in for a token count: a quarter of the JSON's length, at least 1."""
    return max(1, len(json.dumps([p for p in parts if p is not None])) // 4)


def signature(*seed: Any) -> str:
    """A stable opaque signature (thinking signatures, encrypted reasoning)."""
    return hashlib.sha256(json.dumps(seed).encode()).hexdigest()


def text_of(content: Any) -> str:
    """The text in a tool result's content, whatever its protocol's shape: a string, a list
    of text parts (``text``/``input_text``/``output_text``), or a JSON value."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if texts:
            return "".join(texts)
    if isinstance(content, dict):
        for k in ("output", "result", "content", "text"):
            if k in content:
                return text_of(content[k])
    return json.dumps(content)


# -- what to answer ----------------------------------------------------------------------------


@dataclass
class Tool:
    """An offered function tool, protocol-neutral."""

    name: str
    schema: Any
    kind: str = "function"
    """``function``, or ``local_shell`` (the Responses built-in)."""


@dataclass
class Plan:
    """What to answer: text, or tool calls (name, arguments, the offered tool)."""

    text: str | None = None
    calls: list[tuple[str, dict[str, Any], Tool]] = field(default_factory=list)


def plan(
    behaviour: Behaviour,
    tools: list[Tool],
    results: list[str],
    choice: str | None = "auto",
    parallel: bool = True,
    schema: Any = None,
) -> Plan:
    """Decide the answer from a protocol-neutral view of the request.

    ``tools`` are the offered tools; ``results`` the tool results in the conversation, in
    order; ``choice`` is ``"none"``, ``"auto"``, ``"required"`` or a tool's name;
    ``schema`` a JSON schema the text must follow (or None).

    Generic mode: with tools offered, no tool result yet and a choice other than ``none``,
    call the named tool, else every tool (only the first unless ``parallel``); arguments
    come from each schema (:func:`example_value`). Otherwise answer ``behaviour.text``.

    Tool scenario (``behaviour.tool_scenario``): once there is a tool result, answer
    ``"the command printed: <result>"``; before that, when a shell-like tool
    (:data:`SHELL_TOOLS`) is offered, make ONE call to it running ``echo hi``
    (:func:`shell_arguments`); otherwise answer text.
    """
    text = behaviour.text
    if behaviour.raw_text:
        return Plan(text=text)
    if behaviour.ignore_results:
        results = []
    if behaviour.tool_scenario:
        if results:
            text = QUOTE_PREFIX + results[-1].strip()
        elif choice != "none":
            shell = next((t for t in tools if t.name in SHELL_TOOLS or t.kind == "local_shell"), None)
            if shell is not None:
                return Plan(calls=[(shell.name, shell_arguments(shell.schema, behaviour.shell_command), shell)])
    elif tools and not results and choice != "none":
        if choice not in (None, "auto", "required", "any"):
            chosen = [t for t in tools if t.name == choice][:1]
        else:
            chosen = tools if parallel else tools[:1]
        if chosen:
            return Plan(calls=[(t.name, example_value(t.schema or {"type": "object"}, behaviour.text), t) for t in chosen])
    if schema is not None:
        text = json.dumps(example_value(schema or {"type": "object"}, text))
    return Plan(text=text)


# -- the server --------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the real API would refuse (the fakes are strict, like the real thing)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FakeUpstream:
    """The server. ``await start()`` (or ``async with``), then point a backend at
    :attr:`base_url`; :meth:`close` stops it. Subclasses add routes and the wire format."""

    default_models: ClassVar[tuple[str, ...]] = ()
    error_types: ClassVar[dict[int, str]] = {}
    malformed_body: ClassVar[bytes] = b'{"id": "broken", "obj'
    sse_headers: ClassVar[dict[str, str]] = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

    def __init__(self, models: Iterable[str] | None = None, **behaviour: Any) -> None:
        self.models = list(models if models is not None else self.default_models)
        self.requests: list[Received] = []
        self.behaviour = replace(Behaviour(), **behaviour)
        self.by_model: dict[str, Behaviour] = {}
        self.queued: list[Behaviour] = []
        """Behaviours for the next requests, one each (see :meth:`script_next`)."""
        self.strict = True
        """Refuse requests the real API refuses (see each fake's ``validate``)."""
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)

    # -- life cycle --------------------------------------------------------------------------
    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> "FakeUpstream":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        app.router.add_route("HEAD", "/", self._head)
        # handler_cancellation: a peer that hangs up cancels the handler, which is how a
        # hanging answer notices the disconnect; a short shutdown never waits on a hang.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """What a backend of this protocol should have as ``base_url``."""
        return self.url

    async def _head(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    # -- scripting ---------------------------------------------------------------------------
    def script(self, model: str | None = None, **fields: Any) -> Behaviour:
        """Set how requests (for ``model`` only, when given) are answered from now on;
        ``fields`` are :class:`Behaviour`'s. Returns the behaviour, which may be edited."""
        behaviour = replace(Behaviour(), **fields)
        if model is None:
            self.behaviour = behaviour
        else:
            self.by_model[model] = behaviour
        return behaviour

    def script_next(self, **fields: Any) -> Behaviour:
        """Answer the next request (any endpoint, whatever its model) with this behaviour; several
        calls queue up in order. Afterwards :meth:`script`'s behaviours apply again."""
        behaviour = replace(Behaviour(), **fields)
        self.queued.append(behaviour)
        return behaviour

    def behaviour_for(self, model: Any) -> Behaviour:
        if self.queued:
            return self.queued.pop(0)
        return self.by_model.get(model, self.behaviour) if isinstance(model, str) else self.behaviour

    def for_model(self, model: str) -> list[Received]:
        return [r for r in self.requests if r.model == model]

    @property
    def last(self) -> Received:
        return self.requests[-1]

    def next_id(self) -> int:
        return next(self._ids)

    # -- serving -----------------------------------------------------------------------------
    async def serve(
        self,
        request: web.Request,
        answer: Callable[[web.Request, Received], Awaitable[web.StreamResponse]],
        model: str | None = None,
    ) -> web.StreamResponse:
        """Record the request, then ``answer`` it; notes a peer that hung up."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        received = Received(request.method, request.path, dict(request.query), CIMultiDict(request.headers), raw, body)
        if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"]
        received.model = model
        self.requests.append(received)
        try:
            response = await answer(request, received)
            if received.cut and isinstance(response, web.Response) and response.body:
                return await _cut_short(request, response)
            return response
        except RequestError as exc:
            return self.error(received, exc.status, str(exc))
        except (asyncio.CancelledError, ConnectionError):
            received.disconnected.set()
            raise
        finally:
            received.finished.set()

    async def faults(self, received: Received, behaviour: Behaviour, stream: bool) -> web.Response | None:
        """The scripted faults that come before any answer: an error status, a hang, a
        malformed non-streamed body. None when the request should be answered."""
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.cut_body and not stream:
            received.cut = True  # answered as usual, then cut short by serve()
        if behaviour.status is not None:
            message = behaviour.message.replace("{key}", received.key or "")
            return self.error(received, behaviour.status, message, behaviour.error_type, behaviour.error_code, behaviour.retry_after)
        if behaviour.hang_after is not None and (not stream or behaviour.hang_after == 0):
            await forever()
        if behaviour.malformed and not stream:
            return self.send_json(received, self.malformed_body)
        return None

    def send_json(self, received: Received, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        received.sent += data
        received.status = status
        return web.Response(body=data, status=status, content_type="application/json", headers=headers)

    def error_body(self, status: int, message: str, error_type: str | None, code: str | None, retry_after: str | None) -> Any:
        raise NotImplementedError

    def error(
        self,
        received: Received,
        status: int,
        message: str,
        error_type: str | None = None,
        code: str | None = None,
        retry_after: str | None = None,
    ) -> web.Response:
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return self.send_json(received, self.error_body(status, message, error_type, code, retry_after), status, headers)

    def stream_error_frame(self, behaviour: Behaviour, sequence: int) -> bytes:
        """The protocol's in-stream error event (see :attr:`Behaviour.error_after`)."""
        raise NotImplementedError

    def malformed_frame(self) -> bytes:
        return b'data: {"type": "broken", "de\n\n'

    async def send_stream(
        self,
        request: web.Request,
        received: Received,
        behaviour: Behaviour,
        frames: list[bytes],
        headers: dict[str, str] | None = None,
        malformed: bytes | None = None,
        error_frame: bytes | None = None,
        tail: bytes = b"",
    ) -> web.StreamResponse:
        """Write ``frames`` one by one, applying the stream faults of ``behaviour``;
        ``malformed`` and ``error_frame`` replace the protocol's defaults, ``tail`` is
        written after an in-stream error (a JSON array's closing bracket)."""
        frames = list(frames)
        if behaviour.malformed:
            frames.insert(min(behaviour.malformed_at, len(frames)), malformed if malformed is not None else self.malformed_frame())
        response = web.StreamResponse(headers=headers or self.sse_headers)
        await response.prepare(request)
        if behaviour.hang_after_headers:
            await forever()
        for sent, frame in enumerate(frames):
            if sent == behaviour.break_after:
                # Drop the connection mid-answer: no terminating event.
                assert request.transport is not None
                request.transport.abort()
                return response
            if sent == behaviour.hang_after:
                await forever()
            if behaviour.event_delay:
                await asyncio.sleep(behaviour.event_delay)
            if sent == behaviour.error_after:
                if error_frame is None:
                    echoing = replace(behaviour, message=behaviour.message.replace("{key}", received.key or ""))
                    error_frame = self.stream_error_frame(echoing, sent)
                frame = error_frame + tail
                await response.write(frame)
                received.sent += frame
                break
            await response.write(frame)
            received.sent += frame
        await response.write_eof()
        return response


def sse(data: Any, event: str | None = None, end: bytes = b"\n\n") -> bytes:
    """One SSE frame; ``event`` adds its ``event:`` line."""
    payload = json.dumps(data).encode() if not isinstance(data, bytes) else data
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + end


async def _cut_short(request: web.Request, answer: web.Response) -> web.StreamResponse:
    """Send ``answer``'s headers and the first half of its body, then drop the connection."""
    body = bytes(answer.body)  # type: ignore[arg-type]
    response = web.StreamResponse(status=answer.status, headers={"Content-Type": answer.content_type, "Content-Length": str(len(body))})
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    assert request.transport is not None
    request.transport.abort()
    return response


async def forever() -> None:
    """Wait until cancelled (the peer hung up, or the server is stopping)."""
    await asyncio.Event().wait()


def body_dict(received: Received) -> dict[str, Any]:
    if not isinstance(received.json, dict):
        raise RequestError("The request body is not valid JSON.")
    return received.json
