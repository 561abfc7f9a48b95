"""The image/host CLI: help text, JSON output, exit codes, and register() for sbroker."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.container import cli

from .conftest import make_file

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [
        ["image"], ["image", "build"], ["image", "list"], ["image", "switch"], ["image", "rollback"],
        ["image", "cleanup"], ["image", "verify"], ["image", "freeze"], ["image", "status"],
        ["image", "sandbox"], ["image", "sandbox", "create"], ["image", "sandbox", "list"],
        ["image", "sandbox", "switch"], ["image", "sandbox", "rollback"], ["image", "sandbox", "cleanup"],
        ["host"], ["host", "check"], ["host", "install"],
    ],
)  # fmt: skip
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and len(out.splitlines()) > 3


def test_register_into_a_foreign_parser() -> None:
    parser = argparse.ArgumentParser(prog="sbroker")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["image", "cleanup", "--keep", "2", "-d", "/x", "--json"])
    assert (args.keep, args.dir, args.json) == (2, "/x", True) and args.handler is args.func
    failing = parser.parse_args(["image", "switch", "9.9", "-d", "/nonexistent"])
    assert failing.handler(failing) == 1  # a guarded one-line error, not a traceback


def test_list_switch_rollback_cleanup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, version in enumerate(["1.0", "1.1", "1.2"]):
        make_file(tmp_path / f"scitex-v{version}.sif", 1_700_000_000 + i)
    assert run_cli(capsys, "image", "switch", "1.2", "-d", str(tmp_path))[:2] == (0, "active version: 1.2\n")
    code, out, _ = run_cli(capsys, "image", "list", "-d", str(tmp_path), "--json")
    assert code == 0 and [row["version"] for row in json.loads(out)] == ["1.2", "1.1", "1.0"]
    code, out, _ = run_cli(capsys, "image", "list", "-d", str(tmp_path))
    assert out.splitlines()[0].split() == ["ACTIVE", "VERSION", "SIZE", "DATE", "PATH"] and out.splitlines()[1].startswith("*")
    assert json.loads(run_cli(capsys, "image", "rollback", "-d", str(tmp_path), "--json")[1]) == {"active": "1.1"}
    code, out, _ = run_cli(capsys, "image", "cleanup", "-d", str(tmp_path), "--keep", "0", "--json")
    assert sorted(Path(p).name for p in json.loads(out)["removed"]) == ["scitex-v1.0.sif", "scitex-v1.2.sif"]


def test_errors_are_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "image", "switch", "9.9", "-d", str(tmp_path))
    assert (code, out) == (1, "") and err.startswith("error: Version 9.9 not found")
    code, _, err = run_cli(capsys, "image", "rollback", "-d", str(tmp_path))
    assert code == 1 and err == "error: No active version: nothing to roll back from\n"


def test_verify_exit_code_follows_overall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sif = make_file(tmp_path / "a.sif", 1_700_000_000)
    code, out, _ = run_cli(capsys, "image", "verify", str(sif), "--json")
    assert code == 0 and json.loads(out)["overall"] == "pass"
    assert run_cli(capsys, "image", "verify", str(tmp_path / "nope.sif"))[0] == 1


def test_host_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "host", "check", "--json")
    assert code == 0 and set(json.loads(out)) == {"texlive", "imagemagick"}


def test_module_entry_point() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "broker.container.cli", "image", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "rollback" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "broker.container.cli"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
