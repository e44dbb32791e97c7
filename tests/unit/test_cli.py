"""The `driftloop` command line, run as a user would (a real subprocess), and its app tree.

In-process runs (``typer.testing.CliRunner``) are for what a subprocess cannot reach: a
terminal on stdout, an uninstalled package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GOOD = "label\ttext\n" + "".join(
    f"{lab}\t{lab} tweet number {i} about things\n"
    for i in range(30)
    for lab in ("negative", "neutral", "positive")
)


def driftloop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("driftloop")
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("content", "code", "expected"),
    [
        (GOOD, 0, "valid:"),
        ("text\n" + "some tweet\n" * 30, 1, "column 'label' is missing"),
        (GOOD + "happy\tunknown label row\n" * 5, 1, "labels outside"),
        (GOOD + "neutral\t   \n" * 3, 1, "text"),
        (b"\x00\x01\x02binary\xff\xfe".decode("latin-1"), 2, "unreadable"),
    ],
    ids=["valid", "missing-column", "unknown-labels", "empty-texts", "not-a-table"],
)
def test_validate_exit_codes_and_reasons(tmp_home, tmp_path, content, code, expected) -> None:
    path = tmp_path / "batch.tsv"
    path.write_text(content, encoding="latin-1" if code == 2 else "utf-8")
    out = driftloop("validate", str(path), "--human")
    assert out.returncode == code, out.stdout + out.stderr
    assert expected in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_validate_missing_file_is_unreadable(tmp_home, tmp_path) -> None:
    out = driftloop("validate", str(tmp_path / "nope.tsv"), "--human")
    assert out.returncode == 2 and "no such file" in out.stdout


def test_status_rollback_and_audit(tmp_home, tiny_model_dir) -> None:
    from ml import registry

    v1 = registry.register_model_dir(
        tiny_model_dir, reason="first", metrics={"val_macro_recall": 0.6}
    )
    v2 = registry.register_model_dir(
        tiny_model_dir, reason="second", metrics={"val_macro_recall": 0.7}
    )
    registry.set_alias("champion", v1.version, actor="t", reason="seed", action="promote")
    registry.set_alias("champion", v2.version, actor="t", reason="better", action="promote")

    status = json.loads(driftloop("status", "--json").stdout)
    assert status["champion"]["version"] == v2.version
    assert status["champion"]["metrics"]["val_macro_recall"] == 0.7
    human = driftloop("status", "--human").stdout
    assert_not_json(human)
    assert f"version:      {v2.version}" in human and "val_macro_recall: 0.7" in human

    out = driftloop("rollback", "--reason", "bad outputs", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["to_version"] == v1.version
    # Not a terminal and no flag: JSON, as scripts that read the output expect.
    assert json.loads(driftloop("status").stdout)["champion"]["version"] == v1.version
    audit = json.loads(driftloop("audit", "--json").stdout)
    assert audit[0]["action"] == "rollback" and audit[0]["reason"] == "bad outputs"
    assert audit[0]["actor"].startswith("cli:")
    human = driftloop("audit", "--human").stdout
    assert_not_json(human)
    assert "action:" in human and "reason:" in human and "bad outputs" in human


def test_rollback_without_champion_fails_cleanly(tmp_home) -> None:
    out = driftloop("rollback")
    assert out.returncode == 1
    assert "no champion" in out.stderr and "Traceback" not in out.stderr


def assert_not_json(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_validate_json_is_one_document_with_the_same_exit_code(tmp_home, tmp_path) -> None:
    path = tmp_path / "batch.tsv"
    path.write_text(GOOD + "happy\tunknown label row\n" * 5)
    out = driftloop("validate", str(path), "--json")
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "invalid" and doc["rows"] == 95 and doc["path"] == str(path)
    assert any("labels outside" in reason for reason in doc["reasons"])

    missing = driftloop("validate", str(tmp_path / "nope.tsv"), "--json")
    assert missing.returncode == 2
    assert json.loads(missing.stdout)["status"] == "unreadable"


def test_setup_json_and_human(tmp_home) -> None:
    out = driftloop("setup", "--json")
    assert out.returncode == 0, out.stderr
    assert {s["name"]: s["state"] for s in json.loads(out.stdout)} == {
        "mlflow": "created",
        "driftloop": "created",
    }
    human = driftloop("setup", "--human")
    assert human.returncode == 0, human.stderr
    assert_not_json(human.stdout)
    header, *rows = human.stdout.splitlines()
    assert header.split() == ["name", "url", "state"]
    assert [row.split()[::2] for row in rows] == [["mlflow", "ready"], ["driftloop", "ready"]]


def test_version_is_the_package_version() -> None:
    from importlib import metadata

    out = driftloop("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"driftloop {metadata.version('driftloop')}"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch) -> None:
    from importlib import metadata

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out = invoke("--version")
    assert out.exit_code == 0 and out.stdout.strip() == f"driftloop {pyproject}"


def test_bash_completion_script_and_answers() -> None:
    script = driftloop(env={"_DRIFTLOOP_COMPLETE": "source_bash"})
    assert script.returncode == 0, script.stderr
    assert "_driftloop_completion" in script.stdout
    assert "complete -o default -F _driftloop_completion driftloop" in script.stdout

    words = driftloop(
        env={
            "_DRIFTLOOP_COMPLETE": "complete_bash",
            "COMP_WORDS": "driftloop st",
            "COMP_CWORD": "1",
        }
    )
    assert words.returncode == 0, words.stderr
    assert set(words.stdout.split()) == {"status", "stage"}


def walk(command: Any, path: tuple[str, ...] = ("driftloop",)) -> Iterator[tuple[str, Any]]:
    """Every command of the click tree Typer builds, with its full name."""
    yield " ".join(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, (*path, name))


def test_every_command_and_parameter_has_help() -> None:
    import typer.main

    from ml.cli import app

    commands = dict(walk(typer.main.get_command(app)))
    assert {"driftloop status", "driftloop stage train", "driftloop replay"} <= set(commands)
    missing = [
        f"{name} {'/'.join(param.opts) or param.name}"
        for name, command in commands.items()
        for param in command.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    missing += [f"{name} (no docstring)" for name, cmd in commands.items() if not cmd.help]
    assert not missing, f"give these a help= text: {missing}"
    root = {opt for param in commands["driftloop"].params for opt in param.opts}
    assert {"--version", "--show-completion", "--install-completion"} <= root


def test_commands_that_print_results_take_json() -> None:
    import typer.main

    from ml.cli import app

    commands = dict(walk(typer.main.get_command(app)))
    with_json = {
        name.removeprefix("driftloop ")
        for name, command in commands.items()
        if any("--json" in param.opts for param in command.params)
    }
    assert with_json == {
        "validate",
        "train",
        "promote",
        "canary",
        "rollback",
        "setup",
        "status",
        "audit",
        "events-flush",
        "replay",
        "drift",
        "reports",
        "db upgrade",
        "db current",
    }


# ------------------------------------------------------------------------------- in-process


@pytest.fixture(autouse=True)
def _logging_restored(restore_logging: None) -> None:
    """Every test here may reconfigure the root logger (tests/conftest.py puts it back)."""


def invoke(*args: str) -> Any:
    from typer.testing import CliRunner

    from ml.cli import app

    return CliRunner().invoke(app, list(args), prog_name="driftloop")


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_default_output_follows_the_terminal(tmp_home, monkeypatch, terminal: bool) -> None:
    from ml import cli

    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: terminal)
    out = invoke("events-flush")
    assert out.exit_code == 0, out.output
    if terminal:
        assert_not_json(out.stdout)
        assert out.stdout.splitlines() == ["delivered: 0", "failed:    0", "waiting:   0"]
    else:
        assert json.loads(out.stdout) == {"delivered": 0, "failed": 0, "waiting": 0}


def test_human_rendering_aligns_keys_and_tabulates_flat_rows() -> None:
    from ml.console import human_lines

    value = {
        "version": "3",
        "drift_detected": False,
        "metrics": {"val_f1": 0.5, "val_macro_recall": 0.75},
        "signals": [],
        "rows": [{"name": "a", "n": 1}, {"name": "bbb", "n": None}],
    }
    assert human_lines(value) == [
        "version:        3",
        "drift_detected: no",
        "metrics:",
        "  val_f1:           0.5",
        "  val_macro_recall: 0.75",
        "signals:        -",
        "rows:",
        "  name  n",
        "  a     1",
        "  bbb   -",
    ]
