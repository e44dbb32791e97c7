"""The model card: the Markdown description each registered model version carries.

Pure: :func:`render_card` turns a small :class:`ModelCard` into text that the MLflow UI renders;
:func:`ml.training.pipeline.register` fills it from the training run and sets it on the version.
What the card holds and why: ``docs/model-card.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Limits every version of every task shares; a task adds its own (``limits`` in its entry of
# ``params.yaml``: what its behavioural tests check and what they do not).
COMMON_LIMITS: tuple[str, ...] = (
    "A version is gated by its task's primary metric on the validation split and then by the "
    "canary's live comparison; neither checks behaviours the task's limits do not list.",
)


@dataclass(frozen=True)
class ModelCard:
    """What a model version's description says: what, how well, from what, and why."""

    run_id: str
    reason: str
    task: str
    labels: tuple[str, ...]
    metrics: Mapping[str, float]
    data_mix: Mapping[str, int]  # rows (and windows) per part of the training batch
    data_hashes: Mapping[str, str]  # file name -> md5
    git_commit: str
    trigger: str = "unknown"
    mlflow_task: str = "text-classification"
    eval_data_md5: str | None = None
    champion_version: str | None = None  # the champion when this version was registered
    description: str = ""  # the task's, from params.yaml
    limits: tuple[str, ...] = COMMON_LIMITS


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]


def _mix_lines(mix: Mapping[str, int]) -> list[str]:
    if not mix:
        return ["Not recorded (the batch was given as a table, not prepared)."]
    rows = [(part, str(n)) for part, n in mix.items()]
    lines = _table(("part", "rows (windows for `*_windows`)"), rows)
    base = mix.get("base", 0)
    feedback = mix.get("recent", 0) + mix.get("older", 0)
    if base + feedback:
        lines.append("")
        lines.append(
            f"Feedback (labelled production windows): {feedback} of {base + feedback} rows "
            f"({feedback / (base + feedback):.1%})."
        )
    return lines


def render_card(card: ModelCard) -> str:
    """The card as Markdown: task, labels, metrics, data mix, lineage, reason and known limits."""
    champion = (
        f"v{card.champion_version} (the version this one challenges)"
        if card.champion_version
        else "none (no champion when registered)"
    )
    scored_on = f" (validation split md5 `{card.eval_data_md5}`)" if card.eval_data_md5 else ""
    metrics = [(name, f"{value:.4f}") for name, value in sorted(card.metrics.items())]
    hashes = [(f"`{name}`", f"`{md5}`") for name, md5 in sorted(card.data_hashes.items())]
    lines = [
        "## Why this version exists",
        "",
        f"{card.reason} (trigger: {card.trigger})",
        "",
        "## Task",
        "",
        f"`{card.task}`{': ' + card.description if card.description else ''} "
        f"(MLflow task `{card.mlflow_task}`).",
        f"Labels: {', '.join(f'`{label}`' for label in card.labels)}.",
        "",
        f"## Metrics{scored_on}",
        "",
        *(_table(("metric", "value"), metrics) if metrics else ["None logged."]),
        "",
        "## Training data",
        "",
        *_mix_lines(card.data_mix),
        "",
        "## Lineage",
        "",
        f"- training run: `{card.run_id}`",
        f"- git commit: `{card.git_commit}`",
        f"- champion at registration: {champion}",
        "",
        *(_table(("data file", "md5"), hashes) if hashes else ["No data hashes recorded."]),
        "",
        "## Known limits",
        "",
        *(f"- {limit}" for limit in card.limits),
    ]
    return "\n".join(lines) + "\n"
