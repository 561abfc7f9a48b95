"""Broker memory with 1,000 stored live sessions, and how fast a restart re-adopts them."""

from __future__ import annotations

import json
import os
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
from .common import PtyProc, Row, log, prompt_re, summary

ALICE = tb.USERS[0]

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


# ------------------------------------------------------------------ RSS with attached terminals

ATTACH_PROJECT = "rssattach"
#: Logins started at once (each waits for its prompt before the next wave starts).
ATTACH_WAVE = 8


def _proc_counts(pid: int) -> tuple[float, int, int]:
    """(VmRSS MiB, open fds, tasks) of ``pid``."""
    return (_rss_kb(pid) / 1024, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")))


def _sample(pid: int, k: int, spacing: float) -> list[tuple[float, int, int]]:
    out = []
    for i in range(k):
        if i:
            time.sleep(spacing)
        out.append(_proc_counts(pid))
    return out


def _alive(terms: list[PtyProc], user: str) -> None:
    """Every terminal answers a command with its output and a fresh prompt (really at a prompt)."""
    for i, t in enumerate(terms):
        t.mark()
        t.send(f"echo ALIVE_$(({1000 + i}+0))\r".encode())
        t.expect(f"ALIVE_{1000 + i}\r?\n".encode(), 30)
        t.expect(prompt_re(user), 30)


def _wait_status(broker: bed.Broker, user: str, project: str, shells: int, timeout: float = 60.0) -> dict:
    """The agent's status once it counts ``shells`` shells (all with a writer); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            status = bed.agent_status(broker, user, project)
        except (OSError, ValueError, BrokerError):
            status = {}
        if status.get("shells") == shells and status.get("writers") == shells:
            return status
        time.sleep(0.2)
    raise RuntimeError(f"agent status: wanted {shells} shells with writers, last read {status}")


def _open_terms(n: int, user: str, project: str) -> list[PtyProc]:
    terms: list[PtyProc] = []
    try:
        while len(terms) < n:
            wave = [PtyProc(bed.local_login_argv(user, project)) for _ in range(min(ATTACH_WAVE, n - len(terms)))]
            terms += wave
            for t in wave:
                t.expect(prompt_re(user), 120)
                t.drain(quiet=0.05)
    except Exception:
        _close_terms(terms)
        raise
    return terms


def _close_terms(terms: list[PtyProc]) -> None:
    for t in terms:  # ask every shell to exit first, then wait for each
        try:
            if not t.eof:
                t.send(b"exit\r")
        except OSError:
            pass
    for t in terms:
        t.close(exit_bytes=b"")


def rss_attached(n_terms: int, rounds: int, samples: int = 5) -> list[Row]:
    """Broker RSS (and fds, tasks) with ``n_terms`` interactive logins at their prompt vs none.

    One ready session of sbalice; its agent allows more shells than the default 32
    (``limits.shells_per_user``). Each round: sample with none attached, open ``n_terms``
    logins (the ForceCommand on a local pty, ``ATTACH_WAVE`` at a time), check every one
    answers at a prompt and that the agent counts them, sample again, close them all.
    """
    broker = bed.SectionsBroker({"limits": {"shells_per_user": n_terms + 28}})
    broker.start()
    runtime = bed.container_runtime()
    pid = broker.proc.proc.pid
    none: list[tuple[float, int, int]] = []
    attached: list[tuple[float, int, int]] = []
    terms: list[PtyProc] = []
    try:
        session = broker.ensure(ALICE, ATTACH_PROJECT)
        log(f"rss attached: session {session['id']} job {session['job_id']}, broker pid {pid}")
        # warm-up: the login path's first use (imports, caches) is not what is being measured
        _close_terms(_open_terms(ATTACH_WAVE, ALICE, ATTACH_PROJECT))
        _wait_status(broker, ALICE, ATTACH_PROJECT, 0)
        for r in range(rounds):
            time.sleep(2.5)   # two poll cycles of the daemon (slurm.poll_interval 1 s)
            none += _sample(pid, samples, 0.5)
            t0 = time.monotonic()
            terms = _open_terms(n_terms, ALICE, ATTACH_PROJECT)
            opened = time.monotonic() - t0
            _alive(terms, ALICE)
            status = _wait_status(broker, ALICE, ATTACH_PROJECT, n_terms)
            time.sleep(2.5)
            attached += _sample(pid, samples, 0.5)
            _alive(terms, ALICE)   # still all at a prompt after the measurement
            log(f"rss attached round {r + 1}/{rounds}: {n_terms} logins at a prompt in {opened:.1f}s (agent: "
                f"{status['shells']} shells, {status['writers']} writers); broker RSS none "
                f"{none[-1][0]:.1f} MiB → attached {attached[-1][0]:.1f} MiB, fds {none[-1][1]} → "
                f"{attached[-1][1]}, tasks {none[-1][2]} → {attached[-1][2]}")
            _close_terms(terms)
            terms = []
            _wait_status(broker, ALICE, ATTACH_PROJECT, 0)
        after = _sample(pid, samples, 0.5)
    finally:
        _close_terms(terms)
        broker.kill(ALICE, ATTACH_PROJECT)
        broker.stop()
        d.reset_state()
    a = [s[0] for s in attached]
    b = [s[0] for s in none]
    ratio = summary(a)["median"] / summary(b)["median"]

    def med(values: list[tuple[float, int, int]], k: int) -> float:
        return summary([v[k] for v in values])["median"]

    return [Row("rss", f"broker RSS with {n_terms} attached terminals (interactive logins at their prompt, one "
                "session) vs none attached, same daemon", "MiB", a, b, goal="≤ 1.10×", met=ratio <= 1.10,
                ratio=ratio, ratio_label="×", runtime=runtime,
                note=f"raw column: none attached (not a SLURM path); {rounds} rounds of 0 → {n_terms} → 0, "
                     f"{samples} samples per state; logins are `sbroker login` on local ptys ({ATTACH_WAVE} "
                     f"starting at a time), each checked at a prompt before and after sampling and counted by the "
                     f"agent; median fds {med(none, 1):.0f} → {med(attached, 1):.0f}, tasks {med(none, 2):.0f} → "
                     f"{med(attached, 2):.0f}; after closing all: {med(after, 0):.1f} MiB; "
                     f"limits.shells_per_user {n_terms + 28}",
                extra={"fds_none": [s[1] for s in none], "fds_attached": [s[1] for s in attached],
                       "tasks_none": [s[2] for s in none], "tasks_attached": [s[2] for s in attached],
                       "rss_after_mib": [s[0] for s in after]})]


def rss_all(n_sessions: int, restarts: int, n_terms: int, rounds: int) -> list[Row]:
    """Both RSS benchmarks: stored live sessions (own daemon and socket), then attached terminals."""
    return rss(n_sessions, restarts) + rss_attached(n_terms, rounds)
