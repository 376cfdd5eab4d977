"""OpenAI-protocol backends: OpenAI itself (Chat Completions and Responses), Azure OpenAI,
and every OpenAI-compatible service or local server, each a preset with its defaults.

| type | protocol | default base_url | key |
| --- | --- | --- | --- |
| openai | chat | https://api.openai.com/v1 | Bearer |
| openai-responses | responses | https://api.openai.com/v1 | Bearer |
| azure-openai | chat | https://{resource}.openai.azure.com | api-key header, deployments, api-version |
| openrouter, groq, together, mistral, deepseek, xai, zai, zai-coding | chat | the vendor's | Bearer |
| ollama, lmstudio, vllm, llamacpp | chat | the usual local port | none |
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field

from llmproxy import hookimpl
from llmproxy.config import BackendConfig
from llmproxy.flow import Flow
from llmproxy.providers import Capabilities, HTTPProvider


class OpenAISettings(BackendConfig):
    organization: str | None = Field(None, description="Sent as OpenAI-Organization.")
    project: str | None = Field(None, description="Sent as OpenAI-Project.")


class OpenAIProvider(HTTPProvider):
    protocol = "openai_chat"
    Settings = OpenAISettings
    env_key = "OPENAI_API_KEY"
    default_base_url = "https://api.openai.com/v1"
    path = "/chat/completions"
    capabilities = Capabilities(reasoning=True, max_context=400_000)
    endpoints = frozenset(("embeddings", "completions", "images/generations"))

    # OpenAI's own API refuses max_tokens for reasoning models (gpt-5, o-series) and wants
    # max_completion_tokens; compatible servers mostly know only max_tokens.
    max_tokens_field = "max_completion_tokens"

    def body(self, flow: Flow, target: Any, stream: bool, passthrough: bool) -> dict[str, Any]:
        body = super().body(flow, target, stream, passthrough)
        # A Chat client's own max_tokens stays as it sent it (it knows its model); a limit it
        # did not send (another protocol's, a plugin's !/set) goes in this backend's field.
        if "max_tokens" in body and self.max_tokens_field != "max_tokens" and (flow.frontend != self.protocol or "max_tokens" not in flow.raw_request):
            body[self.max_tokens_field] = body.pop("max_tokens")
        if passthrough and flow.frontend == self.protocol and flow.request_decoded:
            # The re-encoded request asks for the usage chunk (llmproxy wants the counts), but
            # these bytes go to the client as they are: only what it asked for.
            if "stream_options" in flow.raw_request:
                body["stream_options"] = flow.raw_request["stream_options"]
            else:
                body.pop("stream_options", None)
        return body

    def headers(self, key: str | None, flow: Flow) -> dict[str, str]:
        headers = super().headers(key, flow)
        settings: Any = self.settings
        if settings.organization:
            headers["OpenAI-Organization"] = settings.organization
        if settings.project:
            headers["OpenAI-Project"] = settings.project
        return headers

    def models_headers(self, key: str | None) -> dict[str, str]:
        return self.headers(key, None)  # type: ignore[arg-type] # these headers never read the flow


class OpenAIResponsesProvider(OpenAIProvider):
    protocol = "openai_responses"
    env_key = None  # OPENAI_API_KEY adds the chat backend; this one is configured by hand
    path = "/responses"


class AzureSettings(OpenAISettings):
    api_version: str = Field("2024-10-21", description="Azure's api-version query parameter.")
    deployments: dict[str, str] = Field(default_factory=dict, description="Model name → deployment name (default: the model name).")


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI: ``base_url`` is the resource endpoint, the model picks a deployment."""

    Settings = AzureSettings
    env_key = None  # needs a resource URL, so never added from a key alone
    endpoints = frozenset()  # Azure's other endpoints sit under per-deployment paths too

    def headers(self, key: str | None, flow: Flow) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key:
            headers["api-key"] = key
        headers.update(self.settings.headers)
        return headers

    def url(self, target: Any, stream: bool) -> str:
        settings: Any = self.settings
        deployment = settings.deployments.get(target.model, target.model)
        return f"{self.base_url}/openai/deployments/{deployment}/chat/completions?api-version={settings.api_version}"

    def models_url(self) -> str:
        settings: Any = self.settings
        return f"{self.base_url}/openai/models?api-version={settings.api_version}"


def preset(name: str, base_url: str, capabilities: Capabilities = Capabilities(), env_key: str | None = None) -> type[OpenAIProvider]:
    """An OpenAI-compatible provider that differs only in its defaults."""
    attributes = {"default_base_url": base_url, "capabilities": capabilities, "max_tokens_field": "max_tokens", "env_key": env_key}
    return type(f"{name.title().replace('-', '')}Provider", (OpenAIProvider,), attributes)


PRESETS: dict[str, type[OpenAIProvider]] = {
    "openrouter": preset("openrouter", "https://openrouter.ai/api/v1", Capabilities(reasoning=True), "OPENROUTER_API_KEY"),
    "groq": preset("groq", "https://api.groq.com/openai/v1", Capabilities(vision=False, max_context=131_072), "GROQ_API_KEY"),
    "together": preset("together", "https://api.together.xyz/v1", env_key="TOGETHER_API_KEY"),
    "mistral": preset("mistral", "https://api.mistral.ai/v1", Capabilities(max_context=131_072), "MISTRAL_API_KEY"),
    "deepseek": preset("deepseek", "https://api.deepseek.com/v1", Capabilities(vision=False, reasoning=True, max_context=131_072), "DEEPSEEK_API_KEY"),
    "xai": preset("xai", "https://api.x.ai/v1", Capabilities(reasoning=True, max_context=256_000), "XAI_API_KEY"),
    "zai": preset("zai", "https://api.z.ai/api/paas/v4", Capabilities(reasoning=True, max_context=200_000), "ZAI_API_KEY"),
    "zai-coding": preset("zai-coding", "https://api.z.ai/api/coding/paas/v4", Capabilities(reasoning=True, max_context=200_000)),
    "ollama": preset("ollama", "http://127.0.0.1:11434/v1", Capabilities(vision=False, json_schema=False)),
    "lmstudio": preset("lmstudio", "http://127.0.0.1:1234/v1", Capabilities(vision=False)),
    "vllm": preset("vllm", "http://127.0.0.1:8000/v1", Capabilities(vision=False)),
    "llamacpp": preset("llamacpp", "http://127.0.0.1:8080/v1", Capabilities(vision=False, json_schema=False)),
}


@hookimpl
def register_providers(register: Callable[[str, type], None]) -> None:
    register("openai", OpenAIProvider)
    register("openai-responses", OpenAIResponsesProvider)
    register("azure-openai", AzureOpenAIProvider)
    for name, cls in PRESETS.items():
        register(name, cls)
