"""The ``redaction`` plugin and the core's ``llmproxy.redact``: every key format is masked and
ordinary text and code are not; literal secrets, JSON text, headers and URLs; settings
validation; then end to end through a real llmproxy with the official SDKs against fake
upstreams — what reaches the backend in each ``outbound`` mode (streamed and not, and across
protocols), and that logs never show a key, tracebacks included.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, AsyncIterator

import aiohttp
import anthropic
import llmproxy_anthropic
import llmproxy_openai
import llmproxy_redaction
import openai
import pytest
from pydantic import ValidationError

from fakes.anthropic_upstream import FakeAnthropic
from fakes.openai_upstream import FakeOpenAI
from llmproxy import hookimpl
from llmproxy.redact import DEFAULT_PATTERNS, LABEL, SECRET_LABEL, Redactor, mask_literals, pattern, redact
from llmproxy.testing import RunningProxy, start_proxy
from llmproxy_redaction import LOG_FILTER, RedactionSettings

BOUND = 10.0
UPSTREAM_KEY = "sk-upstream-redaction-7e41c0b9d2"
ANTHROPIC_KEY = "ant-upstream-redaction-5d9e"
CLIENT_KEY = "client-key-redaction-31f8"
CONFIGURED = "Project-Nightingale-42"  # a configured literal secret (not a key format)
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])

# One realistic, fake example of every format DEFAULT_PATTERNS knows.
SAMPLES = {
    "openai_key": "sk-proj-Ab3dEfGh1jKlMnOpQrStUvWxYz0123456789_-abcDEF",
    "anthropic_key": "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Jh1Gf0EdCbA-x_yz0",
    "google_api_key": "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    "github_token": "ghp_R2d2C3p0Bb8Ll4Ee1Kk9Yy7Uu5Ii3Oo6Pp0Qq",
    "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE",
    "slack_token": "xoxb-2048121212-4096343434-AbCdEfGhIjKlMnOp",
    "huggingface_token": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
    "groq_key": "gsk_" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv1Wx2Yz3Ab4Cd5",
    "stripe_key": "sk_live_51HqLyjWDarjtT1zdp7dcXyZ",
    "xai_key": "xai-" + "Q1w2E3r4T5y6U7i8O9p0A1s2D3f4G5h6J7k8L9z0X1c2V3b4",
    "jwt": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
}
WRAPPED = {  # formats recognised by what surrounds them; (text, what must disappear)
    "aws_secret_access_key": ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    "bearer_token": ('curl -H "Authorization: Bearer 4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"', "4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"),
    "private_key": (
        "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM\nKfg0/8nPzGhQ1c2e3F4g5H6i7J8k9L0=\n-----END RSA PRIVATE KEY-----\nthanks",
        "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM",
    ),
    "github_token:fine-grained": ("GITHUB_TOKEN=github_pat_11ABCDEFG0aBcDeFgHiJkL_mNoPqRsTuVwXyZ0123456789", "github_pat_11ABCDEFG0aBcDeFgHiJkL"),
}

# Ordinary prose and code that contains the anchors but no credential.
CLEAN = [
    "The task-management-dashboard-component-2024 renders the disk-usage-summary-panel-v2.",
    "import sklearn  # scikit-learn; pip install scikit-learn==1.5.0",
    "Send the token as `Authorization: Bearer <token>` or `Bearer ${OPENAI_API_KEY}` or Bearer YOUR_API_KEY_HERE.",
    "def test_login_with_bearer_authentication_scheme(): assert check_test_live_mode() is None",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8 (HEAD -> main); uuid 123e4567-e89b-12d3-a456-426614174000",
    "AKIA is the prefix of AWS access keys; sk- is OpenAI's; eyJ starts a JWT; xox a Slack token; ghp_ GitHub.",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "background: url(data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==)",
    "const risk_score = compute(ask_user_for_confirmation_step_2, desk_lamp_brightness_level);",
    "SELECT * FROM users WHERE email = 'ada@example.com' AND id > 4096 -- hf_model, gsk_x",
]


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RED_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("RED_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("RED_CLIENT_KEY", CLIENT_KEY)
    monkeypatch.setenv("RED_EXTRA_SECRET", "extra-secret-from-env-99")


# -- the patterns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_key_format_is_masked_with_its_name(name: str) -> None:
    key = SAMPLES[name]
    text = f"here it is: {key} — keep it safe"
    masked = redact(text)
    assert key not in masked
    assert masked == f"here it is: [REDACTED:{name}] — keep it safe"


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_formats_recognised_by_their_surroundings(name: str) -> None:
    text, secret = WRAPPED[name]
    masked = redact(text)
    assert secret not in masked
    assert f"[REDACTED:{name.split(':')[0]}]" in masked


def test_bearer_keeps_the_scheme_and_pem_keeps_what_follows() -> None:
    assert redact(WRAPPED["bearer_token"][0]) == 'curl -H "Authorization: Bearer [REDACTED:bearer_token]"'
    assert redact(WRAPPED["private_key"][0]) == "key:\n[REDACTED:private_key]\nthanks"
    assert redact(WRAPPED["aws_secret_access_key"][0]) == "aws_secret_access_key = [REDACTED:aws_secret_access_key]"


def test_every_default_pattern_has_a_sample() -> None:
    covered = set(SAMPLES) | {name.split(":")[0] for name in WRAPPED}
    assert {p.name for p in DEFAULT_PATTERNS} == covered


@pytest.mark.parametrize("text", CLEAN)
def test_no_false_positives_on_ordinary_text_and_code(text: str) -> None:
    assert redact(text) == text


def test_keys_inside_words_are_not_split_out_but_keys_in_code_are_found() -> None:
    assert redact("mask-sk-proj-Ab3dEfGh1jKlMnOpQrStUvWx") == "mask-sk-proj-Ab3dEfGh1jKlMnOpQrStUvWx"
    code = f'client = OpenAI(api_key="{SAMPLES["openai_key"]}")'
    assert redact(code) == 'client = OpenAI(api_key="[REDACTED:openai_key]")'


def test_unterminated_private_key_is_masked_to_its_end() -> None:
    text = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\nAAAAMwAAAAtzc2gtZW"
    assert redact(text) == "[REDACTED:private_key]"


# -- literal secrets, JSON, headers, URLs ----------------------------------------------------------


def test_literal_secrets_longest_first_and_short_ones_ignored() -> None:
    r = Redactor(["abcdefgh12", "abcdefgh1234", "short"], patterns=())
    assert r.text("x abcdefgh1234 y abcdefgh12 z short") == f"x {SECRET_LABEL} y {SECRET_LABEL} z short"
    assert r.finds("abcdefgh12 abcdefgh12") == ["secret", "secret"]


def test_masking_json_text_keeps_it_valid_json_even_for_escaped_secrets() -> None:
    secret = 'pa"ss\\wörd/2024'
    document = {"messages": [{"content": f"the password is {secret}"}], "key": SAMPLES["openai_key"],
                "pem": WRAPPED["private_key"][0], "tricky": '-----BEGIN PRIVATE KEY-----\nMIIabc"quoted'}
    r = Redactor([secret])
    for text in (json.dumps(document), json.dumps(document, ensure_ascii=False), json.dumps(document).replace("/", "\\/")):
        masked = r.text(text)
        data = json.loads(masked)  # still valid
        assert secret not in json.dumps(data, ensure_ascii=False)
        assert data["messages"][0]["content"] == f"the password is {SECRET_LABEL}"
        assert data["key"] == "[REDACTED:openai_key]"
        assert data["pem"] == "key:\n[REDACTED:private_key]\nthanks"


def test_keys_at_the_start_of_a_line_inside_json_text_are_found() -> None:
    text = "output:\n" + SAMPLES["openai_key"] + "\n\t" + SAMPLES["aws_access_key_id"] + "\nBearer 4f9a8b7c6d5e4f3a2b1c0d9e8f\n" + SAMPLES["jwt"]
    masked = json.loads(redact(json.dumps({"tool_result": text})))["tool_result"]
    assert masked == "output:\n[REDACTED:openai_key]\n\t[REDACTED:aws_access_key_id]\nBearer [REDACTED:bearer_token]\n[REDACTED:jwt]"
    assert redact(text) == masked  # the same as in the text itself


def test_spans_say_where_to_mask_for_text_that_arrives_in_pieces() -> None:
    r = Redactor(["Project-Nightingale-42", "Nightingale-42-and-more"])
    text = f"a Project-Nightingale-42-and-more b {SAMPLES['google_api_key']} c"
    spans = r.spans(text)
    assert [(text[s:e], label) for s, e, label in spans] == [
        ("Project-Nightingale-42-and-more", SECRET_LABEL),  # overlapping secrets merge into one region
        (SAMPLES["google_api_key"], "[REDACTED:google_api_key]"),
    ]
    assert Redactor().spans("Authorization: Bearer 4f9a8b7c6d5e4f3a2b1c")[0][2] == "[REDACTED:bearer_token]"
    assert r.spans("nothing here") == []


def test_value_copies_only_what_changed() -> None:
    r = Redactor([CONFIGURED])
    untouched = {"a": ["x", {"b": "y"}], "c": 1}
    assert r.value(untouched) is untouched
    body = {"keep": {"n": 1}, "messages": [{"content": f"say {CONFIGURED}"}]}
    masked = r.value(body)
    assert masked["messages"][0]["content"] == f"say {SECRET_LABEL}"
    assert masked["keep"] is body["keep"]
    assert body["messages"][0]["content"] == f"say {CONFIGURED}"  # the original is not changed


def test_headers_and_urls() -> None:
    r = Redactor([UPSTREAM_KEY])
    headers = r.headers({"Authorization": f"Bearer {UPSTREAM_KEY}", "x-api-key": "anything", "X-Goog-Api-Key": "k",
                         "Cookie": "session=abc", "X-Note": f"key {UPSTREAM_KEY}", "User-Agent": "openai/1.0"})
    assert headers == {"Authorization": f"Bearer {LABEL}", "x-api-key": LABEL, "X-Goog-Api-Key": LABEL, "Cookie": LABEL,
                       "X-Note": f"key {SECRET_LABEL}", "User-Agent": "openai/1.0"}
    url = r.url("https://generativelanguage.googleapis.com/v1beta/models/x:generateContent?alt=sse&key=AIzaSyFAKE")
    assert url.endswith(f"?alt=sse&key={LABEL}")


def test_may_contain_is_a_cheap_conservative_test() -> None:
    r = Redactor([UPSTREAM_KEY], patterns=())
    assert not r.may_contain(b'{"messages":[{"content":"hello"}]}')
    assert r.may_contain(f'{{"content":"{UPSTREAM_KEY}"}}'.encode())
    assert Redactor().may_contain(b"a task-list")  # "sk-" anchor: look closer (and find nothing)
    assert Redactor().text("a task-list") == "a task-list"
    assert Redactor(patterns=[pattern("custom", r"\d{3}")]).may_contain(b"anything")  # no anchors: always look


def test_user_patterns_mask_a_named_group_and_refuse_empty_matches() -> None:
    p = pattern("custom", r"ticket=(?P<secret>T-\d+)")
    assert Redactor(patterns=[p]).text("see ticket=T-1234 now") == "see ticket=[REDACTED:custom] now"
    with pytest.raises(ValueError, match="empty string"):
        pattern("custom", r"x*")


def test_mask_literals_and_the_providers_echo_guard() -> None:
    assert mask_literals(f"bad key {UPSTREAM_KEY}", [None, UPSTREAM_KEY], "[backend key]") == "bad key [backend key]"


def test_a_redactor_never_shows_its_secrets() -> None:
    assert CONFIGURED not in repr(Redactor([CONFIGURED]))


# -- settings ----------------------------------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    settings = RedactionSettings()
    assert settings.outbound == "secrets" and settings.secrets == [] and settings.loggers == ["aiohttp"]
    for name, field in RedactionSettings.model_fields.items():
        assert field.description, name
    with pytest.raises(ValidationError, match=r"patterns\[1\] '\(unclosed'"):
        RedactionSettings(patterns=["ok-\\d+", "(unclosed"])
    with pytest.raises(ValidationError, match="empty string"):
        RedactionSettings(patterns=["a?"])
    with pytest.raises(ValidationError):
        RedactionSettings(outbound="sometimes")  # type: ignore[arg-type]


async def test_bad_settings_stop_the_proxy_with_the_key_path() -> None:
    from llmproxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"plugins\.redaction\.patterns"):
        await start_proxy({"plugins": {"redaction": {"patterns": ["(oops"]}}}, plugins=[("redaction", llmproxy_redaction)], entry_points=False)


# -- end to end -----------------------------------------------------------------------------------------


class Leaky:
    """A test plugin that logs what it should not: the prompt, and (on demand) an exception
    whose message holds it, which the pipeline logs with its traceback."""

    log = logging.getLogger("llmproxy_leaky_test_plugin")

    @hookimpl
    def request(self, flow: Any) -> None:
        text = flow.request.last_user_message.text
        self.log.warning("the prompt was %s (key %s)", text, os.environ["RED_UPSTREAM_KEY"])
        if "explode" in text:
            raise RuntimeError(f"cannot handle {text}")


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def launch() -> AsyncIterator[Any]:
    started: list[RunningProxy] = []

    async def launch(config: dict[str, Any], extra: tuple[tuple[str, Any], ...] = (), redaction: bool = True) -> RunningProxy:
        plugins: list[tuple[str, Any]] = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic)]
        if redaction:
            plugins.append(("redaction", llmproxy_redaction))
        plugins.extend(extra)
        proxy = await start_proxy(config, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield launch
    for proxy in started:
        await proxy.stop()


def config(fake: FakeOpenAI, outbound: str | None = "secrets", anthropic_fake: FakeAnthropic | None = None, **redaction: Any) -> dict[str, Any]:
    backends: dict[str, Any] = {"up": {"type": "openai", "base_url": fake.base_url, "api_keys": ["${RED_UPSTREAM_KEY}"]}}
    if anthropic_fake is not None:
        backends["ant"] = {"type": "anthropic", "base_url": anthropic_fake.base_url, "api_keys": ["${RED_ANTHROPIC_KEY}"]}
    section: dict[str, Any] = {"secrets": [CONFIGURED], "secret_env": ["RED_EXTRA_SECRET"], **redaction}
    if outbound is not None:
        section["outbound"] = outbound
    return {
        "proxy": {"drain_timeout": 1},
        "auth": {"api_keys": [{"name": "tester", "key": "${RED_CLIENT_KEY}"}]},
        "backends": backends,
        "default_backend": "up",
        "plugins": {"redaction": section},
    }


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)


async def ask(client: openai.AsyncOpenAI, prompt: str, stream: bool, **kwargs: Any) -> str:
    messages = kwargs.pop("messages", [{"role": "user", "content": prompt}])
    if not stream:
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, **kwargs)
        return reply.choices[0].message.content or ""
    text = ""
    async for chunk in await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
    return text


def prompt_with_everything() -> str:
    return (f"backend key {UPSTREAM_KEY}, client key {CLIENT_KEY}, codename {CONFIGURED}, env secret extra-secret-from-env-99, "
            f"openai {SAMPLES['openai_key']}, aws {SAMPLES['aws_access_key_id']}")


@STREAM
async def test_default_masks_the_proxys_own_and_configured_secrets_only(fake_openai: FakeOpenAI, launch: Any, stream: bool) -> None:
    proxy = await launch(config(fake_openai, outbound=None))  # the default: secrets
    client = openai_client(proxy)
    assert await ask(client, prompt_with_everything(), stream) == "hello from fake upstream"
    sent = fake_openai.last.body.decode()
    for secret in (UPSTREAM_KEY, CLIENT_KEY, CONFIGURED, "extra-secret-from-env-99"):
        assert secret not in sent
    content = fake_openai.last.json["messages"][0]["content"]
    assert content.count(SECRET_LABEL) == 4
    # Key formats that are not this proxy's secrets pass in this mode (documented).
    assert SAMPLES["openai_key"] in content and SAMPLES["aws_access_key_id"] in content
    assert fake_openai.last.key == UPSTREAM_KEY  # the key header itself is untouched
    await client.close()


@STREAM
async def test_all_masks_every_key_format_too_and_leaves_clean_requests_byte_identical(fake_openai: FakeOpenAI, launch: Any, stream: bool) -> None:
    proxy = await launch(config(fake_openai, outbound="all"))
    client = openai_client(proxy)
    await ask(client, prompt_with_everything(), stream)
    content = fake_openai.last.json["messages"][0]["content"]
    assert SAMPLES["openai_key"] not in content and SAMPLES["aws_access_key_id"] not in content
    assert "[REDACTED:openai_key]" in content and "[REDACTED:aws_access_key_id]" in content
    assert UPSTREAM_KEY not in content
    # A request with nothing to mask goes out exactly as the client wrote it.
    await ask(client, "", stream, messages=[{"role": "user", "content": "a task-list for disk-usage"}], temperature=0.5, logprobs=True)
    assert fake_openai.last.json["messages"][0]["content"] == "a task-list for disk-usage"
    assert fake_openai.last.json["logprobs"] is True
    await client.close()


@STREAM
async def test_off_sends_the_prompt_as_it_is(fake_openai: FakeOpenAI, launch: Any, stream: bool) -> None:
    proxy = await launch(config(fake_openai, outbound="off"))
    client = openai_client(proxy)
    await ask(client, prompt_with_everything(), stream)
    assert UPSTREAM_KEY in fake_openai.last.json["messages"][0]["content"]
    await client.close()


@STREAM
async def test_everything_in_the_request_is_covered_tool_results_system_and_unknown_fields(fake_openai: FakeOpenAI, launch: Any, stream: bool) -> None:
    proxy = await launch(config(fake_openai, outbound="all"))
    client = openai_client(proxy)
    messages = [
        {"role": "system", "content": f"Deploy with {SAMPLES['github_token']}"},
        {"role": "user", "content": "cat .env"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": '{"command": "cat .env"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"OPENAI_API_KEY={UPSTREAM_KEY}\nAWS_KEY={SAMPLES['aws_access_key_id']}"},
    ]
    tools = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]
    await ask(client, "", stream, messages=messages, tools=tools, user=f"user-{CONFIGURED}")
    body = fake_openai.last.body.decode()
    for secret in (SAMPLES["github_token"], UPSTREAM_KEY, SAMPLES["aws_access_key_id"], CONFIGURED):
        assert secret not in body
    sent = fake_openai.last.json
    assert sent["messages"][0]["content"] == "Deploy with [REDACTED:github_token]"
    assert sent["messages"][3]["content"] == f"OPENAI_API_KEY={SECRET_LABEL}\nAWS_KEY=[REDACTED:aws_access_key_id]"
    assert sent["user"] == f"user-{SECRET_LABEL}"  # a field llmproxy does not model
    await client.close()


@STREAM
async def test_cross_protocol_anthropic_client_to_openai_backend(fake_openai: FakeOpenAI, launch: Any, stream: bool) -> None:
    proxy = await launch(config(fake_openai, outbound="all"))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 50, "system": f"token {SAMPLES['slack_token']}",
                              "messages": [{"role": "user", "content": f"my key is {SAMPLES['anthropic_key']}"}]}
    if stream:
        async with client.messages.stream(**kwargs) as events:
            text = "".join([t async for t in events.text_stream])
    else:
        reply = await client.messages.create(**kwargs)
        text = reply.content[0].text
    assert text == "hello from fake upstream"
    sent = fake_openai.last.json
    assert sent["messages"][0] == {"role": "system", "content": "token [REDACTED:slack_token]"}
    assert sent["messages"][1]["content"] in ("my key is [REDACTED:anthropic_key]", [{"type": "text", "text": "my key is [REDACTED:anthropic_key]"}])
    await client.close()


async def test_anthropic_backend_is_masked_too(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, launch: Any) -> None:
    proxy = await launch(config(fake_openai, outbound="secrets", anthropic_fake=fake_anthropic))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=BOUND)
    await client.messages.create(model="ant:claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": f"keys {UPSTREAM_KEY} {ANTHROPIC_KEY}x"}])
    body = fake_anthropic.last.body.decode()
    assert UPSTREAM_KEY not in body and ANTHROPIC_KEY not in body
    assert fake_anthropic.last.key == ANTHROPIC_KEY
    await client.close()


async def test_switched_off_for_a_session_the_prompt_goes_out_unmasked(fake_openai: FakeOpenAI, launch: Any) -> None:
    proxy = await launch(config(fake_openai))
    store = proxy.context.sessions
    store.switch_plugin(store.get("x-session-id:redaction-off"), "redaction", False)
    client = openai_client(proxy)
    headers = {"x-session-id": "redaction-off"}
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"k {UPSTREAM_KEY}"}], extra_headers=headers)
    assert UPSTREAM_KEY in fake_openai.last.json["messages"][0]["content"]
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"k {UPSTREAM_KEY}"}])
    assert UPSTREAM_KEY not in fake_openai.last.json["messages"][0]["content"]
    await client.close()


@STREAM
async def test_logs_never_show_a_key_even_in_tracebacks(fake_openai: FakeOpenAI, launch: Any, caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await launch(config(fake_openai, outbound="off"), extra=(("leaky", Leaky()),))
    client = openai_client(proxy)
    await ask(client, f"remember {CONFIGURED} and {SAMPLES['google_api_key']}", stream)
    with pytest.raises(openai.InternalServerError) as failed:
        await ask(client, f"explode {CONFIGURED} {SAMPLES['jwt']}", stream)
    assert "plugin 'leaky' failed (RuntimeError)" in str(failed.value)
    logged = caplog.text
    assert "the prompt was remember" in logged and "Traceback" in logged and "RuntimeError: cannot handle explode" in logged
    for secret in (UPSTREAM_KEY, CONFIGURED, SAMPLES["google_api_key"], SAMPLES["jwt"]):
        assert secret not in logged
    assert "[REDACTED:google_api_key]" in logged and "[REDACTED:jwt]" in logged
    assert all(CONFIGURED not in r.getMessage() for r in caplog.records)
    await client.close()


async def test_without_the_plugin_the_same_logs_would_leak(fake_openai: FakeOpenAI, launch: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The control for the test above: it could fail."""
    caplog.set_level(logging.DEBUG)
    proxy = await launch(config(fake_openai, outbound="off") | {"plugins": {}}, extra=(("leaky", Leaky()),), redaction=False)
    client = openai_client(proxy)
    await ask(client, f"remember {CONFIGURED}", False)
    assert CONFIGURED in caplog.text and UPSTREAM_KEY in caplog.text
    await client.close()


async def test_the_log_filter_is_released_when_the_proxy_stops(fake_openai: FakeOpenAI) -> None:
    proxy = await start_proxy(config(fake_openai), plugins=[("openai", llmproxy_openai), ("redaction", llmproxy_redaction)], entry_points=False)
    assert proxy.context in LOG_FILTER.contexts
    assert LOG_FILTER in logging.getLogger("llmproxy.flow").filters and LOG_FILTER in logging.getLogger("aiohttp.server").filters
    await proxy.stop()
    assert proxy.context not in LOG_FILTER.contexts


async def test_configured_secrets_join_the_proxys_redactor_for_captures(fake_openai: FakeOpenAI, launch: Any) -> None:
    proxy = await launch(config(fake_openai))
    masked = proxy.context.redactor.text(f"{CONFIGURED} {UPSTREAM_KEY} {CLIENT_KEY} extra-secret-from-env-99 {SAMPLES['openai_key']}")
    assert masked == f"{SECRET_LABEL} {SECRET_LABEL} {SECRET_LABEL} {SECRET_LABEL} [REDACTED:openai_key]"


@pytest.mark.parametrize("escape", ["\\u0026", "\\u003c", "\\u0020"], ids=["amp", "lt", "space"])
async def test_a_secret_spelled_with_json_escapes_is_masked_all_the_same(fake_openai: FakeOpenAI, launch: Any, escape: str) -> None:
    """Go's JSON encoder writes & < > as \\u escapes (and any client may escape any
    character): the raw body then holds none of the secret's usual forms."""
    secret = "pa&ss wo<rd>12345"
    proxy = await launch(config(fake_openai, secrets=[secret]))
    plain = {"\\u0026": "&", "\\u003c": "<", "\\u0020": " "}[escape]
    written = secret.replace(plain, escape)
    body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "the password is ' + written + '"}]}'
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(proxy.url + "/v1/chat/completions", data=body, headers=headers) as response:
        assert response.status == 200
    sent = fake_openai.last.body.decode()
    assert "the password is" in sent and secret not in json.loads(fake_openai.last.body)["messages"][0]["content"]
    assert "pa&ss" not in sent and "pa\\u0026ss" not in sent
