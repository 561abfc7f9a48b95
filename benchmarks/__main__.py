"""``python -m benchmarks [names...]``: run benchmarks against raw SLURM, write the report.

Names: readiness, verify, import, sched, warm, pty, transfer, sshendpoint, cold, immediate, hostile, rss (default: all,
in that order).
Cluster benchmarks take the test bed lock that pytest's cluster fixture takes, for the
whole run, and stop the broker they started. ``--quick`` uses small n (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .common import Row, TestbedLock, log

ORDER = ["readiness", "verify", "import", "sched", "warm", "pty", "transfer", "sshendpoint", "cold", "immediate",
         "hostile", "rss"]
CLUSTER = {"sched", "warm", "pty", "transfer", "sshendpoint", "cold", "immediate", "hostile", "rss"}
NEEDS_BROKER = {"warm", "pty", "transfer", "sshendpoint", "cold"}
RESULTS = Path(__file__).resolve().parent / "results"

# n per benchmark: full run (about 30 minutes on 2 cores) and --quick. transfer: 15 rounds (7
# until 83b352a, whose three runs missed a different 2-4 of 16 rows each time: on this VM a 200 MiB
# transfer's time spreads 0.6-2.2 s on either side, and a median of 7 moves by ~8%).
SIZES = {
    "full": dict(readiness=200, verify=5, verify_mb=1024, import_n=20, sched_ns=[1, 10, 50, 200], sched_s=10.0,
                 warm=30, pty=3, pty_mb=200, keys=200, cold=25, immediate=15, hostile_blocks=3, hostile_per=10, rss=200,
                 rss_restarts=5, rss_terms=100, rss_rounds=3, transfer=15, transfer_mb=200,
                 transfer_files=2000, sshe_true=15, sshe_scp=5, sshe_mb=200),
    "quick": dict(readiness=30, verify=2, verify_mb=128, import_n=5, sched_ns=[1, 10], sched_s=4.0,
                  warm=3, pty=1, pty_mb=20, keys=30, cold=2, immediate=2, hostile_blocks=1, hostile_per=3, rss=200,
                  rss_restarts=1, rss_terms=100, rss_rounds=1, transfer=1, transfer_mb=50,
                  transfer_files=500, sshe_true=3, sshe_scp=1, sshe_mb=50),
}


def machine() -> dict[str, str]:
    def out(*argv: str) -> str:
        try:
            env = {**os.environ, "SLURM_CONF": "/opt/sbroker-testbed/etc/slurm.conf"}
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, env=env).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpus": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "slurm": out("sinfo", "--version"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **provenance()}


def provenance() -> dict[str, str]:
    """What was measured: the commit, whether the tree differed from it (outside
    benchmarks/results/), which apptainer ran, and the test bed's shape."""
    repo = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                            timeout=30).stdout   # not stripped: each line starts with two status columns
    dirty = [line for line in status.splitlines() if not line[3:].startswith("benchmarks/results/")]
    from tests import standin

    real = standin.real_apptainer()
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": "yes" if dirty else "no",
            "apptainer": f"real ({real})" if real else "stand-in (tests/standin: bubblewrap)",
            "bed": "login node + 2 compute nodes in their own UTS/mount/PID namespaces (tests/cluster)"}


class Recorder:
    """Writes each benchmark's JSON as soon as it finishes; one failure does not stop the run."""

    def __init__(self, info: dict[str, str]) -> None:
        self.info = info
        self.done: list[str] = []
        self.failed: dict[str, str] = {}

    def __call__(self, name: str, fn, *args) -> None:
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            rows: list[Row] = fn(*args)
        except Exception:
            self.failed[name] = traceback.format_exc()
            log(f"{name}: FAILED\n{self.failed[name]}")
            return
        info = {**self.info, "bench_wall_s": f"{time.monotonic() - t0:.0f}"}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(
            {"machine": info, "rows": [r.to_json() for r in rows]}, indent=1) + "\n")
        self.done.append(name)
        log(f"{name}: done in {time.monotonic() - t0:.0f}s")


def run(names: list[str], size: dict, lock_wait: float, rec: Recorder) -> None:
    from . import offline

    if "readiness" in names:
        rec("readiness", offline.readiness, size["readiness"])
    if "verify" in names:
        rec("verify", offline.hashing, size["verify"], size["verify_mb"])
    if "import" in names:
        rec("import", offline.import_cost, size["import_n"])
    if not CLUSTER & set(names):
        return
    with TestbedLock(lock_wait):
        from . import bed

        bed.bring_up()
        if "sched" in names:
            from . import sched

            rec("sched", sched.scheduler_load, size["sched_ns"], size["sched_s"])
        if NEEDS_BROKER & set(names):
            from . import interactive

            broker = bed.Broker()
            broker.start()
            try:
                if "warm" in names:
                    rec("warm", interactive.warm_attach, broker, size["warm"])
                if "pty" in names:
                    rec("pty", interactive.pty, broker, size["pty"], size["pty_mb"], size["keys"])
                if "transfer" in names:
                    from . import transfer

                    rec("transfer", transfer.transfer, broker, size["transfer"], size["transfer_mb"],
                        size["transfer_files"])
                if "sshendpoint" in names:
                    from . import sshendpoint

                    rec("sshendpoint", sshendpoint.ssh_endpoint, broker, size["sshe_true"], size["sshe_scp"],
                        size["sshe_mb"])
                if "cold" in names:
                    rec("cold", interactive.cold_shell, broker, size["cold"])
            finally:
                broker.stop()
                from tests.integration import daemon as d

                d.reset_state()
                bed.cleanup_bench_files()
        if "immediate" in names:
            from . import interactive

            broker = bed.Broker(slurm_launch="immediate")
            broker.start()
            try:
                rec("immediate", interactive.cold_immediate, broker, size["immediate"])
            finally:
                broker.stop()
                from tests.integration import daemon as d

                d.reset_state()
                bed.cleanup_bench_files()
        if "hostile" in names:
            from . import hostile

            rec("hostile", hostile.hostile, size["hostile_blocks"], size["hostile_per"])
        if "rss" in names:
            from . import rss

            rec("rss", rss.rss_all, size["rss"], size["rss_restarts"], size["rss_terms"], size["rss_rounds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(ORDER)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small n: a smoke run, not for the report")
    parser.add_argument("--lock-wait", type=float, default=1800.0, help="seconds to wait for the test bed lock")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args(argv)
    names = args.names or ORDER
    unknown = set(names) - set(ORDER)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {', '.join(ORDER)}")
    if os.geteuid() != 0:
        parser.error("run as root (the benchmarks start the broker and drive the test bed)")
    started = time.monotonic()
    mode = "quick" if args.quick else "full"
    info = machine()
    info["mode"] = mode
    rec = Recorder(info)
    try:
        run([n for n in ORDER if n in names], SIZES[mode], args.lock_wait, rec)
    finally:
        if not args.no_report and rec.done:
            from .report import write_report

            log(f"report: {write_report(RESULTS, ORDER)}")
    log(f"done in {time.monotonic() - started:.0f}s; ok: {', '.join(rec.done) or 'none'}"
        + (f"; FAILED: {', '.join(rec.failed)}" if rec.failed else ""))
    return 1 if rec.failed else 0


if __name__ == "__main__":
    sys.exit(main())
