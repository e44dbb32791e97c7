"""``make demo``: driftloop's whole loop, end to end, on a real Airflow scheduler and service.

1. train the first champion on a small sample of the 2013-2015 tweets (``train_model``);
2. serve it (BentoML) and replay held-out tweets from the same period as production traffic,
   with feedback labels for a share: ``monitor_drift`` finds no drift;
3. replay 2016 tweets: ``monitor_drift`` finds drift, records the labelled window as a new data
   version and triggers ``train_model`` with the full budget plus those fresh labels;
4. the retrained model passes the offline gate and serves a canary share; more traffic with
   feedback, then ``canary_rollout`` promotes it on live evidence;
5. a deliberately damaged model (trained on shuffled labels) is stopped by the offline gate,
   then forced onto canary traffic anyway: ``canary_rollout`` removes it on live evidence;
6. the second task, ``emotion`` (params.yaml ``tasks:``), on the same running service: before
   its first model ``/tasks/emotion/predict`` answers 503; ``train_model`` with
   ``{"task": "emotion"}`` trains and promotes its champion, the service picks it up beside the
   sentiment champion, and held-out emotion tweets are replayed to ``/tasks/emotion/...`` with
   feedback; both tasks answer side by side, each with its own labels;
7. 2016 sentiment tweets (a window the emotion model never saw the like of) are posted to the
   emotion endpoint: ``monitor_drift`` with ``{"task": "emotion"}`` finds drift and triggers
   ``train_model`` for emotion, which the demo follows to its end. The shifted window brings
   no emotion labels, and the demo's parameters give this retraining a small budget
   (``tasks.emotion.train`` there) to keep within time: the offline gate keeps the champion;
8. a summary of every model version of both tasks, why it exists, its metrics, every alias move
   and every drift report, and where to look; every run of the three DAGs since the demo
   started (the scheduled ones too) with its final state, and every task try that failed, also
   when a retry fixed it. Nothing is broken on purpose at the task level (the damaged model is
   stopped by decisions), so any failed try, or any failed run, makes the demo exit 1. Also
   when a step fails midway, the runs and failed tries so far are listed. All of it goes to
   ``$DRIFTLOOP_HOME/demo/summary.json`` (``scripts/check_demo.py`` checks it).

The demo drives every DAG run itself: it turns the schedules of ``monitor_drift`` and
``canary_rollout`` off in its parameters file, so no scheduled run decides between two steps.

``--fast`` keeps the same steps with smaller samples (about 25 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ml.params import load_params, use_task
from scripts.airflow_api import TERMINAL, AirflowAPI, LocalAirflow, print_progress
from scripts.procs import start_service, terminate_group, wait_for, wait_http_ok

REPO = Path(__file__).resolve().parents[1]

T0 = time.monotonic()
DAGS = ("train_model", "monitor_drift", "canary_rollout")
# The demo's service runs with API keys: one client predicts, five labelling teams send labels
# (labels.max_source_share in params.yaml: no one source may decide alone), one operator.
APP_KEY = "demo-app-key"
OPS_KEY = "demo-ops-key"
LABELLER_KEYS = [f"demo-labeller-{i}-key" for i in range(1, 6)]
API_KEYS = ",".join(
    [f"{APP_KEY}:predict", f"{OPS_KEY}:admin", *(f"{k}:feedback" for k in LABELLER_KEYS)]
)
# The second task the demo shows beside the default one (params.yaml ``tasks:``): its labels,
# data and registered model's name come from there.
SECOND_TASK = "emotion"


def say(message: str) -> None:
    sys.stderr.write(f"==> [{time.monotonic() - T0:5.0f}s] {message}\n")
    sys.stderr.flush()


def now() -> str:
    return datetime.now(tz=UTC).isoformat()


def task_base(url: str, task: str | None) -> str:
    """Where a task's ``/predict``, ``/feedback`` and ``/model`` hang on a service at ``url``:
    the root for the default task (None), ``/tasks/<task>`` for a named one."""
    return url if task is None else f"{url}/tasks/{task}"


class Service:
    """``bentoml serve`` of the service (every declared task) in the background."""

    def __init__(self, port: int, log_path: Path, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port, self.log_path, self.env = port, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Service:
        self.proc = start_service(self.port, env=self.env, log_path=self.log_path)
        wait_http_ok(
            f"{self.url}/readyz",
            "the service",
            timeout=300,
            every=2,
            proc=self.proc,
            log_path=self.log_path,
        )
        return self

    def model(self, task: str | None = None) -> dict[str, Any]:
        """``GET /model`` (``/tasks/<task>/model``); a non-200 answer as its status and body."""
        import httpx

        url = f"{task_base(self.url, task)}/model"
        resp = httpx.get(url, timeout=10)
        if resp.status_code in (401, 403):  # /model is open; a task's may want a key
            resp = httpx.get(url, timeout=10, headers={"X-API-Key": APP_KEY})
        if resp.status_code != 200:
            return {"status": resp.status_code, "body": resp.text[:300]}
        return dict(resp.json())

    def predict(self, texts: list[str], task: str | None = None) -> Any:
        """``POST /predict`` (``/tasks/<task>/predict``) with the app's key: the response."""
        import httpx

        return httpx.post(
            f"{task_base(self.url, task)}/predict",
            json={"texts": texts},
            headers={"X-API-Key": APP_KEY},
            timeout=30,
        )

    def reload(self) -> str:
        """``POST /admin/reload``: check the registry for every task now, not at the next poll."""
        import httpx

        try:
            resp = httpx.post(
                f"{self.url}/admin/reload", headers={"X-API-Key": OPS_KEY}, timeout=60
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return f"HTTP {resp.status_code}"

    def wait_serving(
        self,
        champion: str,
        challenger: str | None = None,
        timeout: float = 300,
        task: str | None = None,
    ) -> dict[str, Any]:
        """Until /model (``/tasks/<task>/model``) reports the given champion loaded (and the
        challenger loaded and on canary traffic, or any challenger)."""

        def live(entry: dict[str, Any] | None, version: str) -> bool:
            # /model names a version the registry holds before the service has loaded it
            # (or, for a challenger, before it has any traffic): wait until it answers.
            entry = entry or {}
            return entry.get("version") == version and bool(entry.get("loaded"))

        def serving() -> dict[str, Any] | None:
            info = self.model(task)
            chall = info.get("challenger") or {}
            ok = live(info.get("champion"), champion) and (
                challenger is None
                or (live(chall, challenger) and float(chall.get("traffic_share") or 0) > 0)
            )
            return info if ok else None

        what = f"champion v{champion}" + (f" of task {task}" if task else "")
        try:
            return wait_for(serving, what, timeout, every=2, retry_on=())
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: the service is still on {self.model(task)}") from None

    def __exit__(self, *exc: object) -> None:
        terminate_group(self.proc)


def run_dag(api: AirflowAPI, dag_id: str, conf: dict[str, Any]) -> tuple[str, dict]:
    run_id = api.trigger(dag_id, conf)
    say(f"{dag_id}: triggered {run_id}")
    state = api.wait_run(dag_id, run_id, on_change=print_progress(dag_id))
    tasks = api.task_states(dag_id, run_id)
    say(f"{dag_id}: {state}")
    if state != "success":
        raise RuntimeError(f"{dag_id} run {run_id} {state}: {tasks}")
    return run_id, tasks


def outcome(tasks: dict[str, str | None], choices: tuple[str, ...]) -> str:
    return next((t for t in choices if tasks.get(t) == "success"), "unknown")


def wait_new_run(api: AirflowAPI, dag_id: str, after: set[str], timeout: float = 300) -> str:
    def new_run() -> str | None:
        ids = (str(run["dag_run_id"]) for run in api.list_runs(dag_id))
        return next((run_id for run_id in ids if run_id not in after), None)

    return wait_for(new_run, f"a new {dag_id} run", timeout, every=3, retry_on=())


def replay(
    table: Path,
    url: str,
    share: float,
    seed: int,
    task: str | None = None,
    labels_of: str | None = None,
) -> dict[str, Any]:
    """Replay ``table`` as traffic to ``task``'s endpoints (None: the default task's) of the
    service at ``url``, with feedback for ``share`` of the rows. The table's labels are
    ``labels_of``'s (default: ``task``'s); a table labelled for another task than the one it
    is sent to is for traffic only (``share`` 0: its labels would be refused)."""
    from ml.serving.replay import replay as do_replay

    with use_task(labels_of or task):  # the replay checks the table's labels against these
        summary = do_replay(
            table,
            task_base(url, task),
            feedback_share=share,
            concurrency=8,
            seed=seed,
            progress=True,
            api_key=APP_KEY,
            feedback_keys=LABELLER_KEYS,
        ).to_dict()
    say(
        f"replayed {summary['sent']} requests{f' to task {task}' if task else ''} "
        f"({summary['requests_per_second']}/s, "
        f"{summary['failed']} failed, {summary['feedback_sent']} feedback labels); "
        f"answered by versions {summary['by_version']}"
    )
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} requests failed: {summary['errors']}")
    return summary


def traffic_tables(work: Path, sizes: dict[str, int], first_batch: Path, seed: int) -> dict:
    """Same-period held-out tweets, 2016 tweets for drift and canaries, a shuffled batch."""
    from ml.tables import read_table, read_task_table

    params = load_params()
    data = params.data
    tweets = read_task_table(REPO / data.train, data, training=True)
    used = set(read_table(first_batch)["text"])
    time = tweets[str(data.time_column)]
    old = tweets[time.isin(data.train_sources) & ~tweets["text"].isin(used)]
    new = tweets[time.isin(data.drift_sources)].sample(frac=1.0, random_state=seed)
    out: dict[str, Path] = {}
    cut = 0
    for name in ("drift", "canary", "damaged_canary"):
        part = new.iloc[cut : cut + sizes[name]]
        cut += sizes[name]
        out[name] = work / f"replay-{name}.tsv"
        part[["label", "text"]].to_csv(out[name], sep="\t", index=False)
    out["same_period"] = work / "replay-same-period.tsv"
    old.sample(n=sizes["same_period"], random_state=seed)[["label", "text"]].to_csv(
        out["same_period"], sep="\t", index=False
    )
    shuffled = old.sample(n=sizes["damaged_train"], random_state=seed + 1)[["label", "text"]]
    shuffled = shuffled.assign(
        label=shuffled["label"].sample(frac=1.0, random_state=seed).to_numpy()
    )
    out["damaged_train"] = work / "damaged-shuffled-labels.tsv"
    shuffled.to_csv(out["damaged_train"], sep="\t", index=False)
    return out


def second_task_tables(work: Path, drift_table: Path, shifted: int) -> dict[str, Path]:
    """The second task's traffic: its held-out tweets (its validation table) with their labels,
    and a shifted window for it, the first ``shifted`` of the 2016 sentiment tweets that the
    sentiment steps replay as their drifted window (the task's ``data.drift_texts``)."""
    from ml.tables import read_table, read_task_table

    params = load_params(task=SECOND_TASK)
    out = {
        "traffic": work / f"replay-{SECOND_TASK}.tsv",
        "shifted": work / f"replay-{SECOND_TASK}-shifted.tsv",
    }
    held_out = read_task_table(REPO / params.data.val, params.data)
    held_out[["label", "text"]].to_csv(out["traffic"], sep="\t", index=False)
    window = read_table(drift_table).iloc[:shifted]
    window[["label", "text"]].to_csv(out["shifted"], sep="\t", index=False)
    return out


def answer(resp: Any) -> dict[str, Any]:
    """What one ``/predict`` answer shows: status, the labels its scores name, the predicted
    labels and the version that answered."""
    entry: dict[str, Any] = {"path": resp.request.url.path, "status": resp.status_code}
    if resp.status_code != 200:
        return {**entry, "body": resp.text[:300]}
    body = resp.json()
    preds = body.get("predictions") or []
    scores = preds[0].get("scores") if preds else None
    return {
        **entry,
        "labels": list(scores) if isinstance(scores, dict) else None,
        "predicted": [p.get("label") for p in preds],
        "model_version": body.get("model_version"),
    }


def _preds(entry: dict[str, Any]) -> list[Any]:
    return list(entry.get("predicted") or [])


def canary_until_decided(api, service, table_paths, share, seed) -> str:
    """Replay canary traffic and ask canary_rollout until it promotes or rolls back."""
    from ml.lifecycle.outcomes import CanaryOutcome as C

    for round_no, table in enumerate(table_paths):
        replay(table, service.url, share, seed + round_no)
        _, tasks = run_dag(api, "canary_rollout", {})
        decided = outcome(tasks, (C.PROMOTED, C.ROLLED_BACK, C.WAITING, C.NO_CANARY))
        say(f"canary_rollout: {decided}")
        if decided != C.WAITING:
            return decided
    return C.WAITING


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="smaller samples, same steps")
    parser.add_argument(
        "--airflow-port", type=int, default=int(os.environ.get("AIRFLOW_PORT", "8080"))
    )
    parser.add_argument("--service-port", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=180,
        help="at the end, how long to wait for DAG runs still in flight (scheduled ones)",
    )
    args = parser.parse_args()

    from ml.settings import get_settings

    settings = get_settings()
    home = settings.ensure_home()
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    work = home / "demo"
    work.mkdir(exist_ok=True)
    sizes = {
        "first": 2000,
        "same_period": 600,
        "drift": 1200,
        "canary": 1600,
        "damaged_canary": 900,
        "damaged_train": 1500,
        # The second task: its first model (all its tweets, fewer epochs than its default 4 to
        # keep the demo within time), the shifted window, and the budget of the retraining
        # that drift starts (written into the demo's parameters: monitor_drift passes none).
        "second_examples": load_params(settings.params_path, task=SECOND_TASK).train.max_examples,
        "second_epochs": 2,
        "second_shifted": 500,
        "second_retrain_examples": 200,
        "second_retrain_epochs": 1,
    }
    env = dict(os.environ, DRIFTLOOP_REGISTRY_POLL="3", DRIFTLOOP_API_KEYS=API_KEYS)
    # The demo's own parameters: its scripted steps must be the only DAG runs, so the schedules
    # are off (a scheduled canary_rollout could otherwise decide a canary between two steps).
    import yaml

    raw = yaml.safe_load(settings.params_path.read_text())
    raw.setdefault("drift", {})["schedule"] = "none"
    raw.setdefault("rollout", {})["schedule"] = "none"
    if args.fast:
        sizes.update(first=1000, same_period=400, drift=800, damaged_train=600)
        sizes.update(second_examples=1000, second_shifted=300)
        raw["train"]["max_examples"] = 4000
    raw["tasks"][SECOND_TASK].setdefault("train", {}).update(
        max_examples=sizes["second_retrain_examples"], epochs=sizes["second_retrain_epochs"]
    )
    demo_params = work / ("params-fast.yaml" if args.fast else "params.yaml")
    demo_params.write_text(yaml.safe_dump(raw, sort_keys=False))
    env["DRIFTLOOP_PARAMS"] = str(demo_params)
    os.environ["DRIFTLOOP_PARAMS"] = str(demo_params)
    get_settings.cache_clear()

    started_at = datetime.now(tz=UTC)
    record: dict[str, Any] = {"started": started_at.isoformat(), "steps": []}
    finished = False
    try:
        say(f"starting Airflow on :{args.airflow_port} (log {logs / 'airflow-standalone.log'})")
        with LocalAirflow(logs / "airflow-standalone.log", port=args.airflow_port, env=env) as api:
            try:
                run_steps(api, args, settings, sizes, env, work, logs, record)
                finished = True
            finally:
                # Still inside the `with`: Airflow is up to be asked what every run did.
                record_runs(api, started_at, record, settle=args.settle_seconds if finished else 0)
    except BaseException as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record["seconds"] = round(time.monotonic() - T0)
        (work / "summary.json").write_text(json.dumps(record, indent=2, default=str))
        if not finished:
            sys.stdout.write("\n".join(["", "driftloop demo: FAILED", *run_report(record)]) + "\n")
            say(f"summary (so far): {work / 'summary.json'}")
    return summary(record)


def run_steps(
    api: AirflowAPI,
    args: argparse.Namespace,
    settings: Any,
    sizes: dict[str, int],
    env: dict[str, str],
    work: Path,
    logs: Path,
    record: dict[str, Any],
) -> None:
    """The seven steps; each appends its outcome to ``record["steps"]``."""
    from ml.lifecycle.outcomes import MonitorOutcome as M
    from ml.lifecycle.outcomes import TrainOutcome
    from ml.training.pipeline import default_batch_path

    trained = tuple(TrainOutcome)
    monitored = (M.NO_DRIFT, M.RETRAIN, M.RETRAINING_IN_PROGRESS, M.ROLLBACK)
    for dag_id in DAGS:
        api.wait_dag(dag_id)

    say(f"1/7 first champion: train_model on {sizes['first']} tweets from 2013-2015")
    _, tasks = run_dag(
        api,
        "train_model",
        {
            "max_examples": sizes["first"],
            "reason": "demo: first model, small early sample of the 2013-2015 tweets",
        },
    )
    record["steps"].append(
        {
            "step": "first model",
            "outcome": outcome(tasks, trained),
        }
    )
    tables = traffic_tables(work, sizes, default_batch_path(), args.seed)

    with Service(args.service_port, logs / "service.log", env) as service:
        from ml.registry import CHAMPION, get_alias

        champion = get_alias(CHAMPION)
        assert champion is not None
        service.wait_serving(champion.version)
        say(f"service on {service.url} serves champion v{champion.version}")

        say("2/7 same-period traffic: held-out 2013-2015 tweets, half with feedback")
        since = now()
        replay(tables["same_period"], service.url, 0.5, args.seed)
        run_id, tasks = run_dag(api, "monitor_drift", {"since": since, "until": now()})
        calm = outcome(tasks, monitored)
        note = api.run("monitor_drift", run_id).get("note")
        record["steps"].append({"step": "same-period traffic", "outcome": calm, "note": note})

        say("3/7 later-period traffic: 2016 tweets, 70% with feedback")
        since = now()
        replay(tables["drift"], service.url, 0.7, args.seed + 1)
        before = {r["dag_run_id"] for r in api.list_runs("train_model")}
        run_id, tasks = run_dag(api, "monitor_drift", {"since": since, "until": now()})
        found = outcome(tasks, monitored)
        note = api.run("monitor_drift", run_id).get("note")
        record["steps"].append({"step": "2016 traffic", "outcome": found, "note": note})
        if found == M.RETRAIN:
            run_id = wait_new_run(api, "train_model", before)
            say(f"train_model {run_id} was triggered by monitor_drift; following it")
            state = api.wait_run("train_model", run_id, on_change=print_progress("train_model"))
            tasks = api.task_states("train_model", run_id)
            retrained = outcome(tasks, trained)
            record["steps"].append({"step": "retraining", "state": state, "outcome": retrained})
            if retrained == TrainOutcome.CANARY_STARTED:
                from ml.registry import CHALLENGER

                challenger = get_alias(CHALLENGER)
                service.wait_serving(champion.version, challenger.version)
                say(f"4/7 canary: v{challenger.version} serves 20% of traffic")
                rounds = _split(tables["canary"], 4)
                decided = canary_until_decided(api, service, rounds, 0.8, args.seed + 2)
                record["steps"].append(
                    {"step": "canary", "outcome": decided, "evidence": last_canary_evidence()}
                )

        champion = get_alias(CHAMPION)
        service.wait_serving(champion.version)
        say(f"5/7 damaged model: train_model on {sizes['damaged_train']} shuffled labels")
        _, tasks = run_dag(
            api,
            "train_model",
            {
                "batch_path": str(tables["damaged_train"]),
                "reason": "demo: deliberately damaged model (shuffled labels)",
            },
        )
        gate = outcome(tasks, trained)
        record["steps"].append({"step": "damaged model, offline gate", "outcome": gate})
        from ml.registry import list_versions

        damaged = list_versions()[-1]
        say(f"offline gate: {gate}; forcing v{damaged.version} onto canary traffic anyway")
        subprocess.run(
            [
                str(Path(sys.executable).with_name("driftloop")),
                "canary",
                damaged.version,
                "--force",
                "--reason",
                "demo: push the damaged model through",
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        service.wait_serving(champion.version, damaged.version)
        decided = canary_until_decided(
            api, service, _split(tables["damaged_canary"], 3), 0.8, args.seed + 3
        )
        record["steps"].append(
            {
                "step": "damaged model, canary",
                "outcome": decided,
                "evidence": last_canary_evidence(),
            }
        )
        service.wait_serving(get_alias(CHAMPION).version)
        second = second_task_tables(work, tables["drift"], sizes["second_shifted"])
        second_task_steps(api, args, service, sizes, second, record)
        service.wait_serving(get_alias(CHAMPION).version)
        record["serving_at_end"] = service.model()
        record[f"{SECOND_TASK}_serving_at_end"] = service.model(SECOND_TASK)


def second_task_steps(
    api: AirflowAPI,
    args: argparse.Namespace,
    service: Service,
    sizes: dict[str, int],
    tables: dict[str, Path],
    record: dict[str, Any],
) -> None:
    """Steps 6 and 7: the second task's first model served by the running service beside the
    default task, its traffic; then a shifted window, its drift and the retraining it starts."""
    from ml.lifecycle.outcomes import MonitorOutcome as M
    from ml.lifecycle.outcomes import TrainOutcome
    from ml.registry import CHAMPION, get_alias
    from ml.tables import read_table

    task, default = SECOND_TASK, load_params().task.name
    name = load_params(task=task).task.registered_name
    trained = tuple(TrainOutcome)
    monitored = (M.NO_DRIFT, M.RETRAIN, M.RETRAINING_IN_PROGRESS, M.ROLLBACK)
    texts = [str(t) for t in read_table(tables["traffic"])["text"].iloc[:8]]

    before = service.predict(texts[:1], task=task).status_code
    say(
        f"6/7 second task {task}: /tasks/{task}/predict answers {before} before its first model; "
        f"train_model on {sizes['second_examples']} {task} tweets, "
        f"{sizes['second_epochs']} epochs"
    )
    _, tasks = run_dag(
        api,
        "train_model",
        {
            "task": task,
            "max_examples": sizes["second_examples"],
            "epochs": sizes["second_epochs"],
            "reason": f"demo: first model of the second task, {task}",
        },
    )
    champion = get_alias(CHAMPION, name=name)
    record["steps"].append(
        {
            "step": f"{task} model",
            "outcome": outcome(tasks, trained),
            "task": task,
            "version": champion.version if champion else None,
        }
    )
    if champion is None:
        raise RuntimeError(f"train_model for task {task} left model {name!r} without a champion")
    say(f"{task}: champion v{champion.version}; POST /admin/reload: {service.reload()}")
    service.wait_serving(champion.version, task=task)
    say(f"service on {service.url} serves {task} v{champion.version} beside {default}")
    traffic = replay(tables["traffic"], service.url, 0.5, args.seed + 4, task=task)
    answers = {
        default: answer(service.predict(texts)),
        task: answer(service.predict(texts, task=task)),
    }
    for t, a in answers.items():
        say(f"{a['path']} ({t}): HTTP {a['status']}, labels {a.get('labels')}")
    for i, text in enumerate(texts[:3]):  # the same tweets, both tasks, one service
        both = [f"{t} {a['predicted'][i]}" for t, a in answers.items() if i < len(_preds(a))]
        say(f"  {text[:60]!r}: {', '.join(both)}")
    record["steps"].append(
        {
            "step": f"{task} traffic",
            "outcome": "served" if answers[task]["status"] == 200 else "not served",
            "task": task,
            "service": service.url,
            "before_champion": before,
            "answers": answers,
            "sent": traffic["sent"],
            "feedback_sent": traffic["feedback_sent"],
            "by_version": traffic["by_version"],
        }
    )

    say(f"7/7 {task} drift: {sizes['second_shifted']} 2016 {default} tweets to {task}, no labels")
    since = now()
    replay(tables["shifted"], service.url, 0.0, args.seed + 5, task=task, labels_of=default)
    runs_before = {r["dag_run_id"] for r in api.list_runs("train_model")}
    run_id, tasks = run_dag(api, "monitor_drift", {"task": task, "since": since, "until": now()})
    found = outcome(tasks, monitored)
    note = api.run("monitor_drift", run_id).get("note")
    record["steps"].append(
        {"step": f"{task} shifted traffic", "outcome": found, "task": task, "note": note}
    )
    if found == M.RETRAIN:
        run_id = wait_new_run(api, "train_model", runs_before)
        say(f"train_model {run_id} was triggered by monitor_drift for {task}; following it")
        state = api.wait_run("train_model", run_id, on_change=print_progress("train_model"))
        tasks = api.task_states("train_model", run_id)
        record["steps"].append(
            {
                "step": f"{task} retraining",
                "task": task,
                "state": state,
                "outcome": outcome(tasks, trained),
            }
        )
    service.wait_serving(champion.version, task=task)


def last_canary_evidence() -> dict[str, Any] | None:
    """The evidence recorded with the latest canary promotion or rollback (its audit row)."""
    from ml.registry import AuditAction, audit_log

    actions = {AuditAction.CANARY_PROMOTE, AuditAction.CANARY_ROLLBACK}
    move = next((m for m in audit_log(limit=50) if m.action in actions), None)
    if move is None or not move.evidence:
        return None
    return {
        "reason": move.reason,
        "test": move.evidence.get("test"),
        "labels": move.evidence.get("labels"),
        "checks": move.evidence.get("checks"),
    }


def _split(path: Path, parts: int) -> list[Path]:
    from ml.tables import read_table

    table = read_table(path)
    size = -(-len(table) // parts)
    out = []
    for i in range(parts):
        part = path.with_name(f"{path.stem}-{i + 1}.tsv")
        table.iloc[i * size : (i + 1) * size].to_csv(part, sep="\t", index=False)
        out.append(part)
    return out


def _run_entry(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("run_type", "triggered_by", "state", "queued_at", "start_date", "end_date")
    return {"dag_id": run["dag_id"], "run_id": run["dag_run_id"], **{k: run.get(k) for k in keys}}


def record_runs(api: AirflowAPI, since: datetime, record: dict[str, Any], settle: float) -> None:
    """Put every run of :data:`DAGS` created since ``since`` in ``record["runs"]`` with its
    final state (waiting up to ``settle`` seconds for those in flight), and every task try of
    theirs that failed in ``record["failed_tries"]``; None for both if Airflow cannot say."""
    try:
        deadline = time.monotonic() + settle
        while True:
            runs = [run for dag_id in DAGS for run in api.runs_since(dag_id, since)]
            flying = [
                f"{r['dag_id']} {r['dag_run_id']}" for r in runs if r["state"] not in TERMINAL
            ]
            if not flying or time.monotonic() >= deadline:
                break
            say(f"waiting for {len(flying)} run(s) in flight: {', '.join(flying)}")
            time.sleep(min(10.0, max(deadline - time.monotonic(), 0.0)))
        record["runs"] = [_run_entry(r) for r in runs]
        record["failed_tries"] = [
            t for r in runs for t in api.failed_tries(r["dag_id"], r["dag_run_id"])
        ]
    except Exception as exc:  # noqa: BLE001 - the report must not hide the demo's own error
        record["runs"] = record["failed_tries"] = None
        record["runs_error"] = f"{type(exc).__name__}: {exc}"
        say(f"could not list the DAG runs and their tries: {record['runs_error']}")


def problems(record: dict[str, Any]) -> list[str]:
    """Why the demo did not pass on the task level: failed tries, failed runs, or no answer."""
    if record.get("failed_tries") is None or record.get("runs") is None:
        return [f"the DAG runs could not be listed ({record.get('runs_error', 'not recorded')})"]
    out = []
    if record["failed_tries"]:
        out.append(f"{len(record['failed_tries'])} task tries failed")
    failed_runs = [r for r in record["runs"] if r["state"] == "failed"]
    if failed_runs:
        out.append(f"{len(failed_runs)} DAG runs failed")
    return out


def run_report(record: dict[str, Any]) -> list[str]:
    """The steps, every DAG run since the start with its final state, every failed task try."""
    lines = ["steps:"]
    lines += [f"  {s['step']:<30} {s['outcome']}" for s in record["steps"]] or ["  none"]
    if record.get("error"):
        lines.append(f"  stopped by {record['error'][:300]}")
    lines += ["", "DAG runs since the demo started (final state):"]
    runs = record.get("runs")
    if runs is None:
        lines.append(f"  unknown: {record.get('runs_error', 'not recorded')}")
    for r in runs or []:
        state, kind = r.get("state") or "?", r.get("run_type") or "?"
        lines.append(f"  {r['dag_id']:<15} {state:<8} {kind:<14} {r['run_id']}")
    if runs == []:
        lines.append("  none")
    lines += ["", "failed task tries:"]
    tries = record.get("failed_tries")
    if tries is None:
        lines.append(f"  unknown: {record.get('runs_error', 'not recorded')}")
    elif not tries:
        lines.append("  none")
    for t in tries or []:
        mapped = f"[{t['map_index']}]" if t.get("map_index", -1) >= 0 else ""
        lines.append(
            f"  {t['dag_id']}.{t['task_id']}{mapped} try {t['try_number']}: {t['state']}"
            f"  ({t.get('start_date') or '?'} -> {t.get('end_date') or '?'})  run {t['run_id']}"
        )
    return lines


def canary_evidence(evidence: dict[str, Any] | None) -> list[str]:
    """The sequential test's evidence behind a canary decision, as the audit row holds it."""
    test, labels = (evidence or {}).get("test"), (evidence or {}).get("labels")
    if not test or not labels:
        return []
    counted = labels.get("by_source", {}).get("counted", {})
    rate = labels.get("disagreement_rate")
    return [
        f"           evidence: {labels['paired']} paired + {labels['unpaired']} unpaired labels "
        f"from {len(counted)} sources, mean difference {test['mean']:+.3f}; log-wealth worse "
        f"{test['log_wealth_worse']:.2f}, not worse (margin {test['margin']}) "
        f"{test['log_wealth_not_worse']:.2f}, bound {test['bound']:.2f}",
        f"           shadow-scored requests {labels['shadowed_requests']}, disagreement "
        + (f"{rate:.1%}" if rate is not None else "-")
        + (f" (kappa {labels['kappa']:.2f})" if labels.get("kappa") is not None else "")
        + f"; labels per source {counted}",
    ]


def task_lines(task: str | None) -> list[str]:
    """One task's model versions, alias moves and drift reports (None: the default task)."""
    from ml.drift import list_reports
    from ml.registry import REJECTED_TAG, audit_log, list_versions

    with use_task(task) as params:
        of = f" ({params.task.name}, model {params.task.registered_name})"
        lines = ["", f"model versions{of}:"]
        for v in list_versions():
            m = v.metrics
            status = ", ".join(v.aliases) or ("rejected" if REJECTED_TAG in v.tags else "-")
            lines.append(
                f"  v{v.version}: macro-recall {m.get('val_macro_recall', float('nan')):.4f}"
                f"  macro-F1 {m.get('val_macro_f1', float('nan')):.4f}  [{status}]"
            )
            lines.append(f"       why: {v.tags.get('reason', '?')}")
        lines += ["", f"alias moves{of} (oldest first):"]
        for move in reversed(audit_log(limit=1000)):
            lines.append(
                f"  {move.at[11:19]} {move.action:<15} {move.alias:<10} "
                f"{move.from_version or '-'} -> {move.to_version or '-'}  by {move.actor}"
            )
            lines.append(f"           {move.reason[:150]}")
            lines += canary_evidence(move.evidence)
        lines += ["", f"drift reports ({params.task.name}):"]
        for r in reversed(list_reports()):
            review = Path(r.report_dir) / "review.html"
            lines.append(
                f"  {r.created_at[:19]} {r.outcome:<22} {', '.join(r.drifted_signals) or '-'}"
                f"  {review if review.exists() else r.report_html}"
            )
    return lines


def summary(record: dict[str, Any]) -> int:
    from ml.registry import CHAMPION, get_alias
    from ml.settings import get_settings

    settings = get_settings()
    lines = ["", f"driftloop demo: done in {record['seconds'] / 60:.1f} min", ""]
    lines += run_report(record)
    for task in (None, SECOND_TASK):
        lines += task_lines(task)
    lines += ["", "review pages, top screen at 1280x800 (headless Chromium):"]
    try:
        from scripts.review_shots import demo_shots

        lines += [f"  {shot}" for shot in demo_shots()] or ["  none: no review page found"]
    except (OSError, RuntimeError) as exc:  # no chromium here: the demo stands without them
        lines.append(f"  not taken: {exc}")
    lines += ["", "serving at the end, one service:"]
    for task in (None, SECOND_TASK):
        params = load_params(task=task)
        champion = get_alias(CHAMPION, name=params.task.registered_name)
        path = task_base("", task) + "/predict"
        lines.append(
            f"  {path:<24} {params.task.name}: champion v{champion.version if champion else '?'}"
            f", labels {', '.join(params.task.labels)}"
        )
    lines += [
        "",
        "where to look:",
        "  make airflow-ui    Airflow UI, http://localhost:8080: the runs above, their task logs",
        "  make mlflow-ui     MLflow UI, http://localhost:5000: runs, curves, confusion matrices,",
        "                     the registry with its aliases, drift reports next to each version",
        f"  .venv/bin/evidently ui --workspace {settings.home / 'evidently'}",
        "                     drift reports over time (or open the HTML paths above)",
        "  driftloop audit    every alias move with its evidence (--json for JSON;",
        f"                     driftloop --task {SECOND_TASK} audit: the second task's)",
    ]
    wrong = problems(record)
    if wrong:
        lines += ["", f"driftloop demo: FAILED: {'; '.join(wrong)} (see above)"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
