"""The endpoints beside chat — embeddings, legacy completions, images — and the dedicated
Anthropic port, over real sockets with the official SDKs."""

from __future__ import annotations

import aiohttp
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_offline
import llmproxy_openai
import openai
import pytest

from llmproxy import hookimpl
from llmproxy.testing import start_proxy

BUILTINS = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini), ("offline", llmproxy_offline)]


class FlowLog:
    """Records every finished flow, to prove these endpoints are seen like chat."""

    def __init__(self) -> None:
        self.flows: list = []

    @hookimpl
    def flow_done(self, flow) -> None:
        self.flows.append((flow.frontend, flow.model, flow.status, flow.target.label if flow.target else None))


async def _proxy(backends: dict, default: str, monkeypatch: pytest.MonkeyPatch, log: FlowLog | None = None):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-endpoints")
    config = {"backends": backends, "default_backend": default, "models": {"embedder": {"targets": [f"{default}:text-embedding-3-small"]}}}
    plugins = BUILTINS + ([("flowlog", log)] if log else [])
    return await start_proxy(config, plugins=plugins, entry_points=False)


async def test_embeddings_pass_through_to_an_openai_backend(fake_openai, monkeypatch):
    log = FlowLog()
    proxy = await _proxy({"up": {"type": "openai", "base_url": fake_openai.base_url, "api_keys": ["${TEST_UPSTREAM_KEY}"]}}, "up", monkeypatch, log)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        result = await client.embeddings.create(model="embedder", input=["hello", "hi"])
        assert [d.embedding[0] for d in result.data] == [5.0, 2.0]
        sent = fake_openai.last
        assert sent.path == "/v1/embeddings"
        assert sent.json["model"] == "text-embedding-3-small"  # the alias was resolved
        assert sent.key == "sk-upstream-endpoints"
        assert log.flows[-1] == ("openai_embeddings", "embedder", 200, "up:text-embedding-3-small")
    finally:
        await proxy.stop()


async def test_legacy_completions_stream_and_not(fake_openai, monkeypatch):
    proxy = await _proxy({"up": {"type": "openai", "base_url": fake_openai.base_url}}, "up", monkeypatch)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        plain = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say")
        assert plain.choices[0].text == "completed text"
        pieces = []
        async for chunk in await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say", stream=True):
            pieces.append(chunk.choices[0].text)
        assert "".join(pieces) == "completed text"
    finally:
        await proxy.stop()


async def test_images_pass_through(fake_openai, monkeypatch):
    proxy = await _proxy({"up": {"type": "openai", "base_url": fake_openai.base_url}}, "up", monkeypatch)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        result = await client.images.generate(model="gpt-image-1", prompt="a cat")
        assert result.data[0].b64_json == "aGVsbG8="
    finally:
        await proxy.stop()


async def test_embeddings_translate_to_gemini(fake_gemini, monkeypatch):
    proxy = await _proxy({"g": {"type": "gemini", "base_url": fake_gemini.base_url, "api_keys": ["${TEST_UPSTREAM_KEY}"]}}, "g", monkeypatch)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        result = await client.embeddings.create(model="text-embedding-004", input="hello")
        assert len(result.data) == 1 and result.data[0].embedding
        sent = fake_gemini.last
        assert sent.path.endswith("/models/text-embedding-004:batchEmbedContents")
        assert sent.json["requests"][0]["content"]["parts"][0]["text"] == "hello"
    finally:
        await proxy.stop()


async def test_a_backend_without_the_endpoint_says_so(fake_anthropic, monkeypatch):
    log = FlowLog()
    proxy = await _proxy({"a": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${TEST_UPSTREAM_KEY}"]}}, "a", monkeypatch, log)
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as raised:
            await client.embeddings.create(model="claude-x", input="hello")
        assert "does not serve /v1/embeddings" in str(raised.value)
        assert "'a'" in str(raised.value)
        assert fake_anthropic.requests == []
        assert log.flows[-1][2] == 400
    finally:
        await proxy.stop()


async def test_endpoint_errors_are_openai_errors(fake_openai, monkeypatch):
    proxy = await _proxy({"up": {"type": "openai", "base_url": fake_openai.base_url}}, "up", monkeypatch)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + "/v1/embeddings", json={"input": "x"}) as response:
                assert response.status == 400
                body = await response.json()
                assert body["error"]["param"] == "model"
        fake_openai.script(status=429, message="slow down", retry_after="3")
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as raised:
            await client.embeddings.create(model="m", input="hello")
        assert raised.value.response.headers.get("retry-after") == "3"
    finally:
        await proxy.stop()


async def test_a_plain_text_error_from_a_backend_names_the_backend(monkeypatch):
    """A local server without /v1/embeddings answers aiohttp's own "404: Not Found" text."""
    from aiohttp import web

    from llmproxy.testing import start_app

    bare = web.Application()  # no routes: every path is a plain-text 404
    url, runner = await start_app(bare)
    proxy = await _proxy({"local": {"type": "openai", "base_url": url + "/v1"}}, "local", monkeypatch)
    try:
        async with aiohttp.ClientSession() as session, session.post(proxy.url + "/v1/embeddings", json={"model": "e", "input": "x"}) as response:
            body = await response.json()
        assert response.status == 404
        assert body["error"]["message"] == "backend 'local' answered HTTP 404: 404: Not Found"
    finally:
        await proxy.stop()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("headers", "shape"),
    [({}, "openai"), ({"anthropic-version": "2023-06-01", "x-api-key": "k"}, "anthropic"), ({"x-goog-api-key": "k"}, "gemini")],
)
async def test_an_unknown_path_is_a_404_the_client_can_read(headers, shape, monkeypatch):
    proxy = await _proxy({"off": {"type": "offline"}}, "off", monkeypatch)
    try:
        async with aiohttp.ClientSession() as session, session.post(proxy.url + "/v1/messagez", json={}, headers=headers) as response:
            assert response.status == 404
            body = await response.json()
        if shape == "anthropic":
            assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
        elif shape == "gemini":
            assert body["error"]["code"] == 404 and body["error"]["status"] == "NOT_FOUND"
        else:
            assert body["error"]["type"] and "no such endpoint" in body["error"]["message"]
    finally:
        await proxy.stop()


async def test_dedicated_anthropic_port_serves_the_same_routes(tmp_path):
    """proxy.anthropic_port: a second listening port (real process, real sockets)."""
    import socket

    from proxy_process import ProxyProcess  # tests/proxy_process.py

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(f"proxy: {{port: 0, anthropic_port: {port}}}\nbackends: {{offline: {{type: offline}}}}\ndefault_backend: offline\n")
    with ProxyProcess("--config", str(config)) as proxy:
        url = await proxy.ready()
        async with aiohttp.ClientSession() as session:
            body = {"model": "claude-x", "max_tokens": 50, "messages": [{"role": "user", "content": "ping"}]}
            async with session.post(f"http://127.0.0.1:{port}/v1/messages", json=body) as response:
                assert response.status == 200
                answer = await response.json()
                assert answer["content"][0]["text"] == "You said: ping"
            async with session.post(f"{url}/anthropic/v1/messages", json=body) as response:
                assert (await response.json())["type"] == "message"


@pytest.mark.parametrize("backend", ["gemini", "openai"])
async def test_gemini_clients_embed_through_any_embedding_backend(fake_gemini, fake_openai, monkeypatch, backend):
    """google-genai's embed_content, served by a Gemini backend or an OpenAI-compatible one."""
    from google import genai
    from google.genai import types

    base = fake_gemini.base_url if backend == "gemini" else fake_openai.base_url
    proxy = await _proxy({"up": {"type": backend, "base_url": base, "api_keys": ["${TEST_UPSTREAM_KEY}"]}}, "up", monkeypatch)
    try:
        client = genai.Client(api_key="x", http_options=types.HttpOptions(base_url=proxy.url, api_version="v1beta"))
        result = await client.aio.models.embed_content(model="text-embedding-004", contents=["hello", "hi"])
        assert len(result.embeddings) == 2 and all(e.values for e in result.embeddings)
        if backend == "openai":
            assert fake_openai.last.json["input"] == ["hello", "hi"]
            assert [e.values[0] for e in result.embeddings] == [5.0, 2.0]
        else:
            assert fake_gemini.last.path.endswith(":batchEmbedContents")
    finally:
        await proxy.stop()


async def test_a_batch_of_mixed_embedding_sizes_is_refused_not_given_the_first_size(fake_openai, monkeypatch):
    """One OpenAI embeddings call has one ``dimensions``: a Gemini batch asking for two
    sizes cannot be one call, and each request must get the size it asked for."""
    proxy = await _proxy({"up": {"type": "openai", "base_url": fake_openai.base_url}}, "up", monkeypatch)
    entry = {"model": "models/text-embedding-3-small", "content": {"parts": [{"text": "hello"}]}}
    try:
        async with aiohttp.ClientSession() as http:
            same = {"requests": [{**entry, "outputDimensionality": 64}, {**entry, "outputDimensionality": 64}]}
            async with http.post(proxy.url + "/v1beta/models/text-embedding-3-small:batchEmbedContents", json=same) as response:
                assert response.status == 200 and fake_openai.last.json["dimensions"] == 64
            mixed = {"requests": [{**entry, "outputDimensionality": 64}, entry]}
            calls = len(fake_openai.requests)
            async with http.post(proxy.url + "/v1beta/models/text-embedding-3-small:batchEmbedContents", json=mixed) as response:
                error = await response.json()
                assert response.status == 400 and "outputDimensionality" in error["error"]["message"]
            assert len(fake_openai.requests) == calls
    finally:
        await proxy.stop()


async def test_count_tokens_runs_the_request_chain(fake_anthropic, monkeypatch):
    """A plugin that blocks a prompt blocks it from being counted too (fail closed)."""
    import anthropic

    from llmproxy import ProxyError

    class Guard:
        @hookimpl
        def request(self, flow):
            if "password" in flow.request.last_user_message.text:
                raise ProxyError(403, "no passwords")

    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-endpoints")
    config = {"backends": {"a": {"type": "anthropic", "base_url": fake_anthropic.base_url, "api_keys": ["${TEST_UPSTREAM_KEY}"]}}, "default_backend": "a"}
    proxy = await start_proxy(config, plugins=BUILTINS + [("guard", Guard())], entry_points=False)
    try:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        counted = await client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "hello"}])
        assert counted.input_tokens > 0
        assert fake_anthropic.last.path == "/v1/messages/count_tokens"
        seen = len(fake_anthropic.requests)
        with pytest.raises(anthropic.PermissionDeniedError):
            await client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "my password is x"}])
        assert len(fake_anthropic.requests) == seen  # never reached the backend
    finally:
        await proxy.stop()


async def test_models_retrieve_in_each_sdk(fake_openai, monkeypatch):
    """openai models.retrieve, anthropic models.retrieve and genai models.get find a model
    the proxy serves, and a 404 in the caller's protocol for one it does not."""
    import anthropic
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types

    config = {"backends": {"up": {"type": "openai", "base_url": fake_openai.base_url, "models": ["gpt-x"]}}, "default_backend": "up"}
    proxy = await start_proxy(config, plugins=BUILTINS, entry_points=False)
    try:
        oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        assert (await oai.models.retrieve("gpt-x")).id == "gpt-x"
        with pytest.raises(openai.NotFoundError):
            await oai.models.retrieve("nope")
        ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        assert (await ant.models.retrieve("up:gpt-x")).id == "up:gpt-x"
        gem = genai.Client(api_key="x", http_options=types.HttpOptions(base_url=proxy.url, api_version="v1beta"))
        assert (await gem.aio.models.get(model="gpt-x")).name == "models/gpt-x"
        with pytest.raises(genai_errors.ClientError):
            await gem.aio.models.get(model="nope")
    finally:
        await proxy.stop()
