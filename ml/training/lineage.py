"""Where a model came from: code version, data hashes and the reason it was trained."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ml.settings import REPO_ROOT


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The checked-out commit, with ``-dirty`` when tracked files have uncommitted changes."""
    try:
        sha = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


# The run tags, named once: the model card and the drift reference read them back.
REASON_TAG = "driftloop.reason"
TRIGGER_TAG = "driftloop.trigger"
GIT_COMMIT_TAG = "driftloop.git_commit"
DATA_TAG_PREFIX = "driftloop.data."  # + file name -> md5
TASK_TAG = "driftloop.task"  # the task a run trained (and a version serves)


def data_tags(data_hashes: dict[str, str]) -> dict[str, str]:
    """``driftloop.data.<file name>`` -> md5, for each data file."""
    return {f"{DATA_TAG_PREFIX}{Path(path).name}": md5 for path, md5 in sorted(data_hashes.items())}


def lineage_tags(reason: str, data_hashes: dict[str, str], trigger: str = "cli") -> dict[str, str]:
    """MLflow tags that answer 'which code, which data, and why' for a training run."""
    return {
        REASON_TAG: reason,
        TRIGGER_TAG: trigger,
        GIT_COMMIT_TAG: git_commit(),
        **data_tags(data_hashes),
    }
