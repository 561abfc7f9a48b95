"""A hostile co-tenant against another user's warm login (issue 14).

bob attacks with what costs him nothing: he floods his own session's job log (a file in his
home the daemon reads for him), and loops ``sbroker logs`` and ``sbroker events`` over an
audit log pre-filled with 50 MB of other users' entries. Meanwhile alice logs in to her warm
session (``sbroker login`` → prompt, the ForceCommand without ssh) again and again.

The pairing: the same logins while bob runs the same number of processes burning CPU *not*
aimed at sbroker (busy loops). Both phases alternate in blocks within one run, so the ratio
(attack / control, medians) measures what the daemon lets bob cost alice, not two cores'
contention. The daemon's own loop-lag histogram (``sbroker_event_loop_tick_lateness``), scraped
before and after every attack block, gives the p99 lateness of the attack blocks alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.cluster import config as tb

from . import bed
from .common import Row, log, summary, time_ratio
from .interactive import _time_to_prompt

ALICE, BOB = tb.USERS
METRICS_PORT = 19417
ATTACKERS = 3
AUDIT_PREFILL_MB = 50


def _attack_argvs(session_id: str, log_path: str) -> list[list[str]]:
    cli = ["runuser", "-u", BOB, "--", "env", f"SBROKER_SOCKET={bed.SOCKET}", str(tb.SBROKER_BIN)]
    flood = ("import os,sys\n"
             "p=sys.argv[1]; chunk=b'\\n'*(1<<20)\n"
             "while True:\n"
             "  with open(p,'ab') as f:\n"
             "    for _ in range(64): f.write(chunk)\n"
             "  os.truncate(p, 0)\n")
    loop = "while :; do \"$@\" >/dev/null 2>&1; done"
    return [
        ["runuser", "-u", BOB, "--", "/usr/bin/python3", "-c", flood, log_path],
        ["sh", "-c", loop, "-", *cli, "logs", session_id],
        ["sh", "-c", loop, "-", *cli, "events", "--json"],
    ]


def _control_argvs() -> list[list[str]]:
    return [["runuser", "-u", BOB, "--", "/usr/bin/python3", "-c", "while True: pass"]] * ATTACKERS


def _scrape() -> list[float]:
    """Cumulative tick counts per lateness bucket (the last entry: all ticks)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    counts = []
    for line in text.splitlines():
        if line.startswith("sbroker_event_loop_tick_lateness_seconds_bucket"):
            counts.append(float(line.rsplit(" ", 1)[1]))
    if not counts:
        raise RuntimeError("the daemon exposes no sbroker_event_loop_tick_lateness histogram")
    return counts


def _p99(delta: list[float]) -> float:
    from broker.looplag import BUCKETS

    total = delta[-1]
    for bound, count in zip(BUCKETS, delta):
        if count >= 0.99 * total:
            return bound
    return float("inf")


def _prefill_audit(path: Path, mb: int) -> None:
    line = json.dumps({"ts": 1.0, "event": "session_started", "user": "someone-else", "project": "p",
                       "session": "0" * 12, "job_id": "1", "by": "x" * 100}) + "\n"
    with open(path, "a") as f:
        f.write(line * (mb * (1 << 20) // len(line)))


def hostile(blocks: int, per_block: int) -> list[Row]:
    broker = bed.Broker(broker_metrics_port=METRICS_PORT)
    from tests.integration import daemon as d

    d.reset_state()
    d.STATE_DIR.mkdir(parents=True, exist_ok=True)
    _prefill_audit(d.STATE_DIR / "audit.jsonl", AUDIT_PREFILL_MB)
    broker.proc.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        broker.ensure(ALICE, "victim")
        target = broker.ensure(BOB, "flood")
        log_path = json.loads(subprocess.run(
            ["runuser", "-u", BOB, "--", "env", f"SBROKER_SOCKET={bed.SOCKET}", str(tb.SBROKER_BIN), "show",
             target["id"], "--json"], capture_output=True, text=True, check=True, cwd="/").stdout)["log_path"]
        login = bed.local_login_argv(ALICE, "victim")
        _time_to_prompt(login, ALICE)  # warm-up
        attack: list[float] = []
        control: list[float] = []
        lag = None
        for block in range(blocks):
            for name, argvs, out in (("attack", _attack_argvs(target["id"], log_path), attack),
                                     ("control", _control_argvs(), control)):
                procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                                          start_new_session=True) for a in argvs]
                time.sleep(1.0)  # let the load reach steady state
                before = _scrape() if name == "attack" else None
                for _ in range(per_block):
                    out.append(_time_to_prompt(login, ALICE))
                if before is not None:
                    delta = [a - b for a, b in zip(_scrape(), before)]
                    lag = delta if lag is None else [x + y for x, y in zip(lag, delta)]
                for p in procs:
                    os.killpg(p.pid, 9)
                    p.wait()
                procs = []
                log(f"hostile block {block + 1}/{blocks} {name}: median {summary(out)['median']:.3f}s")
        ratio, met = time_ratio(attack, control, 1.2)
        p99 = _p99(lag or [0.0])
        rows = [
            Row("hostile", "another user's warm login (`sbroker login` → prompt) while bob floods his log and loops "
                "`logs`/`events`, vs while bob burns the same number of processes of plain CPU", "s", attack, control,
                goal="≤ 1.2×", met=met, ratio=ratio, ratio_label="×", runtime=bed.container_runtime(),
                note=f"{ATTACKERS} attacker processes either way; audit log pre-filled with "
                     f"{AUDIT_PREFILL_MB} MB of other users' entries; blocks of {per_block} logins alternate"),
            Row("hostile_lag", "the daemon's event-loop lateness during the attack blocks (p99, from its own "
                "histogram, upper bucket bound)", "s", [p99], goal="≤ 0.05 s p99", met=p99 <= 0.05,
                note=f"{int(lag[-1]) if lag else 0} ticks of 100 ms during attack blocks"),
        ]
        log(f"hostile: attack {summary(attack)['median']:.3f}s control {summary(control)['median']:.3f}s "
            f"ratio {ratio:.2f}; loop lag p99 <= {p99}s")
        return rows
    finally:
        for p in procs:
            os.killpg(p.pid, 9)
        broker.stop()
        d.reset_state()
