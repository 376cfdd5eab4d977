"""Shared fixtures: fake upstreams on real sockets (see tests/fakes/)."""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp
import pytest

from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A started fake OpenAI Chat Completions upstream; script it with ``fake_openai.script(...)``."""
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    """A started fake Anthropic Messages upstream (``base_url`` without ``/v1``)."""
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def fake_responses() -> AsyncIterator[FakeResponses]:
    """A started fake OpenAI Responses upstream (``base_url`` ends in ``/v1``)."""
    async with FakeResponses() as fake:
        yield fake


@pytest.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    """A started fake Gemini upstream (``base_url`` ends in ``/v1beta``)."""
    async with FakeGemini() as fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client whose every request is bounded (10 s): a hang fails the test, never the run."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        yield session
