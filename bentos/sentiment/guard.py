"""The service's front door: API keys and their roles, rate limits, the media type and body
limits, then the body's shape.

An ASGI middleware in front of ``/predict``, ``/feedback``, ``/tasks/<name>/*`` and ``/admin/*``
that answers every
client mistake itself with a 4xx naming the problem, so none becomes a 500 (the statuses are
listed in docs/serving.md). The body's shape is checked against the API's own pydantic types.
It hands the endpoint the caller's source id (:func:`source_of`), which labels record, and puts
:mod:`bentos.sentiment.boundary` around the whole app when the server starts.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from bentos.sentiment.boundary import hoist_boundary, printable, send_json
from ml.serving.provenance import ADMIN, FEEDBACK, PREDICT, address_id, key_id
from ml.serving.ratelimit import RateLimiter, make_rate_limiter
from ml.serving.schemas import TaskTypes, predict_request, task_types
from ml.settings import Settings, get_settings

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

# The role each guarded endpoint needs (RequestGuard.endpoint's names), and how messages name it.
ROLE_NEEDED = {"predict": PREDICT, "feedback": FEEDBACK, "admin": ADMIN}
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
ENDPOINT_PATHS = {"predict": "/predict", "feedback": "/feedback", "admin": "/admin/*"}
TASK_PREFIX = "/tasks/"
# Where the guard leaves the caller's source id for the endpoint: the request's state, which
# only the server writes (a client cannot choose its own source id).
SOURCE_STATE = "driftloop_source"

# The one media type /predict and /feedback take (a web page cannot post it cross-origin
# without a CORS preflight, which the service does not answer), and its one parameter.
JSON_MEDIA_TYPE = "application/json"
_CHARSET_UTF8 = re.compile(r'\s*charset\s*=\s*"?utf-8"?\s*', re.IGNORECASE)
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")

PREDICT_EXAMPLE = '{"texts": ["some text", ...]}'


def served_types() -> dict[str, TaskTypes]:
    """The request and answer types of every task the service serves, the default task (the
    current one: ``DRIFTLOOP_TASK``, else ``default_task``) first."""
    from ml.params import load_params, load_tasks

    main = load_params().task.name
    tasks = load_tasks()
    return {
        name: task_types(name, tasks[name].task.labels)
        for name in (main, *(n for n in tasks if n != main))
    }


def task_not_found(name: str, known: Any) -> str:
    """The 404 message for a task the service does not serve."""
    return f"no task {name!r} is served here; the tasks are {list(known)}"


@dataclass(frozen=True)
class Limits:
    """The request limits from the settings."""

    max_texts: int
    max_chars: int
    max_body_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_texts_per_request, settings.max_chars_per_text, settings.max_body_bytes
        )


class ClientError(Exception):
    """A request the client must fix: HTTP ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# Why the guard checks the body at all, when BentoML validates it against the same types: BentoML
# answers a ValidationError with 400, its own wording and a traceback in the server log, while the
# contract is 422 (400 for bytes that are not JSON text) with a message naming the field. So the
# guard validates against ml.serving.schemas first and words pydantic's errors; the limits
# themselves live only in the types.


def validate_predict(obj: Any, limits: Limits) -> list[str]:
    """Check a ``/predict`` body; return its texts or raise :class:`ClientError`."""
    schema = predict_request(limits.max_texts, limits.max_chars)
    body = _validate(schema, obj, PREDICT_EXAMPLE)
    return list(body.texts)  # type: ignore[attr-defined]


def validate_feedback(obj: Any, types: TaskTypes) -> tuple[str, str]:
    """Check a ``/feedback`` body against a task's types; return ``(request_id, label)`` or raise
    :class:`ClientError` (an unknown label: 422 naming the task's labels)."""
    body = _validate(types.feedback_request, obj, types.feedback_example, types.labels)
    assert isinstance(body, types.feedback_request)
    return body.request_id, str(body.label)


def _validate(
    schema: type[BaseModel], obj: Any, example: str, labels: tuple[str, ...] = ()
) -> BaseModel:
    try:
        return schema.model_validate(obj)
    except ValidationError as exc:
        raise _client_error(exc.errors(), example, labels) from None


def _client_error(errors: list[Any], example: str, labels: tuple[str, ...] = ()) -> ClientError:
    """The first problem of a body, worded for the client: its shape, then field by field."""
    if any(e["loc"] == () for e in errors):
        obj = next(e["input"] for e in errors if e["loc"] == ())
        return ClientError(
            422,
            f"the body must be a JSON object like {example}, not a JSON {_type_name(obj)}",
            "wrong_type",
        )
    missing = [e["loc"][0] for e in errors if e["type"] == "missing"]
    if missing:
        return ClientError(422, f"missing field {missing[0]!r}: send {example}", "missing_field")
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return ClientError(
            422,
            f"unknown field(s) {', '.join(map(repr, unknown))}: send only {example}",
            "unknown_field",
        )
    return _field_error(errors[0], labels)


def _field_error(error: Any, labels: tuple[str, ...] = ()) -> ClientError:
    kind, loc, value = error["type"], error["loc"], error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "nul_character":  # found by the model's validator, after every text's type
        loc = (*loc, ctx["index"])
    where = f"{loc[0]}[{loc[1]}]" if len(loc) > 1 else repr(loc[0])
    if kind == "list_type":
        hint = (
            ' (wrap a single text in a list: {"texts": ["..."]})' if isinstance(value, str) else ""
        )
        return ClientError(
            422, f"{where} must be an array of strings, got {_type_name(value)}{hint}", "wrong_type"
        )
    if kind == "too_short":
        return ClientError(422, f"{where} is empty: send at least one text", "empty_list")
    if kind == "too_long":
        return ClientError(
            422,
            f"too many texts: {len(value)} in one request; the limit is {ctx['max_length']}",
            "too_many_texts",
        )
    if kind == "string_type" or (kind == "literal_error" and not isinstance(value, str)):
        return ClientError(422, f"{where} must be a string, got {_type_name(value)}", "wrong_type")
    if kind == "literal_error":
        return ClientError(
            422, f"unknown label {value!r}: expected one of {', '.join(labels)}", "unknown_label"
        )
    if loc[0] == "request_id" and kind == "string_pattern_mismatch":
        return ClientError(
            422,
            f"{where} is not a request id: use the request_id returned by /predict",
            "invalid_request_id",
        )
    if kind in ("string_too_short", "string_pattern_mismatch"):
        return ClientError(422, f"{where} is empty: send some text to classify", "empty_text")
    if kind == "string_too_long":
        return ClientError(
            422,
            f"{where} has {len(value)} characters; the limit is {ctx['max_length']}",
            "text_too_long",
        )
    if kind == "nul_character":
        return ClientError(422, f"{where} contains a NUL character (\\u0000)", "invalid_text")
    if kind == "string_unicode" and isinstance(value, str):
        at = next((i for i, c in enumerate(value) if 0xD800 <= ord(c) <= 0xDFFF), 0)
        return ClientError(
            400,
            f"{where} is not valid Unicode (a lone surrogate \\u{ord(value[at]):04x} "
            f"at position {at})",
            "invalid_unicode",
        )
    return ClientError(422, f"{where}: {error['msg']}", "invalid_field")


def parse_json(body: bytes) -> Any:
    """Decode a request body as UTF-8 JSON or raise :class:`ClientError` saying where it broke."""
    if not body.strip():
        raise ClientError(400, "empty request body: send a JSON object", "empty_body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(
            400,
            f"the body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})",
            "invalid_utf8",
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientError(
            400,
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "malformed_json",
        ) from None
    except RecursionError:
        raise ClientError(400, "malformed JSON: nested too deeply", "malformed_json") from None
    except ValueError:  # Python 3.11+ refuses integers of more than 4300 digits
        raise ClientError(
            400, "malformed JSON: a number in the body is too long", "malformed_json"
        ) from None


def check_content_type(values: list[bytes]) -> None:
    """Accept only ``application/json``, optionally ``; charset=utf-8``: the request's
    ``Content-Type`` header values, else :class:`ClientError` 415.

    The message names a received media type only when it is a plain token pair, never raw bytes.
    """
    expected = f"send Content-Type: {JSON_MEDIA_TYPE} (optionally ; charset=utf-8)"
    if not values:
        raise ClientError(415, f"missing Content-Type header: {expected}", "unsupported_media_type")
    if len(values) > 1:
        raise ClientError(
            415, f"more than one Content-Type header: {expected}", "unsupported_media_type"
        )
    media, _, params = values[0].decode("latin-1").partition(";")
    media = media.strip()
    if media.lower() == JSON_MEDIA_TYPE and all(
        _CHARSET_UTF8.fullmatch(p) for p in params.split(";") if params
    ):
        return
    got = f"got {media}" if _MEDIA_TYPE.fullmatch(media) else "got another media type"
    if media.lower() == JSON_MEDIA_TYPE:
        got = "got JSON with a parameter other than charset=utf-8"
    raise ClientError(
        415, f"unsupported Content-Type ({got}): {expected}", "unsupported_media_type"
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """ASGI middleware guarding driftloop's endpoints (the statuses: docs/serving.md).

    Args:
        app: The application behind.
        settings: Keys and limits; :func:`ml.settings.get_settings` when None.
        on_reject: Called with ``(endpoint, status, reason)`` for every rejected request.
    """

    def __init__(
        self,
        app: Any,
        settings: Settings | None = None,
        on_reject: Callable[[str, int, str], None] | None = None,
        types: dict[str, TaskTypes] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings or get_settings()
        # Each task's types, the default task (at /predict and /feedback) first.
        self.types = types or served_types()
        self.main = next(iter(self.types))
        self.keys = self.settings.api_key_roles
        self.limits = Limits.from_settings(self.settings)
        self.on_reject = on_reject
        self._limiter: RateLimiter | None = None
        self._hoist_tried = False

    @property
    def limiter(self) -> RateLimiter:
        if self._limiter is None:
            self._limiter = make_rate_limiter(
                self.settings.redis_url, self.settings.rate_limit_per_minute
            )
        return self._limiter

    def route(self, path: str) -> tuple[str | None, str | None]:
        """The guarded endpoint a path belongs to (None for open paths) and the task it is for.

        Raises :class:`ClientError` (404) for ``/tasks/<name>/...`` of a task not served.
        """
        if path in ("/predict", "/feedback"):
            return path[1:], self.main
        if path == "/admin" or path.startswith("/admin/"):
            return "admin", None
        if path.startswith(TASK_PREFIX):
            name, _, op = path[len(TASK_PREFIX) :].partition("/")
            if name not in self.types:
                raise ClientError(404, task_not_found(name, self.types), "unknown_task")
            return (op, name) if op in ("predict", "feedback") else (None, name)
        return None, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and not self._hoist_tried:
            self._hoist_tried = True
            self._hoist(scope)
        endpoint: str | None = None
        task: str | None = None
        if scope["type"] == "http":
            try:
                endpoint, task = self.route(scope.get("path", ""))
            except ClientError as exc:
                await self._refuse(send, "tasks", exc)
                return
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            source = self._authenticate(scope, endpoint)
            # Each task's budget is its own; /admin has one of its own too.
            self._rate_limit(f"{task or endpoint}/{source}")
            if scope.get("method") != "POST":
                await self.app(scope, receive, send)  # the router answers 405
                return
            if endpoint != "admin":
                check_content_type(
                    [v for k, v in scope.get("headers", []) if k.lower() == b"content-type"]
                )
            body = await self._read_body(scope, receive)
            if endpoint != "admin":
                obj = parse_json(body)
                if endpoint == "predict":
                    validate_predict(obj, self.limits)
                else:
                    validate_feedback(obj, self.types[task or self.main])
        except ClientError as exc:
            await self._refuse(send, endpoint, exc)
            return
        except _Disconnected:
            return
        except Exception:  # noqa: BLE001 - a bug here must not hold the request open
            # Raising would leave BentoML's timeout middleware waiting out traffic.timeout
            # (60 s) before uvicorn answers; answer at once instead.
            log.exception("the request guard failed on %s", printable(scope.get("path", "")))
            if self.on_reject is not None:
                with contextlib.suppress(Exception):
                    self.on_reject(endpoint, 500, "guard_error")
            await send_json(send, 500, {"error": "internal error while checking the request"})
            return
        scope = {**scope, "state": {**scope.get("state", {}), SOURCE_STATE: source}}
        if endpoint != "admin":
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, send: Send, endpoint: str, exc: ClientError) -> None:
        if self.on_reject is not None:
            try:
                self.on_reject(endpoint, exc.status, exc.reason)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.exception("reject callback failed")
        headers = getattr(exc, "headers", None)
        await send_json(send, exc.status, {"error": exc.message}, headers)

    def _hoist(self, scope: Scope) -> None:
        """Put :class:`~bentos.sentiment.boundary.HttpBoundary` around the whole app.

        BentoML adds a service's middleware inside its own metrics and access log; the lifespan
        scope passes through here once, before any request, carrying the app to wrap.
        """
        try:
            if hoist_boundary(scope, self.on_reject):
                return
            log.warning("no Starlette app in the lifespan scope: no HTTP boundary around it")
        except Exception:  # noqa: BLE001 - the service still serves, without the boundary
            log.exception("could not put the HTTP boundary around the app")

    def _authenticate(self, scope: Scope, endpoint: str) -> str:
        """Check the key and its role for ``endpoint``; return the caller's source id.

        Without keys configured the service is open and the source is the client address's id;
        ``/admin/*`` then answers loopback clients only (the admin role needs a key elsewhere).
        """
        if not self.keys:
            host = str((scope.get("client") or ("unknown",))[0])
            if endpoint == "admin" and host not in LOOPBACK:
                raise ClientError(
                    403,
                    "/admin/* needs an API key with the 'admin' role; a service without keys "
                    "answers it on loopback only",
                    "missing_role",
                )
            return address_id(host)
        key = _header(scope, b"x-api-key")
        if not key:
            raise ClientError(
                401, "missing X-API-Key header: this endpoint needs an API key", "no_api_key"
            )
        matched: str | None = None
        given = key.encode("utf-8", "surrogateescape")
        for known in self.keys:  # compared with every key, each in constant time
            if hmac.compare_digest(given, known.encode("utf-8", "surrogateescape")):
                matched = known
        if matched is None:
            raise ClientError(403, "invalid API key", "bad_api_key")
        role = ROLE_NEEDED[endpoint]
        if role not in self.keys[matched]:
            raise ClientError(
                403,
                f"this API key lacks the {role!r} role needed for {ENDPOINT_PATHS[endpoint]}",
                "missing_role",
            )
        return key_id(matched)

    def _rate_limit(self, who: str) -> None:
        if self.settings.rate_limit_per_minute <= 0:
            return
        decision = self.limiter.hit(who)
        if not decision.allowed:
            retry = max(1, round(decision.retry_after_seconds))
            exc = ClientError(
                429,
                f"rate limit of {decision.limit} requests per minute exceeded; retry in {retry} s",
                "rate_limited",
            )
            exc.headers = [(b"retry-after", str(retry).encode())]  # type: ignore[attr-defined]
            raise exc

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ClientError(
                413,
                f"request body of {int(declared)} bytes is over the limit of {limit} bytes",
                "body_too_large",
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ClientError(
                    413, f"request body is over the limit of {limit} bytes", "body_too_large"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _Disconnected(Exception):
    """The client went away before sending its whole body."""


def source_of(request: Any) -> str:
    """The source id the guard gave a request (a Starlette request, e.g. ``ctx.request``)."""
    return str(request.scope.get("state", {}).get(SOURCE_STATE, "unknown"))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
