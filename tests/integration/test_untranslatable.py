"""Content one protocol has and another lacks: translated when a faithful form exists, else a
400 in the client's protocol — never a request that quietly arrives without it.

An Anthropic client (aiohttp, real sockets) → llmproxy → a fake OpenAI Chat upstream.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import aiohttp
import llmproxy_openai
import pytest
from fakes.openai_upstream import FakeOpenAI

from llmproxy.testing import RunningProxy, start_proxy

PDF = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}


@pytest.fixture
async def proxy(fake_openai: FakeOpenAI) -> AsyncIterator[RunningProxy]:
    config = {"proxy": {"drain_timeout": 0}, "backends": {"up": {"type": "openai", "base_url": fake_openai.base_url}}, "default_backend": "up"}
    running = await start_proxy(config, plugins=[("openai", llmproxy_openai)], entry_points=False)
    yield running
    await running.stop()


async def send(proxy: RunningProxy, content: list[dict[str, Any]], stream: bool = False) -> tuple[int, Any]:
    body = {"model": "gpt-4o-mini", "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": content}]}
    async with aiohttp.ClientSession() as http, http.post(proxy.url + "/v1/messages", json=body) as response:
        return response.status, await response.json() if response.content_type == "application/json" else await response.text()


async def test_a_plain_text_document_arrives_as_titled_text(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    document = {"type": "document", "title": "notes.txt", "source": {"type": "text", "media_type": "text/plain", "data": "buy milk"}}
    status, _ = await send(proxy, [{"type": "text", "text": "summarise:"}, document])
    assert status == 200
    content = fake_openai.last.json["messages"][-1]["content"]  # text parts only: joined, or as parts
    texts = content if isinstance(content, str) else "\n".join(part["text"] for part in content)
    assert "summarise:" in texts and "notes.txt:\nbuy milk" in texts


@pytest.mark.parametrize("stream", [False, True])
async def test_a_pdf_for_a_chat_backend_is_a_400_naming_it(proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool) -> None:
    status, body = await send(proxy, [{"type": "text", "text": "see:"}, {"type": "document", "source": PDF}], stream)
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "'document'" in body["error"]["message"] and "openai_chat" in body["error"]["message"]
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    "block",
    [{"type": "text"}, {"type": "text", "text": None}, {"type": "image", "source": {"type": "base64", "media_type": "image/png"}},
     {"type": "image", "source": {"type": "url"}}],
    ids=["text-missing", "text-null", "image-without-data", "image-without-url"],
)
async def test_a_block_missing_its_content_is_a_400(proxy: RunningProxy, fake_openai: FakeOpenAI, block: dict[str, Any]) -> None:
    status, body = await send(proxy, [block])
    assert status == 400 and body["type"] == "error" and "must be a string" in body["error"]["message"]
    assert fake_openai.requests == []
