"""``driftloop``: the command line.

Thin wrappers over :mod:`ml.training.pipeline` and :mod:`ml.registry`.

Results go to stdout (JSON where a program may read them); logs and progress go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="driftloop",
    help="Keep a text classifier healthy in production: validate, train, promote, roll back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NOISY = (
    "great_expectations",
    "mlflow",
    "alembic",
    "urllib3",
    "httpx",
    "git",
    "filelock",
    "matplotlib",
    "PIL",
    "asyncio",
    "sqlalchemy",
    "fsspec",
)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _emit(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """driftloop command line."""
    _setup_logging(verbose)


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A labelled table (TSV/CSV with label, text).")],
) -> None:
    """Validate a labelled batch. Exit 0 valid, 1 invalid, 2 unreadable."""
    from ml.params import load_params
    from ml.settings import get_settings
    from ml.training.data import DataError
    from ml.training.validation import validate_file

    try:
        result = validate_file(
            path, load_params().validation, data_docs_dir=get_settings().data_docs_dir
        )
    except DataError as exc:
        typer.echo(f"unreadable: {exc}")
        raise typer.Exit(2) from None
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
        list[str] | None, typer.Option(help="Extra labelled batches to train on.")
    ] = None,
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
    _emit(result)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered version to promote.")],
    force: Annotated[bool, typer.Option(help="Promote even if it does not win.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the audit)")] = None,
) -> None:
    """Compare a version with the champion and move `champion` if it wins (or --force)."""
    from ml.lifecycle.promotion import promote as do_promote
    from ml.registry import RegistryError

    try:
        decision = do_promote(version, actor=_actor(), force=force, reason=reason)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    _emit(decision.to_dict())


@app.command()
def canary(
    version: Annotated[str, typer.Argument(help="Registered version to put on canary traffic.")],
    share: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    force: Annotated[
        bool, typer.Option(help="Skip the offline gate (the canary rule still judges it).")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit)")] = "manual canary",
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
    _emit({"version": version, "outcome": outcome})


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit)")] = "manual rollback",
) -> None:
    """Move `champion` back to the previous champion."""
    from ml.registry import RegistryError
    from ml.registry import rollback as do_rollback

    try:
        move = do_rollback(actor=_actor(), reason=reason)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    _emit(move.to_dict())


@app.command()
def setup(
    repair: Annotated[
        bool, typer.Option(help="Repair a half-migrated SQLite MLflow store (keeps a backup).")
    ] = False,
) -> None:
    """Create or upgrade every store (MLflow's backend, driftloop's tables) before first use."""
    from ml.settings import get_settings
    from ml.stores import init_all

    _emit([s.to_dict() for s in init_all(get_settings(), repair=repair)])


@app.command()
def status() -> None:
    """Champion and challenger with their metrics and lineage, as JSON."""
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
    _emit(out)


@app.command()
def audit(limit: Annotated[int, typer.Option(help="How many rows, newest first.")] = 20) -> None:
    """The alias audit trail (every promotion, keep, rollback), newest first, as JSON."""
    from ml.registry import audit_log

    _emit([m.to_dict() for m in audit_log(limit=limit)])


@app.command("events-flush")
def events_flush(
    now: Annotated[
        bool, typer.Option("--now", help="Retry every waiting event now, ignoring its backoff.")
    ] = False,
) -> None:
    """Deliver the webhook outbox (DRIFTLOOP_WEBHOOK_URL): what was sent and what still waits."""
    from dataclasses import asdict

    from ml.events import flush

    _emit(asdict(flush(ignore_backoff=now)))


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="HTTP port")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
) -> None:
    """Serve the champion over HTTP (BentoML): /predict, /feedback, /model, /metrics."""
    from ml.serving.launch import serve_argv
    from ml.settings import REPO_ROOT

    cmd = serve_argv(host=host, port=port)
    typer.echo(f"serving on http://{host}:{port} (Ctrl-C stops)", err=True)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage analytics from here
    os.chdir(REPO_ROOT)
    os.execv(cmd[0], cmd)


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="Labelled table (label, text) to send.")],
    url: Annotated[str, typer.Option(help="Service base URL")] = "http://127.0.0.1:3000",
    feedback_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of predictions whose label is posted")
    ] = 0.0,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Concurrent clients")] = 8,
    limit: Annotated[int | None, typer.Option(help="Send at most this many rows")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="DRIFTLOOP_API_KEY")] = None,
    feedback_key: Annotated[
        list[str] | None,
        typer.Option(help="Send labels with these keys (one picked per label); repeatable"),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Send a table's texts to a running service as production traffic (one per request)."""
    from ml.serving.replay import replay as do_replay
    from ml.training.data import DataError

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
    _emit(summary.to_dict())
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def drift(
    since: Annotated[str | None, typer.Option(help="Window start, ISO time (UTC)")] = None,
    until: Annotated[str | None, typer.Option(help="Window end, ISO time (UTC)")] = None,
) -> None:
    """Drift report on a window of the prediction log; prints the typed result as JSON."""
    from ml.drift import DriftError, run_drift

    try:
        result = run_drift(since, until)
    except (DriftError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _emit(result.to_dict())


@app.command()
def reports(
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 20,
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
        }
    )


# --- DVC stages: the same library functions, file in and file out -----------------------------

stage = typer.Typer(help="Pipeline stages for dvc.yaml (file in, file out).", no_args_is_help=True)
app.add_typer(stage, name="stage")


@stage.command("prepare")
def stage_prepare(out: Annotated[Path, typer.Option()] = Path("data/prepared/train.tsv")) -> None:
    """Write the training batch described by params.yaml."""
    from ml.training.pipeline import prepare

    _emit(prepare(out_path=out).__dict__)


@stage.command("validate")
def stage_validate(
    batch: Annotated[Path, typer.Option()] = Path("data/prepared/train.tsv"),
    report: Annotated[Path, typer.Option()] = Path("metrics/validation.json"),
) -> None:
    """Validate the training batch; fail the stage (and `dvc repro`) if it is invalid."""
    from ml.params import load_params
    from ml.settings import get_settings
    from ml.training.validation import validate_file

    result = validate_file(batch, load_params().validation, get_settings().data_docs_dir)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    if not result.success:
        raise _fail("; ".join(result.reasons()))


@stage.command("train")
def stage_train(
    batch: Annotated[Path, typer.Option()] = Path("data/prepared/train.tsv"),
    out: Annotated[Path, typer.Option()] = Path("models/sentiment"),
) -> None:
    """Fine-tune on the batch and save the model to a folder DVC tracks."""
    from ml.params import load_params
    from ml.settings import get_settings
    from ml.training.data import read_table
    from ml.training.train import train_model

    params = load_params()
    result = train_model(
        read_table(batch),
        params.train,
        out,
        device_setting=get_settings().device,
        log_to_mlflow=False,
    )
    _emit({k: v for k, v in result.to_dict().items() if k != "step_losses"})


@stage.command("evaluate")
def stage_evaluate(
    model: Annotated[Path, typer.Option()] = Path("models/sentiment"),
    metrics: Annotated[Path, typer.Option()] = Path("metrics/eval.json"),
    plot: Annotated[Path, typer.Option()] = Path("metrics/confusion_matrix.png"),
) -> None:
    """Score the model on the validation split; write metrics JSON and a confusion matrix."""
    from ml.training.evaluate import confusion_png
    from ml.training.pipeline import evaluate_dir

    result = evaluate_dir(model)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}, indent=2))
    confusion_png(result.confusion, plot)
    _emit(result.metrics)


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
        _setup_logging()
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    run()
