"""Google Gemini backends (``type: gemini``): the Generative Language API.

``base_url`` defaults to https://generativelanguage.googleapis.com/v1beta; the key goes in
``x-goog-api-key``. Streams use ``streamGenerateContent?alt=sse``. Token counts come from
``countTokens``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from llmproxy import hookimpl
from llmproxy.codecs import get_codec
from llmproxy.codecs.base import dumps, loads
from llmproxy.codecs.gemini import error_details, gemini_embeddings_to_openai, openai_embeddings_to_gemini
from llmproxy.errors import ProxyError
from llmproxy.flow import Flow
from llmproxy.providers import Capabilities, HTTPProvider, UpstreamReply


class GeminiProvider(HTTPProvider):
    protocol = "gemini"
    env_key = "GEMINI_API_KEY"
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"
    capabilities = Capabilities(reasoning=True, max_context=1_000_000)

    def headers(self, key: str | None, flow: Flow) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key:
            headers["x-goog-api-key"] = key
        headers.update(self.settings.headers)
        return headers

    def models_url(self) -> str:
        return self.base_url + "/models?pageSize=1000"

    def models_headers(self, key: str | None) -> dict[str, str]:
        return self.headers(key, None)  # type: ignore[arg-type] # these headers never read the flow

    def url(self, target: Any, stream: bool) -> str:
        model = target.model if target.model.startswith(("models/", "tunedModels/")) else f"models/{target.model}"
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{self.base_url}/{model}:{method}"

    def upstream_error(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> ProxyError:
        """Gemini says how long to wait in the body (``RetryInfo``), not in a Retry-After
        header: it becomes one, for every client, the breaker, the key's rest and the backoff;
        the details go on, for Gemini clients."""
        error = super().upstream_error(status, payload, headers)
        details, delay = error_details(payload)
        if details:
            # Passed on as they came, but never with this backend's key in them (a
            # LocalizedMessage repeats the message, which may quote it).
            error.details = loads(self.redact(dumps(details).decode()))
        if delay is not None and "Retry-After" not in error.headers:
            error.headers["Retry-After"] = str(math.ceil(delay))
        return error

    def body(self, flow: Flow, target: Any, stream: bool, passthrough: bool) -> dict[str, Any]:
        if flow.frontend in ("gemini", "gemini_array") and not flow.request_decoded:
            body = dict(flow.raw_request)
        else:
            self.check_one_choice(flow)
            body = get_codec(self.protocol).encode_request(self.wire_request(flow), target.model)
        body.pop("model", None)  # the model and the stream flag travel in the URL
        body.pop("stream", None)
        return body

    async def forward(self, flow: Flow, target: Any, endpoint: str, stream: bool) -> Any:
        """OpenAI-style embeddings, answered by ``batchEmbedContents``."""
        if endpoint != "embeddings" or stream:
            return await super().forward(flow, target, endpoint, stream)
        model = target.model.removeprefix("models/")
        body = openai_embeddings_to_gemini(flow.raw_request, model)
        result = await self.send_json(flow, target, f"{self.base_url}/models/{model}:batchEmbedContents", body)
        return UpstreamReply("openai_embeddings", body=dumps(gemini_embeddings_to_openai(result, target.model)))

    async def count_tokens(self, flow: Flow, target: Any) -> int | None:
        body = self.body(flow, target, False, False)
        model = target.model if target.model.startswith("models/") else f"models/{target.model}"
        request = {"generateContentRequest": {"model": model, **body}}
        result = await self.send_json(flow, target, f"{self.base_url}/{model}:countTokens", request)
        return int(result.get("totalTokens", 0)) if isinstance(result, dict) else None


@hookimpl
def register_providers(register: Callable[[str, type], None]) -> None:
    register("gemini", GeminiProvider)
