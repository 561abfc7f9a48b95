"""Broker memory and re-adoption with real SLURM jobs, and with attached terminals.

Re-adoption: N real jobs (held, so they pend and use no node) submitted by the bed's users with
exactly the broker's tags (:func:`broker.jobspec.build`: comment, job name, singleton dependency,
output path), then the daemon started over them: first with an empty store (every job is an
unknown tagged job, adopted), then restarted over the store it wrote. Each start is timed until
it answers ``ping`` (the daemon reconciles before it listens), and what it adopted is checked
in its store: every job, live, ``pending``, owned by its submitter.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker import images, jobspec
from broker.client import BrokerError, Client
from broker.identity import lookup_name
from broker.manager import READ_INTERVAL
from broker.session import State
from broker.store import Store
from tests.cluster import config as tb
from tests.integration import daemon as d

from . import bed
from .common import PtyProc, Row, log, prompt_re, summary

ALICE = tb.USERS[0]

STATE = Path("/var/tmp/sbroker-bench-rss")
SOCKET = "/run/sbroker-bench/broker.sock"
CONFIG = STATE.parent / "sbroker-bench-rss.toml"
LOG = STATE.parent / "sbroker-bench-rss.log"
#: Projects of the held jobs (``adopt000``, ...), one job each per user.
ADOPT_PREFIX = "adopt"
ADOPT_SUBDIR = f"{bed.BENCH_SUBDIR}/adopt"
#: How long a started daemon is watched: one full poll cycle (slurm.poll_interval 5 s) and more.
SETTLE = 6.0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _live_from_log(offset: int) -> int:
    """``live_sessions`` of the daemon's ``reconciled`` line."""
    with open(LOG, "rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode(errors="replace").splitlines():
            if '"reconciled"' in line:
                try:
                    return int(json.loads(line).get("live_sessions", -1))
                except ValueError:
                    pass
    return -1


def submit_tagged_held(n: int, jobs: dict[str, tuple[str, str, str]]) -> None:
    """``n`` held jobs, alternately as each bed user, each tagged exactly as the broker tags a
    session job (:func:`broker.jobspec.build` with the bench broker's config; ``--hold`` added).
    Fills ``jobs`` with ``{job_id: (user, project, instance)}`` as they are submitted (also when
    a submission fails half-way: the caller cancels what is there)."""
    cfg = bed.bench_config()
    image = images.resolve(cfg.image)
    digest = images.digest(image)
    for u, user in enumerate(tb.USERS):
        who = lookup_name(user)
        out_dir = Path(who.home) / ADOPT_SUBDIR
        bed.as_user(user, "mkdir", "-p", "-m", "0700", "--", str(out_dir))
        mine = [(f"{ADOPT_PREFIX}{i:03d}", i) for i in range(u, n, len(tb.USERS))]
        lines, specs = ["set -e"], []
        for project, i in mine:
            spec = jobspec.build(cfg, who, project, str(image), digest)
            script = out_dir / f"{spec.instance}.sh"
            script.write_text(spec.script)
            os.chown(script, who.uid, who.gid)
            # The broker's argv as it is (tags, name, singleton, output), held: it never starts.
            lines.append(f"{shlex.join([*spec.sbatch_argv, '--hold'])} < {shlex.quote(str(script))}")
            specs.append((project, spec.instance))
        runner = out_dir / "submit.sh"
        runner.write_text("\n".join(lines) + "\n")
        os.chown(runner, who.uid, who.gid)
        done = bed.as_user(user, "bash", str(runner), timeout=600, check=False)
        ids = done.stdout.split()
        for job_id, (project, instance) in zip(ids, specs):
            jobs[job_id.split(";")[0]] = (user, project, instance)
        if done.returncode != 0 or len(ids) != len(specs):
            raise RuntimeError(f"adopt: {user} submitted {len(ids)} of {len(specs)} held jobs: {done.stderr[-500:]}")


def cancel_jobs(job_ids: list[str], timeout: float = 60.0) -> None:
    """scancel ``job_ids`` (as root) and wait, bounded, until SLURM lists none of them."""
    for k in range(0, len(job_ids), 100):
        bed.slurm("scancel", *job_ids[k:k + 100], check=False)
    bed.wait_jobs_gone(job_ids, timeout)
    left = bed.slurm("squeue", "--noheader", "-t", "PD,R,CG,CF,S", "-o", "%i", f"--jobs={','.join(job_ids)}",
                     check=False).stdout.split()
    if left:
        raise RuntimeError(f"adopt: {len(left)} held jobs still listed {timeout:g}s after scancel: {left[:10]}")


def _check_adopted(jobs: dict[str, tuple[str, str, str]]) -> str:
    """Every held job is a live ``pending`` session of its owner in the daemon's store (read
    after it stopped); raise otherwise. Returns a one-line summary."""
    store = Store(STATE / "sessions.db")
    try:
        live = {s.job_id: s for s in store.live()}
    finally:
        store.close()
    wrong = []
    for job_id, (user, project, instance) in jobs.items():
        s = live.get(job_id)
        if s is None or (s.user, s.project, s.instance, s.state) != (user, project, instance, State.PENDING):
            wrong.append((job_id, None if s is None else (s.user, s.project, s.instance, s.state.value)))
    if wrong:
        raise RuntimeError(f"adopt: {len(wrong)} of {len(jobs)} held jobs not adopted as pending sessions of "
                           f"their owner, e.g. {wrong[:5]}")
    return f"{len(jobs)} live pending sessions in the store, {len(live)} live in all"


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
            proc.wait()
            raise RuntimeError("rss broker did not answer within 60s")


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, SIGKILL after 15 s; says how it went."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "did not stop within 15 s of SIGTERM: killed"
    return f"stopped {time.monotonic() - t0:.2f}s after SIGTERM (status {rc})"


def rss(n_jobs: int, restarts: int) -> list[Row]:
    subprocess.run(["rm", "-rf", str(STATE)], check=True)
    STATE.mkdir(parents=True)
    # Pending sessions never time out here (the jobs are held); gone-grace long, one poll per 5 s.
    overrides = {**bed.BROKER_OVERRIDES, "broker_socket": SOCKET, "broker_state_dir": str(STATE),
                 "slurm_gone_grace": 3600.0, "slurm_poll_interval": 5.0, "timeouts_pending": 36000}
    CONFIG.write_text(d.config_text(**overrides))
    times, rss_ready, rss_settled, cpu, live, stops = [], [], [], [], [], []
    first: dict[str, float] = {}
    jobs: dict[str, tuple[str, str, str]] = {}
    try:
        t0 = time.monotonic()
        submit_tagged_held(n_jobs, jobs)
        log(f"adopt: {len(jobs)} tagged held jobs submitted as {', '.join(tb.USERS)} in "
            f"{time.monotonic() - t0:.1f}s")
        for i in range(restarts + 1):
            offset = LOG.stat().st_size if LOG.exists() else 0
            proc, t = _start()
            try:
                r0 = _rss_kb(proc.pid)
                n_live = _live_from_log(offset)
                c0 = _cpu_s(proc.pid)
                time.sleep(SETTLE)
                c1 = _cpu_s(proc.pid)
                r1 = _rss_kb(proc.pid)
            finally:
                stopped = _stop(proc)
                stops.append(stopped)
            checked = _check_adopted(jobs)
            busy = (c1 - c0) / SETTLE * 100
            if i == 0:   # empty store: every job is an unknown tagged job (also builds bytecode caches)
                first = {"ping_s": t, "rss_ready_mib": r0 / 1024, "rss_settled_mib": r1 / 1024, "cpu_pct": busy}
            else:
                times.append(t)
                rss_ready.append(r0 / 1024)
                rss_settled.append(r1 / 1024)
                cpu.append(busy)
                live.append(n_live)
            log(f"adopt: {'first start, empty store' if i == 0 else f'restart {i}'}: ping after {t:.3f}s, "
                f"{n_live} live; RSS {r0 / 1024:.1f} → {r1 / 1024:.1f} MiB; daemon CPU {busy:.0f}% of a core "
                f"over {SETTLE:g}s; {checked}; {stopped}")
    finally:
        try:
            if jobs:
                cancel_jobs(list(jobs))
        finally:
            subprocess.run(["rm", "-rf", str(STATE)], check=False)
            CONFIG.unlink(missing_ok=True)
            LOG.unlink(missing_ok=True)
            for user in tb.USERS:
                bed.as_user(user, "rm", "-rf", "--", str(Path(lookup_name(user).home) / ADOPT_SUBDIR), check=False)
    t_med = summary(times)["median"]
    r_max = max(rss_settled + rss_ready)
    how = (f"{n_jobs} real SLURM jobs (held: pending, no node used) submitted by {len(tb.USERS)} users with the "
           "broker's own tags; every start checked in the store afterwards (each job a live `pending` session "
           "of its owner)")
    return [
        Row("rss", f"broker RSS with {n_jobs} re-adopted real session jobs (after reconcile and one poll cycle)",
            "MiB", rss_settled, None, goal="≤ 80 MB", met=r_max <= 80 * 1e6 / 2**20, ratio=r_max,
            ratio_label="MiB max",
            note=f"{how}; right after start: median {summary(rss_ready)['median']:.1f} MiB; daemon CPU while "
                 f"idle with them: median {summary(cpu)['median']:.0f}% of a core; live sessions per the "
                 f"daemon's log: {sorted(set(live))}",
            extra={"rss_at_ready_mib": rss_ready, "cpu_pct_settled": cpu, "first_start_empty_store": first,
                   "stops": stops}),
        Row("rss", f"broker CPU while {n_jobs} re-adopted sessions pend and nobody logs in (after start, "
            f"{SETTLE:g} s)", "% of a core", cpu, None, goal="(no goal; context)", met=None,
            ratio=summary(cpu)["median"], ratio_label="% median",
            note="utime + stime of the daemon from /proc; each pending session's readiness watch re-reads its "
                 f"job log every {READ_INTERVAL * 1000:g} ms in a worker thread (broker.manager._await_ready)"),
        Row("rss", f"re-adoption after restart: daemon start → answers `ping` with {n_jobs} real session jobs "
            "reconciled against `squeue`", "s", times, None, goal="≤ 2 s", met=t_med <= 2.0,
            ratio=t_med, ratio_label="s median",
            note=f"includes interpreter start and imports; restarts over the store the first start wrote. First "
                 f"start over an empty store (all {n_jobs} adopted as unknown tagged jobs): "
                 f"{first.get('ping_s', float('nan')):.3f} s"),
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
