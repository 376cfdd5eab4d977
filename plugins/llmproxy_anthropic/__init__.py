"""Anthropic Messages backends (``type: anthropic``).

Sends ``x-api-key`` and ``anthropic-version``. When the client itself speaks Anthropic, its
``anthropic-version`` and ``anthropic-beta`` headers are forwarded (Claude Code's betas
matter: context-1m, interleaved thinking …); other clients get the stable version and no
betas. Token counts come from the backend's ``/v1/messages/count_tokens``.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field

from llmproxy import hookimpl
from llmproxy.codecs import get_codec
from llmproxy.codecs.anthropic import unsigned_thinking_in_last_turn
from llmproxy.config import BackendConfig
from llmproxy.flow import Flow
from llmproxy.providers import Capabilities, HTTPProvider

ANTHROPIC_VERSION = "2023-06-01"


class AnthropicSettings(BackendConfig):
    version: str = Field(ANTHROPIC_VERSION, description="anthropic-version sent when the client sends none.")
    betas: list[str] = Field(default_factory=list, description="anthropic-beta values always sent.")
    forward_client_betas: bool = Field(True, description="Forward an Anthropic client's own anthropic-beta header.")


class AnthropicProvider(HTTPProvider):
    protocol = "anthropic"
    Settings = AnthropicSettings
    env_key = "ANTHROPIC_API_KEY"
    default_base_url = "https://api.anthropic.com"
    path = "/v1/messages"
    capabilities = Capabilities(reasoning=True, max_context=200_000)

    def headers(self, key: str | None, flow: Flow) -> dict[str, str]:
        settings: Any = self.settings
        headers = {"content-type": "application/json", "anthropic-version": settings.version}
        if key:
            headers["x-api-key"] = key
        betas = list(settings.betas)
        if flow.frontend == "anthropic":
            client = flow.client.headers
            version = client.get("anthropic-version") if client else None
            # anthropic 2.x SDKs send a future-dated version the API may not know yet;
            # only the stable one is safe to pass on.
            if version == ANTHROPIC_VERSION:
                headers["anthropic-version"] = version
            if settings.forward_client_betas and client and client.get("anthropic-beta"):
                betas.extend(b.strip() for b in client["anthropic-beta"].split(",") if b.strip() and b.strip() not in betas)
        if betas:
            headers["anthropic-beta"] = ",".join(betas)
        headers.update(settings.headers)
        return headers

    def body(self, flow: Flow, target: Any, stream: bool, passthrough: bool) -> dict[str, Any]:
        # An Anthropic client's body goes out as it came, unless its last assistant turn holds
        # thinking no Anthropic model signed (another backend's, which llmproxy handed the
        # client without the foreign signature: the API refuses it). Then the body is encoded
        # from the canonical request, which leaves such thinking out, and what enabled
        # thinking refuses without it (see the codec). Earlier turns' thinking the API ignores.
        if flow.frontend == self.protocol and not flow.request_decoded and unsigned_thinking_in_last_turn(flow.raw_request.get("messages")):
            flow.request  # noqa: B018 - decodes it
        return super().body(flow, target, stream, passthrough)

    def models_url(self) -> str:
        return self.base_url + "/v1/models?limit=1000"

    def models_headers(self, key: str | None) -> dict[str, str]:
        settings: Any = self.settings
        headers = {"anthropic-version": settings.version}
        if key:
            headers["x-api-key"] = key
        headers.update(settings.headers)
        return headers

    async def count_tokens(self, flow: Flow, target: Any) -> int | None:
        body = get_codec(self.protocol).encode_request(self.wire_request(flow), target.model)
        for field in ("max_tokens", "stream", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "service_tier"):
            body.pop(field, None)
        result = await self.send_json(flow, target, self.base_url + "/v1/messages/count_tokens", body)
        return int(result.get("input_tokens", 0)) if isinstance(result, dict) else None


@hookimpl
def register_providers(register: Callable[[str, type], None]) -> None:
    register("anthropic", AnthropicProvider)
