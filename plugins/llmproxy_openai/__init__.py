"""OpenAI Chat Completions backends: OpenAI itself and every OpenAI-compatible server.

``type: openai`` talks to ``base_url`` + ``/chat/completions`` (default
https://api.openai.com/v1). ``type: openrouter`` is the same with OpenRouter's URL. Keys are
sent as ``Authorization: Bearer``; ``organization`` and ``project`` add OpenAI's headers.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field

from llmproxy import hookimpl
from llmproxy.config import BackendConfig
from llmproxy.providers import HTTPProvider


class OpenAISettings(BackendConfig):
    organization: str | None = Field(None, description="Sent as OpenAI-Organization.")
    project: str | None = Field(None, description="Sent as OpenAI-Project.")


class OpenAIProvider(HTTPProvider):
    protocol = "openai_chat"
    Settings = OpenAISettings
    default_base_url = "https://api.openai.com/v1"
    path = "/chat/completions"

    def headers(self, key: str | None) -> dict[str, str]:
        headers = super().headers(key)
        settings: Any = self.settings
        if settings.organization:
            headers["OpenAI-Organization"] = settings.organization
        if settings.project:
            headers["OpenAI-Project"] = settings.project
        return headers


class OpenRouterProvider(OpenAIProvider):
    default_base_url = "https://openrouter.ai/api/v1"


@hookimpl
def register_providers(register: Callable[[str, type], None]) -> None:
    register("openai", OpenAIProvider)
    register("openrouter", OpenRouterProvider)
