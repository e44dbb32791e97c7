"""The validation gate: a Great Expectations suite for a labelled batch (``label``, ``text``).

One suite, built from ``params.yaml``'s ``validation`` section, checks that the required columns
exist, hold no nulls or empty strings, that every label is one of the task's labels, that
texts have a sane length, that few texts are duplicated, that the batch is big enough, and that
each class's share lies within bounds. Results come back as a typed :class:`ValidationResult`
whose failures read as one line each; :func:`require_valid` turns a failed result into
:class:`ValidationFailed` so a pipeline stops there.

Texts are validated as the model sees them: surrounding whitespace is stripped first, so an
all-whitespace text counts as empty, and lengths and duplicates are measured on stripped text.

Great Expectations is imported inside the functions (it takes seconds to import), and each call
uses its own ephemeral context, so nothing is written anywhere unless Data Docs are asked for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import pandas as pd

from ml.params import ValidationParams
from ml.tables import read_table

if TYPE_CHECKING:
    import great_expectations as gx

logger = logging.getLogger(__name__)

SUITE_NAME = "labelled_batch"
REQUIRED_COLUMNS: tuple[str, ...] = ("label", "text")
DATA_DOCS_SITE = "local_site"  # the ephemeral context's own site, pointed at a folder we choose
_EXAMPLES = 20  # how many unexpected values GX keeps per expectation (result_format SUMMARY)
_SHOWN = 5  # how many of them a message quotes


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation, said in a line a person can act on.

    Attributes:
        expectation_type: GX's name for it, e.g. ``expect_column_values_to_be_in_set``.
        check: driftloop's name for the rule, e.g. ``label_in_set`` or ``class_min_share``
            (one GX type can serve several rules).
        column: The column checked, or None for table-level checks.
        message: What was wrong, e.g. "column 'label': 3 rows have labels outside {...}: 'happy'".
        observed: The observed value (a count, a share, a list of columns), JSON-able.
    """

    expectation_type: str
    check: str
    column: str | None
    message: str
    observed: Any = None


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of validating one labelled batch against the suite.

    Attributes:
        success: True when every expectation passed.
        name: What was validated (a file path, or the name given to :func:`validate_frame`).
        rows: Number of rows in the batch.
        failures: One entry per failed expectation, in suite order.
        data_docs: Path of the Data Docs ``index.html``, or None when none were built.
        statistics: GX's counts (evaluated/successful/unsuccessful expectations, success_percent).
    """

    success: bool
    name: str
    rows: int
    failures: list[ExpectationFailure] = field(default_factory=list)
    data_docs: str | None = None
    statistics: dict[str, float] = field(default_factory=dict)

    def reasons(self) -> list[str]:
        """One line per failed expectation, naming the expectation and what was wrong."""
        return [f"{f.expectation_type}: {f.message}" for f in self.failures]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for XCom, MLflow or a report file)."""
        return asdict(self)


class ValidationFailed(Exception):
    """Raised by :func:`require_valid` when a batch fails validation; carries the result."""

    def __init__(self, result: ValidationResult) -> None:
        self.result = result
        lines = "\n".join(f"  - {reason}" for reason in result.reasons())
        docs = f"\nData Docs: {result.data_docs}" if result.data_docs else ""
        super().__init__(
            f"{result.name} failed validation ({len(result.failures)} failed expectation(s) "
            f"on {result.rows} rows):\n{lines}{docs}\n"
            "Fix the data (or, if the threshold is wrong, the 'validation' section of "
            "params.yaml) and run again."
        )


def build_suite(params: ValidationParams, labels: Sequence[str]) -> gx.ExpectationSuite:
    """The expectation suite for a labelled batch, with thresholds taken from ``params``.

    Each expectation carries ``meta={"check": ...}`` so results can be read back per rule.
    The suite expects the normalised frame made by :func:`_normalise` (empty texts as nulls).
    """
    _quiet_gx()
    import great_expectations as gx
    import great_expectations.expectations as gxe

    labels = list(labels)
    expectations: list[Any] = []
    for column in REQUIRED_COLUMNS:
        expectations.append(
            gxe.ExpectColumnToExist(
                column=column,
                meta={"check": "column_exists"},
                description=f"Column `{column}` is present.",
            )
        )
    for column in REQUIRED_COLUMNS:
        expectations.append(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column,
                meta={"check": "not_empty"},
                description=f"No `{column}` is null, empty or whitespace-only.",
            )
        )
    expectations += [
        gxe.ExpectColumnValuesToBeInSet(
            column="label",
            value_set=labels,
            meta={"check": "label_in_set"},
            description=f"Every label is one of {', '.join(labels)}.",
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            min_value=params.text_min_length,
            max_value=params.text_max_length,
            meta={"check": "text_length"},
            description=(
                f"Texts are {params.text_min_length} to {params.text_max_length} characters long "
                "after stripping whitespace."
            ),
        ),
        gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="text",
            min_value=1.0 - params.max_duplicate_share,
            meta={"check": "duplicate_share"},
            description=f"At most {params.max_duplicate_share:.1%} of texts are duplicates.",
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value=params.min_rows,
            meta={"check": "min_rows"},
            description=f"The batch has at least {params.min_rows} rows.",
        ),
    ]
    # A class's share >= min  <=>  "label in {c}" holds for at least `min` of the rows;
    # a class's share <= max  <=>  "label not in {c}" holds for at least `1 - max` of them.
    for label in labels:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="label",
                value_set=[label],
                mostly=params.min_class_share,
                meta={"check": "class_min_share", "class": label},
                description=f"Class `{label}` is at least {params.min_class_share:.1%} of labels.",
            )
        )
        expectations.append(
            gxe.ExpectColumnValuesToNotBeInSet(
                column="label",
                value_set=[label],
                mostly=max(0.0, 1.0 - params.max_class_share),
                meta={"check": "class_max_share", "class": label},
                description=f"Class `{label}` is at most {params.max_class_share:.1%} of labels.",
            )
        )
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)


def validate_frame(
    df: pd.DataFrame,
    params: ValidationParams,
    name: str = "batch",
    data_docs_dir: Path | None = None,
    *,
    labels: Sequence[str],
) -> ValidationResult:
    """Validate a labelled batch (columns ``label`` and ``text``; others are ignored).

    Args:
        df: The batch. It is not modified.
        params: Thresholds (``params.yaml``'s ``validation`` section).
        labels: The task's labels: every row's label must be one of them.
        name: What to call the batch in the result and in Data Docs.
        data_docs_dir: If given, Data Docs HTML for this validation is written there; its
            ``index.html`` lists this validation only (pages of earlier runs stay on disk).

    Returns:
        A :class:`ValidationResult`; it does not raise on failure (see :func:`require_valid`).
    """
    _quiet_gx()  # before the import too: GX logs while it registers its expectations
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_gx()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    if data_docs_dir is not None:
        # The ephemeral context already has `local_site` (in a temp dir): re-point it.
        site: Any = {  # GX's TypedDict for this omits SiteBuilder's show_how_to_buttons
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(data_docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
        context.update_data_docs_site(DATA_DOCS_SITE, site)
    asset = context.data_sources.add_pandas("driftloop").add_dataframe_asset(_asset_name(name))
    batch_definition = asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(build_suite(params, labels))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(
            name=f"{SUITE_NAME}-{_asset_name(name)}", data=batch_definition, suite=suite
        )
    )
    gx_result = definition.run(
        batch_parameters={"dataframe": _normalise(df)},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": _EXAMPLES},
    )

    docs: str | None = None
    if data_docs_dir is not None:
        urls = context.build_data_docs(site_names=[DATA_DOCS_SITE])
        docs = _url_to_path(urls[DATA_DOCS_SITE])

    failures = _failures(gx_result.to_json_dict(), df)
    stats = {k: v for k, v in (gx_result.statistics or {}).items() if isinstance(v, int | float)}
    result = ValidationResult(
        success=bool(gx_result.success) and not failures,
        name=name,
        rows=len(df),
        failures=failures,
        data_docs=docs,
        statistics=stats,
    )
    if result.success:
        logger.info("%s passed validation (%d rows)", name, result.rows)
    else:
        logger.warning("%s failed validation: %s", name, "; ".join(result.reasons()))
    return result


def validate_file(
    path: str | Path,
    params: ValidationParams,
    data_docs_dir: Path | None = None,
    *,
    labels: Sequence[str],
) -> ValidationResult:
    """Read a TSV/CSV table with :func:`ml.training.data.read_table` and validate it.

    Raises:
        DataError: The file is missing or is not a readable table (callers map this to
            exit code 2; it is not a validation failure but an unusable input).
    """
    df = read_table(path)
    return validate_frame(df, params, name=str(path), data_docs_dir=data_docs_dir, labels=labels)


def require_valid(result: ValidationResult) -> ValidationResult:
    """Return ``result`` if it passed; raise :class:`ValidationFailed` otherwise."""
    if not result.success:
        raise ValidationFailed(result)
    return result


# --- internals -------------------------------------------------------------------------------


def _quiet_gx() -> None:
    """GX logs a lot at INFO (and Airflow's structlog would show it all); keep warnings only.

    Some GX modules pin their own logger to INFO at import, so the parent's level is not enough.
    """
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    for name, logger_ in list(logging.root.manager.loggerDict.items()):
        if (
            name.startswith("great_expectations.")
            and isinstance(logger_, logging.Logger)
            and logging.NOTSET < logger_.level < logging.WARNING
        ):
            logger_.setLevel(logging.WARNING)


def _asset_name(name: str) -> str:
    """A name safe for GX asset ids and Data Docs file paths."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "batch"


def _url_to_path(url: str) -> str:
    parsed = urlparse(url)
    return unquote(parsed.path) if parsed.scheme == "file" else url


def _blank(values: pd.Series) -> pd.Series:
    """True where a value is a string that is empty once stripped."""
    return values.map(lambda v: isinstance(v, str) and not v.strip()).astype(bool)


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """The frame as validated: text stripped, empty or whitespace-only label/text made null.

    Labels are not stripped otherwise: ``" positive"`` is not a valid label downstream either.
    """
    out = df.copy()
    if "text" in out.columns:
        out["text"] = out["text"].map(_clean_text)
    if "label" in out.columns:
        out["label"] = out["label"].map(
            lambda v: None if _isnull(v) or (isinstance(v, str) and not v.strip()) else v
        )
    return out


def _clean_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    return None if _isnull(value) else str(value).strip() or None


def _isnull(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-like values
        return False


def _exception_messages(info: Any) -> list[str]:
    """GX reports exceptions either flat or keyed by metric id; collect the raised ones."""
    if not isinstance(info, dict):
        return []
    if "raised_exception" in info:
        entries = [info]
    else:
        entries = [v for v in info.values() if isinstance(v, dict)]
    return [
        str(e.get("exception_message") or "unknown error")
        for e in entries
        if e.get("raised_exception") or e.get("exception_message")
    ]


def _failures(gx_result: dict[str, Any], df: pd.DataFrame) -> list[ExpectationFailure]:
    missing = {c for c in REQUIRED_COLUMNS if c not in df.columns}
    failures = []
    for entry in gx_result.get("results", []):
        if entry.get("success"):
            continue
        config = entry.get("expectation_config") or {}
        kwargs = config.get("kwargs") or {}
        meta = config.get("meta") or {}
        column = kwargs.get("column")
        check = meta.get("check", config.get("type", "unknown"))
        if column in missing and check != "column_exists":
            continue  # the column_exists failure already says so; these could not run
        errors = _exception_messages(entry.get("exception_info"))
        if errors:
            where = f"column '{column}'" if column else "table"
            message = f"{where}: check '{check}' could not run: {errors[0]}"
            observed: Any = None
        else:
            result = entry.get("result") or {}
            message, observed = _describe(check, column, kwargs, meta, result, df)
        failures.append(
            ExpectationFailure(
                expectation_type=str(config.get("type")),
                check=check,
                column=column,
                message=message,
                observed=observed,
            )
        )
    return failures


def _quote(values: list[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def _describe(
    check: str,
    column: str | None,
    kwargs: dict[str, Any],
    meta: dict[str, Any],
    result: dict[str, Any],
    df: pd.DataFrame,
) -> tuple[str, Any]:
    """A one-line message and the observed value for one failed expectation."""
    unexpected = int(result.get("unexpected_count") or 0)
    considered = int(result.get("element_count") or 0) - int(result.get("missing_count") or 0)
    are, have = ("row is", "row has") if unexpected == 1 else ("rows are", "rows have")
    if check == "column_exists":
        present = [str(c) for c in df.columns]
        return (
            f"column '{column}' is missing (columns present: {_quote(present) or 'none'})",
            present,
        )
    if check == "not_empty":
        nulls = int(df[column].map(_isnull).sum())
        blanks = int(_blank(df[column]).sum())
        return (
            f"column '{column}': {unexpected} {are} null or empty ({nulls} null, {blanks} "
            "empty or whitespace-only)",
            unexpected,
        )
    if check == "label_in_set":
        counts = result.get("partial_unexpected_counts") or []
        bad = [c["value"] for c in counts][:_SHOWN]
        shown_count = sum(c["count"] for c in counts[:_SHOWN])
        more = ", ..." if counts and unexpected > shown_count else ""
        return (
            f"column '{column}': {unexpected} {have} labels outside "
            f"{{{', '.join(kwargs.get('value_set') or [])}}}: {_quote(bad)}{more}",
            sorted({str(b) for b in bad}),
        )
    if check == "text_length":
        lengths = sorted({len(str(v)) for v in result.get("partial_unexpected_list") or []})
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        shown = ", ".join(str(n) for n in lengths[:_SHOWN])
        shown += ", ..." if len(lengths) > _SHOWN else ""
        return (
            f"column '{column}': {unexpected} {have} a length outside [{low}, {high}] "
            f"characters after stripping (lengths seen: {shown})",
            unexpected,
        )
    if check == "duplicate_share":
        if not df[column].map(_clean_text).notna().any():  # GX then reports 0% unique
            return f"column '{column}': no non-empty texts, so no duplicate share", None
        unique = float(result.get("observed_value") or 0.0)
        share = 1.0 - unique
        limit = 1.0 - float(kwargs.get("min_value") or 0.0)
        return (
            f"column '{column}': {share:.1%} of texts are duplicates, above "
            f"max_duplicate_share {limit:.1%}",
            round(share, 6),
        )
    if check == "min_rows":
        observed = result.get("observed_value")
        return (
            f"table has {observed} rows, fewer than min_rows {kwargs.get('min_value')}",
            observed,
        )
    if check in ("class_min_share", "class_max_share"):
        label = meta.get("class")
        count = considered - unexpected if check == "class_min_share" else unexpected
        share = count / considered if considered else 0.0
        if check == "class_min_share":
            bound = float(kwargs.get("mostly") or 0.0)
            what = f"is {share:.1%} of labels ({count} of {considered})"
            what = "is missing (0 rows)" if count == 0 else what
            return (
                f"column '{column}': class '{label}' {what}, below min_class_share {bound:.1%}",
                round(share, 6),
            )
        bound = 1.0 - float(kwargs.get("mostly") or 0.0)
        return (
            f"column '{column}': class '{label}' is {share:.1%} of labels ({count} of "
            f"{considered}), above max_class_share {bound:.1%}",
            round(share, 6),
        )
    observed = result.get("observed_value", unexpected)
    where = f"column '{column}'" if column else "table"
    return f"{where}: {check} failed (observed {observed!r})", observed
