"""``plugins.inspector``: the web inspector's, the admin API's and the history's settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmproxy.config import SecretRef


class InspectorSettings(BaseModel):
    """On by default, on loopback only, with a key generated at start-up unless ``admin_key``
    names one."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    admin_key: SecretRef | None = Field(
        None,
        description="Reference to the admin key (${ENV}, env:NAME or keyring:service/name) that the admin API "
        "and the UI's login take. Unset: a random key is generated at each start and printed once in the log, "
        "never written to disk.",
    )
    allow_remote: bool = Field(
        False,
        description="Accept admin and UI requests from non-loopback addresses (the proxy must bind one, and "
        "you should then put TLS in front). Off: only 127.0.0.0/8 and ::1 may call them, whatever the bind address.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (without port) accepted in the Host header besides localhost, 127.0.0.1, ::1 and "
        "the bind address; any other Host is refused (a DNS-rebinding defence).",
    )
    record: Literal["opened", "always"] = Field(
        "opened",
        description="opened: record flows from the first time the UI or the admin API is used with the admin key (until "
        "then the inspector costs nothing per request); always: from start-up. A history_path records always.",
    )
    trace: Literal["always", "watched", "never"] = Field(
        "watched",
        description="Record what each plugin changes in the canonical request and response (the per-plugin diffs): "
        "always; watched — only while a browser has the inspector open; or never. Tracing costs a JSON snapshot "
        "of the request per plugin in the chain.",
    )
    capture_bodies: Literal["always", "watched", "never"] = Field(
        "watched",
        description="Keep request and response bodies, upstream attempts and stream events for each flow's detail "
        "(kept in the history, masked like wire captures): always; watched — only while a browser has the inspector "
        "open (the default: recording every body costs tens of µs per request); or never (summaries, headers and "
        "timings only). true and false mean always and never.",
    )

    @field_validator("capture_bodies", mode="before")
    @classmethod
    def _capture(cls, value: Any) -> Any:
        return {True: "always", False: "never"}.get(value, value) if isinstance(value, bool) else value

    recent: int = Field(500, ge=10, le=100_000, description="Flows the live list keeps in memory (newest first).")
    details: int = Field(
        100,
        ge=0,
        le=10_000,
        description="Finished flows kept whole in memory (newest first) so their detail can be built when the UI "
        "asks. Older flows' details come from the history, which stores them only when history_path is set.",
    )
    history_path: str | None = Field(
        None,
        description="SQLite file for the flow history (its folder is created). Unset: the history lives in memory "
        "and is gone at exit. It holds prompts and answers when capture_bodies is on: keep it where only you can read it.",
    )
    history_max_age: float = Field(7 * 86_400.0, ge=0, description="Forget flows older than this many seconds; 0: no age limit.")
    history_max_bytes: int = Field(
        200_000_000, ge=0, description="Forget the oldest flows when the stored records pass this many bytes; 0: no size limit."
    )
    audit_log: str | None = Field(
        None,
        description="JSONL file every change made through the admin API is appended to (who, what, when; never a key). "
        "Unset: beside history_path as audit.jsonl when that is set, else only the log (logger llmproxy.audit).",
    )
    login_ttl: float = Field(12 * 3600.0, gt=0, description="Seconds a UI login (its HttpOnly cookie) stays valid.")

    _v = field_validator("admin_key", mode="before")(lambda value: value if value is None or isinstance(value, SecretRef) else SecretRef(_text(value)))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string reference such as ${LLMPROXY_ADMIN_KEY}")
    return value
