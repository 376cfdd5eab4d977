"""Who may read ``/metrics``: the decision, apart from the HTTP handler so it is tested alone.

Open to anyone who can connect while the proxy listens on loopback only; once it listens
beyond loopback a bearer token is required, and with none configured the endpoint stays
shut (403, saying which setting opens it). A configured token is always required, whatever
the bind. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac

NEEDS_TOKEN = (
    "llmproxy listens beyond loopback: /metrics needs a token; set plugins.metrics.token to a "
    "reference such as ${LLMPROXY_METRICS_TOKEN} and send it as 'Authorization: Bearer <token>'"
)
BAD_TOKEN = "missing or wrong metrics token: send it as 'Authorization: Bearer <token>'"


def refusal(authorization: str, token: bytes | None, loopback_only: bool) -> tuple[int, str] | None:
    """None when a scrape with this ``Authorization`` header may read the metrics, else the
    (status, message) to answer with."""
    if token is None:
        return None if loopback_only else (403, NEEDS_TOKEN)
    presented = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(presented.encode(), token):
        return 401, BAD_TOKEN
    return None
