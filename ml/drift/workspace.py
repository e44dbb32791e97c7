"""The Evidently workspace that keeps every drift report, so they can be browsed over time.

``evidently ui --workspace $DRIFTLOOP_HOME/evidently`` opens it: one project (``driftloop
drift`` by default) whose dashboard plots, per report, the share of drifted columns of each
signal group, the predicted-label and confidence scores and the window's size; each report
opens as the same page as its ``report.html``.

Evidently is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evidently.core.report import Snapshot
    from evidently.ui.workspace import Project, Workspace

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "driftloop drift"
DESCRIPTION = (
    "driftloop drift reports: a window of the prediction log against the champion's reference "
    "(text descriptors, embedding components, predicted labels, confidence)."
)


def workspace_dir(home: Path | None = None) -> Path:
    """``DRIFTLOOP_HOME/evidently`` (or under ``home``)."""
    if home is None:
        from ml.settings import get_settings

        home = get_settings().home
    return Path(home) / "evidently"


def open_workspace(path: Path | None = None) -> Workspace:
    """The local workspace at ``path`` (default :func:`workspace_dir`), created if missing."""
    from evidently.ui.workspace import Workspace

    path = Path(path) if path else workspace_dir()
    path.mkdir(parents=True, exist_ok=True)
    return Workspace.create(str(path))


def ensure_project(workspace: Workspace, name: str = DEFAULT_PROJECT) -> Project:
    """The project called ``name``, created with its dashboard the first time."""
    for project in workspace.list_projects():
        if project.name == name:
            return project
    project = workspace.create_project(name, description=DESCRIPTION)
    _add_panels(project)
    log.info("created Evidently project %r (%s)", name, project.id)
    return project


def _add_panels(project: Project) -> None:
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import counter_panel, line_plot_panel

    def drift(column: str, legend: str) -> PanelMetric:
        return PanelMetric(legend=legend, metric="ValueDrift", metric_labels={"column": column})

    project.dashboard.add_panel(
        counter_panel(
            title="Rows in the last window",
            values=[PanelMetric(legend="rows", metric="RowCount")],
            size="half",
            aggregation="last",
        )
    )
    project.dashboard.add_panel(
        counter_panel(
            title="Share of drifted columns (all signals, last report)",
            values=[
                PanelMetric(
                    legend="share",
                    metric="DriftedColumnsCount",
                    metric_labels={"value_type": "share"},
                )
            ],
            size="half",
            aggregation="last",
        )
    )
    project.dashboard.add_panel(
        line_plot_panel(
            title="Predictions: label distribution (Jensen-Shannon) and confidence (Wasserstein)",
            values=[drift("label", "predicted label"), drift("confidence", "confidence")],
            size="full",
        )
    )
    project.dashboard.add_panel(
        line_plot_panel(
            title="Embeddings: normed Wasserstein distance of the first components",
            values=[drift(f"pc_{i}", f"pc_{i}") for i in range(1, 5)],
            size="half",
        )
    )
    project.dashboard.add_panel(
        line_plot_panel(
            title="Text descriptors: normed Wasserstein distance",
            values=[
                drift(c, c)
                for c in ("chars", "tokens", "split_word_share", "urls", "hashtags", "upper_share")
            ],
            size="half",
        )
    )


def add_snapshot(
    snapshot: Snapshot,
    *,
    name: str,
    project_name: str = DEFAULT_PROJECT,
    path: Path | None = None,
) -> str:
    """Add a report's snapshot to the workspace project; return the snapshot's id."""
    workspace = open_workspace(path)
    project = ensure_project(workspace, project_name)
    ref = workspace.add_run(project.id, snapshot, include_data=False, name=name)
    return str(ref.id)


def list_snapshots(
    project_name: str = DEFAULT_PROJECT, path: Path | None = None
) -> list[dict[str, Any]]:
    """The project's snapshots (id, name, timestamp), oldest first; empty if none yet."""
    path = Path(path) if path else workspace_dir()
    if not path.is_dir():
        return []
    workspace = open_workspace(path)
    for project in workspace.list_projects():
        if project.name == project_name:
            runs = workspace.list_runs(project.id)
            return [{"id": str(r)} for r in runs]
    return []
