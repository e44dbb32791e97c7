"""Who may call what, and who sent a label: API-key roles and label-source ids.

``DRIFTLOOP_API_KEYS`` lists keys, each bare (``key``: ``predict`` and ``feedback``) or with its
roles (``key:predict+feedback+admin``). A label records a source id derived from the key that
sent it, or from the client address when the service runs without keys; never the key itself.
The statuses and the open mode: docs/serving.md.
"""

from __future__ import annotations

import hashlib
import re

PREDICT = "predict"
FEEDBACK = "feedback"
ADMIN = "admin"
ROLES = (PREDICT, FEEDBACK, ADMIN)
DEFAULT_ROLES = frozenset({PREDICT, FEEDBACK})  # a bare key: today's rights, no admin
_ROLE_LIKE = re.compile(r"[A-Za-z_]{1,16}")
ID_HEX = 12  # hex digits of SHA-256 kept in an id: 48 bits, unique among any real set of keys


class ApiKeyError(Exception):
    """``DRIFTLOOP_API_KEYS`` cannot be read.

    Deliberately not a ``ValueError``: pydantic would wrap one into a ``ValidationError`` that
    prints the setting's value, and with it every key.
    """


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HEX]


def key_id(key: str) -> str:
    """The source id of an API key (``key-`` and 12 hex digits): names it, cannot reveal it."""
    return f"key-{_digest(key)}"


def address_id(host: str) -> str:
    """The source id of a client address, for a service that runs without keys."""
    return f"addr-{_digest(host)}"


def parse_api_keys(raw: str | None) -> dict[str, frozenset[str]]:
    """Read ``DRIFTLOOP_API_KEYS``: comma-separated ``key`` or ``key:role+role`` entries.

    Args:
        raw: The setting's value; None or blank means no keys (the service is open).

    Returns:
        Each key and its roles; a bare key gets :data:`DEFAULT_ROLES`.

    Raises:
        ApiKeyError: An entry with no key, no role after ``:``, a role not in :data:`ROLES`,
            or a key listed twice. The message names the entry by position and key id.
    """
    keys: dict[str, frozenset[str]] = {}
    entries = [e.strip() for e in (raw or "").split(",")]
    for n, entry in enumerate((e for e in entries if e), start=1):
        key, sep, spec = entry.rpartition(":") if ":" in entry else (entry, "", "")
        key = key.strip()
        where = f"DRIFTLOOP_API_KEYS entry {n}" + (f" ({key_id(key)})" if key else "")
        if not key:
            raise ApiKeyError(f"{where} has no key before ':': write key or key:role+role")
        roles = [r.strip() for r in spec.split("+")] if sep else []
        if sep and not all(roles):
            raise ApiKeyError(
                f"{where} has an empty role: write key:role+role with roles {', '.join(ROLES)}"
            )
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            # A role is shown only if it looks like one: a key with a ':' in it would put part
            # of the key where a role goes.
            shown = [repr(r) if _ROLE_LIKE.fullmatch(r) else "(not shown)" for r in unknown]
            raise ApiKeyError(
                f"{where} has unknown role(s) {', '.join(shown)}: the roles are "
                f"{', '.join(ROLES)} (keys may not contain ',' or ':')"
            )
        if key in keys:
            raise ApiKeyError(f"{where} repeats a key listed earlier: list each key once")
        keys[key] = frozenset(roles) if sep else DEFAULT_ROLES
    return keys
