"""Data at line rate (issue 19): scp, sftp, rsync and ``ssh host cat`` through sbroker vs plain ssh.

The sbroker side is sbalice through the bed's sshd (ForceCommand ``sbroker login``) into her
ready session, with the home declared shared storage (``[transfer] login_paths``, see
:data:`bed.BROKER_OVERRIDES`): transfers of files in the home run on the login node, confined
to what the session sees at the same path (``broker/xferroute.py``, ``broker/loginxfer.py``);
other commands without a terminal run over the direct stream to the session agent on the
compute node (``broker/direct.py``). Where each ran is counted from the broker's log and
recorded with the rows. The plain side is sbalice through the bench-only sshd
without the ForceCommand (:class:`bed.PlainSshd`): plain ssh to the login node, writing the
same home (shared storage) as the session does. A third side, for context only, is plain ssh
plus a hand-typed ``srun --overlap --jobid=J --unbuffered sh -c 'cat ...'`` into the same job:
the path commands took before issue 19 (srun's stdio forwarding).

Every transfer is timed from spawning the client until it exits; integrity (size and sha256 of
the file, or every file of the tree) is checked after each one, outside the timed part. Sides
alternate order pair by pair, the first pair of each case is a discarded warm-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from tests.cluster import config as tb
from tests.integration.daemon import LOG_PATH as BROKER_LOG

from . import bed
from .common import Row, log, sha256_file, summary

ALICE = tb.USERS[0]
PROJECT = "bench"
LOCAL = Path("/var/tmp/sbroker-bench-transfer")
TIMEOUT = 600.0
GOAL = 0.9


# ------------------------------------------------------------------ the two (three) ways in

class Side:
    """How one side reaches sbalice's home: its ssh options and environment."""

    def __init__(self, name: str, port: int, env: dict[str, str], extra_opts: list[str]) -> None:
        self.name = name
        self.opts = [*extra_opts, *[f"Port={port}" if o == f"Port={tb.SSH_PORT}" else o for o in tb.SSH_OPTS]]
        self.env = env
        self.dest = f"{ALICE}@{tb.SSH_HOST}"

    def rsh(self) -> str:
        return shlex.join(["ssh", *self.opts])


def sides() -> dict[str, Side]:
    return {
        "sbroker": Side("sbroker", tb.SSH_PORT, bed.ssh_env(PROJECT), ["-o", "SendEnv=SBROKER_PROJECT"]),
        "plain": Side("plain", bed.PLAIN_SSH_PORT, bed.ssh_env(), []),
    }


def _run(argv: list[str], env: dict[str, str], *, stdin_path: Path | None = None, stdout_path: Path | None = None,
         input: bytes | None = None) -> float:
    """Run one transfer; return its wall time. Fails loudly (stderr in the message) on non-zero exit."""
    stdin = open(stdin_path, "rb") if stdin_path else (subprocess.PIPE if input is not None else subprocess.DEVNULL)
    stdout = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    try:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env)
        _, err = p.communicate(input, timeout=TIMEOUT)
        t = time.monotonic() - t0
    finally:
        for fh in (stdin, stdout):
            if hasattr(fh, "close"):
                fh.close()
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: exit {p.returncode}: {err.decode(errors='replace')[-1500:]}")
    return t


# ------------------------------------------------------------------ the cases

def cmd_scp(legacy: bool):
    def make(side: Side, up: bool, src: str, dst: str, tree: bool):
        argv = ["scp", "-q", *(["-O"] if legacy else []), *(["-r"] if tree else []), *side.opts]
        argv += [src, f"{side.dest}:{dst}"] if up else [f"{side.dest}:{src}", dst]
        return dict(argv=argv)
    return make


def cmd_sftp(side: Side, up: bool, src: str, dst: str, tree: bool):
    r = " -r" if tree else ""
    line = f"put{r} {shlex.quote(src)} {shlex.quote(dst)}\n" if up else f"get{r} {shlex.quote(src)} {shlex.quote(dst)}\n"
    return dict(argv=["sftp", "-q", "-b", "-", *side.opts, side.dest], input=line.encode())


def cmd_rsync(side: Side, up: bool, src: str, dst: str, tree: bool):
    if tree:
        src, dst = src + "/", dst + "/"
    argv = ["rsync", "-a", "-W", "-e", side.rsh()]
    argv += [src, f"{side.dest}:{dst}"] if up else [f"{side.dest}:{src}", dst]
    return dict(argv=argv)


def cmd_cat(side: Side, up: bool, src: str, dst: str, tree: bool):
    if up:
        return dict(argv=["ssh", *side.opts, side.dest, f"cat > {shlex.quote(dst)}"], stdin_path=Path(src))
    return dict(argv=["ssh", *side.opts, side.dest, f"cat {shlex.quote(src)}"], stdout_path=Path(dst))


def cmd_srun(job_id: str):
    """Plain ssh, then ``srun --overlap`` into the session's job by hand (stdio through slurmstepd)."""
    def make(side: Side, up: bool, src: str, dst: str, tree: bool):
        inner = f"cat > {shlex.quote(dst)}" if up else f"cat {shlex.quote(src)}"
        remote = (f"env PATH={shlex.quote(bed.PATH)} srun --overlap --jobid={job_id} --unbuffered "
                  f"sh -c {shlex.quote(inner)}")
        if up:
            return dict(argv=["ssh", *side.opts, side.dest, remote], stdin_path=Path(src))
        return dict(argv=["ssh", *side.opts, side.dest, remote], stdout_path=Path(dst))
    return make


# ------------------------------------------------------------------ payloads and checks

def _make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 << 20))
            fh.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _make_tree(root: Path, files: int) -> dict[str, bytes]:
    """``files`` files of 1-8 KiB of random bytes, 100 to a directory (two levels)."""
    rng = random.Random(19)
    manifest = {}
    for i in range(files):
        rel = f"d{i // 100:03d}/s{(i // 10) % 10}/f{i:05d}.bin"
        data = rng.randbytes(rng.randint(1024, 8192))
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        manifest[rel] = data
    return manifest


def _check_file(path: Path, size: int, digest: str, what: str) -> None:
    try:
        got_size = path.stat().st_size
    except FileNotFoundError:
        raise RuntimeError(f"{what}: {path} missing") from None
    if got_size != size or sha256_file(path) != digest:
        raise RuntimeError(f"{what}: {path} differs (size {got_size}, want {size})")


def _check_tree(root: Path, manifest: dict[str, bytes], what: str) -> None:
    got = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    if got != set(manifest):
        raise RuntimeError(f"{what}: {root}: {len(got)} files, want {len(manifest)} "
                           f"(e.g. missing {sorted(set(manifest) - got)[:3]}, extra {sorted(got - set(manifest))[:3]})")
    for rel, data in manifest.items():
        if (root / rel).read_bytes() != data:
            raise RuntimeError(f"{what}: {root / rel} differs")


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------ the benchmark

CASES = [  # key, (upload label, download label), command maker, tree?
    ("scp", ("scp (SFTP protocol, OpenSSH 9 default)",) * 2, cmd_scp(False), False),
    ("scp-O", ("scp -O (legacy scp protocol)",) * 2, cmd_scp(True), False),
    ("sftp", ("sftp -b, put", "sftp -b, get"), cmd_sftp, False),
    ("rsync", ("rsync -a -W -e ssh",) * 2, cmd_rsync, False),
    ("cat", ("`ssh host 'cat > f' < file`", "`ssh host 'cat f' > out`"), cmd_cat, False),
    ("scp-tree", ("scp -r",) * 2, cmd_scp(False), True),
    ("sftp-tree", ("sftp -b, put -r", "sftp -b, get -r"), cmd_sftp, True),
    ("rsync-tree", ("rsync -a -e ssh",) * 2, cmd_rsync, True),
    ("true", ("ssh host true",) * 2, None, False),   # context: what one command costs before any data moves
]


def _quiesce(source: Path) -> None:
    """Before each timed transfer: write back what the previous one left dirty (the 200 MiB
    file, 2,000 files and their unlinks), so no transfer pays for its predecessor's writeback,
    and read the source once, so none pays for reading it back from disk. Writeback: added
    after the runs at b6ad00e and 60d800e, whose tree rows spread 2.9-12 s on one side. The
    read: added after the run at 83b352a, on finding that the bed's VM pages out page cache
    left untouched for a minute (DAMON ``pageout``, /sys/kernel/mm/damon): the payload went
    cold while the tree cases ran, and the first upload of a round, either side, re-read it."""
    subprocess.run(["sync"], check=False)
    for path in sorted(source.rglob("*")) if source.is_dir() else [source]:
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(4 << 20):
                    pass


def _log_size() -> int:
    try:
        return BROKER_LOG.stat().st_size
    except OSError:
        return 0


def _routes(since: int) -> dict[str, int]:
    """How many sbroker-side commands the broker routed where (``command_routed``), by program."""
    counts: dict[str, int] = {}
    with open(BROKER_LOG, "rb") as fh:
        fh.seek(since)
        for line in fh:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "command_routed":
                key = f"{event.get('where')}:{event.get('program') or 'shell'}"
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def transfer(broker: bed.Broker, n: int, size_mb: int, files: int) -> list[Row]:
    session = broker.ensure(ALICE, PROJECT)
    job = session["job_id"]
    log(f"transfer: session {session['id']} job {job} instance {session['instance']} node {session.get('node')}")
    home = Path(bed.lookup_name(ALICE).home)
    remote = home / bed.BENCH_SUBDIR / "transfer"
    bed.as_user(ALICE, "mkdir", "-p", "-m", "0700", "--", str(remote))
    _rm(LOCAL)
    LOCAL.mkdir(mode=0o700, parents=True)
    size = size_mb << 20
    src_file = LOCAL / "payload.bin"
    digest = _make_file(src_file, size)
    src_tree = LOCAL / "tree"
    manifest = _make_tree(src_tree, files)
    tree_bytes = sum(len(v) for v in manifest.values())
    log(f"transfer: payload {size_mb} MiB (sha256 {digest[:12]}), tree of {files} files ({tree_bytes / 1e6:.1f} MB)")
    runtime = bed.container_runtime()
    sshd = bed.PlainSshd()
    sshd.start()
    way = sides()
    srun_make = cmd_srun(job)
    # samples[case][direction][side] = seconds
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        key: {d: {s: [] for s in ("sbroker", "plain", "srun")} for d in ("up", "down")} for key, *_ in CASES}
    log_start = _log_size()
    try:
        sshd.check_plain(ALICE)
        # sanity: the sbroker side really lands in the session's job (and is not plain ssh)
        probe = subprocess.run(["ssh", *way["sbroker"].opts, way["sbroker"].dest, 'echo "$SLURM_JOB_ID" "$(hostname)"'],
                               capture_output=True, text=True, env=way["sbroker"].env, timeout=60)
        if probe.returncode != 0 or probe.stdout.split()[:1] != [job]:
            raise RuntimeError(f"sbroker side does not land in job {job}: {probe.returncode} {probe.stdout!r} "
                               f"{probe.stderr!r}")
        log(f"transfer: sbroker side lands in job {job} on {probe.stdout.split()[1]}")

        def one(case: tuple, side_name: str, rnd: int, record: bool) -> None:
            key, _label, make, tree = case
            if key == "true":  # the fixed cost of one command, no data
                side = way[side_name]
                t = _run(["ssh", *side.opts, side.dest, "true"], side.env)
                if record:
                    samples[key]["up"][side_name].append(t)
                return
            side = way["plain" if side_name == "srun" else side_name]
            if side_name == "srun":
                make = srun_make
            rdst = remote / f"{side_name}-{key}-{rnd}"
            ldst = LOCAL / f"down-{side_name}-{key}-{rnd}"
            _rm(rdst), _rm(ldst)
            src = src_tree if tree else src_file
            _quiesce(src)
            t_up = _run(env=side.env, **make(side, True, str(src), str(rdst), tree))
            if tree:
                _check_tree(rdst, manifest, f"{side_name} {key} upload")
            else:
                _check_file(rdst, size, digest, f"{side_name} {key} upload")
            _quiesce(rdst)
            t_down = _run(env=side.env, **make(side, False, str(rdst), str(ldst), tree))
            if tree:
                _check_tree(ldst, manifest, f"{side_name} {key} download")
            else:
                _check_file(ldst, size, digest, f"{side_name} {key} download")
            _rm(rdst), _rm(ldst)
            if record:
                samples[key]["up"][side_name].append(t_up)
                samples[key]["down"][side_name].append(t_down)

        for rnd in range(n + 1):  # round 0: warm-up pairs, discarded
            subprocess.run(["sync"], check=False)
            t_round = time.monotonic()
            for ci, case in enumerate(CASES):
                order = ["sbroker", "plain"] if (rnd + ci) % 2 == 0 else ["plain", "sbroker"]
                if case[0] == "cat":
                    order.insert(rnd % 3, "srun")  # the context side rotates through the order too
                for side_name in order:
                    one(case, side_name, rnd, rnd > 0)
            if rnd == 0:
                log(f"transfer: warm-up round done in {time.monotonic() - t_round:.0f}s (discarded)")
                continue
            log(f"transfer round {rnd}/{n} ({time.monotonic() - t_round:.0f}s): " + "; ".join(
                f"{key} up {samples[key]['up']['sbroker'][-1]:.2f}/{samples[key]['up']['plain'][-1]:.2f}s "
                f"down {samples[key]['down']['sbroker'][-1]:.2f}/{samples[key]['down']['plain'][-1]:.2f}s"
                for key, *_ in CASES if key != "true")
                + f"; true {samples['true']['up']['sbroker'][-1]:.3f}/{samples['true']['up']['plain'][-1]:.3f}s"
                + f"; srun up {samples['cat']['up']['srun'][-1]:.2f}s down {samples['cat']['down']['srun'][-1]:.2f}s")
    finally:
        sshd.stop()
        _rm(LOCAL)
        shutil.rmtree(remote, ignore_errors=True)

    routes = _routes(log_start)
    log(f"transfer: where the sbroker side's commands ran (broker log): {routes}")
    rows = []
    for key, label, _make, tree in CASES:
        if key == "true":
            continue
        for direction in ("up", "down"):
            s = samples[key][direction]
            amount, unit = (files, "files/s") if tree else (size / 1e6, "MB/s")
            a = [amount / t for t in s["sbroker"]]
            b = [amount / t for t in s["plain"]]
            ratio = statistics.median(a) / statistics.median(b)
            what = f"tree of {files} files of 1-8 KiB" if tree else f"{size_mb} MiB random file"
            rows.append(Row(
                "transfer", f"{'upload' if direction == 'up' else 'download'}, {what}: "
                f"{label[0 if direction == 'up' else 1]}, through sbroker vs "
                "plain ssh to the login node", unit, a, b, goal=f"≥ {GOAL}×", met=ratio >= GOAL, ratio=ratio,
                ratio_label="×", runtime=runtime, note="" if rows else (
                    "sbroker side: sbalice through the bed's sshd (ForceCommand `sbroker login`) into her ready "
                    f"session, job {job}, with `[transfer] login_paths = [\"/home\"]`: transfers of files in her "
                    "home run on the login node, confined by Landlock to the trees the session sees at the same "
                    "path, other commands in the instance over the direct stream to the session agent (where "
                    f"each ran, from the broker's log: {routes}); plain side: sbalice through the bench-only sshd on port {bed.PLAIN_SSH_PORT} (no "
                    "ForceCommand), same home; result = sbroker speed / plain speed (medians); each transfer is "
                    "one ssh invocation timed from spawn to exit, integrity checked after it, untimed; per-transfer "
                    "seconds are in the results file"),
                extra={"seconds": {"sbroker": s["sbroker"], "plain": s["plain"]}, "routes": routes,
                       "median_s": {"sbroker": statistics.median(s["sbroker"]),
                                    "plain": statistics.median(s["plain"])},
                       "bytes": tree_bytes if tree else size, "files": files if tree else 1}))
    s = samples["true"]["up"]
    rows.append(Row(
        "transfer", "per-command fixed cost (context): `ssh host true` through sbroker (ForceCommand → `sbroker "
        "login` → ensure → direct stream handshake → `apptainer exec instance://…`: a command, so in the "
        "allocation) vs plain ssh to the login node",
        "s", s["sbroker"], s["plain"], goal="— (context)", met=None,
        ratio=statistics.median(s["sbroker"]) - statistics.median(s["plain"]), ratio_label="s added (median)",
        runtime=runtime, note="paid once per scp/sftp/rsync/ssh invocation whatever its size: with a 200 MiB file "
                              "moving in under a second on this bed, it weighs on the single-file rows"))
    for direction in ("up", "down"):
        s = samples["cat"][direction]
        a = [size / 1e6 / t for t in s["sbroker"]]
        c = [size / 1e6 / t for t in s["srun"]]
        ratio = statistics.median(a) / statistics.median(c)
        rows.append(Row(
            "transfer", f"{'upload' if direction == 'up' else 'download'}, {size_mb} MiB (context): `ssh host "
            f"'cat …'` through sbroker vs plain ssh + hand-typed `srun --overlap --jobid=J --unbuffered sh -c "
            f"'cat …'` into the same job (the pre-issue-19 path: srun's stdio forwarding)", "MB/s", a, c,
            goal="— (context)", met=None, ratio=ratio, ratio_label="×", runtime=runtime,
            note=f"srun {direction}: median {statistics.median(s['srun']):.3f} s vs sbroker "
                 f"{statistics.median(s['sbroker']):.3f} s (plain ssh {statistics.median(s['plain']):.3f} s); the srun "
                 f"side runs `sh` on the compute node outside the container, job {job}",
            extra={"seconds": {"sbroker": s["sbroker"], "srun": s["srun"], "plain": s["plain"]}, "bytes": size}))
    for r in rows:
        log(f"{r.metric[:100]}: sbroker {summary(r.a)['median']:.3g} vs {summary(r.b)['median']:.3g} {r.unit} "
            f"→ {r.ratio:.2f} {r.ratio_label} ({'met' if r.met else 'context' if r.met is None else 'MISSED'})")
    return rows
