"""Wire-protocol codecs, one module per protocol, shared by front-ends and providers."""

from __future__ import annotations

from .anthropic import AnthropicCodec
from .base import Codec
from .gemini import GeminiArrayCodec, GeminiCodec
from .openai_chat import OpenAIChatCodec
from .openai_responses import OpenAIResponsesCodec

CODECS: dict[str, Codec] = {
    codec.protocol: codec
    for codec in (OpenAIChatCodec(), OpenAIResponsesCodec(), AnthropicCodec(), GeminiCodec(), GeminiArrayCodec())
}


def get_codec(protocol: str) -> Codec:
    return CODECS[protocol]


__all__ = ["CODECS", "Codec", "get_codec"]
