"""``driftloop``: the command line.

Thin wrappers over :mod:`ml.training.pipeline` and :mod:`ml.registry`.

Results go to stdout: one JSON document with ``--json`` (the default when stdout is not a
terminal, so scripts and pipes keep reading JSON), aligned text with ``--human`` (the default on
a terminal). Logs and progress go to stderr (:mod:`ml.logs`). See docs/cli.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ml import logs
from ml.console import human_lines

app = typer.Typer(
    name="driftloop",
    help="Keep a text classifier healthy in production: validate, train, promote, roll back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Every command that prints a result takes this flag; None means "decide by the terminal".
JsonFlag = Annotated[
    bool | None,
    typer.Option(
        "--json/--human",
        help="Print one JSON document (stable, sorted keys) or aligned text. "
        "Default: JSON when stdout is a pipe or file, text on a terminal.",
        show_default=False,
    ),
]


def _offline_defaults() -> None:
    """Nothing is fetched from a model hub; tokenizer threads would fight the model's."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _wants_json(as_json: bool | None) -> bool:
    return as_json if as_json is not None else not _stdout_is_terminal()


def _emit(value: Any, as_json: bool | None) -> None:
    """Print a result: JSON (``--json``), aligned text (``--human``), or by the terminal (None)."""
    if _wants_json(as_json):
        typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))
    else:
        # The JSON round trip makes the text show exactly what --json would (enums, dates...).
        typer.echo("\n".join(human_lines(json.loads(json.dumps(value, default=str)))))


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _version() -> str:
    """The installed package's version, or pyproject's when running from an uninstalled tree."""
    from importlib import metadata

    try:
        return metadata.version("driftloop")
    except metadata.PackageNotFoundError:
        import tomllib

        from ml.settings import REPO_ROOT

        with (REPO_ROOT / "pyproject.toml").open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"driftloop {_version()}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at DEBUG instead of INFO (on stderr).")
    ] = False,
    log_format: Annotated[
        logs.LogFormat | None,
        typer.Option(
            "--log-format",
            help="Log lines as text or json (one object per line). "
            "Default: DRIFTLOOP_LOG_FORMAT, else text.",
            show_default=False,
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="The task (params.yaml tasks:) the command works on: its data, registered "
            "model, reports and thresholds. Default: DRIFTLOOP_TASK, else the first task.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print driftloop's version and exit.",
        ),
    ] = False,
) -> None:
    """driftloop command line."""
    from ml.params import UnknownTask, load_params, select_task

    logs.configure(verbose, log_format)
    _offline_defaults()
    try:
        # --task pins the task for the command; without it the usual order applies
        # (DRIFTLOOP_TASK, then default_task), checked here so a wrong name fails at once.
        select_task(task) if task else load_params()
    except UnknownTask as exc:
        raise _fail(str(exc), code=2) from None


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A labelled table (TSV/CSV with label, text).")],
    as_json: JsonFlag = None,
) -> None:
    """Validate a labelled batch. Exit 0 valid, 1 invalid, 2 unreadable."""
    from ml.params import load_params
    from ml.settings import get_settings
    from ml.tables import DataError
    from ml.training.validation import validate_file

    try:
        params = load_params()
        result = validate_file(
            path,
            params.validation,
            data_docs_dir=get_settings().data_docs_dir,
            labels=params.task.labels,
        )
    except DataError as exc:
        if _wants_json(as_json):
            _emit({"path": str(path), "status": "unreadable", "error": str(exc)}, as_json=True)
        else:
            typer.echo(f"unreadable: {exc}")
        raise typer.Exit(2) from None
    status = "valid" if result.success else "invalid"
    if _wants_json(as_json):
        _emit(
            {"path": str(path), "status": status, "reasons": result.reasons(), **result.to_dict()},
            as_json=True,
        )
    else:
        if result.success:
            typer.echo(f"valid: {path} ({result.rows} rows)")
        else:
            typer.echo(f"invalid: {path} ({result.rows} rows, {len(result.failures)} failure(s))")
            for reason in result.reasons():
                typer.echo(f"  - {reason}")
        if result.data_docs:
            typer.echo(f"data docs: {result.data_docs}")
    raise typer.Exit(0 if result.success else 1)


@app.command()
def train(
    reason: Annotated[str, typer.Option(help="Why this model is being trained.")] = "manual",
    epochs: Annotated[int | None, typer.Option(help="Override params.yaml train.epochs.")] = None,
    max_examples: Annotated[
        int | None, typer.Option(help="Override params.yaml train.max_examples.")
    ] = None,
    extra: Annotated[
        list[str] | None,
        typer.Option(help="An extra labelled batch to train on (TSV/CSV); repeatable."),
    ] = None,
    as_json: JsonFlag = None,
) -> None:
    """Prepare, validate, train, evaluate, register and (if better) promote a model."""
    from ml.lifecycle.promotion import run_all
    from ml.training.validation import ValidationFailed

    try:
        result = run_all(
            reason=reason,
            actor="cli",
            epochs=epochs,
            max_examples=max_examples,
            extra_paths=extra,
        )
    except ValidationFailed as exc:
        raise _fail(f"training batch failed validation: {exc}") from None
    _emit(result, as_json)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered version to promote.")],
    force: Annotated[
        bool, typer.Option(help="Promote even if it does not beat the champion.")
    ] = False,
    reason: Annotated[
        str | None,
        typer.Option(help="Why, recorded in the audit. Default: the comparison's verdict."),
    ] = None,
    as_json: JsonFlag = None,
) -> None:
    """Compare a version with the champion and move `champion` if it wins (or --force)."""
    from ml.lifecycle.promotion import promote as do_promote
    from ml.registry import RegistryError

    try:
        decision = do_promote(version, actor=_actor(), force=force, reason=reason)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    _emit(decision.to_dict(), as_json)


@app.command()
def canary(
    version: Annotated[str, typer.Argument(help="Registered version to put on canary traffic.")],
    share: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of traffic (0-1) the version serves. Default: params.yaml "
            "rollout.canary_share. Used with --force; otherwise the offline gate decides.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Skip the offline gate (the canary rule still judges it).")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, recorded in the audit.")] = "manual canary",
    as_json: JsonFlag = None,
) -> None:
    """Serve a version to a canary share of traffic; canary_rollout then promotes or removes it."""
    from ml.lifecycle import canary
    from ml.lifecycle.outcomes import TrainOutcome
    from ml.lifecycle.promotion import promote_or_canary
    from ml.registry import RegistryError, get_version

    try:
        get_version(version)
        if force:
            canary.start_canary(
                version,
                actor=_actor(),
                share=share,
                reason=f"forced past the offline gate: {reason}",
            )
            outcome = TrainOutcome.CANARY_STARTED
        else:
            outcome = promote_or_canary(version, actor=_actor())
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    _emit({"version": version, "outcome": outcome}, as_json)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why, recorded in the audit.")] = "manual rollback",
    as_json: JsonFlag = None,
) -> None:
    """Move `champion` back to the previous champion."""
    from ml.registry import RegistryError
    from ml.registry import rollback as do_rollback

    try:
        move = do_rollback(actor=_actor(), reason=reason)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    _emit(move.to_dict(), as_json)


@app.command()
def setup(
    repair: Annotated[
        bool, typer.Option(help="Repair a half-migrated SQLite MLflow store (keeps a backup).")
    ] = False,
    as_json: JsonFlag = None,
) -> None:
    """Create or upgrade every store (MLflow's backend, driftloop's tables) before first use."""
    from ml.settings import get_settings
    from ml.stores import init_all

    _emit([s.to_dict() for s in init_all(get_settings(), repair=repair)], as_json)


@app.command()
def status(as_json: JsonFlag = None) -> None:
    """Champion and challenger with their metrics and lineage."""
    from ml.registry import CHALLENGER, CHAMPION, client, get_alias

    out: dict[str, Any] = {}
    mlc = None
    for alias in (CHAMPION, CHALLENGER):
        info = get_alias(alias)
        if info is None:
            out[alias] = None
            continue
        mlc = mlc or client()
        tags = mlc.get_run(info.run_id).data.tags if info.run_id else {}
        out[alias] = {
            "version": info.version,
            "run_id": info.run_id,
            "created_at": info.created_at,
            "aliases": info.aliases,
            "metrics": {
                k: round(v, 4)
                for k, v in sorted(info.metrics.items())
                if k.startswith(("val_", "train_"))
            },
            "lineage": {
                k.removeprefix("driftloop."): v
                for k, v in sorted(tags.items())
                if k.startswith("driftloop.")
            },
            "version_tags": info.tags,
        }
    _emit(out, as_json)


@app.command()
def audit(
    limit: Annotated[int, typer.Option(help="How many rows, newest first.")] = 20,
    as_json: JsonFlag = None,
) -> None:
    """The alias audit trail (every promotion, keep, rollback), newest first."""
    from ml.registry import audit_log

    _emit([m.to_dict() for m in audit_log(limit=limit)], as_json)


@app.command("events-flush")
def events_flush(
    now: Annotated[
        bool, typer.Option("--now", help="Retry every waiting event now, ignoring its backoff.")
    ] = False,
    as_json: JsonFlag = None,
) -> None:
    """Deliver the webhook outbox (DRIFTLOOP_WEBHOOK_URL): what was sent and what still waits."""
    from dataclasses import asdict

    from ml.events import flush

    _emit(asdict(flush(ignore_backoff=now)), as_json)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="HTTP port to listen on.")] = 3000,
    host: Annotated[
        str, typer.Option(help="Interface to bind (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
) -> None:
    """Serve the task's champion over HTTP (BentoML): /predict, /feedback, /model, /metrics."""
    from ml.params import current_task
    from ml.serving.launch import serve_argv
    from ml.settings import REPO_ROOT

    cmd = serve_argv(host=host, port=port)
    task = current_task()
    if task:  # --task: the service serves that task
        os.environ["DRIFTLOOP_TASK"] = task
    typer.echo(f"serving on http://{host}:{port} (Ctrl-C stops)", err=True)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage analytics from here
    os.chdir(REPO_ROOT)
    os.execv(cmd[0], cmd)


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="Labelled table (label, text) to send.")],
    url: Annotated[str, typer.Option(help="Base URL of the running service.")] = (
        "http://127.0.0.1:3000"
    ),
    feedback_share: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Share of predictions (0-1) whose true label is posted back."
        ),
    ] = 0.0,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Concurrent clients (1-64).")] = 8,
    limit: Annotated[
        int | None, typer.Option(help="Send at most this many rows. Default: every row.")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DRIFTLOOP_API_KEY",
            help="API key sent with each request (needed when the service sets "
            "DRIFTLOOP_API_KEYS). Default: none.",
            show_envvar=True,
        ),
    ] = None,
    feedback_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Post labels with this key (one picked at random per label); repeatable. "
            "Default: --api-key."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Random seed for which rows get feedback and with which key.")
    ] = 0,
    as_json: JsonFlag = None,
) -> None:
    """Send a table's texts to a running service as production traffic (one per request)."""
    from ml.serving.replay import replay as do_replay
    from ml.tables import DataError

    try:
        summary = do_replay(
            path,
            url,
            feedback_share=feedback_share,
            concurrency=concurrency,
            limit=limit,
            api_key=api_key,
            feedback_keys=feedback_key or None,
            seed=seed,
            progress=True,
        )
    except (DataError, ValueError) as exc:
        raise _fail(str(exc), 2) from None
    _emit(summary.to_dict(), as_json)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def drift(
    since: Annotated[
        str | None,
        typer.Option(
            help="Window start, ISO 8601 time (UTC). Default: params.yaml drift.window_hours "
            "before --until."
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Window end (exclusive), ISO 8601 time (UTC). Default: now.")
    ] = None,
    as_json: JsonFlag = None,
) -> None:
    """Drift report on a window of the prediction log: outcome, signals and where it is saved."""
    from ml.drift import DriftError, run_drift

    try:
        result = run_drift(since, until)
    except (DriftError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _emit(result.to_dict(), as_json)


@app.command()
def reports(
    limit: Annotated[int, typer.Option(help="How many reports, newest first.")] = 20,
    as_json: JsonFlag = None,
) -> None:
    """Saved drift reports, newest first (open the HTML, or `evidently ui` on the workspace)."""
    from ml.drift import list_reports
    from ml.settings import get_settings

    workspace = get_settings().home / "evidently"
    _emit(
        {
            "workspace": str(workspace),
            "ui": f"evidently ui --workspace {workspace}",
            "reports": [
                {
                    "created_at": r.created_at,
                    "outcome": r.outcome,
                    "drift_detected": r.drift_detected,
                    "drifted_signals": r.drifted_signals,
                    "rows": r.rows,
                    "model_version": r.model_version,
                    "html": r.report_html,
                }
                for r in list_reports(limit)
            ],
        },
        as_json,
    )


db = typer.Typer(help="driftloop's own tables: schema migrations (docs/migrations.md).")
app.add_typer(db, name="db")


@db.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="The revision to reach.")] = "head",
    as_json: JsonFlag = None,
) -> None:
    """Migrate DATABASE_URL's tables to a revision (every process also does this on start)."""
    from sqlalchemy.engine import make_url

    from ml.db import current_revision, migrate, normalise_url
    from ml.settings import get_settings

    url = get_settings().database_url
    before = current_revision(url)
    migrate(url, revision)
    shown = make_url(normalise_url(url)).render_as_string(hide_password=True)
    _emit({"database": shown, "from": before, "to": current_revision(url)}, as_json)


@db.command("current")
def db_current(as_json: JsonFlag = None) -> None:
    """The schema revision of DATABASE_URL's tables, and the newest this driftloop knows."""
    from ml.db import current_revision, head_revision
    from ml.settings import get_settings

    url = get_settings().database_url
    _emit({"current": current_revision(url), "head": head_revision()}, as_json)


# --- DVC stages: the same library functions, file in and file out -----------------------------

stage = typer.Typer(help="Pipeline stages for dvc.yaml (file in, file out).", no_args_is_help=True)
app.add_typer(stage, name="stage")


@stage.command("prepare")
def stage_prepare(
    out: Annotated[Path, typer.Option(help="Where to write the batch (TSV).")] = Path(
        "data/prepared/train.tsv"
    ),
) -> None:
    """Write the training batch described by params.yaml; print what was written (JSON)."""
    from ml.training.pipeline import prepare

    _emit(prepare(out_path=out).__dict__, as_json=True)


@stage.command("validate")
def stage_validate(
    batch: Annotated[Path, typer.Option(help="The training batch to validate.")] = Path(
        "data/prepared/train.tsv"
    ),
    report: Annotated[Path, typer.Option(help="Where to write the result (JSON).")] = Path(
        "metrics/validation.json"
    ),
) -> None:
    """Validate the training batch; fail the stage (and `dvc repro`) if it is invalid."""
    from ml.params import load_params
    from ml.settings import get_settings
    from ml.training.validation import validate_file

    params = load_params()
    result = validate_file(
        batch, params.validation, get_settings().data_docs_dir, labels=params.task.labels
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    if not result.success:
        raise _fail("; ".join(result.reasons()))


@stage.command("train")
def stage_train(
    batch: Annotated[Path, typer.Option(help="The training batch (TSV).")] = Path(
        "data/prepared/train.tsv"
    ),
    out: Annotated[Path, typer.Option(help="Folder to save the model to (HF format).")] = Path(
        "models/sentiment"
    ),
) -> None:
    """Fine-tune on the batch and save the model to a folder DVC tracks; print it (JSON)."""
    from ml.params import load_params
    from ml.settings import get_settings
    from ml.tables import read_table
    from ml.training.pipeline import base_checkpoint
    from ml.training.train import train_model

    params = load_params()
    base = base_checkpoint(params)
    result = train_model(
        read_table(batch),
        params.train,
        out,
        labels=params.task.labels,
        base_model=base,
        device_setting=get_settings().device,
        log_to_mlflow=False,
    )
    _emit({k: v for k, v in result.to_dict().items() if k != "step_losses"}, as_json=True)


@stage.command("evaluate")
def stage_evaluate(
    model: Annotated[Path, typer.Option(help="The model folder to score.")] = Path(
        "models/sentiment"
    ),
    metrics: Annotated[Path, typer.Option(help="Where to write the metrics (JSON).")] = Path(
        "metrics/eval.json"
    ),
    plot: Annotated[Path, typer.Option(help="Where to write the confusion matrix (PNG).")] = Path(
        "metrics/confusion_matrix.png"
    ),
) -> None:
    """Score the model on the validation split; write metrics JSON and a confusion matrix."""
    from ml.training.evaluate import confusion_png
    from ml.training.pipeline import evaluate_dir

    result = evaluate_dir(model)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}, indent=2))
    confusion_png(result.confusion, result.labels, plot)
    _emit(result.metrics, as_json=True)


def _actor() -> str:
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no USER/LOGNAME and no passwd entry
        user = "unknown"
    return f"cli:{user}"


def run() -> None:
    """The ``driftloop`` entry point: a store that cannot be used is an error, not a traceback."""
    from ml.stores import StoreError

    try:
        app()
    except StoreError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    run()
