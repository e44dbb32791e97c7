"""``bentoml build`` works offline, keeps the CPU torch, and the built bento serves."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from ml.serving.launch import serve_argv
from scripts.procs import free_port, terminate_group, wait_http_ok

REPO_ROOT = Path(__file__).resolve().parents[2]
BENTO_DIR = REPO_ROOT / "bentos" / "sentiment"


def locked_versions() -> dict[str, set[str]]:
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        versions.setdefault(package["name"].lower(), set()).add(package["version"])
    return versions


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()  # type: ignore[union-attr]
            found[name.lower()] = version
    return found


# Imports every ml module the service's files name (at the top or inside a method), then lists
# the files of all ml modules loaded: what the service needs, and all that the bento should ship.
LIST_SERVING_MODULES = """
import ast, importlib, sys
from pathlib import Path
root = Path.cwd()
for path in sorted((root / "bentos/sentiment").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ml":
            importlib.import_module(node.module)
for name, module in sorted(sys.modules.items()):
    if name == "ml" or name.startswith("ml."):
        print(Path(module.__file__).resolve().relative_to(root))
"""


def serving_modules() -> set[str]:
    """The ``ml`` files the service imports, found in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", LIST_SERVING_MODULES],
        cwd=REPO_ROOT,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "True"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return set(out.stdout.split())


def test_serving_imports_nothing_but_the_serving_side_of_the_library() -> None:
    modules = imported_ml_files()
    assert "ml/serving/loading.py" in modules and "ml/artifacts.py" in modules
    others = ("ml/training/", "ml/drift/", "ml/lifecycle/", "ml/cli.py")
    assert not [m for m in modules if m.startswith(others)], modules


def included_ml_files() -> set[str]:
    """The ``ml`` files the bentofile's ``include:`` globs name."""
    import yaml

    spec = yaml.safe_load((BENTO_DIR / "bentofile.yaml").read_text())
    return {
        str(path.relative_to(REPO_ROOT))
        for pattern in spec["include"]
        if pattern.startswith("ml/")
        for path in REPO_ROOT.glob(pattern)
        if path.suffix == ".py"
    }


def _ml_imports(path: Path) -> set[str]:
    """Every ``ml`` module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "ml" or n.startswith("ml.")}


def _module_file(module: str) -> str | None:
    stem = module.replace(".", "/")
    for candidate in (f"{stem}.py", f"{stem}/__init__.py"):
        if (REPO_ROOT / candidate).is_file():
            return candidate
    return None  # a name imported from a module, not a module


def imported_ml_files() -> set[str]:
    """The ``ml`` files the service's files import, directly or through each other, at the top
    or inside a function (a lazy import runs only on its code path, so read them all)."""
    todo = [str(p.relative_to(REPO_ROOT)) for p in BENTO_DIR.glob("*.py")]
    seen: set[str] = set()
    while todo:
        file = todo.pop()
        for module in _ml_imports(REPO_ROOT / file):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # a package's __init__ runs too
                found = _module_file(".".join(parts[:i]))
                if found and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def test_the_bentofile_ships_every_module_the_service_can_import() -> None:
    # Alembic loads the migrations by path when the service opens its database, so no import
    # names them; they ship all the same (the built bento below starts on a fresh database).
    migrations = {
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "ml/migrations").rglob("*.py")
    }
    assert included_ml_files() == imported_ml_files() | migrations
    assert serving_modules() <= imported_ml_files()


def test_bento_requirements_are_the_locked_versions() -> None:
    locked = locked_versions()
    wanted = pins(BENTO_DIR / "requirements.txt")
    assert wanted["torch"] == "2.13.0+cpu"
    drifted = {
        n: (v, sorted(locked.get(n, ())))
        for n, v in wanted.items()
        if v not in locked.get(n, set())
    }
    assert drifted == {}, f"requirements.txt differs from uv.lock: {drifted}"


@pytest.mark.slow
@pytest.mark.integration
def test_bentoml_build_works_offline_and_the_bento_serves(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml import registry
    from ml.settings import get_settings

    bentoml = str(Path(sys.executable).parent / "bentoml")
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "DRIFTLOOP_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'driftloop.db'}",
    }
    env.pop("REDIS_URL", None)
    env.pop("DRIFTLOOP_API_KEYS", None)
    build = subprocess.run(
        [bentoml, "build", "-f", str(BENTO_DIR / "bentofile.yaml"), "--output", "tag", "."],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    tag = re.search(r"driftloop-sentiment:\w+", build.stdout).group(0)  # type: ignore[union-attr]
    bento = tmp_path / "bentoml" / "bentos" / "driftloop-sentiment" / tag.split(":")[1]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0+cpu" in requirements
    assert not re.search(r"nvidia-|torch==2\.13\.0(?!\+cpu)", requirements)
    assert (bento / "src" / "bentos" / "sentiment" / "service.py").is_file()
    shipped = {str(p.relative_to(bento / "src")) for p in (bento / "src" / "ml").rglob("*.py")}
    assert shipped == included_ml_files()

    for key in ("DRIFTLOOP_HOME", "MLFLOW_TRACKING_URI", "DATABASE_URL"):
        monkeypatch.setenv(key, env[key])
    get_settings.cache_clear()
    try:
        version = registry.register_model_dir(tiny_model_dir, reason="bento test")
        registry.set_alias("champion", version.version, actor="test", reason="bento test")
    finally:
        get_settings.cache_clear()

    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            serve_argv(tag, host="127.0.0.1", port=port),
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        wait_http_ok(url, "the built bento", 240, proc=proc, log_path=log_path)
        resp = httpx.post(
            f"http://127.0.0.1:{port}/predict", json={"texts": ["from a bento"]}, timeout=30
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["model_version"] == version.version
    finally:
        terminate_group(proc, timeout=30)
