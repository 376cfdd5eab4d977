"""Differential tests for the decode path's shortcuts: each must give exactly what the
general path gives, for any input, or step aside.

1. ``ChatStreamDecoder``'s bulk fast path (a read made only of plain text chunks of the
   stream's learned shape, mapped without a parse per chunk) against the same decoder with
   the fast path never switched on: the same events for every read, or the same error at
   the same read, for streams mixing plain text chunks (text with every kind of escape,
   unicode, control characters) with near misses (broken literals, bad UTF-8, lone
   surrogates, other envelopes, finish, usage, tool calls, comments, event lines, CRLF),
   cut at arbitrary offsets. Each stream is also read the way the pipeline reads one that no
   processor watches: a read ``text_literal`` takes (one plain frame, its literal copied
   unparsed) is that literal's text event, and must be the event the general path gives.
2. ``AnthropicStreamEncoder``'s short way for text in the open block (remembered from one
   batch to the next): a stream encoded in one batch, one event per batch, or in any
   batches gives the same bytes as the same stream with the short way forgotten before
   every event.

And how the pipeline reads a stream a provider gives as an async iterator.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies as S
from llmproxy.canonical import EventKind, StreamEvent
from llmproxy.codecs import get_codec, openai_chat
from llmproxy.codecs.base import SSESplitter
from llmproxy.codecs.openai_chat import ChatStreamDecoder
from llmproxy.errors import ProxyError
from llmproxy.providers import UpstreamStream
from llmproxy.testing import build_flow

MANY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CountingDecoder(ChatStreamDecoder):
    """Counts the frames its general path mapped."""

    __slots__ = ("general_frames",)

    def __init__(self) -> None:
        super().__init__()
        self.general_frames = 0

    def _frame(self, event_name: str | None, data: bytes, events: list[StreamEvent]) -> None:
        self.general_frames += 1
        super()._frame(event_name, data, events)


def general_decoder() -> ChatStreamDecoder:
    decoder = ChatStreamDecoder()
    decoder._learn = 0  # never learns a shape: every read takes the general path
    return decoder


def joined_texts(events: list[StreamEvent]) -> list[StreamEvent]:
    """``events`` with each run of text events of one block made one: the bulk fast path
    passes on the text of a read's run of plain chunks as one delta, the general path one
    per chunk, and that is the only difference allowed between them."""
    out: list[StreamEvent] = []
    for event in events:
        last = out[-1] if out else None
        if last is not None and event.kind == last.kind == EventKind.TEXT and event.index == last.index:
            out[-1] = StreamEvent(EventKind.TEXT, last.index, last.text + event.text)
        else:
            out.append(event)
    return out


def run(decoder: ChatStreamDecoder, reads: list[bytes], literals: bool = False) -> list[Any]:
    """Per read, its events (runs of text joined, see :func:`joined_texts`), or the error
    that ended the stream there (then nothing more). With ``literals``, as the pipeline
    reads a stream nobody watches: a read :meth:`~ChatStreamDecoder.text_literal` takes is
    its text event, parsed here, and not fed."""
    out: list[Any] = []
    try:
        for read in reads:
            copied = decoder.text_literal(read) if literals else None
            if copied is not None:
                index, literal = copied
                out.append([StreamEvent(EventKind.TEXT, index, orjson.loads(literal))])
                continue
            out.append(joined_texts(decoder.feed(read)))
        out.append(decoder.close())
    except ProxyError as error:
        out.append(("error", error.status, error.message))
    return out


def agree(reads: list[bytes], message: Any = None) -> None:
    """The fast paths give what the general path gives: fed every read, and with the reads
    that are one plain text frame taken as copied literals."""
    expected = run(general_decoder(), reads)
    assert run(ChatStreamDecoder(), reads) == expected, message
    assert run(ChatStreamDecoder(), reads, literals=True) == expected, message


# -- chat streams: plain text chunks and near misses ----------------------------------------

ENVELOPES = [  # what precedes "choices" in real servers' chunks
    {"id": "chatcmpl-AbC123", "object": "chat.completion.chunk", "created": 1730000000, "model": "gpt-4o-mini", "system_fingerprint": "fp_0ba0d124f1"},
    {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m", "system_fingerprint": None},
    {"id": "c", "object": "chat.completion.chunk", "created": 17, "model": "gpt-5", "service_tier": "default", "system_fingerprint": "fp"},
    {"id": "c2", "object": "chat.completion.chunk", "created": 5, "model": "llama"},
]


def _literal(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as a JSON string literal, spelled the way some server might."""
    how = draw(st.sampled_from(("orjson", "ascii", "utf8", "slashes", "all-u")))
    if how == "orjson":
        return orjson.dumps(text)
    if how == "ascii":
        return json.dumps(text, ensure_ascii=True).encode()
    if how == "utf8":
        return json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "slashes":
        return json.dumps(text, ensure_ascii=False).replace("/", "\\/").encode("utf-8", "surrogatepass")
    return b'"' + "".join(f"\\u{ord(c):04X}" if ord(c) < 0x10000 else c for c in text).encode("utf-8", "surrogatepass") + b'"'


BROKEN_LITERALS = [
    b'"a\nb"', b'"tab\there"', b'"quote"inside"', b'"back\\slash\\"', b'"bad \\x escape"', b'"\\u12"', b'"\\ud800 lone"',
    b'"\\udc00"', b'"bad utf8 \xff"', b'"cut \xe2\x82"', b'"unterminated', b'unquoted', b'"a","b"', b'"a"  ', b' "a"', b'"a"\n', b'\n"a"', b'\t"a"\r', b'null', b'7', b'{"a":1}', b'[]',
    b'"\\"escaped quote\\""', b'"\\\\"', b'"\\/"', b'""', b'"\\ud83d\\ude00"', b'"ok"}\n\ndata: {"x":1', b'"a\\\nb"',
]


_anything = st.binary(max_size=8)
_space = st.sampled_from([b"", b" ", b"\n", b"\t", b"\r", b"\r\n"])
# What may stand where a plain chunk's content literal should: the list above, any bytes,
# any bytes in quotes, and JSON values with whitespace around them (an LF makes two lines).
near_misses = (
    st.sampled_from(BROKEN_LITERALS)
    | _anything
    | _anything.map(lambda raw: b'"' + raw + b'"')
    | st.tuples(_space, st.sampled_from([b'"a"', b'"\\n"', b"1", b"null", b"[]", b'{"a":"b"}']), _space).map(b"".join)
)


def _chunk(envelope: dict[str, Any], choice: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({**envelope, "choices": [choice], **extra})


@st.composite
def chat_streams(draw: st.DrawFn) -> bytes:
    envelope = draw(st.sampled_from(ENVELOPES))
    usage_null = draw(st.booleans())
    extra = {"usage": None} if usage_null else {}

    def plain(literal: bytes) -> bytes:
        head = _chunk(envelope, {"index": 0, "delta": {"content": "\x00"}, "logprobs": None, "finish_reason": None}, **extra)
        return head.replace(b'"\\u0000"', literal)

    frames = [_chunk(envelope, {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})]
    texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["", "\n", '"', "\\", "/", "\u2028", "😀", "\x7f", "\x1f"])
    for _ in range(draw(st.integers(0, 8))):
        # runs of plain chunks (what the fast path takes), each followed by a near miss or not
        frames.extend(plain(_literal(draw, draw(texts))) for _ in range(draw(st.integers(0, 6))))
        kind = draw(st.sampled_from(["plain", "plain", "plain", "broken", "other", "done", "comment", "event"]))
        if kind == "plain":
            frames.append(plain(_literal(draw, draw(texts))))
        elif kind == "broken":
            frames.append(plain(draw(near_misses)))
        elif kind == "done":
            frames.append(b"[DONE]")
        elif kind == "comment":
            frames.append(None)  # a comment line of its own
        elif kind == "event":
            frames.append(b"event: chunk\ndata: " + plain(orjson.dumps("evented")))
        else:
            choice = draw(st.sampled_from([
                {"index": 0, "delta": {"content": "fin"}, "logprobs": None, "finish_reason": "stop"},
                {"index": 0, "delta": {"content": "lp"}, "logprobs": {"content": []}, "finish_reason": None},
                {"index": 1, "delta": {"content": "second choice"}, "logprobs": None, "finish_reason": None},
                {"index": 0, "delta": {"role": "assistant", "content": "role too"}, "logprobs": None, "finish_reason": None},
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}, "logprobs": None, "finish_reason": None},
                {"index": 0, "delta": {"reasoning_content": "hmm"}, "logprobs": None, "finish_reason": None},
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"},
            ]))
            other = draw(st.sampled_from([envelope, {**envelope, "id": "other"}, {**envelope, "created": 2}]))
            frames.append(_chunk(other, choice, **draw(st.sampled_from([{}, {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}]))))
    if draw(st.booleans()):
        frames.append(b"[DONE]")
    out = b"".join(b": keep-alive\n\n" if frame is None else (frame if frame.startswith(b"event:") else b"data: " + frame) + b"\n\n" for frame in frames)
    eol = draw(st.sampled_from(["lf", "lf", "crlf", "one-crlf"]))
    if eol == "crlf":
        out = out.replace(b"\n", b"\r\n")
    elif eol == "one-crlf" and b"\n\n" in out[:-2]:
        at = draw(st.sampled_from([i for i in range(len(out) - 2) if out[i : i + 2] == b"\n\n"]))
        out = out[:at] + b"\r\n\r\n" + out[at + 2 :]
    return out


# Reads are mapped in segments of openai_chat._SEGMENT bytes of whole frames; the tests'
# streams are small, so they also run with segments of a frame or a few.
SEGMENTS = [pytest.param(openai_chat._SEGMENT, id="segment-default"), pytest.param(1, id="segment-1"), pytest.param(600, id="segment-600")]


@pytest.mark.parametrize("segment", SEGMENTS)
@settings(MANY, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])  # the patch is the same for every input
@given(data=st.data())
def test_chat_bulk_fast_path_equals_general_path(segment: int, data: st.DataObject, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_chat, "_SEGMENT", segment)
    stream = data.draw(chat_streams())
    reads = data.draw(st.one_of(_frame_reads(stream), S.splits(stream), st.just([stream])))
    agree(reads)


@st.composite
def _frame_reads(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """Reads that end on frame ends, a few frames each: what the fast path most often sees."""
    frames = [frame + b"\n\n" for frame in stream.split(b"\n\n")[:-1]]
    reads, i = [], 0
    while i < len(frames):
        n = draw(st.integers(1, 5))
        reads.append(b"".join(frames[i : i + n]))
        i += n
    return reads or [stream]


def _plain_stream(texts: list[str]) -> list[bytes]:
    envelope = ENVELOPES[0]
    frames = [_chunk(envelope, {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})]
    frames += [_chunk(envelope, {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}) for text in texts]
    frames.append(_chunk(envelope, {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}))
    return [b"data: " + frame + b"\n\n" for frame in frames] + [b"data: [DONE]\n\n"]


TEXTS = ["Hello", ", wo", "rld", " — ", "😀", "line\nbreak", 'a "quote"', "back\\slash", "", "tab\t", "é", "\u2028", "x" * 300]


@pytest.mark.parametrize("per_read", [1, 3, 20])
def test_fast_path_is_taken_and_agrees(per_read: int) -> None:
    """A plain stream: after the chunk it learns from, only the read with the finish chunk
    and [DONE] takes the general path, and the events are the general path's."""
    frames = _plain_stream(TEXTS * 4)
    reads = [b"".join(frames[i : i + per_read]) for i in range(0, len(frames), per_read)]
    decoder = CountingDecoder()
    assert run(decoder, reads) == run(general_decoder(), reads)
    # the role chunk, the chunk that begins the text block and the one it learns from take
    # the general path (and the rest of their read), as does the read with the finish chunk
    assert decoder.general_frames <= 2 * per_read + 3 < len(frames)


def test_a_paced_stream_copies_the_text_it_can() -> None:
    """One frame per read, as a paced stream comes: once the shape is learned, every plain
    text frame is taken as its literal, spelled as the backend spelled it, except those
    only a parse can vouch for (a \\u escape, which may be a lone surrogate) or that give
    no event (empty text); a frame buffered behind a partial one is never taken."""
    texts = ["Hello", "there", "a/b", "é", ", wo", "", "😀", 'say "hi"', "tab\t", "x" * 300]
    frames = _plain_stream(texts)  # a role chunk, then frame i holds texts[i - 1]
    spelled = {"a/b": b'"a\\/b"', "é": b'"\\u00e9"'}  # valid spellings orjson never writes
    for i, text in enumerate(texts, start=1):
        if text in spelled:
            frames[i] = frames[i].replace(orjson.dumps(text), spelled[text])
    decoder = ChatStreamDecoder()
    copied = {}
    for i, frame in enumerate(frames):
        taken = decoder.text_literal(frame)
        if taken is None:
            decoder.feed(frame)
        else:
            copied[i] = taken
    literal = {i: spelled.get(text, orjson.dumps(text)) for i, text in enumerate(texts, start=1)}
    # frame 1 begins the text block, frame 2 is the one the shape is learned from
    assert copied == {i: (0, literal[i]) for i in (3, 5, 7, 8, 9, 10)}
    assert copied[3] == (0, b'"a\\/b"')
    assert run(ChatStreamDecoder(), frames, literals=True) == run(general_decoder(), frames)
    half = len(frames[5]) // 2  # a frame split in two: the read after the first half is not one frame
    decoder = ChatStreamDecoder()
    for frame in frames[:4]:
        decoder.feed(frame)
    decoder.feed(frames[5][:half])
    assert decoder.text_literal(frames[5][half:]) is None and decoder.text_literal(frames[7]) is None


@pytest.mark.parametrize("reads_of", [None, 100_000, 7_000])
def test_big_reads_with_near_misses(reads_of: int | None) -> None:
    """A 2000-chunk stream (about 400 KB, so many segments per read) with unusual chunks
    here and there: read whole or in big pieces, the fast path takes the plain segments,
    learning in the first read, and the events are the general path's."""
    frames = _plain_stream([f"w{i} " for i in range(2000)])
    odd = [b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"odd"},"logprobs":null,"finish_reason":null}]}\n\n',
           b": keep-alive\n\n", frames[1].replace(b'"w0 "', b'"bad \\x"')]
    for i, at in enumerate(range(300, 2000, 400)):
        frames.insert(at, odd[i % 2])
    wire = b"".join(frames)
    reads = [wire] if reads_of is None else [wire[i : i + reads_of] for i in range(0, len(wire), reads_of)]
    decoder = CountingDecoder()
    assert run(decoder, reads) == run(general_decoder(), reads)
    assert decoder.general_frames < len(frames) // 2
    broken = b"".join(frames[:900] + [odd[2]] + frames[900:])  # an error at chunk 900: same error
    error = run(general_decoder(), [broken])[-1]
    assert error[:2] == ("error", 502) and run(ChatStreamDecoder(), [broken])[-1] == error


def test_fast_path_at_every_cut() -> None:
    """The plain stream cut in two at every byte offset, then in reads of 7 bytes."""
    frames = _plain_stream(TEXTS)
    wire = b"".join(frames)
    learned = b"".join(frames[:3])  # the decoder has learned the shape after these
    expected = run(general_decoder(), [wire])
    for offset in range(len(learned), len(wire)):
        reads = [learned, wire[len(learned) : offset], wire[offset:]]
        agree(reads, offset)
    sevens = [wire[i : i + 7] for i in range(0, len(wire), 7)]
    agree(sevens)
    events = [event for batch in expected[:-1] for event in batch]
    assert "".join(event.text for event in events if event.kind == "text") == "".join(TEXTS)


@pytest.mark.parametrize("literal", BROKEN_LITERALS)
def test_broken_literal_after_learning(literal: bytes) -> None:
    """Each near miss, in a read that would otherwise take the fast path: the same events
    or the same error as the general path, in one read and alone."""
    frames = _plain_stream(["a", "b", "c", "d"])
    broken = frames[4].replace(b'"d"', literal)
    for reads in ([b"".join(frames[:4]), frames[3] + broken + frames[3]], [b"".join(frames[:4]), broken, frames[3]]):
        agree(reads)


@MANY
@given(literal=near_misses, before=st.integers(0, 3), after=st.integers(0, 3))
def test_any_literal_after_learning(literal: bytes, before: int, after: int) -> None:
    """Whatever stands in a plain chunk's content, once the shape is learned: alone in its
    read (the one-frame way) and among plain chunks (the bulk way)."""
    frames = _plain_stream(["a", "b", "c", "d"])
    odd = frames[4].replace(b'"d"', literal)
    learned = b"".join(frames[:4])
    for reads in ([learned, odd], [learned, frames[3] * before + odd + frames[3] * after, frames[3]]):
        agree(reads)


@MANY
@given(at=st.integers(0, 10_000), byte=st.integers(0, 255), before=st.integers(0, 3), after=st.integers(0, 3))
def test_one_byte_off(at: int, byte: int, before: int, after: int) -> None:
    """A plain chunk with any one byte changed (another choice index, id or model of the
    same length, a broken tail …), alone in its read and among plain chunks."""
    frames = _plain_stream(["a", "b", "c", "d"])
    at %= len(frames[4])
    odd = frames[4][:at] + bytes([byte]) + frames[4][at + 1 :]
    learned = b"".join(frames[:4])
    for reads in ([learned, odd], [learned, frames[3] * before + odd + frames[3] * after, frames[3]]):
        agree(reads)


# -- the SSE splitter's support for it ------------------------------------------------------

def test_a_read_of_plain_chunks_is_one_delta() -> None:
    """The point of the bulk fast path: a read of 100 plain chunks after the learned one
    becomes one text event holding their text, in order, not 100 events."""
    texts = [f"w{i} " for i in range(104)]
    frames = _plain_stream(texts)
    decoder = ChatStreamDecoder()
    first = decoder.feed(b"".join(frames[:5]))  # role chunk, then plain ones: learns the shape
    bulk = decoder.feed(b"".join(frames[5:-2]))
    assert [event.kind for event in bulk] == [EventKind.TEXT]
    rest = decoder.feed(b"".join(frames[-2:])) + decoder.close()
    assert "".join(e.text for e in first + bulk + rest if e.kind == EventKind.TEXT) == "".join(texts)


@pytest.mark.parametrize(
    ("content", "text"),
    [([{"type": "text", "text": "he"}, {"type": "image_url"}, {"type": "text", "text": "llo"}], "hello"), (7, "7"), ({"a": 1}, '{"a":1}')],
)
def test_content_that_is_not_a_string_becomes_text(content: Any, text: str) -> None:
    """Some servers stream a list of content parts; whatever comes, a client gets a string."""
    envelope = ENVELOPES[0]
    frames = _plain_stream(["a"])
    odd = b"data: " + _chunk(envelope, {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}) + b"\n\n"
    for reads in ([b"".join(frames[:2]), odd, b"".join(frames[2:])], [b"".join(frames[:2]) + odd + b"".join(frames[2:])]):
        events = [event for read in run(ChatStreamDecoder(), reads) for event in read]
        assert [e.text for e in events if e.kind == EventKind.TEXT] in (["a", text], ["a" + text])


def test_whole_frames_and_keep() -> None:
    splitter = SSESplitter()
    assert splitter.whole_frames(b"data: 1") is None  # no frame end yet
    assert splitter.feed(b"data: 1") == []
    assert splitter.whole_frames(b"\n\ndata: 2\n\ndata: 3") == (b"data: 1\n\ndata: 2\n\n", b"data: 3")
    assert splitter.feed(b"") == []  # whole_frames changed nothing
    splitter.keep(b"data: 3")
    assert splitter.feed(b"\n\n") == [(None, b"3")]
    assert splitter.whole_frames(b"data: 4\r\n\r\n") is None  # CR: the general path's business
    assert splitter.feed(b"data: 4\r") == []
    assert splitter.whole_frames(b"\n\r\n") is None  # the LF of a split CRLF is pending


# -- the Anthropic encoder's short way for text ---------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_anthropic_text_short_way_equals_one_event_per_batch(data: st.DataObject) -> None:
    events = data.draw(S.event_streams("anthropic"))
    # text of the open block in runs, and text for a block that is not open (a processor's doing)
    extra = data.draw(st.lists(st.tuples(st.integers(0, len(events)), st.integers(0, 3), st.text(max_size=4)), max_size=6))
    for at, index, text in sorted(extra, reverse=True):
        events.insert(at, StreamEvent("text", index, text))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=5)))
    codec = get_codec("anthropic")
    flow = build_flow({"model": "m", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}, frontend="anthropic")
    one_batch, one_by_one, in_pieces, reference = (codec.stream_encoder(flow) for _ in range(4))
    for encoder in (one_by_one, in_pieces, reference):
        encoder._id = one_batch._id  # message ids are minted per stream

    def without_short_way(event: StreamEvent) -> bytes:
        reference._text_index = None  # what the short way remembers, forgotten before every event
        return reference.encode([event])  # type: ignore[no-any-return]

    expected = b"".join(without_short_way(event) for event in events)
    assert one_batch.encode(list(events)) == expected
    assert b"".join(one_by_one.encode([event]) for event in events) == expected
    bounds = [0, *cuts, len(events)]
    assert b"".join(in_pieces.encode(events[a:b]) for a, b in zip(bounds, bounds[1:])) == expected


# -- a broken frame after good ones ---------------------------------------------------------

ANTHROPIC_OPENING = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],'
    b'"stop_reason":null,"usage":{"input_tokens":1,"output_tokens":0}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)


def _anthropic_delta(text: str) -> bytes:
    return b'event: content_block_delta\ndata: ' + orjson.dumps({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}) + b"\n\n"


@pytest.mark.parametrize("protocol", ["openai_chat", "anthropic"])
def test_events_before_a_broken_frame_in_the_same_read_are_kept(protocol: str) -> None:
    """A read holding a good event then a frame that is not JSON, once the client is
    reading: the good event comes out of that read, the error at the next call. In the
    stream's first read the error comes at once (nothing shown yet: it may fail over)."""
    if protocol == "openai_chat":
        frames = _plain_stream(["w0", "w1", "w2"])
        first, second = b"".join(frames[:3]), frames[3] + b"data: {garbage\n\n"
    else:
        first, second = ANTHROPIC_OPENING + _anthropic_delta("w0") + _anthropic_delta("w1"), _anthropic_delta("w2") + b"event: content_block_delta\ndata: {garbage\n\n"
    decoder = get_codec(protocol).stream_decoder()
    assert "".join(e.text for e in decoder.feed(first) if e.kind == EventKind.TEXT) == "w0w1"
    assert [e.text for e in decoder.feed(second) if e.kind == EventKind.TEXT] == ["w2"]
    with pytest.raises(ProxyError, match="malformed|not valid|JSON"):
        decoder.close()
    with pytest.raises(ProxyError):
        get_codec(protocol).stream_decoder().feed(first + second)  # all in the first read


# -- tool calls whose name comes in pieces ---------------------------------------------------


def _tool_chunk(call: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                     "choices": [{"index": 0, "delta": {"tool_calls": [call]} if call else {}, "finish_reason": finish}]}) + b"\n\n"


@pytest.mark.parametrize(
    ("pieces", "name"),
    [(["get_", "weather"], "get_weather"), (["get_weather", "get_weather"], "get_weather"), (["get_weather"], "get_weather")],
    ids=["split", "repeated", "whole"],
)
@pytest.mark.parametrize("arguments", ['{"city": "Paris"}', ""], ids=["with-arguments", "none"])
def test_a_tool_name_sent_in_pieces_is_joined(pieces: list[str], name: str, arguments: str) -> None:
    frames = [_tool_chunk({"index": 0, "id": "call_1" if i == 0 else None, "type": "function", "function": {"name": piece, "arguments": ""}})
              for i, piece in enumerate(pieces)]
    if arguments:
        frames.append(_tool_chunk({"index": 0, "function": {"arguments": arguments}}))
    frames += [_tool_chunk({}, finish="tool_calls"), b"data: [DONE]\n\n"]
    for reads in ([b"".join(frames)], frames):
        decoder = ChatStreamDecoder()
        events = [event for read in reads for event in decoder.feed(read)] + decoder.close()
        starts = [(e.id, e.name) for e in events if e.kind == EventKind.TOOL_CALL_START]
        assert starts == [("call_1", name)]
        assert "".join(e.text for e in events if e.kind == EventKind.TOOL_CALL_DELTA) == arguments
        assert [e.kind for e in events][-2:] == [EventKind.BLOCK_STOP, EventKind.STOP]


@st.composite
def parallel_calls(draw: st.DrawFn) -> tuple[list[tuple[str, str]], list[bytes]]:
    """Two to four calls announced in order (id and name first, as OpenAI does), whose
    argument pieces then come interleaved in any order, each call's own in order."""
    names = draw(st.lists(st.sampled_from(["shell", "read", "write", "list", "grep"]), min_size=2, max_size=4))
    calls = [(name, orjson.dumps({"n": i, "arg": draw(st.text(max_size=12))}).decode()) for i, name in enumerate(names)]
    pieces: list[list[str]] = []
    for _, arguments in calls:
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(arguments) - 1)), max_size=4, unique=True)))
        bounds = [0, *cuts, len(arguments)]
        pieces.append([arguments[a:b] for a, b in zip(bounds, bounds[1:]) if arguments[a:b]])
    frames = [_tool_chunk({"index": i, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": ""}}) for i, (name, _) in enumerate(calls)]
    queues = [list(p) for p in pieces]
    while any(queues):
        i = draw(st.sampled_from([i for i, q in enumerate(queues) if q]))
        frames.append(_tool_chunk({"index": i, "function": {"arguments": queues[i].pop(0)}}))
    return calls, frames + [_tool_chunk({}, finish="tool_calls"), b"data: [DONE]\n\n"]


@settings(max_examples=200, deadline=None)
@given(parallel_calls())
def test_parallel_calls_come_out_one_after_another_in_the_order_announced(case: tuple[list[tuple[str, str]], list[bytes]]) -> None:
    """Some servers interleave the argument pieces of parallel calls. Anthropic, Gemini and
    Responses clients take calls one after the other (a block cannot reopen), so the decoder
    gives each call's start and all its arguments before the next call's start, in the order
    the calls were announced, with nothing lost."""
    calls, frames = case
    decoder = ChatStreamDecoder()
    events = [event for frame in frames for event in decoder.feed(frame)] + decoder.close()
    order: list[int] = []
    arguments: dict[int, str] = {}
    for event in events:
        if event.kind == EventKind.TOOL_CALL_START:
            order.append(event.index)
            arguments[event.index] = ""
        elif event.kind == EventKind.TOOL_CALL_DELTA:
            assert event.index == order[-1], "a delta for a call that is not the latest begun"
            arguments[event.index] += event.text
    starts = [(e.id, e.name) for e in events if e.kind == EventKind.TOOL_CALL_START]
    assert starts == [(f"call_{i}", name) for i, (name, _) in enumerate(calls)]
    assert [arguments[i] for i in order] == [args for _, args in calls]


def test_a_stream_of_nothing_but_done_is_an_error_not_an_empty_answer() -> None:
    decoder = ChatStreamDecoder()
    with pytest.raises(ProxyError, match="before sending any answer"):
        decoder.feed(b"data: [DONE]\n\n")


def test_a_reasoning_summary_sent_only_with_the_finished_item_is_thinking() -> None:
    """Streamed as non-streamed: a Responses server that puts the summary only in
    output_item.done still gives the client its thinking."""
    def frame(data: dict[str, Any]) -> bytes:
        return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    item = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking resp"}]}
    stream = b"".join([
        frame({"type": "response.created", "response": {"id": "resp_1", "model": "m"}}),
        frame({"type": "response.output_item.added", "output_index": 0, "item": {**item, "summary": []}}),
        frame({"type": "response.output_item.done", "output_index": 0, "item": item}),
        frame({"type": "response.completed", "response": {"id": "resp_1", "usage": {"input_tokens": 1, "output_tokens": 2}}}),
    ])
    decoder = get_codec("openai_responses").stream_decoder()
    events = decoder.feed(stream) + decoder.close()
    assert "".join(e.text or "" for e in events if e.kind == EventKind.THINKING) == "thinking resp"


# -- how the pipeline reads a stream --------------------------------------------------------

def test_chunks_from_an_iterator_are_read_one_call_each_and_empty_at_the_end() -> None:
    """A provider may give its stream as any async iterator of bytes; the pipeline reads it
    as it reads a socket: one call per chunk, empty chunks skipped, b"" at the end (and
    again after it)."""

    async def chunks() -> Any:
        for chunk in (b"data: 1\n\n", b"", b"data: 2\n\n"):
            yield chunk

    async def read_all() -> list[bytes]:
        stream = UpstreamStream("openai_chat", chunks=chunks())
        assert stream.read is not None
        return [await stream.read() for _ in range(4)]

    assert asyncio.run(read_all()) == [b"data: 1\n\n", b"data: 2\n\n", b"", b""]
