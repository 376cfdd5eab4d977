"""``llmproxy capture list|show``: reading capture files.

``list`` prints one row per flow (time, flow id, front-end, model, backend, status, tokens,
duration); ``show`` prints flows in full, readably (``--json`` for the records as they
are). Several files may be given (rotated files, oldest first); a line that is not a
complete record (a file still being written) is skipped with a warning.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any, Iterator

import click

from llmproxy.canonical import ResponseBuilder
from llmproxy.codecs import CODECS
from llmproxy.codecs.base import sse_frame


def read_records(paths: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with open(path, "rb") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    click.echo(f"warning: {path}:{number}: not a complete record; skipped", err=True)
                    continue
                if isinstance(record, dict) and "id" in record:
                    yield record


@click.group("capture")
def capture() -> None:
    """Read wire captures (plugins.wire_capture.path)."""


@capture.command("list")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def list_flows(files: tuple[str, ...]) -> None:
    """One line per captured flow: time, flow id, front-end, model, backend, status, tokens, duration."""
    rows = [("TIME", "FLOW", "FRONTEND", "MODEL", "BACKEND", "STATUS", "TOKENS", "DURATION")]
    for record in read_records(files):
        rows.append(
            (
                _local_time(record),
                str(record.get("id", "")),
                str(record.get("frontend", "")),
                str(record.get("model") or "-"),
                str(record.get("target") or "-"),
                str(record.get("status") or "-"),
                _tokens(record.get("usage")),
                _seconds(record.get("duration")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo(f"{len(rows) - 1} flow(s)", err=True)


@capture.command("show")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--flow", "flow_id", help="Only this flow (its id, or the start of it).")
@click.option("--json", "as_json", is_flag=True, help="The records as they are, indented.")
def show(files: tuple[str, ...], flow_id: str | None, as_json: bool) -> None:
    """Captured flows in full: request, attempts, response, and what plugins changed."""
    shown = 0
    for record in read_records(files):
        if flow_id and not str(record.get("id", "")).startswith(flow_id):
            continue
        shown += 1
        if as_json:
            click.echo(json.dumps(record, indent=2, ensure_ascii=False))
        else:
            click.echo(render(record))
    if not shown:
        click.echo(f"no flow{' ' + repr(flow_id) if flow_id else 's'} in {', '.join(files)}", err=True)
        sys.exit(1)


# -- rendering ------------------------------------------------------------------------------------


def render(record: dict[str, Any]) -> str:
    out: list[str] = []
    add = out.append
    stream = "stream" if record.get("stream") else "no stream"
    add(f"━━ flow {record.get('id')}  {_local_time(record)}  {record.get('frontend')}  {stream}")
    model = record.get("model") or "-"
    if record.get("requested_model"):
        model = f"{record['requested_model']} → {model}"
    timing = _seconds(record.get("duration"))
    if record.get("ttft") is not None:
        timing += f" (first byte {_seconds(record.get('ttft'))})"
    add(f"   model {model} → {record.get('target') or '-'}   status {record.get('status')}   {timing}   tokens {_tokens(record.get('usage'))}")
    client = record.get("client") or {}
    add(f"   client: key {client.get('key_name') or '-'}, address {client.get('address') or '-'}, agent {client.get('user_agent') or '-'}")
    if record.get("error"):
        add(f"   error: {record['error'].get('status')} {record['error'].get('message')}")
    if record.get("fingerprint"):
        add(f"   fingerprint {record['fingerprint'][:16]}")
    changes = record.get("changes") or {}
    if changes.get("plugins") or changes.get("request"):
        add("── what plugins changed")
        for note in changes.get("plugins") or ():
            details = {k: v for k, v in note.items() if k not in ("plugin", "what", "at")}
            add(f"   {note.get('plugin')}: {note.get('what')}" + (f"  {json.dumps(details, ensure_ascii=False)}" if details else ""))
        for change in changes.get("request") or ():
            add(f"   {change.get('field')}: {json.dumps(change.get('before'), ensure_ascii=False)} → {json.dumps(change.get('after'), ensure_ascii=False)}")
    request = record.get("request") or {}
    add("── client request")
    _headers(add, request.get("headers"))
    if "body" in request:
        _body(add, request["body"])
    attempts = record.get("attempts") or []
    for i, attempt in enumerate(attempts):
        add(f"── attempt {i}: {attempt.get('backend')}:{attempt.get('model')}  status {attempt.get('status') or '-'}"
            + (f"  error {attempt['error']}" if attempt.get("error") else "")
            + f"  {_seconds(attempt.get('start'))} → {_seconds(attempt.get('end'))}")
        sent = attempt.get("request")
        if sent:
            add(f"   → {sent.get('method')} {sent.get('url')}")
            _headers(add, sent.get("headers"), "     ")
            if "body" in sent:
                _body(add, sent["body"], "     ")
        answer = attempt.get("response")
        if answer:
            add(f"   ← {attempt.get('status')}")
            _headers(add, answer.get("headers"), "     ")
            _answer(add, answer, "     ")
    response = record.get("response") or {}
    add(f"── client response  status {response.get('status')}")
    if "same_as_attempt" in response:
        add(f"   (byte for byte the answer of attempt {response['same_as_attempt']})")
        index = response["same_as_attempt"]
        source = (attempts[index].get("response") if index < len(attempts) else None) or {}
    else:
        source = response
        _answer(add, response, "   ")
    text = folded_text(record, source)
    if text:
        add("   answer: " + text.replace("\n", "\n           "))
    add("")
    return "\n".join(out)


def folded_text(record: dict[str, Any], response: dict[str, Any]) -> str:
    """The answer's text and tool calls, folded from the events or body in the client's
    protocol (or the attempt's, for a pass-through answer: the same protocol)."""
    codec = CODECS.get(str(record.get("frontend")))
    if codec is None:
        return ""
    try:
        if "events" in response:
            decoder = codec.stream_decoder()
            builder = ResponseBuilder(str(record.get("model")))
            for event in response["events"]:
                if "raw" in event:
                    data = event["raw"].encode()
                else:
                    payload = event["data"]
                    raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    data = sse_frame(raw, event.get("event"))
                for item in decoder.feed(data):
                    builder.add(item)
            for item in decoder.close():
                builder.add(item)
            answer = builder.build()
        elif isinstance(response.get("body"), dict):
            answer = codec.decode_response(response["body"])
        else:
            return ""
    except Exception:
        return ""
    pieces = [answer.text] if answer.text else []
    pieces += [f"[call {call.name}({call.arguments})]" for call in answer.tool_calls]
    return "\n".join(pieces)


def _answer(add: Any, response: dict[str, Any], indent: str) -> None:
    if "events" in response:
        for event in response["events"]:
            if "raw" in event:
                add(f"{indent}+{event.get('t', 0):.3f}s {event['raw']!r}")
                continue
            name = f"event: {event['event']}  " if event.get("event") else ""
            data = event.get("data")
            add(f"{indent}+{event.get('t', 0):.3f}s {name}data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}")
    elif "body" in response:
        _body(add, response["body"], indent)


def _headers(add: Any, headers: dict[str, str] | None, indent: str = "   ") -> None:
    for name, value in (headers or {}).items():
        add(f"{indent}{name}: {value}")


def _body(add: Any, body: Any, indent: str = "   ") -> None:
    text = body if isinstance(body, str) else json.dumps(body, indent=2, ensure_ascii=False)
    add(indent + text.replace("\n", "\n" + indent))


def _local_time(record: dict[str, Any]) -> str:
    ts = record.get("ts")
    if not isinstance(ts, (int, float)):
        return str(record.get("time", "-"))
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _tokens(usage: Any) -> str:
    if not isinstance(usage, dict):
        return "-"
    return f"{usage.get('input_tokens', 0)}→{usage.get('output_tokens', 0)}"


def _seconds(value: Any) -> str:
    return f"{value:.3f}s" if isinstance(value, (int, float)) else "-"
