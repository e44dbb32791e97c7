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


def lineage_tags(reason: str, data_hashes: dict[str, str], trigger: str = "cli") -> dict[str, str]:
    """MLflow tags that answer 'which code, which data, and why' for a training run."""
    tags = {
        "driftloop.reason": reason,
        "driftloop.trigger": trigger,
        "driftloop.git_commit": git_commit(),
    }
    for path, md5 in sorted(data_hashes.items()):
        tags[f"driftloop.data.{Path(path).name}"] = md5
    return tags
