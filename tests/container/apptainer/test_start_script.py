"""The instance start script under real bash against a fake ``apptainer``.

Checks the marker contract the broker daemon depends on: READY / FAILED: reason /
STOPPED, exact-name matching, the TERM trap stopping the instance promptly and once.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from broker.container.apptainer import build_instance_start_script

from tests.waiting import wait_for

from ..conftest import FakeApptainer

NAME = "inst-1"


def make_script(tmp_path: Path, name: str = NAME) -> Path:
    script = tmp_path / "start.sh"
    script.write_text(build_instance_start_script("/c/img.sif", "alice", "/h/alice", "/p/proj1", "proj1", name))
    return script


class Running:
    """A start script running under bash with its stdout lines in a queue."""

    def __init__(self, script: Path, fake: FakeApptainer, poll: int = 1) -> None:
        env = {**fake.env(), "SBROKER_INSTANCE_POLL_SECONDS": str(poll), "TMPDIR": str(script.parent)}
        # As slurmstepd starts a batch script: default signal dispositions. A signal ignored on
        # entry (a test run under nohup ignores SIGHUP) cannot be trapped by bash at all.
        self.proc = subprocess.Popen(
            ["env", "--default-signal", "bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = 10) -> str | None:
        line = self.lines.get(timeout=timeout)
        if line is not None:
            self.seen.append(line)
        return line

    def finish(self, timeout: float = 15) -> tuple[int, list[str]]:
        try:
            while self.next_line(timeout) is not None:
                pass
        except queue.Empty:
            # Say where the script was: its processes and its stderr (it was seen to hang once).
            tree = subprocess.run(["ps", "-o", "pid,ppid,stat,args", "--ppid", str(self.proc.pid)],
                                  capture_output=True, text=True).stdout
            self.kill()
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"no end of stdout within {timeout:g}s; stdout so far {self.seen}; "
                                 f"children:\n{tree}stderr:\n{stderr}") from None
        return self.proc.wait(timeout=timeout), self.seen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def running(tmp_path: Path, fake_apptainer: FakeApptainer):
    started: list[Running] = []

    def start(name: str = NAME, poll: int = 1) -> Running:
        run = Running(make_script(tmp_path, name), fake_apptainer, poll)
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()


def stops(fake: FakeApptainer, name: str = NAME) -> int:
    return fake.calls().count(f"instance stop {name}")


def test_script_is_bash_syntax_clean(tmp_path: Path) -> None:
    script = make_script(tmp_path)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and text.endswith("\n")
    assert "set -e" not in text
    assert "\nINSTANCE=inst-1\n" in text and "\nCONTAINER=/c/img.sif\n" in text


def test_ready_then_instance_goes_away(running, fake_apptainer: FakeApptainer) -> None:
    run = running()
    assert run.next_line() == "INSTANCE_READY"
    start_calls = [c for c in fake_apptainer.calls() if c.startswith("instance start ")]
    assert start_calls == [
        "instance start --containall --cleanenv --writable-tmpfs --hostname scitex-cloud"
        " --env TERM=xterm-256color --env SCITEX_CLOUD=true --env SCITEX_PROJECT=proj1"
        " --env SCITEX_USER=alice --env USER=alice --env LOGNAME=alice --env SHELL=/bin/bash"
        " --env PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
        " --home /h/alice:/home/alice --bind /p/proj1:/home/alice/proj/proj1:rw /c/img.sif inst-1"
    ]
    # Two listings: the first (the exact-name check right after READY) has surely finished.
    wait_for(lambda: len([c for c in fake_apptainer.calls() if c.startswith("instance list")]) >= 2, 10,
             "the listing after READY and the first keep-alive round")
    (fake_apptainer.state / "instances").write_text("")  # then someone stopped it
    rc, lines = run.finish()
    assert (rc, lines) == (0, ["INSTANCE_READY", "INSTANCE_STOPPED"])
    assert stops(fake_apptainer) == 0


def test_start_failure_reports_exit_code_and_last_stderr_line(running, fake_apptainer: FakeApptainer) -> None:
    fake_apptainer.knob("start_fail")
    rc, lines = running().finish()
    assert rc == 1
    assert lines == ["INSTANCE_FAILED: apptainer instance start exited with status 255: image not found", "INSTANCE_STOPPED"]


def test_term_stops_instance_once_and_promptly(running, fake_apptainer: FakeApptainer) -> None:
    run = running(poll=30)
    assert run.next_line() == "INSTANCE_READY"
    began = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    rc, lines = run.finish()
    assert time.monotonic() - began < 2
    assert rc == 128 + signal.SIGTERM
    assert lines == ["INSTANCE_READY", "INSTANCE_STOPPED"]
    assert stops(fake_apptainer) == 1
    assert fake_apptainer.instances() == []


def test_term_before_ready_is_a_failure_with_reason(running, fake_apptainer: FakeApptainer) -> None:
    fake_apptainer.knob("start_sleep", "1")
    run = running()
    deadline = time.monotonic() + 5
    while not any(c.startswith("instance start") for c in fake_apptainer.calls()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)
    rc, lines = run.finish()
    assert rc == 143
    assert lines == ["INSTANCE_FAILED: received SIGTERM before the instance was ready", "INSTANCE_STOPPED"]
    assert stops(fake_apptainer) == 1


def test_similar_name_does_not_keep_it_alive(running, fake_apptainer: FakeApptainer) -> None:
    (fake_apptainer.state / "instances").write_text("inst-1-old\nxinst-1\n")
    run = running()
    assert run.next_line() == "INSTANCE_READY"
    assert stops(fake_apptainer) == 0  # no stale stop: the similar names are other instances
    # Two listings: the first (the exact-name check right after READY) has surely finished.
    wait_for(lambda: len([c for c in fake_apptainer.calls() if c.startswith("instance list")]) >= 2, 10,
             "the listing after READY and the first keep-alive round")
    (fake_apptainer.state / "instances").write_text("inst-1-old\nxinst-1\n")  # ours is gone
    rc, lines = run.finish()
    assert (rc, lines) == (0, ["INSTANCE_READY", "INSTANCE_STOPPED"])
    assert "instance stop inst-1-old" not in fake_apptainer.calls()


def test_similar_name_is_not_mistaken_for_ready(running, fake_apptainer: FakeApptainer) -> None:
    (fake_apptainer.state / "instances").write_text("inst-1-old\n")
    fake_apptainer.knob("start_noshow")
    rc, lines = running().finish(timeout=20)
    assert rc == 1
    # Ready when the start succeeded; the exact-name check follows at once and fails it.
    assert lines == ["INSTANCE_READY", "INSTANCE_FAILED: apptainer instance start exited 0 but instance inst-1 is "
                     "not listed", "INSTANCE_STOPPED"]
    assert stops(fake_apptainer) == 0


def test_stale_instance_that_blocks_the_start_is_stopped_and_the_start_retried(
        running, fake_apptainer: FakeApptainer) -> None:
    (fake_apptainer.state / "instances").write_text("inst-1\n")
    run = running()
    assert run.next_line() == "INSTANCE_READY"
    calls = [c.split(" --")[0].split()[:2] for c in fake_apptainer.calls() if c.startswith("instance ")]
    starts = [i for i, c in enumerate(calls) if c == ["instance", "start"]]
    assert len(starts) == 2 and starts[0] < calls.index(["instance", "stop"]) < starts[1], calls
    run.proc.send_signal(signal.SIGTERM)
    run.finish()


def test_transient_list_failures_are_tolerated_then_persistent_ones_fail(running, fake_apptainer: FakeApptainer) -> None:
    run = running()
    assert run.next_line() == "INSTANCE_READY"
    def lists() -> int:
        return sum(1 for c in fake_apptainer.calls() if c.startswith("instance list"))
    before = lists()
    fake_apptainer.knob("list_fail_count", "2")
    # two failed polls, a good one, and the poll after it: the script went on past the good one
    wait_for(lambda: lists() >= before + 4, 15, "four more instance list polls")
    assert run.proc.poll() is None
    fake_apptainer.knob("list_fail")
    rc, lines = run.finish()
    assert rc == 1
    assert lines == [
        "INSTANCE_READY",
        "INSTANCE_FAILED: apptainer instance list failed 3 times in a row (last status 3): FATAL: list broken",
        "INSTANCE_STOPPED",
    ]
    assert stops(fake_apptainer) == 1


def test_markers_are_the_only_stdout(running, fake_apptainer: FakeApptainer) -> None:
    run = running(poll=30)
    assert run.next_line() == "INSTANCE_READY"
    os.kill(run.proc.pid, signal.SIGHUP)
    rc, lines = run.finish()
    assert rc == 129 and lines == ["INSTANCE_READY", "INSTANCE_STOPPED"]
    assert "instance started successfully" in run.proc.stderr.read()  # type: ignore[union-attr]
