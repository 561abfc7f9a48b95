"""Benchmarks without SLURM in the loop: readiness detection, image hashing, login import cost."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker.audit import Audit
from broker.config import Config
from broker.identity import lookup_uid
from broker.manager import Manager
from broker.session import Session, State
from broker.slurm.runner import Runner
from broker.store import Store

from .common import Row, log, summary

PY = sys.executable


def _manager(tmp: Path) -> Manager:
    cfg = Config(image="/nonexistent.sif", state_dir=tmp, start_timeout=3600, pending_timeout=3600)
    return Manager(cfg, Runner(path="/usr/bin:/bin"), Store(tmp / "sessions.db"), Audit(tmp / "audit.jsonl"))


async def _readiness(n: int, tmp: Path) -> list[float]:
    """The manager's real readiness path: ``_await_ready`` re-reading a job log, marker appended
    by another writer at a random moment; delay = marker write → READY transition (persisted)."""
    mgr = _manager(tmp)
    me = lookup_uid(os.geteuid())  # the log is read as the session's user: here, whoever runs this
    seen: dict[str, float] = {}
    mgr.on_change.append(lambda s, old: seen.setdefault(s.id, time.perf_counter()) if s.state == State.READY
                         else None)
    delays = []
    for i in range(n):
        log_path = tmp / f"job{i}.log"
        log_path.write_bytes(b"")
        s = Session(user=me.name, uid=me.uid, project="p", job_id=str(100000 + i), node="n1",
                    instance=f"sb-bench-p-{i:06x}", log_path=str(log_path), state=State.STARTING,
                    submitted_at=time.time(), running_at=time.time())
        mgr._track(s)
        task = asyncio.ensure_future(mgr._await_ready(s, me))
        await asyncio.sleep(random.uniform(0.03, 0.08))  # lands anywhere in the re-read interval
        with open(log_path, "ab") as fh:  # a job writes its lines with O_APPEND, like this
            fh.write(b"some instance start noise\n")
            t0 = time.perf_counter()
            fh.write(b"INSTANCE_READY\n")
            fh.flush()
        await asyncio.wait_for(task, 5)
        delays.append((seen[s.id] - t0) * 1000)
    mgr.store.close()
    return delays


def readiness(n: int) -> list[Row]:
    from broker import log as _log

    _log.configure("info", open(os.devnull, "w"))  # the daemon's level, logging cost included
    with tempfile.TemporaryDirectory(prefix="sbroker-bench-ready-") as tmp:
        delays = asyncio.run(_readiness(n, Path(tmp)))
    s = summary(delays)
    log(f"readiness: median {s['median']:.1f} ms p95 {s['p95']:.1f} ms")
    return [Row("readiness", "readiness detection delay: INSTANCE_READY line written to the job log → session "
                "state `ready` (manager `_await_ready`, store write included)", "ms", delays, None,
                goal="≤ 50 ms p95", met=s["p95"] <= 50, ratio=s["p95"], ratio_label="ms p95",
                note="log re-opened and read every 20 ms as the user, in a worker thread (NFS-safe, no "
                     "inotify); no SLURM call on this path")]


def hashing(n: int, size_mb: int) -> list[Row]:
    """``verify``'s sha256 against ``openssl dgst -sha256`` (the same SHA-NI code hashlib uses:
    the yardstick), with coreutils ``sha256sum`` (no SHA-NI path) as a labelled context row."""
    from broker.container.apptainer._integrity import verify

    sides = {
        "openssl": lambda p: subprocess.run(["openssl", "dgst", "-sha256", "-r", str(p)], capture_output=True,
                                            text=True, check=True).stdout.split()[0],
        "sha256sum": lambda p: subprocess.run(["sha256sum", str(p)], capture_output=True, text=True,
                                              check=True).stdout.split()[0],
        "verify": lambda p: verify(p)["sif"]["sha256"],
    }
    names = list(sides)
    with tempfile.TemporaryDirectory(prefix="sbroker-bench-hash-", dir="/var/tmp") as tmp:
        path = Path(tmp) / "image.sif"   # a directory of its own: no lock files beside it for verify to check
        log(f"hashing: writing {size_mb} MiB to {path}")
        block = os.urandom(1 << 20)
        with open(path, "wb") as fh:
            for _ in range(size_mb):
                fh.write(block)
        size = path.stat().st_size
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
        mbps: dict[str, list[float]] = {name: [] for name in names}
        digests = set()
        for i in range(n + 1):                # round 0 warms up; each round rotates who goes first
            for name in names[i % 3:] + names[:i % 3]:
                t0 = time.perf_counter()
                digests.add(sides[name](path))
                rate = size / (time.perf_counter() - t0) / 1e6
                if i:
                    mbps[name].append(rate)
        ceiling = [_openssl_speed() for _ in range(n)]   # after the file rounds: no page cache effect on them
    if len(digests) != 1:
        raise RuntimeError(f"verify, openssl and sha256sum disagree: {digests}")
    med = {name: summary(v)["median"] for name, v in mbps.items()}
    vs_openssl, vs_coreutils = med["verify"] / med["openssl"], med["verify"] / med["sha256sum"]
    log(f"hashing: verify {med['verify']:.0f} MB/s, openssl {med['openssl']:.0f} MB/s ({vs_openssl:.2f}x), "
        f"sha256sum {med['sha256sum']:.0f} MB/s")
    note = (f"{size_mb} MiB file in the page cache; verify in-process (hashlib: OpenSSL's SHA-256, which uses "
            "the CPU's SHA instructions), openssl as a process (its start, ~4 ms, is inside its time)")
    return [Row("verify", f"`verify` sha256 throughput vs `openssl dgst -sha256` on a {size_mb} MiB file",
                "MB/s", mbps["verify"], mbps["openssl"], goal="≥ 0.95×", met=vs_openssl >= 0.95,
                ratio=vs_openssl, ratio_label="×", note=note),
            Row("verify", "context: `verify` vs `openssl speed -evp sha256 -bytes 1048576` (SHA-256 of a buffer "
                "in memory, no file read: the CPU's ceiling)", "MB/s", mbps["verify"], ceiling, goal="", met=None,
                ratio=med["verify"] / summary(ceiling)["median"], ratio_label="×",
                note="`openssl dgst` reads its file 8 KiB per read(2), verify 1 MiB; the ceiling row shows how "
                     "much of the CPU's hashing speed each file path keeps"),
            Row("verify", "context: `verify` vs coreutils `sha256sum` on the same file (sha256sum has no "
                "SHA-instruction path: not a yardstick)", "MB/s", mbps["verify"], mbps["sha256sum"], goal="",
                met=None, ratio=vs_coreutils, ratio_label="×", note="same rounds as the `openssl dgst` row")]


def _openssl_speed() -> float:
    """MB/s of ``openssl speed -evp sha256`` on 1 MiB buffers for one second (its last line: ``sha256 NNNk``,
    k = 1000 bytes per second)."""
    out = subprocess.run(["openssl", "speed", "-evp", "sha256", "-bytes", "1048576", "-seconds", "1"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return float(out.strip().splitlines()[-1].split()[-1].rstrip("k")) * 1000 / 1e6


def import_cost(n: int) -> list[Row]:
    """What `sbroker login` pays before it talks to the broker: interpreter + imports."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    repo = str(Path(__file__).resolve().parents[1])
    a_argv = [PY, "-c", "import broker.cli, broker.login, broker.term"]
    b_argv = [PY, "-c", "pass"]
    a, b = [], []
    for i in range(n + 2):
        for side in ("a", "b") if i % 2 == 0 else ("b", "a"):
            t0 = time.perf_counter()
            subprocess.run(a_argv if side == "a" else b_argv, env=env, cwd=repo, check=True)
            if i >= 2:
                (a if side == "a" else b).append((time.perf_counter() - t0) * 1000)
    added = summary(a)["median"] - summary(b)["median"]
    out = subprocess.run([PY, "-X", "importtime", "-c", "import broker.cli, broker.login, broker.term"], env=env,
                         cwd=repo, capture_output=True, text=True).stderr
    top = sorted((line for line in out.splitlines() if "|" in line and "cumulative" not in line),
                 key=lambda line: -int(line.split("|")[1]))[:5]
    log(f"import cost: +{added:.1f} ms over bare python")
    return [Row("import", "`sbroker login` import cost: `import broker.cli, broker.login, broker.term` vs bare "
                "`python -c pass`", "ms", a, b, goal="(no goal; small)", met=None, ratio=added,
                ratio_label="ms added (median)", extra={"importtime_top": top})]
