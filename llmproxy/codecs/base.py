"""What every wire-protocol codec provides, and the SSE framing they share.

A codec is used from both sides: a front-end decodes the client's request and encodes the
answer back; a provider encodes the request for its backend and decodes the backend's answer.
Stream decoders and encoders are small stateful objects, one per stream, fed batches so that
one upstream read becomes at most one client write.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import orjson

from ..canonical import OpaquePart, Request, Response, StreamEvent
from ..errors import ProxyError


class StreamDecoder(Protocol):
    """A terminal event (stop or error) is the last event a decoder returns: nothing follows
    it in its batch or later ones (the pipeline relies on that).

    Optionally, with an encoder that has it too, ``text_literal(chunk) -> (index, literal) |
    None``: if ``chunk`` would give exactly one TEXT event, whose text is a JSON string literal
    in it that can be copied into another JSON document unchanged, the block index and that
    literal, unparsed; else None. It changes no state: a caller that takes the literal treats
    it as that event, one that does not feeds the chunk after all. The pipeline asks only when
    no stream processor would see the event, so no text can have been changed."""

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        """Parse the complete events in ``chunk`` (plus whatever was buffered)."""

    def close(self) -> list[StreamEvent]:
        """The stream ended cleanly: return the final events (or raise ProxyError if it
        ended before the protocol says it is complete)."""


class StreamEncoder(Protocol):
    """Optionally, ``text_literal(index, literal) -> bytes | None``: the wire bytes for a TEXT
    event of block ``index`` whose text is the JSON string ``literal`` (see StreamDecoder),
    when the encoder can write it without the text (nearly always: the block is the one
    open); else None, and the caller encodes the event. A paced stream reads one text chunk
    at a time: copying its literal from the backend's bytes to the client's skips a parse
    and a dump per event."""

    def encode(self, events: list[StreamEvent]) -> bytes:
        """Wire bytes for a batch of canonical events (may be empty)."""


class Codec(Protocol):
    protocol: str
    content_type_stream: str
    # After a stream's error event, close the connection instead of ending the stream, for
    # clients that would read a cleanly ended stream as a complete (cut short) answer.
    error_ends_connection: bool

    # -- front-end side ----------------------------------------------------------------
    def peek(self, body: dict[str, Any]) -> tuple[str, bool]:
        """Cheaply validate the request's required fields; return (model, stream)."""

    def decode_request(self, body: dict[str, Any]) -> Request: ...

    def encode_response(self, response: Response, request: Request | None) -> dict[str, Any]: ...

    def stream_encoder(self, flow: Any) -> StreamEncoder:
        """An encoder for one stream to the client of ``flow`` (reads ``flow.model`` and,
        without forcing a decode, whatever options the client's request set)."""

    def error_body(self, error: ProxyError) -> dict[str, Any]: ...

    def error_event(self, error: ProxyError) -> bytes: ...

    # -- provider side -----------------------------------------------------------------
    def encode_request(self, request: Request, model: str) -> dict[str, Any]: ...

    def decode_response(self, body: dict[str, Any]) -> Response: ...

    def stream_decoder(self) -> StreamDecoder: ...

    def stream_complete(self, tail: bytes) -> bool:
        """Cheap check on a stream's last bytes: did it end as the protocol says it must?
        (False only means "decode it to be sure".)"""


def array(value: Any, where: str) -> list[Any]:
    """``value`` if it is a JSON array (None counts as empty), else a 400 naming ``where``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProxyError(400, f"{where} must be an array", param=where)
    return value


def public_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` without a codec's private notes (keys starting with ``_``), for the wire."""
    return {k: v for k, v in extra.items() if not k.startswith("_")}


def string(value: Any, where: str) -> str:
    """``value`` if it is a string, else a 400 naming ``where`` (text fields of any protocol)."""
    if isinstance(value, str):
        return value
    raise ProxyError(400, f"{where} must be a string", param=where)


def carried(part: OpaquePart, protocol: str) -> bool:
    """Whether an encoder for ``protocol`` writes ``part``: always in its own protocol; in
    another it is left out, unless it is ``essential`` (what a user sent): then the request
    is refused with a 400 naming it, never sent without it."""
    if part.protocol == protocol:
        return True
    if part.essential:
        kind = part.data.get("type", "unknown")
        raise ProxyError(400, f"a {kind!r} content block from an {part.protocol} client has no form in {protocol}, the backend's protocol: "
                              f"send it to a {part.protocol} backend, or as text")
    return False


def web_url(url: str, protocol: str) -> str:
    """``url`` if a backend of ``protocol`` can fetch it (http or https), else the client's
    400: a Gemini client's ``gs://`` or Files API URI means nothing to OpenAI or Anthropic."""
    if url[:8].lower().startswith(("https://", "http://")):
        return url
    raise ProxyError(400, f"the {protocol} backend cannot fetch {url[:200]!r}: send the file inline (base64), or an http(s) URL")


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError as error:
        # orjson reads JSON nested up to 1024 levels but writes only 254: a client body
        # between the two would otherwise be a 500 when it is forwarded.
        if "Recursion limit" not in str(error):
            raise
        raise ProxyError(400, "JSON nested more than 254 levels deep cannot be forwarded") from None


loads = orjson.loads

_bits = random.getrandbits


def random_hex(chars: int) -> str:
    """``chars`` random hex digits for the ids llmproxy makes up (messages, tool calls).
    They need to be unique, not secret: a Mersenne Twister draw costs a tenth of a uuid4,
    which every translated answer paid."""
    return f"{_bits(chars * 4):0{chars}x}"


class SSESplitter:
    """Splits a byte stream into SSE frames, keeping a partial frame for the next chunk.

    Yields ``(event, data)`` per frame: ``event`` is the ``event:`` field or None, ``data``
    the joined ``data:`` lines as bytes. Frames are separated by a blank line (LF or CRLF).
    """

    __slots__ = ("_buffer", "_cr")

    def __init__(self) -> None:
        self._buffer = b""
        self._cr = False  # the last read ended in CR (already taken as a line end)

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        if self._cr and chunk[:1] == b"\n":
            # The LF of a CRLF split between two reads: its CR has ended the line already,
            # and counting the LF as a second line end would end the frame there.
            chunk = chunk[1:]
        self._cr = chunk[-1:] == b"\r"
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return []
        self._buffer = buffer[end + 2 :]
        return self.frames(buffer[:end])

    @staticmethod
    def frames(body: bytes) -> list[tuple[str | None, bytes]]:
        """The frames of ``body``: whole frames with LF line ends, without the blank line
        after the last one."""
        # The usual read holds nothing but one-line "data:" frames. Splitting on the
        # separator between two such frames then yields every payload in one call, and the
        # count of line ends proves that premise: each separator holds two, so if that is
        # all there are, no frame has a second line (or an event:, id: or comment line).
        if body.startswith(b"data: "):
            payloads = body[6:].split(b"\n\ndata: ")
            if body.count(b"\n") == 2 * (len(payloads) - 1):
                return [(None, data) for data in payloads]
        frames = []
        for raw in body.split(b"\n\n"):
            if raw:
                frame = _parse_frame(raw)
                if frame is not None:
                    frames.append(frame)
        return frames

    def whole_frames(self, chunk: bytes) -> tuple[bytes, bytes] | None:
        """For a decoder's bulk fast path: the buffered bytes plus ``chunk`` cut after the
        last frame end, as ``(complete frames, partial rest)``, or None when there is no
        complete frame or a CR is involved (line ends the general path must normalise).
        Changes nothing: a caller that takes the frames calls :meth:`keep` with the rest."""
        if self._cr or b"\r" in chunk:
            return None
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            return None
        if end == len(data):
            return data, b""
        return data[:end], data[end:]

    def between_frames(self) -> bool:
        """Nothing of a frame is buffered: the next read begins a frame."""
        return not self._buffer and not self._cr

    def keep(self, rest: bytes) -> None:
        """Buffer ``rest`` (from :meth:`whole_frames`) for the next read."""
        self._buffer = rest

    def close(self) -> list[tuple[str | None, bytes]]:
        """Frames left in the buffer when the stream ended without a final blank line."""
        rest, self._buffer = self._buffer.strip(b"\n"), b""
        if not rest:
            return []
        frame = _parse_frame(rest)
        return [frame] if frame is not None else []


class SSEStreamDecoder:
    """The shared frame of the SSE stream decoders (:class:`StreamDecoder`): ``feed`` splits
    frames with :class:`SSESplitter` and hands each to ``_frame``; ``close`` hands over what
    is left and calls ``_end``, which finishes the stream or raises if it was cut short.

    One rule lives here for all of them: a frame that fails to decode in a read that gave
    good events before it, once the client is reading (an earlier read gave events), does
    not take those events down with it: they are returned, and the error is raised at the
    next ``feed`` or ``close``. A stream that breaks in its first read with events raises at
    once: it has shown nothing yet and may still fail over whole."""

    __slots__ = ("_sse", "_failed", "_emitted")

    def __init__(self) -> None:
        self._sse = SSESplitter()
        self._failed: ProxyError | None = None  # held for the next call
        self._emitted = False  # some feed returned events

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        if self._failed is not None:
            raise self._failed
        events: list[StreamEvent] = []
        try:
            self._read(chunk, events)
        except ProxyError as error:
            if not events or not self._emitted:
                raise
            self._failed = error
        if events:
            self._emitted = True
        return events

    def close(self) -> list[StreamEvent]:
        if self._failed is not None:
            raise self._failed
        events: list[StreamEvent] = []
        for name, data in self._sse.close():
            self._frame(name, data, events)
        self._end(events)
        return events

    def _read(self, chunk: bytes, events: list[StreamEvent]) -> None:
        """Append the events of the frames ``chunk`` completes (a decoder may map faster)."""
        for name, data in self._sse.feed(chunk):
            self._frame(name, data, events)

    def _frame(self, name: str | None, data: bytes, events: list[StreamEvent]) -> None:
        raise NotImplementedError

    def _end(self, events: list[StreamEvent]) -> None:
        raise NotImplementedError


def _parse_frame(raw: bytes) -> tuple[str | None, bytes] | None:
    if raw.startswith(b"data: ") and b"\n" not in raw:  # the common case, one data line
        return None, raw[6:]
    event = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
        # comments (":") and id:/retry: fields carry nothing we use
    if not data and event is None:
        return None
    return event, b"\n".join(data)


def sse_frame(data: bytes, event: str | None = None) -> bytes:
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def complete_frames_end(buffer: bytes) -> int:
    """Index just past the last complete SSE frame in ``buffer`` (0 if none).

    Used by the raw pass-through path so a failure mid-frame never leaves the client a
    half-written frame in front of our error event.
    """
    end = buffer.rfind(b"\n\n")
    # A CRLF frame end can only lie after the last LF LF; searching just there keeps this
    # cheap on long reads.
    crlf = buffer.rfind(b"\r\n\r\n", end + 1 if end >= 0 else 0)
    if crlf >= 0:
        return crlf + 4
    return end + 2 if end >= 0 else 0
