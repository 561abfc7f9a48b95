"""Issue 14 item 8: one user's odd instance tree never aborts the reaper pass for everyone.

alice fills her apptainer instance state with what a curious user might: a FIFO and a
directory where the JSON state file should be, a deeply nested JSON, a symlink pointing at
bob's tree. bob has one ordinary stale instance dir. A reaper pass must finish, report no
error, remove bob's stale dir (as bob) and alice's (as alice), and follow none of her links.

On base 6a173e2 the FIFO/directory/nested JSON went through ``_pids_alive`` (``os.read`` of
a directory raised ``IsADirectoryError``; ``json.loads`` of 100,000 nested brackets raised
``RecursionError``), the exception left ``run_once``, and no later item was reaped: bob's
dir stayed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import ensure_as, jobs_of, sbroker
from tests.integration.daemon import BrokerProcess, reset_state
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

ALICE, BOB = tb.USERS


def tree(user: str) -> Path:
    return Path(f"/home/{user}/.apptainer/instances/app/node9/{user}")  # a node since retired


def as_user(user: str, script: str) -> None:
    subprocess.run(tb.as_user(user, "sh", "-c", script), check=True, cwd="/", timeout=30)


def test_odd_instance_state_does_not_stop_the_reaper(cluster):
    reset_state()
    names = {k: f"sb-{ALICE}-{k}-00000{i}" for i, k in enumerate(("fifo", "dir", "deep", "link"))}
    a, b = tree(ALICE), tree(BOB)
    bobs = f"sb-{BOB}-stale-000009"
    as_user(ALICE, f"""set -e
        mkdir -p {a}/{names['fifo']} {a}/{names['dir']}/{names['dir']}.json {a}/{names['deep']}
        mkfifo {a}/{names['fifo']}/{names['fifo']}.json
        python3 -c 'print("[" * 100000 + "]" * 100000, end="")' > {a}/{names['deep']}/{names['deep']}.json
        ln -sfn {b} {a}/{names['link']}
        touch -h -d '1 hour ago' {a}/*""")
    as_user(BOB, f"""set -e
        mkdir -p {b}/{bobs}
        printf '%s' '{json.dumps({"pid": 4194300, "ppid": 4194301})}' > {b}/{bobs}/{bobs}.json
        touch -d '1 hour ago' {b}/{bobs}""")
    proc = BrokerProcess()
    proc.start()
    try:
        # The reaper looks at the trees of users who had sessions here: give both one, end it.
        for user in (ALICE, BOB):
            sid = ensure_as(user, "odd")["session"]["id"]
            sbroker(user, "kill", sid)
            wait_for(lambda: not jobs_of(user), 30, f"{user}'s job gone")
        report = json.loads(sbroker(tb.ADMIN, "reap", "--json").stdout)
        assert report["errors"] == []
        reaped = {(i["user"], i["instance"]) for i in report["stale_instances"]}
        assert {(ALICE, names["fifo"]), (ALICE, names["dir"]), (ALICE, names["deep"]), (BOB, bobs)} <= reaped
        assert (ALICE, names["link"]) not in reaped      # a symlink is never followed nor removed by name
        assert not (b / bobs).exists()
        assert not any((a / names[k]).exists() for k in ("fifo", "dir", "deep"))
    finally:
        proc.stop()
        subprocess.run(["rm", "-rf", str(a), str(b)])
        reset_state()
