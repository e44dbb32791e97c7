"""The `driftloop` command line, run as a user would (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOOD = "label\ttext\n" + "".join(
    f"{lab}\t{lab} tweet number {i} about things\n"
    for i in range(30) for lab in ("negative", "neutral", "positive")
)


def driftloop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("driftloop")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=REPO)


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
    out = driftloop("validate", str(path))
    assert out.returncode == code, out.stdout + out.stderr
    assert expected in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_validate_missing_file_is_unreadable(tmp_home, tmp_path) -> None:
    out = driftloop("validate", str(tmp_path / "nope.tsv"))
    assert out.returncode == 2 and "no such file" in out.stdout


def test_status_rollback_and_audit(tmp_home, tiny_model_dir) -> None:
    from ml import registry

    v1 = registry.register_model_dir(tiny_model_dir, reason="first", metrics={
        "val_macro_recall": 0.6})
    v2 = registry.register_model_dir(tiny_model_dir, reason="second", metrics={
        "val_macro_recall": 0.7})
    registry.set_alias("champion", v1.version, actor="t", reason="seed", action="promote")
    registry.set_alias("champion", v2.version, actor="t", reason="better", action="promote")

    status = json.loads(driftloop("status").stdout)
    assert status["champion"]["version"] == v2.version
    assert status["champion"]["metrics"]["val_macro_recall"] == 0.7

    out = driftloop("rollback", "--reason", "bad outputs")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["to_version"] == v1.version
    assert json.loads(driftloop("status").stdout)["champion"]["version"] == v1.version
    audit = json.loads(driftloop("audit").stdout)
    assert audit[0]["action"] == "rollback" and audit[0]["reason"] == "bad outputs"
    assert audit[0]["actor"].startswith("cli:")


def test_rollback_without_champion_fails_cleanly(tmp_home) -> None:
    out = driftloop("rollback")
    assert out.returncode == 1
    assert "no champion" in out.stderr and "Traceback" not in out.stderr
