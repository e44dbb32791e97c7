"""A person's approve or reject of a move of ``champion`` (``promotion.require_approval``).

The DAGs ask through Airflow's human-in-the-loop operators and hand the response here; the
library acts on it and writes the person's name into the audit table. docs/approval.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

APPROVE = "Approve"
REJECT = "Reject"
OPTIONS = [APPROVE, REJECT]


class ApprovalError(ValueError):
    """The response is not one this request can act on."""


@dataclass(frozen=True)
class Approval:
    """Who answered a request to move ``champion``, what they chose, and why."""

    approved: bool
    user: str
    at: str
    comment: str = ""

    @classmethod
    def from_response(cls, response: dict[str, Any]) -> Approval:
        """From a HITL operator's result (``chosen_options``, ``responded_by_user``, ...).

        A response that timed out into its default has no user: it is recorded as such.
        """
        chosen = list(response.get("chosen_options") or [])
        if len(chosen) != 1 or chosen[0] not in OPTIONS:
            raise ApprovalError(f"expected one of {OPTIONS}, got {chosen}")
        user = response.get("responded_by_user") or {}
        name = (user.get("name") or user.get("id")) if isinstance(user, dict) else str(user)
        comment = str((response.get("params_input") or {}).get("comment") or "")[:500]
        return cls(
            approved=chosen[0] == APPROVE,
            user=str(name or "nobody (timed out)"),
            at=str(response.get("responded_at") or ""),
            comment=comment,
        )

    def actor(self, via: str) -> str:
        """The audit row's actor: the person first, then the run that asked."""
        return f"user:{self.user} via {via}"

    def describe(self) -> str:
        verb = "approved" if self.approved else "rejected"
        return f"{verb} by {self.user}" + (f": {self.comment}" if self.comment else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_body(
    *, challenger: str, champion: str | None, reason: str, evidence: dict[str, Any] | None = None
) -> str:
    """The Markdown the Airflow UI shows above Approve / Reject: what would move, and why."""
    lines = [
        f"**Move `champion` to v{challenger}**"
        + (f" (now v{champion})." if champion else " (there is no champion yet)."),
        "",
        f"Why the rule says so: {reason}",
    ]
    for key, value in (evidence or {}).items():
        if isinstance(value, int | float | str):
            lines.append(f"- {key}: {value}")
    lines += ["", "Reject keeps the current champion; either answer goes into `driftloop audit`."]
    return "\n".join(lines)
