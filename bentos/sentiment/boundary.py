"""The outermost layer of the HTTP app: what BentoML's access log and metrics may see.

BentoML puts a service's own middleware inside its metrics and access log, which label and log
the raw path and ``Content-Type``. :func:`hoist_boundary` wraps the whole app in
:class:`HttpBoundary` instead, which refuses paths and headers that would forge log lines or
crash the log, collapses unknown paths into one metric label and adds security headers to
every response (docs/serving.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
Headers = list[tuple[bytes, bytes]]

# The path every unknown path is rewritten to, so BentoML's metrics label them all alike.
UNKNOWN_PATH = "/_unknown"
# Answers that must never be stored by a browser or a proxy: predictions, labels, admin state.
NO_STORE_PREFIXES = ("/predict", "/feedback", "/admin", "/model")
# BentoML's Swagger UI: its page and assets (scripts and styles of its own origin).
DOCS_PREFIXES = ("/static_content/", "/assets/")
SECURITY_HEADERS: Headers = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
API_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI runs its own scripts and injects inline styles; it fetches /docs.json. The page's
# inline analytics snippet (Google Tag Manager) is blocked, and so is any other origin.
DOCS_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# What a client address may look like (IPv4, IPv6, a unix socket's "" or a test client's name):
# an X-Forwarded-For value from a trusted proxy becomes the address BentoML logs.
_ADDRESS = re.compile(r"[0-9A-Za-z.:%_\[\]-]{0,100}")


def printable(value: str, limit: int = 200) -> str:
    """``value`` safe for one log line: ASCII only, every other character escaped."""
    cut = value[:limit]
    return ascii(cut)[1:-1] + ("..." if len(value) > limit else "")


def _header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", []) if k.lower() == name]


def _visible_ascii(value: bytes) -> bool:
    return all(b == 0x09 or 0x20 <= b <= 0x7E for b in value)


def check_request(scope: Scope) -> tuple[int, str, str] | None:
    """Why a request may not reach the app, as ``(status, message, reason)``; None if it may.

    The messages never repeat what the client sent: it is what could not be logged.
    """
    if not scope.get("path", "").isprintable():
        return 400, "the path contains control or non-printable characters", "bad_path"
    if not all(_visible_ascii(v) for v in _header_values(scope, b"content-type")):
        return (
            415,
            "the Content-Type header is not a media type (non-ASCII or control bytes); "
            "send Content-Type: application/json",
            "bad_content_type",
        )
    client = scope.get("client")
    if client and not _ADDRESS.fullmatch(str(client[0])):
        return 400, "X-Forwarded-For does not name a valid client address", "bad_client_address"
    return None


async def send_json(
    send: Send, status: int, payload: dict[str, Any], headers: Headers | None = None
) -> None:
    """Answer with ``payload`` as JSON, in full (a start and one body message)."""
    data = json.dumps(payload).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def security_headers(path: str, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """``headers`` with the security headers for a response to ``path`` added.

    Headers the app set are kept, except ``Cache-Control`` on answers that must not be stored.
    """
    no_store = path.startswith(NO_STORE_PREFIXES)
    out = [(k, v) for k, v in headers if not (no_store and k.lower() == b"cache-control")]
    present = {k.lower() for k, _ in out}
    docs = path == "/" or path.startswith(DOCS_PREFIXES)
    extra = [
        *SECURITY_HEADERS,
        (b"content-security-policy", DOCS_CSP if docs else API_CSP),
        *([(b"cache-control", b"no-store")] if no_store else []),
    ]
    return out + [(k, v) for k, v in extra if k not in present]


class KnownPaths:
    """Whether a path is one the app answers, matched against the app's own routes.

    Mounted apps with routes of their own are matched route by route (a mount at ``/`` is not a
    catch-all), and a path under a static mount only if the file exists, so random paths
    anywhere are unknown.
    """

    def __init__(self, routes: Iterable[Any]) -> None:
        self.routes = list(routes)
        self.static = _static_files(self.routes, "")

    def __call__(self, scope: Scope) -> bool:
        return scope.get("path", "") in self.static or _matches(self.routes, scope)


def _is_static(route: Any) -> bool:
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    return isinstance(route, Mount) and isinstance(route.app, StaticFiles)


def _matches(routes: Iterable[Any], scope: Scope) -> bool:
    from starlette.routing import Match, Mount

    for route in routes:
        if _is_static(route):
            continue  # its files are in KnownPaths.static
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        inner = getattr(route.app, "routes", None) if isinstance(route, Mount) else None
        if match is Match.FULL and inner is not None:
            if _matches(inner, {**scope, **child}):
                return True
            continue
        return True
    return False


def _static_files(routes: Iterable[Any], prefix: str) -> set[str]:
    from starlette.routing import Mount

    found: set[str] = set()
    for route in routes:
        if not isinstance(route, Mount):
            continue
        here = prefix + route.path.rstrip("/")
        app: Any = route.app
        if _is_static(route):
            for directory in app.all_directories:
                for root, _dirs, files in os.walk(directory):
                    rel = os.path.relpath(root, directory)
                    parts = [] if rel == "." else rel.split(os.sep)
                    found.update("/".join([here, *parts, name]) for name in files)
        elif getattr(app, "routes", None) is not None:
            found |= _static_files(app.routes, here)
    return found


class HttpBoundary:
    """ASGI middleware around the whole app (see :func:`hoist_boundary`).

    Args:
        app: The application behind: BentoML's whole middleware stack.
        known: Whether a scope's path is one the app answers; None counts every path as known.
        on_reject: Called with ``(endpoint, status, reason)`` for every request refused here.
    """

    def __init__(
        self,
        app: Any,
        known: Callable[[Scope], bool] | None = None,
        on_reject: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.app = app
        self.known = known
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = check_request(scope)
        if scope["type"] == "websocket":  # no routes take one: all collapse into one label
            if problem is not None or (self.known is not None and not self.known(scope)):
                scope = {**scope, "path": UNKNOWN_PATH, "raw_path": UNKNOWN_PATH.encode()}
            await self.app(scope, receive, send)
            return
        if problem is None and self.known is not None and not self.known(scope):
            scope = {**scope, "path": UNKNOWN_PATH, "raw_path": UNKNOWN_PATH.encode()}
        path = scope.get("path", "")

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": security_headers(path, message.get("headers", []))}
            await send(message)

        if problem is None:
            await self.app(scope, receive, send_secured)
            return
        status, message, reason = problem
        client = scope.get("client") or ("-",)
        log.info(
            "refused %s %s from %s with %d: %s",
            printable(str(scope.get("method", ""))),
            printable(path),
            printable(str(client[0])),
            status,
            reason,
        )
        if self.on_reject is not None:
            try:
                self.on_reject("http", status, reason)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.exception("reject callback failed")
        await send_json(send_secured, status, {"error": message})


HOISTED = "driftloop_boundary"  # set on the app once it is wrapped


def hoist_boundary(scope: Scope, on_reject: Callable[[str, int, str], None] | None = None) -> bool:
    """Wrap the Starlette app of a ``lifespan`` scope in :class:`HttpBoundary`, outermost.

    Called by the request guard when the lifespan passes through it, before any request: the
    app's middleware stack is built by then, and every request after takes the new one.
    Returns whether the app is wrapped (once; again is a no-op).
    """
    from starlette.applications import Starlette

    app = scope.get("app")
    if not isinstance(app, Starlette) or app.middleware_stack is None:
        return False
    if getattr(app.state, HOISTED, False):
        return True
    boundary: Any = HttpBoundary(app.middleware_stack, KnownPaths(app.router.routes), on_reject)
    app.middleware_stack = boundary
    setattr(app.state, HOISTED, True)
    return True
