"""A bounded fuzzer for the sentiment service's HTTP boundary, driven by its own OpenAPI document.

The service promises that no client input can make it answer 5xx or fall over: the guard
(:mod:`bentos.sentiment.guard`) answers every client mistake with a 4xx that names the problem.
This script tests that promise from outside, against a running ``bentoml serve``::

    python -m tests.harness.fuzz_api --url http://127.0.0.1:3000 --key K \
        --out benchmarks/results/fuzz_api.md

It loads the document BentoML serves at ``/docs.json``, lets schemathesis generate requests for
every operation (schema-valid and schema-violating bodies, with the API key, without it and with a
wrong one; hypothesis with a fixed seed, a bounded number of examples per operation and a total time
budget), sends a few hand-written probes that generators rarely hit (a 5000-digit number, nesting
100 000 deep, invalid UTF-8, a chunked body over the size limit, ...), and finally asks ``/livez``
whether the process is still alive. Each response goes through these schemathesis checks:

* ``not_a_server_error``: no 5xx. The one 5xx the service may answer by design (503 while no
  champion is loaded) counts as a failure too: fuzz a service that serves a model.
* ``status_code_conformance``, ``content_type_conformance``, ``response_schema_conformance`` and
  ``response_headers_conformance``: the answer is one the document describes.
* ``negative_data_rejection``: a schema-violating body is refused with a 4xx.

The input rules come from the served document itself: the request types of
:mod:`ml.serving.schemas` carry them (no unknown fields, one to ``DRIFTLOOP_MAX_TEXTS`` texts of
at most ``DRIFTLOOP_MAX_CHARS`` characters, no blank text, a request id of
``[A-Za-z0-9_-]{1,64}``), with this deployment's limits. Only the guard's own answers (401, 403,
413, 422, 429 with ``{"error": "..."}``) are added to it (:func:`guard_contract`), and the 409
``/feedback`` answers to a second, different label for a request id: BentoML builds the document
from the API methods and cannot know about the ASGI middleware in front, nor about a status an
endpoint answers itself. Without them ``status_code_conformance`` flags every 422 the guard
rightly sends, and the content-type and schema checks skip those responses altogether.

The key given should be a bare one (``predict`` and ``feedback`` roles): ``/admin/*`` then answers
403 for the missing ``admin`` role, which the contract allows.

``positive_data_acceptance`` (a schema-valid body must get a 2xx) is left out: the guard is
stricter than a JSON Schema says (a NUL character, an unknown but well-formed request id answers
404) and the check would flag those correct refusals.

It only ever talks to a service on this machine (127.0.0.1, ::1 or localhost): it sends hundreds
of hostile requests, and the admin endpoint among them.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

SCHEMA_PATH = "/docs.json"  # where BentoML 1.4 serves the service's OpenAPI document
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
GUARDED_PATHS = ("/predict", "/feedback")
# Each task's own routes, /tasks/<name>/predict and /tasks/<name>/feedback, are guarded alike.
TASK_ROUTE = re.compile(r"/tasks/[^/]+/(predict|feedback)")
# A hang counts as a failure: the tiny and the real model answer in well under a second here.
REQUEST_TIMEOUT_S = 20.0
BODY_EXCERPT = 160

# The guard's answers, which the generated document does not list (see the module docstring).
GUARD_STATUSES = {
    "401": "Missing X-API-Key header",
    "403": "Invalid API key, or a key without the role this endpoint needs",
    "413": "Request body over the size limit",
    "415": "Content-Type other than application/json",
    "422": "Well-formed JSON of the wrong shape",
    "429": "Rate limit exceeded",
}
# Answers an endpoint gives itself that BentoML's document does not list, by path.
ENDPOINT_STATUSES = {
    "/feedback": {"409": "A different label is already recorded for this request id"},
}
ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def is_guarded(path: str) -> bool:
    """Whether the guard asks for an API key on ``path`` (mirrors ``RequestGuard.endpoint``)."""
    return (
        path in GUARDED_PATHS
        or TASK_ROUTE.fullmatch(path) is not None
        or path == "/admin"
        or path.startswith("/admin/")
    )


# ------------------------------------------------------------------------------------- results


@dataclass
class Failure:
    """One kind of wrong answer, with the first request that produced it."""

    check: str
    operation: str
    auth: str
    status: int | None
    method: str
    path: str
    content_type: str | None
    body: str
    detail: str
    count: int = 1

    def describe(self) -> str:
        """One line a reader can turn into a ``curl`` command."""
        if not self.method:  # not about one request (the service went down)
            return f"{self.check}: {self.detail}"
        status = self.status if self.status is not None else "no response"
        ctype = f" Content-Type: {self.content_type};" if self.content_type else ""
        times = f" ({self.count}x)" if self.count > 1 else ""
        return (
            f"{self.check}{times}: {self.method} {self.path} [{self.auth}]{ctype} "
            f"body {self.body} -> {status}: {self.detail}"
        )


@dataclass
class FuzzResult:
    """What one fuzzing run sent, what came back and what was wrong with it."""

    base_url: str
    seed: int
    max_examples: int
    operations: list[str] = field(default_factory=list)
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    alive_after: bool = False
    complete: bool = True  # False when the time budget cut generation short
    checks: list[str] = field(default_factory=list)
    probes: dict[str, int | None] = field(default_factory=dict)  # probe -> status (None: no answer)

    @property
    def ok(self) -> bool:
        return not self.failures and self.alive_after

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        data["ok"] = self.ok
        return data

    def to_markdown(self) -> str:
        verdict = "no failures" if self.ok else f"{len(self.failures)} kind(s) of failure"
        if not self.alive_after:
            verdict += "; **the service did not answer /livez afterwards**"
        lines = [
            "# API fuzzing (schemathesis)",
            "",
            f"**Result: {verdict}.** `python -m tests.harness.fuzz_api --url {self.base_url} "
            f"--max-examples {self.max_examples} --seed {self.seed}`",
            "",
            "| | |",
            "|---|---|",
            f"| operations fuzzed | {len(self.operations)} |",
            f"| requests sent | {self.requests} |",
            f"| seconds | {self.seconds:.1f} |",
            f"| alive afterwards (`/livez`) | {'yes' if self.alive_after else 'NO'} |",
            f"| generation finished within the time budget | {'yes' if self.complete else 'no'} |",
            "",
            "Responses by status: "
            + ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items())),
            "",
            "Operations: " + ", ".join(f"`{op}`" for op in self.operations),
            "",
            "Checks: " + ", ".join(f"`{c}`" for c in self.checks),
            "",
            "Probes: "
            + ", ".join(
                f"{name} -> {'no answer' if status is None else status}"
                for name, status in self.probes.items()
            ),
            "",
        ]
        if self.failures:
            lines += ["## Failures", ""]
            lines += [f"- {f.describe()}" for f in self.failures]
            lines.append("")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- the schema


def require_local(base_url: str) -> str:
    """Return ``base_url`` without a trailing slash, or refuse one that is not on this machine."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise ValueError(
            f"refusing to fuzz {base_url!r}: only http(s) on {', '.join(sorted(LOCAL_HOSTS))} "
            "is allowed (the fuzzer sends hundreds of hostile requests)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"give the service's root URL, not {base_url!r}")
    return base_url.rstrip("/")


def guard_contract(document: dict[str, Any]) -> dict[str, Any]:
    """The served OpenAPI document plus the guard's answers on the guarded operations.

    The request bodies are left as served: their limits are the ones the service enforces.
    """
    doc = copy.deepcopy(document)
    for path, operations in doc.get("paths", {}).items():
        if not is_guarded(path):
            continue
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            own = ENDPOINT_STATUSES.get(path) or ENDPOINT_STATUSES.get(
                "/feedback" if path.endswith("/feedback") else path, {}
            )
            statuses = {**GUARD_STATUSES, **own}
            for status, description in statuses.items():
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": ERROR_BODY}},
                    },
                )
    return doc


def _load_schema(base_url: str, document: dict[str, Any]) -> Any:
    import schemathesis

    # An explicit config: a schemathesis.toml lying in the working directory must not change what
    # is checked. 413 joins the statuses that count as rejecting a schema-violating body.
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "negative_data_rejection": {
                    "expected-statuses": [
                        "400", "401", "403", "404", "405", "406", "409", "413", "415", "422",
                        "428", "429",
                    ]
                }
            }
        }
    )  # fmt: skip
    schema = schemathesis.openapi.from_dict(guard_contract(document), config=config)
    schema.location = f"{base_url}{SCHEMA_PATH}"
    return schema


def _checks() -> list[Callable[..., Any]]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks as oc

    return [
        not_a_server_error,
        oc.status_code_conformance,
        oc.content_type_conformance,
        oc.response_schema_conformance,
        oc.response_headers_conformance,
        oc.negative_data_rejection,
    ]


# ------------------------------------------------------------------------------------- the run


class _ServiceDown(Exception):
    """The service stopped answering: stop fuzzing and report it."""


def _excerpt(body: bytes | str | None) -> str:
    if body is None:
        return "(none)"
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    text = repr(body[:BODY_EXCERPT])
    return f"{text}... ({len(body)} bytes)" if len(body) > BODY_EXCERPT else text


def _alive(session: requests.Session, base_url: str) -> bool:
    try:
        response = session.get(f"{base_url}/livez", timeout=10, allow_redirects=False)
        return response.status_code == 200
    except requests.RequestException:
        return False


@dataclass(frozen=True)
class _Identity:
    """Who the requests claim to be: the real key, none, or a wrong one."""

    name: str
    headers: dict[str, str]
    guarded_status: int | None  # what every guarded request must get, None: anything but 5xx
    full: bool  # fuzz with the full budget and negative data too, or just a few examples


def _identities(api_key: str | None) -> list[_Identity]:
    if api_key is None:
        return [_Identity("no key", {}, None, True)]
    return [
        _Identity("key", {"X-API-Key": api_key}, None, True),
        _Identity("no key", {}, 401, False),
        _Identity("wrong key", {"X-API-Key": f"not-{api_key}"}, 403, False),
    ]


@dataclass
class _Run:
    base_url: str
    session: requests.Session
    result: FuzzResult
    deadline: float
    _seen: dict[tuple[str, str, str, int | None], Failure] = field(default_factory=dict)

    def record(self, status: int | None) -> None:
        self.result.requests += 1
        if status is not None:
            self.result.statuses[status] = self.result.statuses.get(status, 0) + 1

    def fail(
        self,
        *,
        check: str,
        operation: str,
        auth: str,
        status: int | None,
        request: requests.PreparedRequest | None,
        method: str,
        path: str,
        body: bytes | str | None,
        detail: str,
    ) -> None:
        key = (check, operation, auth, status)
        if key in self._seen:
            self._seen[key].count += 1
            return
        ctype = None
        if request is not None:
            method = request.method or method
            path = urlsplit(request.url or path).path or path
            body = request.body
            ctype = request.headers.get("Content-Type")
        failure = Failure(
            check=check,
            operation=operation,
            auth=auth,
            status=status,
            method=method,
            path=path,
            content_type=ctype,
            body=_excerpt(body),
            detail=" ".join(detail.split())[:300],
        )
        self._seen[key] = failure
        self.result.failures.append(failure)

    def out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            self.result.complete = False
            return True
        return False


def _fuzz_operation(
    run: _Run,
    operation: Any,
    mode: Any,
    identity: _Identity,
    examples: int,
    seed: int,
) -> None:
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.failures import FailureGroup

    checks = _checks()
    label = f"{operation.method.upper()} {operation.path}"
    auth = f"{identity.name}, {mode.value}"

    def send(case: Any) -> None:
        if run.out_of_time():
            return
        try:
            response = case.call(
                base_url=run.base_url,
                session=run.session,
                headers=identity.headers,
                timeout=REQUEST_TIMEOUT_S,
                allow_redirects=False,  # a redirect could lead off this machine
            )
        except requests.RequestException as exc:
            run.record(None)
            run.fail(
                check="no_response",
                operation=label,
                auth=auth,
                status=None,
                request=getattr(exc, "request", None),
                method=operation.method.upper(),
                path=operation.path,
                body=None,
                detail=f"{type(exc).__name__}: {exc}",
            )
            if not _alive(run.session, run.base_url):
                raise _ServiceDown(f"{label} got no answer and /livez is down") from exc
            return
        run.record(response.status_code)
        request = response.request

        def failed(check: str, detail: str) -> None:
            run.fail(
                check=check,
                operation=label,
                auth=auth,
                status=response.status_code,
                request=request,
                method="",
                path="",
                body=None,
                detail=detail,
            )

        if (
            identity.guarded_status is not None
            and is_guarded(operation.path)
            and response.status_code != identity.guarded_status
        ):
            failed("auth", f"expected {identity.guarded_status} with {identity.name}")
        try:
            case.validate_response(response, checks=checks, headers=identity.headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                failed(
                    f"{failure.code} {failure.title}",
                    f"{failure.message} | response: {_excerpt(response.content)}",
                )

    test = given(operation.as_strategy(generation_mode=mode))(send)
    test = settings(
        max_examples=examples,
        deadline=None,
        database=None,  # no example database: no replays of another run's examples
        phases=[Phase.explicit, Phase.generate],  # failures are recorded, never shrunk
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )(test)
    test = hypothesis_seed(seed)(test)
    try:
        test()
    except Unsatisfiable:
        pass  # nothing to negate: an operation without parameters or body


# The hand-written probes: (name, method, path, body, extra headers, statuses that are right).
# Generators rarely produce these: huge numbers, deep nesting, bad encodings, size limits.
Probe = tuple[str, str, str, bytes | Iterator[bytes] | None, dict[str, str], frozenset[int]]
BAD_INPUT = frozenset({400, 413, 422})


def _probes() -> list[Probe]:
    def chunked(total: int) -> Iterator[bytes]:  # no Content-Length: the guard must count bytes
        yield b'{"texts": ["'
        for _ in range(total // 65536):
            yield b"x" * 65536
        yield b'"]}'

    return [
        ("valid, text/plain", "POST", "/predict", b'{"texts": ["fine"]}',
         {"Content-Type": "text/plain"}, frozenset({415})),
        ("5000-digit number", "POST", "/predict", b'{"texts": [' + b"9" * 5000 + b"]}",
         {}, BAD_INPUT),
        ("5000-digit number (feedback)", "POST", "/feedback",
         b'{"request_id": "a", "label": ' + b"9" * 5000 + b"}", {}, BAD_INPUT),
        ("huge exponent", "POST", "/predict", b'{"texts": [1e999999]}', {}, BAD_INPUT),
        ("NaN", "POST", "/predict", b'{"texts": NaN}', {}, BAD_INPUT),
        ("nested 100000 deep", "POST", "/predict",
         b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, BAD_INPUT),
        ("lone surrogate", "POST", "/predict", b'{"texts": ["\\ud800"]}', {}, BAD_INPUT),
        ("NUL in a text", "POST", "/predict", b'{"texts": ["a\\u0000b"]}', {}, BAD_INPUT),
        ("invalid UTF-8", "POST", "/predict", b'{"texts": ["\xff\xfe"]}', {}, BAD_INPUT),
        ("UTF-8 BOM", "POST", "/predict", b'\xef\xbb\xbf{"texts": ["a"]}', {},
         frozenset({200, 400})),
        ("trailing garbage", "POST", "/predict", b'{"texts": ["a"]} x', {}, BAD_INPUT),
        ("duplicate field", "POST", "/feedback",
         b'{"request_id": "a", "request_id": 1, "label": "neutral"}', {}, BAD_INPUT),
        ("20000 texts", "POST", "/predict",
         b'{"texts": [' + b",".join([b'"x"'] * 20_000) + b"]}", {}, BAD_INPUT),
        ("one 200000-character text", "POST", "/predict",
         b'{"texts": ["' + b"x" * 200_000 + b'"]}', {}, BAD_INPUT),
        ("8 MB body", "POST", "/predict", b'{"texts": ["' + b"x" * 8_000_000 + b'"]}', {},
         BAD_INPUT),
        ("8 MB chunked body", "POST", "/predict", chunked(8_000_000), {}, BAD_INPUT),
        ("Content-Length not a number", "POST", "/predict", b'{"texts": ["a"]}',
         {"Content-Length": "abc"}, frozenset({200, 400, 413, 422})),
        ("GET on a POST endpoint", "GET", "/predict", None, {}, frozenset({405})),
        # 403: a key without the admin role is refused before any route is looked up.
        ("unknown admin path", "POST", "/admin/nope", None, {}, frozenset({403, 404, 405})),
        ("unknown path", "POST", "/nope", b"{}", {}, frozenset({404})),
    ]  # fmt: skip


def _send_probes(run: _Run, api_key: str | None) -> None:
    key_headers = {"X-API-Key": api_key} if api_key else {}
    probes: list[Probe] = list(_probes())
    if api_key:
        probes += [
            ("empty key", "POST", "/predict", b'{"texts": ["a"]}', {"X-API-Key": ""},
             frozenset({401})),
            ("non-ASCII key", "POST", "/predict", b'{"texts": ["a"]}',
             {"X-API-Key": "\xff\xfe"}, frozenset({403})),
        ]  # fmt: skip
    # A real prediction, then feedback on its request id: the one path to "recorded" (and to a
    # second label, the same: 200, or another: 409) that generated request ids cannot reach.
    predicted = _probe(run, "real prediction", "POST", "/predict", b'{"texts": ["so good"]}',
                       key_headers, frozenset({200}))  # fmt: skip
    if predicted is not None and predicted.status_code == 200:
        rid = predicted.json()["predictions"][0]["request_id"]
        for name, label, expected in [
            ("feedback on it", "positive", 200),
            ("the same label again", "positive", 200),
            ("a different label", "negative", 409),
        ]:
            body = json.dumps({"request_id": rid, "label": label}).encode()
            _probe(run, name, "POST", "/feedback", body, key_headers, frozenset({expected}))
    for name, method, path, data, headers, expected in probes:
        _probe(run, name, method, path, data, {**key_headers, **headers}, expected)


def _probe(
    run: _Run,
    name: str,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] | None,
    headers: dict[str, str],
    expected: frozenset[int],
) -> requests.Response | None:
    headers = {"Content-Type": "application/json", **headers}
    request = requests.Request(method, f"{run.base_url}{path}", data=body, headers=headers)
    prepared = run.session.prepare_request(request)
    if "Content-Length" in headers:  # prepare_request sets the real length; a probe overrides it
        prepared.headers["Content-Length"] = headers["Content-Length"]
    shown = body if isinstance(body, bytes | None) else b"(chunked) " + b"x" * BODY_EXCERPT
    auth = "probe: " + ("key" if headers.get("X-API-Key") else "no key")
    run.result.probes[name] = None
    try:
        response = run.session.send(prepared, timeout=REQUEST_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        run.record(None)
        run.fail(check=f"probe {name}", operation=f"{method} {path}", auth=auth, status=None,
                 request=None, method=method, path=path, body=shown,
                 detail=f"{type(exc).__name__}: {exc}")  # fmt: skip
        if not _alive(run.session, run.base_url):
            raise _ServiceDown(f"probe {name!r} got no answer and /livez is down") from exc
        return None
    run.record(response.status_code)
    run.result.probes[name] = response.status_code
    if response.status_code not in expected or response.status_code >= 500:
        run.fail(check=f"probe {name}", operation=f"{method} {path}", auth=auth,
                 status=response.status_code, request=None, method=method, path=path,
                 body=shown, detail=f"expected {sorted(expected)}; response: "
                 f"{_excerpt(response.content)}")  # fmt: skip
    return response


def fuzz(
    base_url: str,
    api_key: str | None,
    *,
    max_examples: int = 50,
    seed: int = 0,
    deadline_s: float = 120,
) -> FuzzResult:
    """Fuzz every operation of the service at ``base_url`` (on this machine only).

    Args:
        base_url: The service's root, e.g. ``http://127.0.0.1:3000``.
        api_key: A key the service accepts; None for a service without keys. With a key, a few
            examples per operation also go without it and with a wrong one.
        max_examples: Generated examples per operation and kind (valid, invalid); the key-less
            and wrong-key passes get a tenth of it.
        seed: Hypothesis seed: the same seed generates the same requests.
        deadline_s: Time budget for generated requests; the ~25 probes and the liveness check
            run after it whatever the time.

    Returns:
        What was sent and what was wrong; ``result.ok`` when nothing was.
    """
    from schemathesis import GenerationMode

    base_url = require_local(base_url)
    started = time.monotonic()
    session = requests.Session()
    try:
        response = session.get(f"{base_url}{SCHEMA_PATH}", timeout=30, allow_redirects=False)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise RuntimeError(f"cannot load {base_url}{SCHEMA_PATH}: {exc}") from exc
    schema = _load_schema(base_url, response.json())
    result = FuzzResult(
        base_url=base_url,
        seed=seed,
        max_examples=max_examples,
        checks=[c.__name__ for c in _checks()] + ["auth", "probes", "alive_after"],
    )
    run = _Run(base_url, session, result, deadline=started + deadline_s)
    operations = [op.ok() for op in schema.get_all_operations()]
    result.operations = [f"{op.method.upper()} {op.path}" for op in operations]
    small = max(3, max_examples // 10)
    try:
        for identity in _identities(api_key):
            modes = [GenerationMode.POSITIVE]
            if identity.full:
                modes.append(GenerationMode.NEGATIVE)
            for i, operation in enumerate(operations):
                if not identity.full and not is_guarded(operation.path):
                    continue  # open endpoints answer the same whoever asks
                for mode in modes:
                    if run.out_of_time():
                        break
                    examples = max_examples if identity.full else small
                    _fuzz_operation(run, operation, mode, identity, examples, seed * 1000 + i)
        _send_probes(run, api_key)
    except _ServiceDown as exc:
        result.failures.append(Failure("service down", "", "", None, "", "", None, "", str(exc)))
    result.alive_after = _alive(session, base_url)
    result.seconds = round(time.monotonic() - started, 2)
    session.close()
    return result


def write_report(result: FuzzResult, out: Path) -> Path:
    """The markdown report at ``out`` and its JSON beside it (same name, ``.json``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.to_markdown())
    out.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the service's root URL")
    parser.add_argument("--key", default=None, help="an API key the service accepts")
    parser.add_argument("--max-examples", type=int, default=50, help="examples per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=120, help="time budget in seconds")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (.json beside)")
    args = parser.parse_args(argv)
    try:
        result = fuzz(
            args.url,
            args.key,
            max_examples=args.max_examples,
            seed=args.seed,
            deadline_s=args.deadline,
        )
    except (ValueError, RuntimeError) as exc:  # a refused URL, a service that is not there
        parser.error(str(exc))
    if args.out is not None:
        write_report(result, args.out)
    sys.stdout.write(result.to_markdown())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
