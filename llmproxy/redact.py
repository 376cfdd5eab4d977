"""Masking secrets: in text, JSON text, headers and URLs. One pure module, shared by the core
(error messages a backend echoes), the proxy's own redactor (``ProxyContext.redactor``, for
logs and captures) and any plugin that masks prompts.

A :class:`Redactor` masks two kinds of thing:

- **literal secrets**: exact strings (backend keys, client keys, what the config lists),
  replaced by ``[REDACTED:secret]``. Strings shorter than ``min_secret_length`` are ignored:
  masking a short "key" such as ``ollama`` everywhere would mangle ordinary text.
- **patterns**: the common key formats in :data:`DEFAULT_PATTERNS` (OpenAI, Anthropic,
  Google, GitHub, AWS, Slack, Hugging Face, Groq, Stripe and xAI keys, JWTs, PEM private
  key blocks, ``Bearer`` tokens), replaced by ``[REDACTED:<pattern name>]``. Each pattern
  lists *anchors*, literal strings one of which every match contains, so text containing
  none of them costs a few substring searches and no regular expression at all.

Every label is plain ASCII without quotes or backslashes, and no pattern masks a quote or
half an escape sequence, so masking the text of a JSON document leaves valid JSON: a whole
record can be serialised once and masked in one pass.

The functions here are pure and thread-safe; a Redactor is immutable once built.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from .context import ProxyContext

MIN_SECRET_LENGTH = 8
SECRET_LABEL = "[REDACTED:secret]"
LABEL = "[REDACTED]"

# Request and response headers whose whole value is a credential.
SENSITIVE_HEADERS = frozenset(
    (
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "x-goog-api-key",
        "api-key",
        "cookie",
        "set-cookie",
        "x-amz-security-token",
        "x-auth-token",
        "x-access-token",
    )
)
# URL query parameters that carry keys (Gemini's ?key=, signed URLs).
_QUERY_SECRET = re.compile(r"([?&](?:key|api_key|api-key|apikey|access_token|token|sig|signature)=)[^&#\s\"]+", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Pattern:
    """A secret format: ``regex`` finds it; ``group`` is the part of the match that is the
    secret (0: all of it); ``anchors`` are literal strings one of which every match contains
    (empty: always run the regex)."""

    name: str
    regex: re.Pattern[str]
    anchors: tuple[str, ...] = ()
    group: int = 0

    @property
    def label(self) -> str:
        return f"[REDACTED:{self.name}]"

    def sub(self, text: str, found: list[str] | None = None) -> str:
        label = self.label
        group = self.group

        def replace(match: re.Match[str]) -> str:
            if found is not None:
                found.append(self.name)
            if group == 0:
                return label
            whole, start = match.group(0), match.start()
            return whole[: match.start(group) - start] + label + whole[match.end(group) - start :]

        return self.regex.sub(replace, text)


def pattern(name: str, regex: str, anchors: Iterable[str] = (), group: int = 0, flags: int = 0) -> Pattern:
    """Compile a :class:`Pattern`; a user's regex with a group named ``secret`` masks only
    that group."""
    compiled = re.compile(regex, flags)
    if compiled.match("") is not None or compiled.search("") is not None:
        raise ValueError(f"pattern {name!r} matches the empty string")
    if group == 0 and "secret" in compiled.groupindex:
        group = compiled.groupindex["secret"]
    return Pattern(name, compiled, tuple(anchors), group)


# Not inside a longer token: "task-manager-..." must not look like an "sk-" key. A JSON
# escape (\n, \t, \r) before a key is a line start in the text the JSON holds, not a letter.
_START = r"(?:(?<=\\[nrt])|(?<![A-Za-z0-9_\-]))"
_END = r"(?![A-Za-z0-9_\-])"
# A PEM body: base64, line ends (raw, or escaped as in JSON and reprs), and the header
# lines of encrypted keys — never a quote, and escapes are consumed whole.
_PEM_BODY = r"(?:[A-Za-z0-9+/=:,.\- \t\r\n]|\\[nrt/])"

DEFAULT_PATTERNS: tuple[Pattern, ...] = (
    pattern(
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        rf"(?:{_PEM_BODY}*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|{_PEM_BODY}*)",
        anchors=("PRIVATE KEY-----",),
    ),
    pattern("anthropic_key", _START + r"sk-ant-[A-Za-z0-9_\-]{20,}", anchors=("sk-ant-",)),
    # OpenAI (sk-, sk-proj-, sk-svcacct-, sk-admin-) and the services that copied the
    # format (OpenRouter's sk-or-v1-, DeepSeek): real keys always contain a digit.
    pattern("openai_key", _START + r"sk-(?=[A-Za-z0-9_\-]*[0-9])[A-Za-z0-9_\-]{20,}", anchors=("sk-",)),
    pattern("google_api_key", _START + r"AIza[0-9A-Za-z_\-]{35}" + _END, anchors=("AIza",)),
    pattern(
        "github_token",
        _START + r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
        anchors=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    pattern("aws_access_key_id", r"(?:(?<=\\[nrt])|(?<![A-Za-z0-9]))(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])", anchors=("AKIA", "ASIA", "ABIA", "ACCA")),
    pattern(
        "aws_secret_access_key",
        r"(?i:secret_?access_?key)\\?[\"']?\s*[:=]\s*\\?[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
        anchors=("secret_access_key", "SECRET_ACCESS_KEY", "SecretAccessKey", "secretAccessKey", "secretaccesskey"),
        group=1,
    ),
    pattern("slack_token", _START + r"xox[abposr]-[A-Za-z0-9\-]{10,}", anchors=("xox",)),
    pattern("huggingface_token", _START + r"hf_[A-Za-z0-9]{30,}" + _END, anchors=("hf_",)),
    pattern("groq_key", _START + r"gsk_[A-Za-z0-9]{40,}" + _END, anchors=("gsk_",)),
    pattern("stripe_key", _START + r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,}" + _END, anchors=("sk_live_", "sk_test_", "rk_live_", "rk_test_")),
    pattern("xai_key", _START + r"xai-[A-Za-z0-9]{40,}" + _END, anchors=("xai-",)),
    # Both halves of a JWT are base64 JSON objects, so both begin "eyJ".
    pattern("jwt", _START + r"eyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]*", anchors=("eyJ",)),
    # "Bearer <token>" in prose or code; the scheme stays, the token goes. A token without
    # a digit is a placeholder (Bearer YOUR_API_KEY), not a credential.
    pattern(
        "bearer_token",
        r"(?:(?<=\\[nrt])|(?<![A-Za-z0-9_]))(?i:bearer)\s+((?=[A-Za-z0-9\-._~+/]*[0-9])[A-Za-z0-9\-._~+/]{16,}=*)",
        anchors=("Bearer", "bearer", "BEARER"),
        group=1,
    ),
)
"""The common key formats, most specific first (a masked span is never matched again)."""


class Redactor:
    """Masks literal ``secrets`` and ``patterns`` in text; immutable and thread-safe."""

    __slots__ = ("secrets", "patterns", "_needles")

    def __init__(
        self,
        secrets: Iterable[str] = (),
        patterns: Iterable[Pattern] = DEFAULT_PATTERNS,
        min_secret_length: int = MIN_SECRET_LENGTH,
    ) -> None:
        values = {s for s in secrets if isinstance(s, str) and len(s) >= min_secret_length}
        # A secret as it appears inside JSON text, when escaping changes it (quotes and
        # backslashes; non-ASCII as \\uXXXX; "/" as "\\/", as some encoders write it).
        for secret in list(values):
            for ascii_only in (False, True):
                escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
                values.update((escaped, escaped.replace("/", "\\/")))
        # Longest first, so a secret that contains another is masked whole.
        self.secrets: tuple[str, ...] = tuple(sorted(values, key=len, reverse=True))
        self.patterns: tuple[Pattern, ...] = tuple(patterns)
        needles: set[bytes] = {s.encode() for s in self.secrets}
        always = False
        for p in self.patterns:
            if not p.anchors:
                always = True
            needles.update(a.encode() for a in p.anchors)
        # None: some pattern has no anchor, so no cheap test can rule a text out.
        self._needles: tuple[bytes, ...] | None = None if always else tuple(needles)

    def __bool__(self) -> bool:
        return bool(self.secrets or self.patterns)

    def __repr__(self) -> str:  # never the secrets themselves
        return f"<Redactor {len(self.secrets)} secrets, patterns: {', '.join(p.name for p in self.patterns) or 'none'}>"

    def extended(self, secrets: Iterable[str] = (), patterns: Iterable[Pattern] = (), min_secret_length: int = MIN_SECRET_LENGTH) -> "Redactor":
        """A new Redactor that also masks ``secrets`` and ``patterns``."""
        return Redactor((*self.secrets, *secrets), (*self.patterns, *patterns), min_secret_length)

    # -- masking -------------------------------------------------------------------------
    def text(self, text: str, found: list[str] | None = None) -> str:
        """``text`` with every secret masked; names of what was masked go to ``found``."""
        if not text:
            return text
        for secret in self.secrets:
            if secret in text:
                if found is not None:
                    found.extend(["secret"] * text.count(secret))
                text = text.replace(secret, SECRET_LABEL)
        for p in self.patterns:
            anchors = p.anchors
            if anchors and not any(a in text for a in anchors):
                continue
            text = p.sub(text, found)
        return text

    def value(self, value: Any) -> Any:
        """A JSON-like value with every string masked (dict keys included); containers are
        copied only where something changed."""
        if isinstance(value, str):
            masked = self.text(value)
            return value if masked == value else masked
        if isinstance(value, dict):
            changed = False
            items = []
            for key, item in value.items():
                new_key = self.text(key) if isinstance(key, str) else key
                new = self.value(item)
                changed = changed or new_key != key or new is not item
                items.append((new_key, new))
            return dict(items) if changed else value
        if isinstance(value, list):
            items = [self.value(item) for item in value]
            return value if all(a is b for a, b in zip(items, value)) else items
        return value

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Headers with credential headers masked whole (``Authorization`` keeps its scheme)
        and every other value masked as text."""
        out = {}
        for name, value in headers.items():
            lower = name.lower()
            if lower in SENSITIVE_HEADERS:
                scheme, sep, rest = value.partition(" ")
                out[name] = f"{scheme} {LABEL}" if sep and rest and lower in ("authorization", "proxy-authorization") else LABEL
            else:
                out[name] = self.text(value)
        return out

    def url(self, url: str) -> str:
        """A URL with key-like query parameters masked, and then as text."""
        if "=" in url:
            url = _QUERY_SECRET.sub(lambda m: m.group(1) + LABEL, url)
        return self.text(url)

    # -- cheap tests ---------------------------------------------------------------------
    def may_contain(self, data: bytes) -> bool:
        """False only when ``data`` (raw bytes, JSON or text) certainly holds nothing to mask:
        a substring search per secret and anchor, no regex. True means "look closer"."""
        needles = self._needles
        if needles is None:
            return True
        for needle in needles:
            if needle in data:
                return True
        return False

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """Where :meth:`text` would mask: ``(start, end, label)`` per region, in order, not
        overlapping. For masking text that arrives in pieces (stream deltas), where a secret
        may begin in one piece and end in the next."""
        found: list[tuple[int, int, str]] = []
        for secret in self.secrets:
            start = text.find(secret)
            while start >= 0:
                found.append((start, start + len(secret), SECRET_LABEL))
                start = text.find(secret, start + len(secret))
        for p in self.patterns:
            if p.anchors and not any(a in text for a in p.anchors):
                continue
            for match in p.regex.finditer(text):
                if match.start(p.group) >= 0:
                    found.append((match.start(p.group), match.end(p.group), p.label))
        found.sort()
        merged: list[tuple[int, int, str]] = []
        for start, end, label in found:
            if merged and start < merged[-1][1]:
                last = merged[-1]
                merged[-1] = (last[0], max(last[1], end), last[2])
            else:
                merged.append((start, end, label))
        return merged

    def finds(self, text: str) -> list[str]:
        """Names of what :meth:`text` would mask in ``text`` (``"secret"`` for literals)."""
        found: list[str] = []
        self.text(text, found)
        return found


def redact(text: str, secrets: Iterable[str] = (), patterns: Iterable[Pattern] = DEFAULT_PATTERNS) -> str:
    """``text`` with ``secrets`` and the common key formats masked (a one-off Redactor)."""
    return Redactor(secrets, patterns).text(text)


def mask_literals(text: str, secrets: Iterable[str | None], label: str = LABEL) -> str:
    """``text`` with each of ``secrets`` (exact strings, any length) replaced by ``label``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, label)
    return text


def proxy_secrets(context: "ProxyContext") -> list[str]:
    """The secrets a running proxy holds: every backend's keys and every client key, each
    resolved now (unset references are left out)."""
    values: list[str] = []
    for provider in context.providers.values():
        for ref in getattr(provider.settings, "api_keys", ()):
            value = ref.get()
            if value:
                values.append(value)
    for entry in context.config.auth.api_keys:
        value = entry.key.get()
        if value:
            values.append(value)
    return values


__all__ = [
    "DEFAULT_PATTERNS",
    "LABEL",
    "MIN_SECRET_LENGTH",
    "Pattern",
    "Redactor",
    "SECRET_LABEL",
    "SENSITIVE_HEADERS",
    "mask_literals",
    "pattern",
    "proxy_secrets",
    "redact",
]
