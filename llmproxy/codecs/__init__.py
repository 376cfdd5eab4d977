"""Wire-protocol codecs, one module per protocol, shared by front-ends and providers."""

from __future__ import annotations

from .base import Codec
from .openai_chat import OpenAIChatCodec

CODECS: dict[str, Codec] = {
    OpenAIChatCodec.protocol: OpenAIChatCodec(),
}


def get_codec(protocol: str) -> Codec:
    return CODECS[protocol]


__all__ = ["CODECS", "Codec", "get_codec"]
