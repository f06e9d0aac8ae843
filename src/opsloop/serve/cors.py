"""Calls from browser pages on other origins: the CORS allowlist and the guard on their POSTs.

A browser sends some cross-origin POSTs without asking first (a "simple" request: a form post,
or a fetch of a text/plain or untyped body), so without a guard any web page a user opens could
post into a reachable server and poison its prediction log and drift statistics. So infer and
`/feedback` take only JSON or binary bodies (415 otherwise), and a POST whose `Origin` header is
neither the server's own origin nor one in `OPSLOOP_CORS_ORIGINS` is refused (403). Clients that
are not browsers (curl, Triton's client, httpx) send no `Origin` and are not affected. With an
allowlist, Starlette's CORSMiddleware answers the preflights and adds the CORS headers for it.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from opsloop.serve.protocol import HEADER_LENGTH, RequestError

# What a listed origin's page may send and read beyond the CORS-safelisted headers.
ALLOWED_HEADERS = ["authorization", "content-type", HEADER_LENGTH]
EXPOSED_HEADERS = ["x-model-version", "x-model-role", HEADER_LENGTH]
PREFLIGHT_CACHE_S = 600


def check_origin(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> None:
    """403 for a browser's POST from another origin that the allowlist does not name."""
    if origin is None or origin in allowed or "*" in allowed:
        return
    if host is not None and origin.partition("://")[2] == host:
        return  # the server's own origin: e.g. the /docs page trying an endpoint
    raise RequestError(
        f"cross-origin request from {origin!r:.100} refused; add the origin to "
        "OPSLOOP_CORS_ORIGINS to allow its pages",
        status=403,
        reason="cross_origin",
    )


def with_cors(app: ASGIApp, origins: tuple[str, ...]) -> ASGIApp:
    """`app` answering preflights and adding CORS headers for `origins`; as it is without any."""
    if not origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=list(origins),
        allow_methods=["GET", "POST"],
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=PREFLIGHT_CACHE_S,
    )
