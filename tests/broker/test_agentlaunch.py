"""The agent's launch snippets and its status file, without SLURM (issue 15).

The start snippet runs here for real (bash, the embedded agent, a private directory) with a
stand-in ``fail``; the status file parser gets what a hostile user could write.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from broker import agentlaunch
from broker.agents import parse_status
from broker.config import Config

GOOD = {"v": 1, "pid": 10, "dir": "/tmp/sbroker-agent.AbC123", "python": "/usr/bin/python3", "started": 1.0,
        "time": 2.0, "shells": 1, "writers": 1, "observers": 0, "detached": 0, "last_input": 1.5,
        "last_attach": 1.2, "commands": 0, "port": 40000}


def test_a_valid_status_parses():
    status = parse_status(json.dumps(GOOD).encode())
    assert status is not None and status.dir == GOOD["dir"] and status.attachers == 1


@pytest.mark.parametrize("change", [
    {"v": 2}, {"dir": "tmp/relative"}, {"dir": "/tmp/../etc"}, {"dir": "/tmp/a b"}, {"dir": "/tmp/x;rm -rf ~"},
    {"python": "python3"}, {"python": "/usr/bin/python3\n"}, {"shells": -1}, {"writers": True}, {"port": 70000},
    {"observers": 1 << 40}, {"detached": "1"}, {"last_input": time.time() + 10 * 86400}, {"time": None},
    {"dir": "/" + "a" * 300},
])
def test_a_hostile_status_reads_as_none(change):
    assert parse_status(json.dumps({**GOOD, **change}).encode()) is None


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[]", b"null", b"{" * 10000, b'{"v": 1}'])
def test_garbage_reads_as_none(data):
    assert parse_status(data) is None


def test_attach_argv_is_srun_to_the_agent_and_refuses_odd_paths():
    argv = agentlaunch.attach_argv("42", GOOD["dir"], GOOD["python"], ["apptainer", "exec", "instance://x"],
                                   mode="observe", tty=False, announce="hello")
    assert argv[:6] == ["srun", "--overlap", "--unbuffered", "--jobid=42", "--ntasks=1", "/usr/bin/python3"]
    assert argv[6:] == ["-I", "-S", f"{GOOD['dir']}/agent.py", "attach", "--mode", "observe", "--announce", "hello",
                        "--", "apptainer", "exec", "instance://x"]
    with pytest.raises(ValueError, match="agent"):
        agentlaunch.attach_argv("42", "/tmp/a b", GOOD["python"], ["true"])
    with pytest.raises(ValueError):
        agentlaunch.attach_argv("42; true", GOOD["dir"], GOOD["python"], ["true"])


def test_the_start_snippet_starts_a_private_agent_and_the_exit_snippet_removes_it(tmp_path):
    status = tmp_path / "sb-u-p-abc.agent.json"
    script = "\n".join([
        'fail() { echo "FAILED: $1"; exit 1; }',
        agentlaunch.start_snippet(Config(), status),
        agentlaunch.await_snippet(),
        'echo "READY $agent_dir"',
        'python3 -I -S "$agent_dir/agent.py" status',
        agentlaunch.keepalive_snippet(),
        agentlaunch.exit_snippet(),
        'test -e "$agent_dir" && echo LEFT-DIR; test -e "$agent_status" && echo LEFT-STATUS; echo DONE',
    ])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "SLURM_JOB_ID": ""})
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"READY {tmp_path}/sbroker-agent."), out
    reported = json.loads(lines[1])
    assert reported["type"] == "result" and reported["shells"] == 0 and reported["dir"] == lines[0].split()[1]
    assert lines[2:] == ["DONE"], out


def test_the_start_snippet_fails_in_one_line_when_the_agent_cannot_start(tmp_path):
    status = tmp_path / "s.agent.json"
    script = "\n".join(['fail() { echo "FAILED: $1"; exit 1; }', agentlaunch.start_snippet(Config(), status),
                        agentlaunch.await_snippet()])
    unwritable = tmp_path / "ro"
    unwritable.mkdir(mode=0o500)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], "TMPDIR": str(unwritable)},
                         user=65534 if os.geteuid() == 0 else None)
    assert out.stdout.splitlines() == [f"FAILED: cannot create the session agent's directory in {unwritable} on "
                                       f"{os.uname().nodename.split('.')[0]}"], out


def test_the_agent_source_is_embedded_verbatim():
    source = agentlaunch.agent_source()
    snippet = agentlaunch.start_snippet(Config(), Path("/x/s.agent.json"))
    assert f"<<'SBROKER_AGENT_SOURCE_END'\n{source.rstrip()}\nSBROKER_AGENT_SOURCE_END\n" in snippet
