"""Drift reports: is production traffic still what the champion was trained on?

A window of the prediction log is compared with a *reference*: a sample of the champion's
training data with the champion's own predictions on it. Both sides get the same features
(:func:`compute_features`), and an Evidently 0.7 report tests each of them:

* **text descriptors**: length in characters, words and word pieces, the share of words the
  tokenizer splits or does not know, hashtags, mentions, URLs, upper case, non-ASCII and digits;
* **embeddings**: the champion encoder's mean-pooled sentence embeddings, projected onto a few
  principal components fitted on the reference;
* **predictions**: the predicted-label distribution and the prediction confidence (max score);
* **quality**: macro-recall on the window's feedback labels against the champion's validation
  macro-recall, once the window holds enough labelled rows.

Every tested column is a ``ValueDrift`` with a distance method (Wasserstein for numbers,
Jensen-Shannon for labels), so its score does not grow with the window size the way a p-value
test's does; ``DriftedColumnsCount`` gives each group's share of drifted columns (Evidently 0.7
has no dataset-drift flag: the share is compared with the threshold here). The thresholds live
in ``params.yaml`` (``drift:``); ``monitoring/README.md`` explains each signal and how the
defaults were calibrated.

:func:`run_drift` is the entry point for the DAG and the CLI: it reads the window, builds (or
reads the cached) reference, runs the report, saves HTML + JSON under
``DRIFTLOOP_HOME/reports/<UTC time>/``, logs them to MLflow next to the judged model version and
adds the snapshot to the Evidently workspace at ``DRIFTLOOP_HOME/evidently``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ml.params import LABELS, DriftParams, Params, load_params

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from evidently.core.report import Snapshot

log = logging.getLogger(__name__)

# Per-text descriptors, in report order. All numeric; see monitoring/README.md for each meaning.
DESCRIPTORS: tuple[str, ...] = (
    "chars",
    "words",
    "tokens",
    "split_word_share",
    "unk_share",
    "hashtags",
    "mentions",
    "urls",
    "upper_share",
    "non_ascii_share",
    "digit_share",
)
SCORE_COLUMNS: tuple[str, ...] = tuple(f"score_{label}" for label in LABELS)
EMBEDDING_PREFIX = "emb_"
PC_PREFIX = "pc_"

_HASHTAG = re.compile(r"#\w+")
_MENTION = re.compile(r"@\w+")
_URL = re.compile(r"https?://\S+|www\.\S+", re.IGNORECASE)


# ------------------------------------------------------------------------------------ features


def text_descriptors(texts: list[str], tokenizer: Any) -> pd.DataFrame:
    """Numeric descriptors of each text (see :data:`DESCRIPTORS`), cheap and model-free.

    ``split_word_share`` is the share of the tokenizer's words that it cuts into several word
    pieces and ``unk_share`` the share of pieces that are ``[UNK]``: together they measure how
    much of the text lies outside the model's vocabulary.
    """
    import numpy as np
    import pandas as pd

    s = pd.Series(texts, dtype="object").astype(str)
    chars = s.str.len().to_numpy(dtype=float)
    letters = s.str.count(r"[^\W\d_]").to_numpy(dtype=float)
    enc = tokenizer(list(s), add_special_tokens=False, truncation=False)
    unk_id = tokenizer.unk_token_id
    tokens = np.zeros(len(s))
    unk = np.zeros(len(s))
    split_share = np.zeros(len(s))
    for i, ids in enumerate(enc["input_ids"]):
        tokens[i] = len(ids)
        unk[i] = sum(1 for t in ids if t == unk_id)
        word_ids = [w for w in enc.word_ids(i) if w is not None]
        if word_ids:
            pieces = np.bincount(word_ids)
            pieces = pieces[pieces > 0]
            split_share[i] = float((pieces > 1).mean())
    return pd.DataFrame(
        {
            "chars": chars,
            "words": s.str.split().str.len().fillna(0).to_numpy(dtype=float),
            "tokens": tokens,
            "split_word_share": split_share,
            "unk_share": unk / np.maximum(tokens, 1),
            "hashtags": s.str.count(_HASHTAG.pattern).to_numpy(dtype=float),
            "mentions": s.str.count(_MENTION.pattern).to_numpy(dtype=float),
            "urls": s.str.count(_URL.pattern, flags=re.IGNORECASE).to_numpy(dtype=float),
            "upper_share": s.str.count(r"[A-Z]").to_numpy(dtype=float) / np.maximum(letters, 1),
            "non_ascii_share": s.str.count(r"[^\x00-\x7f]").to_numpy(dtype=float)
            / np.maximum(chars, 1),
            "digit_share": s.str.count(r"\d").to_numpy(dtype=float) / np.maximum(chars, 1),
        },
        index=range(len(s)),
    )


def encode(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int = 64,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean-pooled last hidden states ``(n, hidden)`` and, for a classifier, its probabilities.

    One forward pass gives both: a sequence classifier is run with ``output_hidden_states``; a
    bare encoder (``AutoModel``) gives embeddings only (probabilities ``None``).
    """
    import numpy as np
    import torch

    from ml.modeling import iter_batches

    device = device or next(model.parameters()).device
    emb = np.zeros((len(texts), int(model.config.hidden_size)), dtype=np.float32)
    probs: np.ndarray | None = None
    model.eval()
    with torch.inference_mode():
        for idx, enc in iter_batches(tokenizer, texts, batch_size, max_length):
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model(**enc, output_hidden_states=True)
            states = out.hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            emb[idx] = pooled.float().cpu().numpy()
            logits = getattr(out, "logits", None)
            if logits is not None:
                if probs is None:
                    probs = np.zeros((len(texts), logits.shape[-1]), dtype=np.float32)
                probs[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return emb, probs


def compute_features(
    df: pd.DataFrame,
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    max_length: int = 64,
) -> pd.DataFrame:
    """``df`` plus descriptors, embeddings (``emb_*``) and prediction columns.

    Rows that already carry scores (the prediction log) keep them: that is what production
    answered. Otherwise ``model`` must be a classifier and its scores are added (the reference).
    ``label`` is the predicted label and ``confidence`` the highest score.
    """
    import numpy as np
    import pandas as pd

    base = df.reset_index(drop=True)
    texts = base["text"].astype(str).tolist()
    emb, probs = encode(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    out = base.copy()
    if not set(SCORE_COLUMNS) <= set(out.columns):
        if probs is None and texts:
            raise ValueError(
                "rows have no score_* columns and the model has no classification head; pass "
                "the champion classifier, or rows from the prediction log"
            )
        probs = probs if probs is not None else np.zeros((0, len(LABELS)), dtype=np.float32)
        if probs.shape[1] != len(LABELS):
            raise ValueError(f"the model predicts {probs.shape[1]} classes, expected {LABELS}")
        for j, col in enumerate(SCORE_COLUMNS):
            out[col] = probs[:, j].astype(float)
        out["label"] = [LABELS[k] for k in probs.argmax(axis=1)]
    scores = out[list(SCORE_COLUMNS)].to_numpy(dtype=float)
    out["confidence"] = scores.max(axis=1)
    if "label" not in out.columns:
        out["label"] = [LABELS[k] for k in scores.argmax(axis=1)]
    desc = text_descriptors(texts, tokenizer)
    width = len(str(emb.shape[1] - 1))
    emb_cols = pd.DataFrame(
        emb.astype(np.float32),
        columns=[f"{EMBEDDING_PREFIX}{i:0{width}d}" for i in range(emb.shape[1])],
    )
    return pd.concat([out, desc, emb_cols], axis=1)


def embedding_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(EMBEDDING_PREFIX)]


# ------------------------------------------------------------------------------------- params


# ------------------------------------------------------------------------------------- result


class DriftError(RuntimeError):
    """The report could not be made (no champion to judge, unreadable reference, ...)."""


@dataclass(frozen=True)
class DriftSignal:
    """One tested signal: its score, the threshold it is compared with, and the verdict.

    ``kind`` is ``data`` (inputs, embeddings, predictions) or ``quality`` (live feedback);
    ``detail`` holds the per-column scores or the quality numbers behind the score.
    """

    name: str
    score: float | None
    threshold: float
    drifted: bool
    detail: dict[str, Any] = field(default_factory=dict)
    kind: Literal["data", "quality"] = "data"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Outcome = Literal[
    "insufficient_data", "no_drift", "data_drift", "quality_drop", "data_drift+quality_drop"
]


@dataclass(frozen=True)
class DriftResult:
    """What one drift report found, where it is, and the thresholds it used.

    ``drift_detected`` is ``data_drift or quality_drop``; ``outcome`` names the case for a DAG
    branch, ``reason`` says it in a sentence.
    """

    drift_detected: bool
    data_drift: bool
    quality_drop: bool
    outcome: str
    reason: str
    signals: list[DriftSignal]
    window_start: str | None
    window_end: str | None
    rows: int
    feedback_rows: int
    quality: dict[str, Any] | None
    thresholds: dict[str, Any]
    model_version: str | None
    report_dir: str | None = None
    report_html: str | None = None
    report_json: str | None = None
    reference_rows: int = 0
    reference_origin: str = ""
    created_at: str = ""
    mlflow_run_id: str | None = None
    workspace_snapshot_id: str | None = None

    @property
    def drifted_signals(self) -> list[str]:
        return [s.name for s in self.signals if s.drifted]

    def signal(self, name: str) -> DriftSignal:
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(f"no signal {name!r}; have {[s.name for s in self.signals]}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["drifted_signals"] = self.drifted_signals
        return _jsonable(out)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftResult:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["signals"] = [DriftSignal(**s) for s in data.get("signals", [])]
        return cls(**values)


def _jsonable(value: Any) -> Any:
    """Plain JSON types all the way down (numpy scalars, NaN -> None, datetimes -> ISO)."""
    import math

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float):
        return value
    return str(value)


# ------------------------------------------------------------------------------------ windows


def _utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def window_bounds(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    params: DriftParams | None = None,
) -> tuple[datetime, datetime]:
    """``[since, until)`` in UTC; by default the last ``window_hours`` up to now.

    Naive times and ISO strings without an offset are read as UTC.
    """
    params = params or DriftParams()
    end = _utc(until) or datetime.now(tz=UTC)
    start = _utc(since) or end - timedelta(hours=params.window_hours)
    if start >= end:
        raise ValueError(f"empty window: since {start.isoformat()} is not before {end.isoformat()}")
    return start, end


def load_window(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    *,
    model_version: str | None = None,
    database_url: str | None = None,
    params: DriftParams | None = None,
) -> pd.DataFrame:
    """Logged predictions with ``since <= at < until``, joined with their feedback.

    Columns: those of the ``predictions`` table (``label`` is the *predicted* label) plus
    ``true_label`` and ``feedback_at`` (None where no feedback came). ``model_version`` keeps
    only the rows that version answered (the canary's rows are judged separately). Default
    window: the last ``drift.window_hours``.
    """
    import pandas as pd
    import sqlalchemy as sa

    from ml.db import feedback, get_engine, predictions
    from ml.settings import get_settings

    start, end = window_bounds(since, until, params or DriftParams.from_params())
    query = (
        sa.select(
            predictions,
            feedback.c.label.label("true_label"),
            feedback.c.at.label("feedback_at"),
        )
        .select_from(
            predictions.outerjoin(feedback, predictions.c.request_id == feedback.c.request_id)
        )
        .where(predictions.c.at >= start, predictions.c.at < end)
        .order_by(predictions.c.at, predictions.c.request_id)
    )
    if model_version is not None:
        query = query.where(predictions.c.model_version == str(model_version))
    engine = get_engine(database_url or get_settings().database_url)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    columns = [c.name for c in predictions.columns] + ["true_label", "feedback_at"]
    df = pd.DataFrame([dict(r) for r in rows], columns=columns)
    for col in ("at", "feedback_at"):
        df[col] = pd.to_datetime(df[col], utc=True)
    return df


# ---------------------------------------------------------------------------------- reference

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

    from ml.settings import REPO_ROOT, get_settings
    from ml.training.data import file_md5, read_table

    params = params or load_params()
    dparams = DriftParams.from_params(params)
    if run_tags is None and version is not None:
        run_tags = _run_tags(version)
    run_tags = run_tags or {}

    def repo_path(p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else REPO_ROOT / path

    tagged = run_tags.get(REFERENCE_TAG)
    windows = _training_windows(run_tags) if dparams.reference_from_windows else []
    if tagged:
        table = read_table(repo_path(tagged))
        origin = f"{tagged} (tag {REFERENCE_TAG})"
    elif windows:
        table = pd.concat([read_table(p) for p in windows], ignore_index=True)
        origin = "labelled production windows " + ", ".join(p.name for p in windows)
    else:
        tweets = read_table(repo_path(params.data.tweets))
        table = tweets
        if params.data.train_sources and "source" in tweets.columns:
            table = tweets[tweets["source"].isin(params.data.train_sources)]
        origin = f"{params.data.tweets} sources {params.data.train_sources}"
        batch = get_settings().work_dir / "train_batch.tsv"
        md5 = run_tags.get("driftloop.data.train_batch.tsv")
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


def _training_windows(run_tags: dict[str, str]) -> list[Path]:
    """Labelled production windows named in a training run's data tags that exist here."""
    from ml.settings import REPO_ROOT

    prefix = "driftloop.data."
    names = [k[len(prefix) :] for k in run_tags if k.startswith(prefix + "window-")]
    found = [REPO_ROOT / "data" / "feedback" / name for name in sorted(names, reverse=True)]
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


def _reference_cache_path(version: str, params: DriftParams, rows: pd.DataFrame) -> Path:
    from ml.settings import get_settings

    digest = hashlib.md5(usedforsecurity=False)
    digest.update(json.dumps([params.reference_size, params.max_length, params.seed]).encode())
    for text in rows["text"]:
        digest.update(text.encode("utf-8", "surrogatepass"))
    return get_settings().reports_dir / f"reference-v{version}-{digest.hexdigest()[:10]}.parquet"


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
    path = _reference_cache_path(str(version), dparams, rows)
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
        rows, model, tokenizer, batch_size=dparams.batch_size, max_length=dparams.max_length
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
    """A registered version's classifier and tokenizer, on the configured device."""
    from ml import registry
    from ml.modeling import load_model, resolve_device
    from ml.settings import get_settings

    settings = get_settings()
    local = settings.work_dir / "drift_models" / f"{settings.model_name}-v{version}"
    model_dir = local / "model"
    if (
        not (model_dir / "config.json").is_file()
        or not (model_dir / "tokenizer_config.json").is_file()
    ):
        model_dir = registry.download_model(str(version), dst=local)
    return load_model(model_dir, str(resolve_device(settings.device)))


# ----------------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    """The data-drift half of a report: signals, per-column scores and the Evidently snapshot."""

    signals: list[DriftSignal]
    columns: dict[str, dict[str, Any]]
    snapshot: Snapshot


def has_features(df: pd.DataFrame) -> bool:
    """True when ``df`` already carries :func:`compute_features`' columns."""
    needed = {*DESCRIPTORS, "label", "confidence"}
    return needed <= set(df.columns) and bool(embedding_columns(df))


def project_embeddings(
    current: pd.DataFrame, reference: pd.DataFrame, params: DriftParams
) -> tuple[pd.DataFrame, pd.DataFrame, list[float]]:
    """Both sides' embeddings on the reference's first principal components (``pc_1``...).

    Returns the two projections and the share of the reference's variance each component
    explains. The PCA is fitted on the reference only, so the axes are those of the training
    data and a window cannot move them.
    """
    import pandas as pd
    from sklearn.decomposition import PCA

    cols = embedding_columns(reference)
    if cols != embedding_columns(current):
        raise DriftError(
            "current and reference embeddings differ in width; compute both with the same model"
        )
    k = max(1, min(params.pca_components, len(cols), len(reference) - 1))
    pca = PCA(n_components=k, random_state=params.seed)
    ref = pca.fit_transform(reference[cols].to_numpy(dtype="float64"))
    cur = pca.transform(current[cols].to_numpy(dtype="float64"))
    names = [f"{PC_PREFIX}{i + 1}" for i in range(k)]
    return (
        pd.DataFrame(cur, columns=names),
        pd.DataFrame(ref, columns=names),
        [float(v) for v in pca.explained_variance_ratio_],
    )


def _column_plan(pcs: list[str], params: DriftParams) -> dict[str, tuple[str, float]]:
    """Each tested column -> (Evidently drift method, threshold)."""
    plan = {c: (params.descriptor_method, params.descriptor_threshold) for c in DESCRIPTORS}
    plan.update({c: (params.embedding_method, params.embedding_threshold) for c in pcs})
    plan["confidence"] = (params.confidence_method, params.confidence_threshold)
    plan["label"] = (params.label_method, params.label_threshold)
    return plan


def compare(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    params: DriftParams,
    *,
    timestamp: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> Comparison:
    """Run the Evidently report on two featured frames and turn it into data-drift signals.

    Pure apart from Evidently itself: nothing is read or written. Groups: ``text_descriptors``
    and ``embeddings`` drift when their share of drifted columns (Evidently's
    ``DriftedColumnsCount``) reaches the group's share; ``predicted_label`` and ``confidence``
    are one column each; ``dataset`` is the share over every tested column.
    """
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, RowCount, ValueDrift

    cur_pcs, ref_pcs, variance = project_embeddings(current, reference, params)
    pcs = list(ref_pcs.columns)
    plan = _column_plan(pcs, params)
    numeric = [*DESCRIPTORS, *pcs, "confidence"]

    def frame(feats: pd.DataFrame, proj: pd.DataFrame) -> pd.DataFrame:
        out = feats[[*DESCRIPTORS, "confidence"]].reset_index(drop=True).astype(float)
        out = pd.concat([out, proj.reset_index(drop=True)], axis=1)
        out["label"] = feats["label"].astype(str).to_numpy()
        return out[[*numeric, "label"]]

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=["label"])
    groups: dict[str, tuple[list[str], float]] = {
        "text_descriptors": (list(DESCRIPTORS), params.descriptors_drift_share),
        "embeddings": (pcs, params.embeddings_drift_share),
        "dataset": ([*numeric, "label"], params.drift_share),
    }
    metrics: list[Any] = [RowCount()]
    metrics += [ValueDrift(column=c, method=m, threshold=t) for c, (m, t) in plan.items()]
    metrics += [
        DriftedColumnsCount(
            columns=cols,
            drift_share=share,
            per_column_method={c: plan[c][0] for c in cols},
            per_column_threshold={c: plan[c][1] for c in cols},
        )
        for cols, share in groups.values()
    ]
    report = Report(metrics, metadata=dict(metadata or {}), tags=["driftloop", "drift"])
    with warnings.catch_warnings():
        # Evidently correlates the columns for its tables; a constant one (no [UNK] anywhere)
        # has no correlation, which numpy reports as a division warning. The drift is unaffected.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        snapshot = report.run(
            Dataset.from_pandas(frame(current, cur_pcs), data_definition=definition),
            Dataset.from_pandas(frame(reference, ref_pcs), data_definition=definition),
            timestamp=timestamp,
        )
    values = _snapshot_values(snapshot)

    columns: dict[str, dict[str, Any]] = {}
    for col, (method, threshold) in plan.items():
        score = float(values["ValueDrift", col])
        entry: dict[str, Any] = {
            "score": score,
            "threshold": threshold,
            "method": method,
            "drifted": score >= threshold,
        }
        if col == "label":
            entry["reference_shares"] = _shares(reference["label"])
            entry["current_shares"] = _shares(current["label"])
        else:
            ref_col = ref_pcs[col] if col in pcs else reference[col]
            cur_col = cur_pcs[col] if col in pcs else current[col]
            entry["reference_mean"] = float(ref_col.mean())
            entry["current_mean"] = float(cur_col.mean())
        columns[col] = entry

    signals = []
    for name, (cols, share) in groups.items():
        got = values["DriftedColumnsCount", tuple(cols)]
        detail: dict[str, Any] = {
            "drifted_columns": [c for c in cols if columns[c]["drifted"]],
            "tested_columns": len(cols),
        }
        if name != "dataset":
            detail["columns"] = {c: columns[c] for c in cols}
        if name == "embeddings":
            detail["explained_variance"] = variance
        signals.append(DriftSignal(name, float(got["share"]), share, got["share"] >= share, detail))
    for name in ("predicted_label", "confidence"):
        col = "label" if name == "predicted_label" else name
        c = columns[col]
        signals.append(DriftSignal(name, c["score"], c["threshold"], c["drifted"], dict(c)))
    order = ["text_descriptors", "embeddings", "predicted_label", "confidence", "dataset"]
    signals.sort(key=lambda s: order.index(s.name))
    return Comparison(signals=signals, columns=columns, snapshot=snapshot)


def _shares(labels: pd.Series) -> dict[str, float]:
    counts = labels.astype(str).value_counts(normalize=True)
    return {label: float(counts.get(label, 0.0)) for label in LABELS}


def _snapshot_values(snapshot: Snapshot) -> dict[tuple[Any, ...], Any]:
    """Metric values keyed by (metric type, column) or (type, tuple of columns)."""
    out: dict[tuple[Any, ...], Any] = {}
    for item in snapshot.dict()["metrics"]:
        cfg = item["config"]
        kind = cfg["type"].rsplit(":", 1)[-1]
        if kind == "ValueDrift":
            out[kind, cfg["column"]] = item["value"]
        elif kind == "DriftedColumnsCount":
            out[kind, tuple(cfg["columns"])] = item["value"]
        else:
            out[kind, None] = item["value"]
    return out


# ------------------------------------------------------------------------------------ quality


def macro_recall(y_true: Any, y_pred: Any) -> float:
    """Recall averaged over the classes present in ``y_true`` (absent classes are undefined)."""

    t, p = _codes(y_true), _codes(y_pred)
    return _macro_recall_codes(t, p) if len(t) else float("nan")


def _codes(labels: Any) -> np.ndarray:
    import numpy as np

    index = {label: i for i, label in enumerate(LABELS)}
    return np.fromiter((index.get(str(v), -1) for v in labels), dtype=np.int64)


def _macro_recall_codes(t: np.ndarray, p: np.ndarray) -> float:
    import numpy as np

    k = len(LABELS)
    support = np.bincount(t, minlength=k)
    hits = np.bincount(t[t == p], minlength=k)
    present = support > 0
    return float((hits[present] / support[present]).mean())


def quality_signal(
    labelled: pd.DataFrame,
    reference_macro_recall: float | None,
    params: DriftParams,
    *,
    reference_source: str = "",
) -> tuple[DriftSignal, dict[str, Any] | None]:
    """Macro-recall on the window's feedback against the champion's reference macro-recall.

    The signal fires when the drop exceeds ``quality_drop`` *and* is significant: the
    one-sided bootstrap upper bound (``quality_confidence``) of the window's macro-recall is
    still below the reference. With fewer than ``min_feedback`` labelled rows it does not fire
    and says so.
    """
    import numpy as np

    n = len(labelled)
    if n < params.min_feedback or reference_macro_recall is None:
        why = (
            f"{n} labelled rows in the window (< min_feedback={params.min_feedback})"
            if n < params.min_feedback
            else "no reference macro-recall to compare with"
        )
        detail = {"feedback_rows": n, "skipped": why}
        return DriftSignal("quality", None, params.quality_drop, False, detail, "quality"), None
    y_true = labelled["true_label"].astype(str).to_numpy()
    y_pred = labelled["label"].astype(str).to_numpy()
    t, p = _codes(y_true), _codes(y_pred)
    current = _macro_recall_codes(t, p)
    rng = np.random.default_rng(params.seed)
    boots = []
    for _ in range(500):
        idx = rng.integers(0, n, n)
        boots.append(_macro_recall_codes(t[idx], p[idx]))
    upper = float(np.nanquantile(boots, params.quality_confidence))
    lower = float(np.nanquantile(boots, 1 - params.quality_confidence))
    drop = float(reference_macro_recall) - current
    drifted = drop > params.quality_drop and upper < float(reference_macro_recall)
    quality = {
        "feedback_rows": n,
        "macro_recall": current,
        "macro_recall_ci": [lower, upper],
        "confidence": params.quality_confidence,
        "accuracy": float((y_true == y_pred).mean()),
        "recall_by_label": {
            c: float((y_pred[y_true == c] == c).mean()) for c in LABELS if (y_true == c).any()
        },
        "reference_macro_recall": float(reference_macro_recall),
        "reference_source": reference_source,
        "drop": drop,
    }
    return DriftSignal("quality", drop, params.quality_drop, drifted, quality, "quality"), quality


def quality_report(
    labelled: pd.DataFrame,
    reference: pd.DataFrame,
    *,
    timestamp: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> Snapshot:
    """Evidently's classification view of the window's feedback rows next to the reference.

    The reference rows carry their true labels and the champion's predictions, so both sides
    are the same classifier on labelled data: the window's feedback and training-period rows.
    """
    import pandas as pd
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.metrics import Accuracy, F1Score, Recall

    # Probabilities in columns named after the labels: Evidently then treats the task as
    # three-class even when a window's feedback holds only two of the classes.
    definition = DataDefinition(
        categorical_columns=["true_label"],
        classification=[
            MulticlassClassification(target="true_label", prediction_probas=list(LABELS))
        ],
    )

    def dataset(df: pd.DataFrame) -> Dataset:
        rows = df[df["true_label"].isin(LABELS)]
        frame = pd.DataFrame({"true_label": rows["true_label"].astype(str).to_numpy()})
        probs = rows[list(SCORE_COLUMNS)].to_numpy(dtype=float)
        probs = probs / probs.sum(axis=1, keepdims=True).clip(min=1e-12)  # float32 sums drift
        for j, label in enumerate(LABELS):
            frame[label] = probs[:, j]
        return Dataset.from_pandas(frame, data_definition=definition)

    has_truth = "true_label" in reference.columns and reference["true_label"].isin(LABELS).any()
    report = Report(
        [Recall(), Accuracy(), F1Score()],
        metadata=dict(metadata or {}),
        tags=["driftloop", "quality"],
    )
    with warnings.catch_warnings():
        # A window's feedback may lack a class: sklearn warns that its recall/AUC is undefined.
        warnings.simplefilter("ignore", UserWarning)
        return report.run(
            dataset(labelled), dataset(reference) if has_truth else None, timestamp=timestamp
        )


# ---------------------------------------------------------------------------------- the report


def _stamp(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ")


def _report_dir(now: datetime) -> Path:
    from ml.settings import get_settings

    root = get_settings().reports_dir
    base = root / _stamp(now)
    path, i = base, 1
    while path.exists():
        i += 1
        path = root / f"{base.name}-{i}"
    path.mkdir(parents=True)
    return path


def _champion_version() -> str:
    from ml import registry

    champion = registry.get_alias(registry.CHAMPION)
    if champion is None:
        raise DriftError(
            "there is no champion to judge: train and promote a model first "
            "(`driftloop train`), or pass model_version"
        )
    return champion.version


def _reference_recall(
    version: str | None, reference: pd.DataFrame, given: float | None
) -> tuple[float | None, str]:
    """The macro-recall the window is held to: given, else the version's, else the reference's."""
    if given is not None:
        return float(given), "given"
    if version is not None:
        from ml import registry

        metric = registry.get_version(str(version)).metrics.get("val_macro_recall")
        if metric is not None:
            return float(metric), f"v{version} val_macro_recall"
    if "true_label" in reference.columns and reference["true_label"].isin(LABELS).any():
        rows = reference[reference["true_label"].isin(LABELS)]
        return macro_recall(rows["true_label"], rows["label"]), "reference sample"
    return None, ""


def _decide(signals: list[DriftSignal]) -> tuple[bool, bool, str, str]:
    data = [s.name for s in signals if s.kind == "data" and s.drifted]
    quality = [s for s in signals if s.kind == "quality" and s.drifted]
    if data and quality:
        outcome = "data_drift+quality_drop"
    elif data:
        outcome = "data_drift"
    elif quality:
        outcome = "quality_drop"
    else:
        outcome = "no_drift"
    parts = []
    if data:
        parts.append("data drift in " + ", ".join(data))
    if quality:
        q = quality[0].detail
        parts.append(
            f"macro-recall on feedback {q['macro_recall']:.3f} vs {q['reference_macro_recall']:.3f}"
            f" ({q['feedback_rows']} labelled rows)"
        )
    reason = "; ".join(parts) if parts else "no signal crossed its threshold"
    return bool(data), bool(quality), outcome, reason


def run_drift(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    *,
    current: pd.DataFrame | None = None,
    reference: pd.DataFrame | None = None,
    params: Params | None = None,
    model_version: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    reference_macro_recall: float | None = None,
    log_to_mlflow: bool = True,
    add_to_workspace: bool = True,
) -> DriftResult:
    """Compare a window of traffic with the champion's reference and save the report.

    Args:
        since, until: the window ``[since, until)`` of the prediction log (UTC; default: the
            last ``drift.window_hours``). Ignored for reading when ``current`` is given.
        current: rows to judge instead of the log (``text`` and, optionally, ``label`` /
            ``score_*`` as logged, ``true_label`` for feedback); features are added if missing.
        reference: the reference rows (``text``, ``true_label``), with or without features;
            default: :func:`build_reference` for the judged version (cached).
        params: default ``params.yaml``.
        model_version: the version judged; default the champion. Only rows that version
            answered are read from the log.
        model, tokenizer: default the registered ``model_version``.
        reference_macro_recall: what feedback quality is held to; default the version's
            ``val_macro_recall``, else the reference sample's.
        log_to_mlflow: log the report to a new MLflow run tagged with the judged version.
        add_to_workspace: add the snapshot(s) to the Evidently workspace.

    Returns:
        The typed :class:`DriftResult`. A window with fewer than ``drift.min_rows`` rows is not
        judged: ``drift_detected`` is False, ``outcome`` is ``insufficient_data`` and no report
        is written.
    """
    params = params or load_params()
    dp = DriftParams.from_params(params)
    now = datetime.now(tz=UTC)
    version = str(model_version) if model_version is not None else None
    start: datetime | None
    end: datetime | None
    if current is None:
        start, end = window_bounds(since, until, dp)
        version = version or _champion_version()
        current = load_window(start, end, model_version=version, params=dp)
    else:
        start = _utc(since) or _time_bound(current, min)
        end = _utc(until) or _time_bound(current, max)
    current = current.reset_index(drop=True)
    if "true_label" not in current.columns:
        current["true_label"] = None
    labelled = current[current["true_label"].isin(LABELS)]

    def result(**kwargs: Any) -> DriftResult:
        return DriftResult(
            window_start=start.isoformat() if start else None,
            window_end=end.isoformat() if end else None,
            rows=len(current),
            feedback_rows=len(labelled),
            thresholds=dp.thresholds(),
            model_version=version,
            created_at=now.isoformat(),
            **kwargs,
        )

    if len(current) < dp.min_rows:
        reason = f"not judged: {len(current)} rows in the window (< drift.min_rows={dp.min_rows})"
        log.info(reason)
        return result(
            drift_detected=False,
            data_drift=False,
            quality_drop=False,
            outcome="insufficient_data",
            reason=reason,
            signals=[],
            quality=None,
        )

    if model is None and (
        not has_features(current) or reference is None or not has_features(reference)
    ):
        version = version or _champion_version()
        model, tokenizer = load_version(version)
    if reference is None:
        if version is None:
            raise DriftError("pass a reference, or a model_version to build one from")
        reference = build_reference(version, model=model, tokenizer=tokenizer, params=params)
    elif not has_features(reference):
        reference = compute_features(
            reference, model, tokenizer, batch_size=dp.batch_size, max_length=dp.max_length
        )
    sample = current
    if len(current) > dp.max_rows:
        sample = current.sample(n=dp.max_rows, random_state=dp.seed).reset_index(drop=True)
    if not has_features(sample):
        sample = compute_features(
            sample, model, tokenizer, batch_size=dp.batch_size, max_length=dp.max_length
        )
    if len(labelled) and "label" not in labelled.columns:  # not logged: predicted just now
        labelled = sample[sample["true_label"].isin(LABELS)]

    metadata = {
        "model_version": version or "",
        "window_start": start.isoformat() if start else "",
        "window_end": end.isoformat() if end else "",
    }
    comparison = compare(sample, reference, dp, timestamp=end or now, metadata=metadata)
    ref_recall, ref_source = _reference_recall(version, reference, reference_macro_recall)
    q_signal, quality = quality_signal(labelled, ref_recall, dp, reference_source=ref_source)
    signals = [*comparison.signals, q_signal]
    data_drift, quality_drop, outcome, reason = _decide(signals)

    report_dir = _report_dir(now)
    html, snap_json = report_dir / "report.html", report_dir / "report.json"
    comparison.snapshot.save_html(str(html))
    comparison.snapshot.save_json(str(snap_json))
    q_snapshot = None
    if quality is not None:
        q_snapshot = quality_report(labelled, reference, timestamp=end or now, metadata=metadata)
        q_snapshot.save_html(str(report_dir / "quality.html"))
        q_snapshot.save_json(str(report_dir / "quality.json"))
        quality["report_html"] = str(report_dir / "quality.html")
    found = result(
        drift_detected=data_drift or quality_drop,
        data_drift=data_drift,
        quality_drop=quality_drop,
        outcome=outcome,
        reason=reason,
        signals=signals,
        quality=quality,
        report_dir=str(report_dir),
        report_html=str(html),
        report_json=str(snap_json),
        reference_rows=len(reference),
        reference_origin=str(reference.attrs.get("origin", "given")),
    )
    _write_result(found)
    extra: dict[str, Any] = {}
    if add_to_workspace:
        from ml.drift.workspace import add_snapshot

        name = f"{f'v{version}' if version else 'unregistered model'} {report_dir.name} {outcome}"
        extra["workspace_snapshot_id"] = add_snapshot(
            comparison.snapshot, name=name, project_name=dp.workspace_project
        )
        if q_snapshot is not None:
            add_snapshot(q_snapshot, name=f"{name} quality", project_name=dp.workspace_project)
    if log_to_mlflow:
        extra["mlflow_run_id"] = _log_to_mlflow(found, report_dir)
    if extra:
        found = DriftResult(**{**found.__dict__, **extra})
        _write_result(found)
    log.info("drift report %s: %s (%s)", report_dir, outcome, reason)
    return found


def _time_bound(df: pd.DataFrame, pick: Any) -> datetime | None:
    if "at" not in df.columns or df.empty:
        return None
    import pandas as pd

    return _utc(pd.to_datetime(pick(df["at"]), utc=True).to_pydatetime())


def _write_result(result: DriftResult) -> Path:
    assert result.report_dir is not None
    path = Path(result.report_dir) / "result.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(result.to_json(indent=2))
    tmp.replace(path)
    return path


def _log_to_mlflow(result: DriftResult, report_dir: Path) -> str:
    """A run in driftloop's experiment for this report, linked both ways to the judged version.

    The run is tagged ``driftloop.kind=drift`` and ``driftloop.model_version``; the version gets
    ``driftloop.last_drift_*`` tags pointing back at the run and the report folder.
    """
    import mlflow

    from ml import registry

    registry.ensure_experiment()
    version = result.model_version or "none"
    tags = {
        "driftloop.kind": "drift",
        "driftloop.model_version": version,
        "driftloop.drift_detected": str(result.drift_detected).lower(),
        "driftloop.outcome": result.outcome,
        "driftloop.reason": result.reason,
        "driftloop.report_dir": str(report_dir),
    }
    metrics = {f"drift_{s.name}": float(s.score) for s in result.signals if s.score is not None}
    metrics.update({"rows": float(result.rows), "feedback_rows": float(result.feedback_rows)})
    if result.quality:
        metrics["feedback_macro_recall"] = float(result.quality["macro_recall"])
    with mlflow.start_run(run_name=f"drift-{report_dir.name}", tags=tags) as run:
        mlflow.log_params({k: v for k, v in result.thresholds.items() if v is not None})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(report_dir), artifact_path=f"drift/{report_dir.name}")
    if result.model_version:
        try:
            registry.set_version_tag(
                result.model_version, "driftloop.last_drift_run", run.info.run_id
            )
            registry.set_version_tag(
                result.model_version, "driftloop.last_drift_report", str(report_dir)
            )
            registry.set_version_tag(
                result.model_version, "driftloop.last_drift_outcome", result.outcome
            )
        except Exception:  # noqa: BLE001 - an unregistered version (tests, imports) has no tags
            log.warning("could not tag model version %s with the drift run", result.model_version)
    return str(run.info.run_id)


def list_reports(limit: int | None = None) -> list[DriftResult]:
    """Saved drift results, newest first (read from ``reports/*/result.json``)."""
    from ml.settings import get_settings

    root = get_settings().reports_dir
    if not root.is_dir():
        return []
    found = sorted(root.glob("*/result.json"), key=lambda p: p.parent.name, reverse=True)
    out: list[DriftResult] = []
    for path in found[:limit] if limit else found:
        try:
            out.append(DriftResult.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable drift result %s: %s", path, exc)
    return out
