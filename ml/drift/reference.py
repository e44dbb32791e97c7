"""The reference a window is compared with: the champion's training data, scored by the champion.

Which rows stand for the training data, the per-version cache of their features, and the
judged model (the champion by default, read from the one download cache); see ``docs/drift.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.drift.features import compute_features
from ml.drift.result import DriftError
from ml.params import DriftParams, Params, load_params
from ml.training.lineage import DATA_TAG_PREFIX

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


REFERENCE_TAG = "driftloop.reference_data"  # run tag: a TSV (label, text) to use as reference


def reference_rows(
    version: str | None = None,
    params: Params | None = None,
    *,
    run_tags: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The labelled rows (``text``, ``true_label``) that stand for the champion's training data.

    In order of preference:

    1. the table named by the champion run's ``driftloop.reference_data`` tag;
    2. the labelled production windows the champion was retrained on (its run's
       ``driftloop.data.window-*.tsv`` tags, found under ``data/feedback/``), when
       ``drift.reference_from_windows``: a model retrained because traffic moved is judged
       against the traffic it was retrained for, so a shift it has absorbed does not keep
       triggering retraining;
    3. the training sources of ``params.data`` minus the rows of the champion's training batch
       when that batch is found locally (rows the model never saw, so its confidence on them is
       what it would be on fresh traffic from the same period); else the training sources.

    At most ``drift.reference_size`` rows are sampled with ``drift.seed``.
    """
    import pandas as pd

    from ml.settings import project_path
    from ml.tables import file_md5, read_table, read_task_table

    params = params or load_params()
    dparams = DriftParams.from_params(params)
    if run_tags is None and version is not None:
        run_tags = _run_tags(version)
    run_tags = run_tags or {}

    tagged = run_tags.get(REFERENCE_TAG)
    windows = _training_windows(run_tags, params) if dparams.reference_from_windows else []
    if tagged:
        table = read_table(project_path(tagged))
        origin = f"{tagged} (tag {REFERENCE_TAG})"
    elif windows:
        table = pd.concat([read_table(p) for p in windows], ignore_index=True)
        origin = "labelled production windows " + ", ".join(p.name for p in windows)
    else:
        data = params.data
        table = read_task_table(project_path(data.train), data, training=True)
        if data.train_sources and data.time_column:
            table = table[table[data.time_column].isin(data.train_sources)]
            origin = f"{data.train} sources {data.train_sources}"
        else:
            origin = data.train
        from ml.training.pipeline import default_batch_path

        batch = default_batch_path(params)
        md5 = run_tags.get(f"{DATA_TAG_PREFIX}{batch.name}")
        if md5 and batch.is_file() and file_md5(batch) == md5:
            unseen = table[~table["text"].isin(set(read_table(batch)["text"]))]
            if len(unseen) >= dparams.reference_size:
                table = unseen
                origin += " minus the champion's training batch"
    table = table.drop_duplicates(subset=["text"])
    n = min(dparams.reference_size, len(table))
    sample = table.sample(n=n, random_state=dparams.seed) if n < len(table) else table
    out = pd.DataFrame({"text": sample["text"].astype(str).to_numpy()})
    out["true_label"] = sample["label"].to_numpy() if "label" in sample.columns else None
    out.attrs["origin"] = origin
    log.info("reference: %d rows from %s", len(out), origin)
    return out


def _training_windows(run_tags: dict[str, str], params: Params) -> list[Path]:
    """Labelled production windows named in a training run's data tags that exist here."""
    from ml.lifecycle.feedback import task_feedback_dir

    windows = f"{DATA_TAG_PREFIX}window-"
    names = [k.removeprefix(DATA_TAG_PREFIX) for k in run_tags if k.startswith(windows)]
    folder = task_feedback_dir(params)
    found = [folder / name for name in sorted(names, reverse=True)]
    return [p for p in found if p.is_file()]


def _run_tags(version: str) -> dict[str, str]:
    from ml import registry

    info = registry.get_version(str(version))
    if not info.run_id:
        return {}
    try:
        return dict(registry.client().get_run(info.run_id).data.tags)
    except Exception:  # noqa: BLE001 - a deleted run leaves the version usable
        log.warning("run %s of version %s is gone; reference from params", info.run_id, version)
        return {}


def _reference_cache_path(task: str, version: str, params: DriftParams, rows: pd.DataFrame) -> Path:
    from ml.settings import get_settings

    digest = hashlib.md5(usedforsecurity=False)
    digest.update(json.dumps([params.reference_size, params.max_length, params.seed]).encode())
    for text in rows["text"]:
        digest.update(text.encode("utf-8", "surrogatepass"))
    name = f"reference-{task}-v{version}-{digest.hexdigest()[:10]}.parquet"
    return get_settings().reports_dir / name


def build_reference(
    version: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    rows: pd.DataFrame | None = None,
    params: Params | None = None,
    use_cache: bool = True,
) -> pd.DataFrame:
    """The reference with features and the champion's predictions, cached per version.

    Computed once per champion version and rows (a parquet file under ``reports/``); later
    calls read the file. ``model``/``tokenizer`` default to the registered ``version``.
    """
    import pandas as pd

    params = params or load_params()
    dparams = DriftParams.from_params(params)
    rows = rows if rows is not None else reference_rows(version, params)
    path = _reference_cache_path(params.task.name, str(version), dparams, rows)
    sidecar = path.with_suffix(".json")
    if use_cache and path.is_file():
        log.info("reference for v%s from cache %s", version, path)
        cached = pd.read_parquet(path)
        if sidecar.is_file():
            cached.attrs["origin"] = json.loads(sidecar.read_text()).get("origin", "")
        return cached
    if model is None:
        model, tokenizer = load_version(version)
    feats = compute_features(
        rows,
        model,
        tokenizer,
        labels=params.task.labels,
        batch_size=dparams.batch_size,
        max_length=dparams.max_length,
    )
    feats.attrs["origin"] = rows.attrs.get("origin", "given rows")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        feats.to_parquet(tmp, index=False)
        tmp.replace(path)
        sidecar.write_text(json.dumps({"origin": feats.attrs["origin"], "rows": len(feats)}))
        log.info("reference for v%s cached at %s (%d rows)", version, path, len(feats))
    return feats


def load_version(version: str) -> tuple[Any, Any]:
    """A registered version's classifier and tokenizer, on the configured device.

    The files come from the one download cache (:func:`ml.artifacts.cached_model_dir`), which
    serving reads too.
    """
    from ml.artifacts import cached_model_dir
    from ml.modeling import load_model, resolve_device
    from ml.settings import get_settings

    model_dir = cached_model_dir(str(version))
    return load_model(model_dir, str(resolve_device(get_settings().device)))


def champion_version() -> str:
    """The version a report judges by default: the champion's."""
    from ml import registry

    champion = registry.get_alias(registry.CHAMPION)
    if champion is None:
        raise DriftError(
            "there is no champion to judge: train and promote a model first "
            "(`driftloop train`), or pass model_version"
        )
    return champion.version
