"""What an OpenAI-protocol backend receives when the client speaks another protocol: OpenAI's
own API gets ``max_completion_tokens`` (its reasoning models refuse ``max_tokens``), the
OpenAI-compatible presets keep ``max_tokens``, and parameters Chat Completions does not have
(Gemini's ``topK``) are not sent."""

from __future__ import annotations

import anthropic
import llmproxy_anthropic
import llmproxy_openai
import pytest

from llmproxy.testing import start_proxy


@pytest.mark.parametrize(("backend_type", "field"), [("openai", "max_completion_tokens"), ("groq", "max_tokens"), ("vllm", "max_tokens")])
async def test_max_tokens_field_per_backend_type(fake_openai, backend_type, field):
    config = {"backends": {"up": {"type": backend_type, "base_url": fake_openai.base_url}}, "default_backend": "up"}
    proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic)], entry_points=False)
    try:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        answer = await client.messages.create(model="m", max_tokens=321, messages=[{"role": "user", "content": "hi"}])
        assert answer.content[0].text
        sent = fake_openai.last.json
        assert sent[field] == 321
        other = {"max_tokens", "max_completion_tokens"} - {field}
        assert not other & sent.keys()
    finally:
        await proxy.stop()


async def test_an_openai_client_keeps_its_own_spelling(fake_openai):
    """Same protocol: the client's body passes as it is, whichever field it used."""
    import openai

    config = {"backends": {"up": {"type": "openai", "base_url": fake_openai.base_url}}, "default_backend": "up"}
    proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai)], entry_points=False)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        await client.chat.completions.create(model="m", max_tokens=55, messages=[{"role": "user", "content": "hi"}])
        assert fake_openai.last.json["max_tokens"] == 55
    finally:
        await proxy.stop()


async def test_a_passed_through_stream_carries_no_usage_chunk_the_client_did_not_ask_for(fake_openai):
    """A plugin that reads the request makes llmproxy re-encode it; the stream still goes to
    the client as the backend sends it, so it must not ask for more than the client did."""
    import openai

    from llmproxy import hookimpl

    class Reader:
        @hookimpl
        def request(self, flow):
            assert flow.request.messages

    config = {"backends": {"up": {"type": "openai", "base_url": fake_openai.base_url}}, "default_backend": "up"}
    proxy = await start_proxy(config, plugins=[("openai", llmproxy_openai), ("reader", Reader())], entry_points=False)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "hi"}])]
        assert all(c.choices for c in chunks)  # no usage-only chunk
        assert "stream_options" not in fake_openai.last.json
        chunks = [c async for c in await client.chat.completions.create(model="m", stream=True, stream_options={"include_usage": True}, messages=[{"role": "user", "content": "hi"}])]
        assert chunks[-1].usage is not None and not chunks[-1].choices
    finally:
        await proxy.stop()
