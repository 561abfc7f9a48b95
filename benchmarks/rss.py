"""Broker memory with 1,000 stored live sessions, and how fast a restart re-adopts them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.client import BrokerError, Client
from broker.session import Session, State
from broker.store import Store
from tests.cluster import config as tb
from tests.integration import daemon as d

from . import bed
from .common import Row, log, summary

STATE = Path("/var/tmp/sbroker-bench-rss")
SOCKET = "/run/sbroker-bench/broker.sock"
CONFIG = STATE.parent / "sbroker-bench-rss.toml"


def _populate(n: int) -> None:
    store = Store(STATE / "sessions.db")
    now = time.time()
    users = tb.USERS
    for i in range(n):
        user = users[i % len(users)]
        s = Session(user=user, uid=0, project=f"p{i:04d}", job_id=str(9_000_000 + i), node="node1",
                    instance=f"sb-{user}-p{i:04d}-{i:06x}", image=str(tb.IMAGES / "base.sif"),
                    image_digest="sha256:" + "0" * 64, state=State.READY, submitted_at=now - 60,
                    running_at=now - 50, ready_at=now - 49,
                    log_path=f"{STATE}/jobs/{user}/sb-{user}-p{i:04d}-{i:06x}.log",
                    script_path=f"{STATE}/jobs/{user}/sb-{user}-p{i:04d}-{i:06x}.sh")
        store.save(s)
    store.close()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


LOG = STATE.parent / "sbroker-bench-rss.log"


def _live_from_log(offset: int) -> int:
    """``live_sessions`` of the daemon's ``reconciled`` line (``list`` cannot carry 1,000 sessions)."""
    with open(LOG, "rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode(errors="replace").splitlines():
            if '"reconciled"' in line:
                try:
                    return int(json.loads(line).get("live_sessions", -1))
                except ValueError:
                    pass
    return -1


def _start() -> tuple[subprocess.Popen[bytes], float]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(tb.REPO), "LANG": "C.UTF-8"}
    log_fh = open(LOG, "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(CONFIG)], env=env,
                            stdout=log_fh, stderr=log_fh, cwd="/")
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"rss broker exited with {proc.returncode}; see {log_fh.name}")
        try:
            with Client(SOCKET, timeout=5) as c:
                c.request("ping")
            return proc, time.monotonic() - t0
        except (BrokerError, OSError):
            time.sleep(0.005)
        if time.monotonic() - t0 > 60:
            proc.kill()
            raise RuntimeError("rss broker did not answer within 60s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss(n_sessions: int, restarts: int) -> list[Row]:
    subprocess.run(["rm", "-rf", str(STATE)], check=True)
    STATE.mkdir(parents=True)
    _populate(n_sessions)
    overrides = {**bed.BROKER_OVERRIDES, "broker_socket": SOCKET, "broker_state_dir": str(STATE),
                 "slurm_gone_grace": 3600.0, "slurm_poll_interval": 5.0}
    CONFIG.write_text(d.config_text(**overrides))
    times, rss_ready, rss_settled, live = [], [], [], []
    try:
        for i in range(restarts + 1):
            offset = LOG.stat().st_size if LOG.exists() else 0
            proc, t = _start()
            try:
                r0 = _rss_kb(proc.pid)
                n_live = _live_from_log(offset)
                time.sleep(6)  # one full poll cycle over all 1,000 jobs (one squeue)
                r1 = _rss_kb(proc.pid)
            finally:
                _stop(proc)
            if i:  # the first start also builds bytecode caches: discarded
                times.append(t)
                rss_ready.append(r0 / 1024)
                rss_settled.append(r1 / 1024)
                live.append(n_live)
            log(f"rss: restart {i}: ping after {t:.3f}s, {n_live} live, RSS {r0 / 1024:.1f} → "
                f"{r1 / 1024:.1f} MiB")
    finally:
        subprocess.run(["rm", "-rf", str(STATE)], check=False)
        CONFIG.unlink(missing_ok=True)
        LOG.unlink(missing_ok=True)
    t_med = summary(times)["median"]
    r_max = max(rss_settled + rss_ready)
    return [
        Row("rss", f"broker RSS with {n_sessions} stored live sessions (after reconcile and one poll cycle)", "MiB",
            rss_settled, None, goal="≤ 80 MB", met=r_max <= 80 * 1e6 / 2**20, ratio=r_max,
            ratio_label="MiB max", note=f"right after start: median {summary(rss_ready)['median']:.1f} MiB; "
                                        f"live sessions after reconcile (daemon log): {sorted(set(live))}",
            extra={"rss_at_ready_mib": rss_ready}),
        Row("rss", f"re-adoption after restart: daemon start → answers `ping` with {n_sessions} sessions "
            "loaded and reconciled against `squeue`", "s", times, None, goal="≤ 2 s", met=t_med <= 2.0,
            ratio=t_med, ratio_label="s median", note="includes interpreter start and imports"),
    ]
