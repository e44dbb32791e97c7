"""The one on-disk cache of registered models: each version downloaded once, old ones pruned.

Serving loads its champion from here, so a restarted service needs no download; drift reports
read the same copies. A registered version's artifacts never change, so a copy never goes stale.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ml import registry
from ml.settings import get_settings

log = logging.getLogger(__name__)

MARKER = ".driftloop-model-dir"  # relative path of the HF dir inside a cached download
STALE_DOWNLOAD_SECONDS = 3600  # a temporary download folder older than this was left by a kill


def cache_root() -> Path:
    """Where the downloads live: ``DRIFTLOOP_HOME/work/models``."""
    return get_settings().work_dir / "models"


def cached_model_dir(version: str, name: str | None = None, *, keep: int = 3) -> Path:
    """A local HF dir (model + tokenizer) of registered ``version``, downloaded at most once.

    The copy is named after the version's run id too, so two registries that both have a "v1"
    never share one. It is complete or absent: downloaded under a temporary name, then renamed.
    Only the ``keep`` most recently used copies are kept (never this one).

    Args:
        version: The registered version.
        name: Registered model name (the current task's when None).
        keep: How many downloaded versions of that model to keep on disk.
    """
    info = registry.get_version(str(version), name)
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    run = str(info.run_id or "no-run")[:12]
    entry = cache / f"{info.name}-v{info.version}-{run}"
    path = _complete(entry)
    if path is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache))
        try:
            got = registry.download_model(str(info.version), info.name, dst=staging)
            (staging / MARKER).write_text(str(got.relative_to(staging)))
            os.replace(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        path = _complete(entry)
        assert path is not None
    else:
        log.info("%s v%s: using the copy downloaded earlier (%s)", info.name, info.version, entry)
        os.utime(entry)  # most recently used
    _prune(cache, keep=max(1, keep), current=entry, name=info.name)
    return path


def discard(model_dir: Path) -> None:
    """Delete the cached copy holding ``model_dir`` (one that failed to load is fetched afresh)."""
    cache = cache_root().resolve()
    for parent in Path(model_dir).resolve().parents:
        if parent.parent == cache:
            shutil.rmtree(parent, ignore_errors=True)
            return


def _complete(entry: Path) -> Path | None:
    """The HF dir of a complete cached download, or None."""
    try:
        path = entry / (entry / MARKER).read_text().strip()
    except OSError:
        return None
    return path if (path / "config.json").is_file() else None


def _prune(cache: Path, *, keep: int, current: Path, name: str) -> None:
    """Delete all but the ``keep`` most recently used downloads of model ``name`` (never
    ``current``; other tasks' models are theirs to prune), and temporary folders of downloads
    that a killed process left behind."""
    entries = sorted(
        (
            p
            for p in cache.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name.startswith(f"{name}-v")
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[keep:]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in cache.glob(".*"):
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > STALE_DOWNLOAD_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)
