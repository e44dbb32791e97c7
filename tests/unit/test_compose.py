"""The production stack's static deployment: ``docker-compose.airflow.yml``, ``deploy/`` and the
monitoring configuration under ``monitoring/`` (Prometheus, Grafana, statsd).

No Docker engine runs here, so these tests check what can be checked without one: the compose file
against the compose specification's JSON schema (``check-jsonschema``), every reference in it
(services, volumes, files, build contexts), health checks, secrets, ``.env.example``, the GPU
reservation, and that every Prometheus query of the Grafana dashboard names a metric that something
in the stack exports. ``docker compose config`` runs too where the compose plugin is installed.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = REPO_ROOT / "docker-compose.airflow.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DEPLOY = REPO_ROOT / "deploy"
MONITORING = REPO_ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "driftloop.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS = MONITORING / "prometheus" / "prometheus.yml"
STATSD_MAPPINGS = MONITORING / "statsd" / "mappings.yml"
DOCS = REPO_ROOT / "docs" / "running-at-scale.md"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

AIRFLOW_SERVICES = {
    "airflow-init": ["bash", "-c", "airflow db migrate && python -m ml.cli setup"],
    "airflow-api-server": ["airflow", "api-server"],
    "airflow-scheduler": ["airflow", "scheduler"],
    "airflow-dag-processor": ["airflow", "dag-processor"],
    "airflow-triggerer": ["airflow", "triggerer"],
    "airflow-worker": ["airflow", "celery", "worker"],
}
STACK = {
    *AIRFLOW_SERVICES,
    "postgres",
    "redis",
    "statsd-exporter",
    "mlflow",
    "sentiment",
    "evidently-ui",
    "prometheus",
    "grafana",
}
# The loop's metrics the dashboard expects (sent through statsd-exporter; see the docs).
LOOP_METRICS = {
    "driftloop_drift_score",
    "driftloop_drift_detected",
    "driftloop_drift_last_run_timestamp_seconds",
    "driftloop_retrainings_total",
    "driftloop_promotions_total",
    "driftloop_rollbacks_total",
    "driftloop_champion_version",
    "driftloop_champion_macro_recall",
}
# BentoML 1.4's own HTTP metrics, under the namespace `bentoml_service` (checked below against the
# installed BentoML).
BENTOML_METRICS = {
    "bentoml_service_request_total",
    "bentoml_service_request_in_progress",
    "bentoml_service_last_request_timestamp_seconds",
    *(f"bentoml_service_request_duration_seconds_{s}" for s in ("bucket", "sum", "count")),
    *(f"bentoml_service_adaptive_batch_size_{s}" for s in ("bucket", "sum", "count")),
}
PROMETHEUS_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Names of settings and variables that hold secrets.
SECRET_KEY = re.compile(r"(PASSWORD|SECRET|FERNET_KEY|API_KEYS|_AUTH|TOKEN)$")


# ------------------------------------------------------------------------------------- helpers


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def services() -> dict[str, Any]:
    return load_compose()["services"]


def _walk_strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_strings(item, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def compose_variables(compose: Any) -> dict[str, set[str]]:
    """Every variable the compose file interpolates, with the operators it is used with.

    Compose interpolates values after parsing the YAML, so comments do not count.
    """
    found: dict[str, set[str]] = {}
    for _, text in _walk_strings(compose, "compose"):
        for match in VARIABLE.finditer(text):
            name = match["braced"] or match["bare"]
            if name:
                found.setdefault(name, set()).add((match["op"] or "") + (match["arg"] or ""))
    return found


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation (``$$``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ...) of
    every string in a parsed compose file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        if op == ":-":
            return arg if unset_or_empty else str(value)
        if op == "-":
            return arg if value is None else value
        if op == ":?":
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        if op == "?":
            if value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op == ":+":
            return "" if unset_or_empty else arg
        if op == "+":
            return "" if value is None else arg
        return value or ""

    return VARIABLE.sub(substitute, value)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _named(value: Any) -> list[str]:
    """Keys of a mapping, or the items of a list (depends_on, networks, secrets...)."""
    if isinstance(value, dict):
        return list(value)
    return [v if isinstance(v, str) else v.get("source", "") for v in _as_list(value)]


def reference_problems(compose: dict[str, Any], base: Path) -> list[str]:
    """Everything a service refers to that does not exist (one message per problem)."""
    problems: list[str] = []
    svcs: dict[str, Any] = compose.get("services", {})
    top = {
        kind: set(compose.get(kind) or {}) for kind in ("volumes", "networks", "secrets", "configs")
    }
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        for dep in _named(deps):
            if dep not in svcs:
                problems.append(f"{name}: depends_on unknown service {dep!r}")
                continue
            condition = deps[dep].get("condition") if isinstance(deps, dict) else None
            if condition == "service_healthy" and not svcs[dep].get("healthcheck"):
                problems.append(f"{name}: waits for {dep} to be healthy, but it has no healthcheck")
            if condition == "service_completed_successfully" and svcs[dep].get("restart") != "no":
                problems.append(f"{name}: waits for {dep} to complete, but {dep} restarts")
        for link in _as_list(svc.get("links")):
            if link.split(":")[0] not in svcs:
                problems.append(f"{name}: links unknown service {link!r}")
        for volume in _as_list(svc.get("volumes")):
            source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0]
            kind = volume.get("type", "") if isinstance(volume, dict) else ""
            if "$" in source:
                problems.append(f"{name}: volume source {source!r} depends on a variable")
            elif kind == "bind" or source.startswith((".", "/", "~")):
                if not (base / source).exists():
                    problems.append(f"{name}: bind-mounted path {source!r} does not exist")
            elif source and source not in top["volumes"]:
                problems.append(f"{name}: volume {source!r} is not declared under volumes:")
        for kind in ("networks", "secrets", "configs"):
            for ref in _named(svc.get(kind)):
                if ref not in top[kind] and not (kind == "networks" and ref == "default"):
                    problems.append(f"{name}: {kind[:-1]} {ref!r} is not declared under {kind}:")
        for env_file in _as_list(svc.get("env_file")):
            path, required = (
                (env_file, True)
                if isinstance(env_file, str)
                else (env_file["path"], env_file.get("required", True))
            )
            if required and not (base / path).is_file():
                problems.append(f"{name}: env_file {path!r} does not exist")
        build = svc.get("build")
        if build is not None:
            context = base / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            if not context.is_dir():
                problems.append(f"{name}: build context {context} does not exist")
            elif not (context / dockerfile).is_file():
                problems.append(f"{name}: Dockerfile {dockerfile!r} not found in {context}")
    for kind in ("secrets", "configs"):
        for ref, spec in (compose.get(kind) or {}).items():
            if isinstance(spec, dict) and "file" in spec and not (base / spec["file"]).exists():
                problems.append(f"{kind}: {ref!r} file {spec['file']!r} does not exist")
    return problems


def one_shot(svc: dict[str, Any]) -> bool:
    return svc.get("restart") == "no"


def healthcheck_problems(svcs: dict[str, Any]) -> list[str]:
    problems = []
    for name, svc in svcs.items():
        if one_shot(svc):
            continue
        check = svc.get("healthcheck") or {}
        test = check.get("test")
        if not test or check.get("disable") or _as_list(test)[:1] == ["NONE"]:
            problems.append(f"{name}: long-running service without a healthcheck")
    return problems


URL_PASSWORD = re.compile(r"://[^:/@\s]+:(?P<password>[^@\s]*)@")


def secret_problems(compose: dict[str, Any]) -> list[str]:
    """Literal secrets: secret settings or URL passwords that are not ``${VAR}`` references."""
    problems = []
    for name, svc in compose.get("services", {}).items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        for key, value in env.items():
            if SECRET_KEY.search(key) and not re.fullmatch(
                r"\$\{[A-Za-z_]\w*:\?[^}]*\}", str(value)
            ):
                problems.append(f"{name}: {key} is not a required ${{VAR:?}} reference")
        for where, text in _walk_strings(svc, name):
            for match in URL_PASSWORD.finditer(text):
                if not match["password"].startswith("${"):
                    problems.append(f"{where}: a password written into a URL")
        for key in ("command", "entrypoint"):
            line = " ".join(_as_list(svc.get(key)))
            if re.search(r"(requirepass|--password)[\s=\"']+(?![\"']?\$)", line):
                problems.append(f"{name}.{key}: a literal password on the command line")
    # A secret variable with a default would start the stack with a password everyone knows.
    for name, ops in compose_variables(compose).items():
        defaults = [op for op in ops if op.startswith((":-", "-")) and op.lstrip(":-")]
        if SECRET_KEY.search(name) and defaults:
            problems.append(f"${{{name}}} has a default value: {defaults}")
    return problems


# --- Prometheus queries


PROMQL_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords removed)."""
    if match := re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)\s*", expr):
        return {match[1]}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (and Grafana variables in them)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors ([5m], [$__rate_interval])
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        if match[1].lower() not in PROMQL_NOT_METRICS:
            names.add(match[1])
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) for every Prometheus query of the dashboard and its variables."""
    queries: list[tuple[str, str]] = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((panel.get("title", "?"), target["expr"]))
            visit(panel.get("panels", []))

    visit(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            queries.append((f"${variable['name']}", query))
    return queries


def service_metric_names() -> set[str]:
    """The sample names bentos/sentiment/metrics.py exports, from a fresh process's registry."""
    code = """
import json
from prometheus_client import REGISTRY
from bentos.sentiment.metrics import ServiceMetrics
ServiceMetrics()
suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
            "gauge": [""], "summary": ["", "_sum", "_count"]}
names = [m.name + s for m in REGISTRY.collect() if m.name.startswith("driftloop_")
         for s in suffixes.get(m.type, [""])]
print(json.dumps(names))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def statsd_mappings() -> list[dict[str, Any]]:
    return yaml.safe_load(STATSD_MAPPINGS.read_text())["mappings"]


def statsd_metric_names() -> set[str]:
    names = set()
    for mapping in statsd_mappings():
        if mapping.get("match_metric_type") == "observer":
            names.update(f"{mapping['name']}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(mapping["name"])
    return names


def known_metrics() -> set[str]:
    return service_metric_names() | BENTOML_METRICS | statsd_metric_names() | PROMETHEUS_BUILTIN


def locked_versions(name: str) -> set[str]:
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    return {p["version"] for p in lock["package"] if p["name"] == name}


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            found[name.lower()] = version
    return found


def make_env(tmp_path: Path, name: str = ".env") -> Path:
    out = tmp_path / name
    result = subprocess.run(
        ["bash", str(DEPLOY / "make-env.sh"), str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return out


# ------------------------------------------------------------------------ schema and references


def test_compose_file_passes_the_compose_specification_schema() -> None:
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_an_invalid_file(tmp_path: Path) -> None:
    compose = load_compose()
    compose["services"]["postgres"]["depends_on"] = 5
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose))
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "$.services.postgres" in result.stdout + result.stderr


def test_the_stack_has_every_component_of_the_topology() -> None:
    svcs = services()
    assert STACK <= set(svcs), f"missing services: {sorted(STACK - set(svcs))}"
    for name, command in AIRFLOW_SERVICES.items():
        assert svcs[name]["command"][: len(command)] == command, name


def test_every_reference_in_the_compose_file_resolves() -> None:
    assert reference_problems(load_compose(), COMPOSE.parent) == []


def test_the_reference_check_reports_what_is_missing(tmp_path: Path) -> None:
    compose = load_compose()
    svcs = compose["services"]
    svcs["grafana"]["depends_on"]["loki"] = {"condition": "service_started"}
    svcs["grafana"]["depends_on"]["airflow-worker"] = {
        "condition": "service_completed_successfully"
    }
    svcs["sentiment"]["depends_on"]["airflow-init"] = {"condition": "service_healthy"}
    svcs["prometheus"]["volumes"].append("./monitoring/prometheus/rules.yml:/etc/prometheus/rules.yml")
    svcs["prometheus"]["volumes"].append("tsdb-archive:/archive")
    svcs["prometheus"]["networks"] = ["monitoring"]
    svcs["mlflow"]["env_file"] = [".env.mlflow"]
    svcs["mlflow"]["build"] = {"context": ".", "dockerfile": "deploy/mlflow.Dockerfile"}
    problems = "\n".join(reference_problems(compose, COMPOSE.parent))
    for expected in (
        "unknown service 'loki'",
        "airflow-worker to complete, but airflow-worker restarts",
        "airflow-init to be healthy, but it has no healthcheck",
        "'./monitoring/prometheus/rules.yml' does not exist",
        "volume 'tsdb-archive' is not declared",
        "network 'monitoring' is not declared",
        "env_file '.env.mlflow' does not exist",
        "Dockerfile 'deploy/mlflow.Dockerfile' not found",
    ):
        assert expected in problems


def test_every_long_running_service_has_a_healthcheck() -> None:
    svcs = services()
    assert healthcheck_problems(svcs) == []
    assert {name for name, svc in svcs.items() if one_shot(svc)} == {"airflow-init"}
    without = dict(svcs)
    without["redis"] = {k: v for k, v in svcs["redis"].items() if k != "healthcheck"}
    assert healthcheck_problems(without) == ["redis: long-running service without a healthcheck"]


def test_services_start_in_dependency_order() -> None:
    svcs = services()

    def waits_for(name: str) -> dict[str, str]:
        return {
            dep: spec["condition"] for dep, spec in (svcs[name].get("depends_on") or {}).items()
        }

    for name in AIRFLOW_SERVICES.keys() - {"airflow-init"}:
        assert waits_for(name).get("airflow-init") == "service_completed_successfully", name
    assert waits_for("airflow-init") == {"postgres": "service_healthy"}
    # Airflow 3's Celery workers run tasks through the API server's execution API.
    assert waits_for("airflow-worker")["airflow-api-server"] == "service_healthy"
    assert waits_for("airflow-worker")["mlflow"] == "service_healthy"
    assert waits_for("sentiment") == {
        "mlflow": "service_healthy",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    assert waits_for("grafana") == {"prometheus": "service_healthy"}


# ----------------------------------------------------------------------- settings of the stack


def _env(svc: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (svc.get("environment") or {}).items()}


def test_airflow_components_share_the_celery_executor_settings() -> None:
    svcs = services()
    envs = [_env(svcs[name]) for name in AIRFLOW_SERVICES]
    shared = (
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CORE__DAGS_FOLDER",
    )
    for key in shared:
        assert len({env.get(key) for env in envs}) == 1, f"{key} differs between Airflow services"
    env = envs[0]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET:?")
    assert (
        env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
        == "http://airflow-api-server:8080/execution/"
    )
    assert "8080" in svcs["airflow-api-server"]["command"]
    # psycopg2 explicitly: SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://.
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://airflow:")
    assert re.fullmatch(
        r"redis://:\$\{REDIS_PASSWORD:\?[^}]*\}@redis:6379/0", env["AIRFLOW__CELERY__BROKER_URL"]
    )
    assert env["AIRFLOW__METRICS__STATSD_ON"] == "True"
    assert env["AIRFLOW__METRICS__STATSD_HOST"] in svcs
    assert f":{env['AIRFLOW__METRICS__STATSD_PORT']}" in " ".join(
        svcs["statsd-exporter"]["command"]
    )
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/driftloop/dags"


def test_the_databases_the_stack_uses_are_the_ones_postgres_creates() -> None:
    script = (DEPLOY / "postgres" / "init-databases.sh").read_text()
    created = set(re.findall(r"^create_database (\w+) ", script, re.MULTILINE))
    text = COMPOSE.read_text()
    used = set(re.findall(r"postgresql\+psycopg2://(\w+):\$\{[^}]+\}@postgres:5432/(\w+)", text))
    assert used, "no PostgreSQL URL found"
    assert {db for _, db in used} == created == {"airflow", "mlflow", "driftloop"}
    assert all(role == db for role, db in used), "each component logs in as its own role"
    mounts = services()["postgres"]["volumes"]
    assert any(
        m.startswith("./deploy/postgres/init-databases.sh:/docker-entrypoint-initdb.d/")
        for m in mounts
    )


def test_the_mlflow_server_serves_artifacts_from_postgres_and_a_volume() -> None:
    mlflow = services()["mlflow"]
    env = _env(mlflow)
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in mlflow["command"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    destination = interpolate(env["MLFLOW_ARTIFACTS_DESTINATION"], {})
    assert any(v.split(":")[1] == destination for v in mlflow["volumes"]), destination


def test_the_sentiment_service_reserves_an_nvidia_gpu() -> None:
    sentiment = services()["sentiment"]
    devices = sentiment["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    env = _env(sentiment)
    assert env["DRIFTLOOP_SERVE_GPU"] == "true"
    assert env["DRIFTLOOP_DEVICE"] == "cuda"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert sentiment["image"].startswith("${SENTIMENT_IMAGE:?")


# -------------------------------------------------------------------------- .env and secrets


def test_env_example_documents_every_variable_with_a_comment() -> None:
    used = set(compose_variables(load_compose()))
    lines = ENV_EXAMPLE.read_text().splitlines()
    documented: dict[str, int] = {}
    for i, line in enumerate(lines):
        if match := re.match(r"([A-Z][A-Z0-9_]*)=", line):
            documented[match[1]] = i
            assert i > 0 and lines[i - 1].startswith("#"), f"{match[1]} has no comment above it"
    assert used - documented.keys() == set(), "used in the compose file, missing from .env.example"
    unused = documented.keys() - used - {"COMPOSE_FILE"}
    assert unused == set(), "in .env.example but not used by the compose file"


def test_no_literal_secret_in_the_compose_file_and_the_example_holds_none() -> None:
    compose = load_compose()
    assert secret_problems(compose) == []
    example = read_env_file(ENV_EXAMPLE)
    secrets = {name for name in compose_variables(load_compose()) if SECRET_KEY.search(name)}
    assert secrets, "the compose file uses no secret variable?"
    assert {name: example[name] for name in secrets if example[name]} == {}
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO_ROOT, check=False)
    assert ignored.returncode == 0, ".env must be git-ignored"


def test_the_secret_check_catches_literal_passwords() -> None:
    compose = load_compose()
    svcs = compose["services"]
    svcs["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] = "admin"
    svcs["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] = (
        "postgresql://mlflow:hunter2@postgres/mlflow"
    )
    svcs["redis"]["command"] = ["redis-server", "--requirepass", "hunter2"]
    problems = "\n".join(secret_problems(compose))
    assert "grafana: GF_SECURITY_ADMIN_PASSWORD" in problems
    assert "mlflow.environment.MLFLOW_BACKEND_STORE_URI: a password written into a URL" in problems
    assert "redis.command: a literal password on the command line" in problems


def test_compose_refuses_to_start_without_the_secrets() -> None:
    example = read_env_file(ENV_EXAMPLE)
    with pytest.raises(MissingVariable, match="set it in .env|set .* in .env"):
        interpolate(load_compose(), example)


def test_make_env_fills_every_secret_so_the_file_interpolates(tmp_path: Path) -> None:
    env_file = make_env(tmp_path)
    env = read_env_file(env_file)
    example = read_env_file(ENV_EXAMPLE)
    assert env.keys() == example.keys()
    for name, value in example.items():
        if value:
            assert env[name] == value, f"{name} should be copied as it is"
        else:
            assert re.fullmatch(r"[A-Za-z0-9_=-]{32,}", env[name]), f"{name}: {env[name]!r}"
    assert len(base64.urlsafe_b64decode(env["AIRFLOW_FERNET_KEY"])) == 32  # a valid Fernet key
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    resolved = interpolate(load_compose(), env)
    assert reference_problems(resolved, COMPOSE.parent) == []
    assert (
        env["POSTGRES_PASSWORD"] != read_env_file(make_env(tmp_path, ".env2"))["POSTGRES_PASSWORD"]
    )
    again = subprocess.run(
        ["bash", str(DEPLOY / "make-env.sh"), str(env_file)], capture_output=True, text=True
    )
    assert again.returncode != 0 and "exists" in again.stderr


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _docker_compose_available(), reason="the docker compose plugin is not installed"
)
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    env_file = make_env(tmp_path)
    result = subprocess.run(
        ["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "--quiet"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- images and files


def test_the_airflow_image_installs_the_locked_environment() -> None:
    dockerfile = (DEPLOY / "airflow.Dockerfile").read_text()
    assert "COPY pyproject.toml uv.lock ./" in dockerfile
    assert "uv export --frozen --no-dev" in dockerfile
    assert "--require-hashes" in dockerfile
    python = re.search(r"^ARG PYTHON_VERSION=(\S+)", dockerfile, re.MULTILINE)[1]  # type: ignore[index]
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    assert f">={python}" in requires
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.MULTILINE)[1]  # type: ignore[index]
    assert torch in locked_versions("torch"), f"the image's torch {torch} is not the locked one"
    # Every file the image copies exists and is let through by the Dockerfile's .dockerignore.
    ignore = (DEPLOY / "airflow.Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.MULTILINE):
        sources = [part for part in line.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (REPO_ROOT / source).exists(), source
            assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), (
                source
            )


def test_the_gpu_bento_differs_from_the_cpu_bento_only_in_torch() -> None:
    cpu = pins(REPO_ROOT / "bentos" / "sentiment" / "requirements.txt")
    gpu = pins(DEPLOY / "bentoml" / "requirements.gpu.txt")
    assert {k: v for k, v in gpu.items() if k != "torch"} == {
        k: v for k, v in cpu.items() if k != "torch"
    }
    base, _, variant = gpu["torch"].partition("+")
    assert {v.partition("+")[0] for v in locked_versions("torch")} == {base}
    assert variant.startswith("cu")
    gpu_file = yaml.safe_load((DEPLOY / "bentoml" / "bentofile.gpu.yaml").read_text())
    cpu_file = yaml.safe_load((REPO_ROOT / "bentos" / "sentiment" / "bentofile.yaml").read_text())
    for key in ("service", "name", "include"):
        assert gpu_file[key] == cpu_file[key], key
    assert gpu_file["python"]["extra_index_url"] == [f"https://download.pytorch.org/whl/{variant}"]
    assert (REPO_ROOT / gpu_file["python"]["requirements_txt"]).is_file()
    assert (REPO_ROOT / gpu_file["docker"]["setup_script"]).is_file()
    env = {e["name"]: e["value"] for e in gpu_file["envs"]}
    assert env["DRIFTLOOP_SERVE_GPU"] == "true"
    assert env["DRIFTLOOP_HOME"] == next(
        v.split(":")[1]
        for v in services()["sentiment"]["volumes"]
        if v.startswith("sentiment-home:")
    )


def test_the_entrypoint_writes_the_admin_password_file(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW_ADMIN_USER": "ops",
        "AIRFLOW_ADMIN_PASSWORD": 'a"b\\c',
        "DRIFTLOOP_HOME": str(tmp_path / "home"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "passwords.json"),
    }
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{python_dir}:{env['PATH']}"
    result = subprocess.run(
        ["bash", str(DEPLOY / "airflow" / "entrypoint.sh"), "sh", "-c", "echo ran $0", "ok"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran ok"
    passwords = tmp_path / "passwords.json"
    assert json.loads(passwords.read_text()) == {"ops": 'a"b\\c'}
    assert oct(passwords.stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "home" / "evidently").is_dir()


# -------------------------------------------------------------------------------- monitoring


def test_promql_metric_extraction() -> None:
    assert promql_metric_names(
        "histogram_quantile(0.95, sum by (le) (rate(driftloop_request_latency_seconds_bucket"
        '{endpoint="predict", model_version=~"$v"}[$__rate_interval])))'
    ) == {"driftloop_request_latency_seconds_bucket"}
    assert promql_metric_names(
        "sum(rate(a_total[5m])) / clamp_min(sum(rate(b_total[5m])), 1e-9) * 60 > bool 0"
    ) == {"a_total", "b_total"}
    assert promql_metric_names('max(up{job="sentiment"}) offset 1h') == {"up"}
    assert promql_metric_names("label_values(driftloop_predictions_total, model_version)") == {
        "driftloop_predictions_total"
    }


def test_every_dashboard_query_uses_a_metric_the_stack_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = known_metrics()
    queries = dashboard_queries(dashboard)
    assert len(queries) > 20
    unknown = {
        (title, name)
        for title, expr in queries
        for name in promql_metric_names(expr)
        if name not in known
    }
    assert unknown == set()
    used = {name for _, expr in queries for name in promql_metric_names(expr)}
    # What the dashboard must show: throughput, latency, errors, predictions by label and model
    # version, cache, batch sizes, and the loop's drift scores, retrainings and rollbacks.
    for metric in (
        "bentoml_service_request_total",
        "driftloop_request_latency_seconds_bucket",
        "bentoml_service_request_duration_seconds_bucket",
        "driftloop_errors_total",
        "driftloop_predictions_total",
        "driftloop_cache_lookups_total",
        "driftloop_batch_size_bucket",
        *LOOP_METRICS,
        "airflow_ti_finish_total",
        "airflow_executor_queued_tasks",
    ):
        assert metric in used, f"the dashboard does not plot {metric}"
    exprs = [expr for _, expr in queries]
    assert any("by (label)" in e and "driftloop_predictions_total" in e for e in exprs)
    assert any("by (model_version)" in e and "driftloop_predictions_total" in e for e in exprs)
    assert any(e.startswith("histogram_quantile(0.99") for e in exprs)
    # ... and one unknown name would be reported.
    assert "driftloop_predictions" not in known  # the counter is exported with its _total suffix


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel[
                "title"
            ]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()  # type: ignore[union-attr]
    assert host in services() and port == "9090"
    provider = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "dashboards" / "driftloop.yml").read_text()
    )["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services()["grafana"]["volumes"])
    assert mounts["./monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_prometheus_scrapes_the_service_and_the_statsd_exporter() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [t for sc in job["static_configs"] for t in sc["targets"]]
        for name, job in jobs.items()
    }
    assert targets["sentiment"] == ["sentiment:3000"]
    assert jobs["sentiment"].get("metrics_path", "/metrics") == "/metrics"
    assert "--web.listen-address=:9102" in services()["statsd-exporter"]["command"]
    assert targets["statsd-exporter"] == ["statsd-exporter:9102"]
    for name, hosts in targets.items():
        for target in hosts:
            host = target.split(":")[0]
            assert host == "localhost" or host in services(), f"{name}: unknown host {host}"
    mounts = services()["prometheus"]["volumes"]
    assert "./monitoring/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def _package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it (importing Airflow is slow)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, name
    return Path(next(iter(spec.submodule_search_locations)))


def test_statsd_mappings_name_real_airflow_metrics() -> None:
    template = _package_dir("airflow") / "_shared/observability/metrics/metrics_template.yaml"
    registry = {m["name"]: m["type"] for m in yaml.safe_load(template.read_text())["metrics"]}
    kinds = {"counter": "counter", "gauge": "gauge", "timer": "observer"}
    airflow_mappings = [m for m in statsd_mappings() if m["match"].startswith("airflow.")]
    assert airflow_mappings
    for mapping in airflow_mappings:
        pattern = mapping["match"].removeprefix("airflow.")
        matches = [
            n for n in registry if fnmatchcase(n, pattern) and n.count(".") == pattern.count(".")
        ]
        assert matches, f"{mapping['match']} matches no metric Airflow emits"
        assert {kinds[registry[n]] for n in matches} == {mapping["match_metric_type"]}, mapping[
            "match"
        ]
        if mapping["match_metric_type"] == "counter":
            assert mapping["name"].endswith("_total"), mapping["name"]
    loop = {m["name"] for m in statsd_mappings() if m["match"].startswith("driftloop.")}
    assert loop == LOOP_METRICS


def test_bentoml_metric_names_match_the_installed_bentoml() -> None:
    root = _package_dir("bentoml") / "_internal"
    defaults = yaml.safe_load((root / "configuration/v2/default_configuration.yaml").read_text())
    assert defaults["services"]["metrics"]["namespace"] == "bentoml_service"
    instruments = (root / "server/http/instruments.py").read_text()
    for base in ("request_duration_seconds", "request_total", "request_in_progress"):
        assert f'name="{base}"' in instruments, base
    assert 'name="last_request_timestamp_seconds"' in instruments
    app = (_package_dir("_bentoml_impl") / "server/app.py").read_text()
    assert 'namespace="bentoml_service"' in app and 'name="adaptive_batch_size"' in app


def test_the_docs_name_every_metric_the_dashboard_expects_from_the_loop() -> None:
    docs = DOCS.read_text()
    for metric in sorted(LOOP_METRICS):
        assert f"`{metric}`" in docs, metric
    for variable in ("DRIFTLOOP_STATSD_HOST", "DRIFTLOOP_STATSD_PORT"):
        assert variable in docs
        assert variable in services()["airflow-worker"]["environment"]


# ------------------------------------------------------------------------ writable state


def mounts(svc: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each volume of a service as (target in the container, writable)."""
    out = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            out.append((volume["target"], not volume.get("read_only", False)))
            continue
        parts = str(volume).split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        out.append((parts[1], "ro" not in mode.split(",")))
    return out


def task_write_paths(env: Mapping[str, str]) -> dict[str, str]:
    """Every folder a DAG task writes, as driftloop's settings resolve it in the container."""
    from ml.settings import REPO_ROOT, Settings

    container_root = Path(env["AIRFLOW__CORE__DAGS_FOLDER"]).parent
    where = ("DRIFTLOOP_HOME", "DRIFTLOOP_FEEDBACK_DIR")
    given = {k: env[k] for k in where if k in env}
    settings = Settings(**{"DRIFTLOOP_FEEDBACK_DIR": None, **given})

    def inside(path: Path) -> str:
        return str(container_root / path.relative_to(REPO_ROOT)) if path.is_relative_to(
            REPO_ROOT) else str(path)

    paths = {
        "home": settings.home,
        "reports": settings.reports_dir,
        "data docs": settings.data_docs_dir,
        "work (batches, checkpoints, model cache)": settings.work_dir,
        "feedback batches": settings.feedback_dir,
        "Evidently workspace": settings.home / "evidently",
    }
    if not str(env.get("MLFLOW_TRACKING_URI", "")).startswith(("http://", "https://")):
        paths["MLflow artifacts"] = settings.artifact_root
    out = {name: inside(path) for name, path in paths.items()}
    out["Airflow task logs"] = f"{env['AIRFLOW_HOME']}/logs"
    return out


def unwritable_paths(svc: dict[str, Any]) -> list[str]:
    """Task write paths that are not on a writable mount (read-only, or the container layer)."""
    env = _env(svc)
    problems = []
    for name, path in task_write_paths(env).items():
        covering = [
            (t, w) for t, w in mounts(svc) if path == t or path.startswith(t.rstrip("/") + "/")
        ]
        if not covering:
            problems.append(f"{name} ({path}) is on no volume: lost when the container goes")
            continue
        target, writable = max(covering, key=lambda m: len(m[0]))  # the innermost mount wins
        if not writable:
            problems.append(f"{name} ({path}) is on the read-only mount {target}")
    return problems


def test_every_path_a_task_writes_is_on_a_writable_mount() -> None:
    svcs = services()
    for name in ("airflow-worker", "airflow-scheduler", "airflow-dag-processor"):
        assert unwritable_paths(svcs[name]) == [], name


def test_the_mount_check_catches_a_read_only_feedback_folder() -> None:
    worker = services()["airflow-worker"]
    worker["environment"].pop("DRIFTLOOP_FEEDBACK_DIR")  # the default: <repo>/data/feedback
    assert unwritable_paths(worker) == [
        "feedback batches (/opt/driftloop/data/feedback) is on the read-only mount "
        "/opt/driftloop/data"
    ]
    worker["environment"]["DRIFTLOOP_FEEDBACK_DIR"] = "/tmp/feedback"
    assert unwritable_paths(worker) == [
        "feedback batches (/tmp/feedback) is on no volume: lost when the container goes"
    ]
