"""Fake upstreams whose model-list endpoint can be watched and broken, for discovery,
``llmproxy doctor`` and ``llmproxy providers check`` tests.

``ListingOpenAI``, ``ListingAnthropic`` and ``ListingGemini`` are the protocol fakes with the
model-list requests they received kept in :attr:`list_headers`; set :attr:`list_status` to
answer them with that HTTP error (401: the protocol's "invalid key"), or :attr:`list_hang` to
never answer. Every other endpoint behaves as in the plain fake.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from .anthropic_upstream import FakeAnthropic
from .common import forever
from .gemini_upstream import FakeGemini
from .openai_upstream import FakeOpenAI


class Listing:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.list_headers: list[CIMultiDict[str]] = []
        self.list_status: int | None = None
        self.list_hang = False

    async def _models(self, request: web.Request) -> web.Response:
        self.list_headers.append(CIMultiDict(request.headers))
        if self.list_hang:
            await forever()
        if self.list_status is not None:
            body = self.error_body(self.list_status, "Incorrect API key provided", None, None, None)  # type: ignore[attr-defined]
            return web.json_response(body, status=self.list_status)
        return await super()._models(request)  # type: ignore[misc]


class ListingOpenAI(Listing, FakeOpenAI):
    pass


class ListingAnthropic(Listing, FakeAnthropic):
    pass


class ListingGemini(Listing, FakeGemini):
    pass
