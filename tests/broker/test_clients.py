"""Lean client pieces: project routing, progress text, admin formatting."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from broker.admin import COLUMNS, format_table, parse_since
from broker.login import Progress, split_project


@pytest.mark.parametrize("command, env, expected", [
    (None, None, (None, None)),
    (None, "p2", ("p2", None)),
    ("@p3", None, ("p3", None)),
    ("@p3 ls -la", "p2", ("p3", "ls -la")),
    ("  @p4   echo 'a b'", None, ("p4", "echo 'a b'")),
    ("echo @notaproject", "p2", ("p2", "echo @notaproject")),
    ("rsync --server -e.LsfxC . dir", None, (None, "rsync --server -e.LsfxC . dir")),
])
def test_split_project(command, env, expected):
    assert split_project(command, env) == expected


def test_progress_plain_lines_without_tty():
    out = io.StringIO()
    progress = Progress(out)
    progress({"state": "pending", "pending_reason": "Resources", "expected_start": "2026-11-29T12:00:00"})
    progress({"state": "pending", "pending_reason": "Resources", "expected_start": "2026-11-29T12:00:00"})
    progress({"state": "ready", "reason": "instance ready"})
    assert out.getvalue().splitlines() == [
        "sbroker: pending (reason: Resources, expected start 2026-11-29T12:00:00)", "sbroker: ready"]


def test_table_fits_80_columns():
    row = {key: "x" * 50 for _, key, _ in COLUMNS}
    row["idle"] = 98765
    for line in format_table([row, row]).splitlines():
        assert len(line) <= 80


def test_parse_since():
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("2h ago", now=10000.0) == 2800.0
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday-ish")


def test_login_import_graph_is_lean():
    """sbroker login must not pull in the daemon's dependencies (structlog, anyio, asyncssh)."""
    code = ("import sys, broker.cli, broker.login, broker.term\n"
            "heavy = {'structlog', 'anyio', 'asyncssh', 'sqlite3', 'prometheus_client', 'broker.manager'}\n"
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_login_help_prints_usage_without_contacting_the_broker(tmp_path):
    import subprocess
    import sys
    missing = tmp_path / "no.sock"  # contacting it would fail: help must not try
    for flag in ("--help", "-h"):
        res = subprocess.run([sys.executable, "-m", "broker", "login", "--socket", str(missing), flag],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and res.stderr == ""
        assert res.stdout.startswith("usage: sbroker login [--socket PATH]\n")
    res = subprocess.run([sys.executable, "-m", "broker", "login", "--bogus"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert res.stderr == "sbroker login: unknown argument '--bogus' (see sbroker login --help)\n"
