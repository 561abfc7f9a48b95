"""SSH inside the session (issue 18): sbroker's endpoint vs the hand-made two-hop path.

The sbroker side is the client entry ``sbroker ssh-config`` prints: a ``ProxyCommand`` through
the bed's login sshd (ForceCommand ``sbroker login``) into the image's ``sshd -i``, run by the
session agent in sbalice's ready session, host key pinned. The other side is what users build
by hand today: their own unprivileged ``sshd`` on the compute node, started as a step of the
same job (``srun --overlap ... apptainer exec instance://`` of the same instance, the image's
same sshd binary), reached with ``ProxyJump`` through plain ssh to the login node (the
bench-only sshd without the ForceCommand). Both sides are two SSH handshakes, as the same
user, into the same job and instance, with the same sshd: only the way in differs. (On the
host instead of the container, the bed's users' login shell, the ForceCommand wrapper, would
run every command.)

Timed from spawning the client until it exits; scp integrity checked after each copy, untimed;
sides alternate pair by pair, the first pair is a discarded warm-up.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path

from tests.cluster import config as tb

from . import bed
from .common import Row, log, sha256_file

ALICE = tb.USERS[0]
PROJECT = "bench"
LOCAL = Path("/var/tmp/sbroker-bench-sshendpoint")
TRUE_GOAL = 1.2
SCP_GOAL = 0.8
TIMEOUT = 300.0


def _identity() -> str:
    return [o for o in tb.SSH_OPTS if o.startswith("IdentityFile=")][0].split("=", 1)[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


class HandMadeSshd:
    """sbalice's own sshd on the session's compute node, a step of her job (as users do it)."""

    def __init__(self, job: str, instance: str, addr: str, home: Path) -> None:
        self.job, self.instance, self.addr, self.port = job, instance, addr, _free_port()
        self.key = home / bed.BENCH_SUBDIR / "handmade_host_key"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        bed.as_user(ALICE, "mkdir", "-p", "-m", "0700", "--", str(self.key.parent))
        bed.as_user(ALICE, "rm", "-f", str(self.key), str(self.key) + ".pub")
        bed.as_user(ALICE, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-h", str(self.key), "-p", str(self.port),
                "-o", f"ListenAddress={self.addr}", "-o", "PidFile=none", "-o", "UsePAM=no",
                "-o", "PasswordAuthentication=no", "-o", "AuthorizedKeysFile=.ssh/authorized_keys",
                "-o", "Subsystem sftp /usr/lib/openssh/sftp-server", "-o", "LogLevel=ERROR"]
        self.proc = subprocess.Popen(
            ["runuser", "-u", ALICE, "--", "env", f"SLURM_CONF={tb.SLURM_CONF}", f"PATH={bed.PATH}",
             "srun", "--overlap", f"--jobid={self.job}", "apptainer", "exec", f"instance://{self.instance}", *sshd],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _answers(self.addr, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"hand-made sshd exited: {self.proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"hand-made sshd: no answer on {self.addr}:{self.port} within {timeout:g}s")
            time.sleep(0.1)
        log(f"sshendpoint: hand-made sshd of {ALICE} in job {self.job} on {self.addr}:{self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def _client_config(directory: Path, addr: str, port: int, known_line: str) -> Path:
    common = (f"    User {ALICE}\n    IdentityFile {_identity()}\n    IdentitiesOnly yes\n    BatchMode yes\n"
              "    LogLevel ERROR\n")
    proxy = shlex.join(["ssh", "-T", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}", f"@{PROJECT}", "sbroker", "ssh-proxy"])
    (directory / "known_hosts").write_text(known_line + "\n")
    config = directory / "config"
    config.write_text(
        f"Host session\n    HostName cluster.test\n    ProxyCommand {proxy}\n"
        f"    HostKeyAlias sbroker.{ALICE}.cluster.test\n    UserKnownHostsFile {directory / 'known_hosts'}\n"
        f"    StrictHostKeyChecking yes\n{common}"
        f"Host jump\n    HostName {tb.SSH_HOST}\n    Port {bed.PLAIN_SSH_PORT}\n"
        f"    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n{common}"
        f"Host handmade\n    HostName {addr}\n    Port {port}\n    ProxyJump jump\n"
        f"    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n{common}")
    return config


def _run(argv: list[str]) -> float:
    t0 = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT, env=bed.ssh_env())
    t = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: exit {p.returncode}: {p.stderr.decode(errors='replace')[-1500:]}")
    return t


def ssh_endpoint(broker: bed.Broker, n_true: int, n_scp: int, size_mb: int) -> list[Row]:
    session = broker.ensure(ALICE, PROJECT)
    job = session["job_id"]
    node = bed.slurm("squeue", "-h", "-j", job, "-o", "%N").stdout.strip()
    addr = bed.slurm("sinfo", "-h", "-n", node, "-o", "%o").stdout.split()[0]
    home = Path(bed.lookup_name(ALICE).home)
    remote = home / bed.BENCH_SUBDIR / "sshendpoint.bin"
    printed = subprocess.run(["ssh", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}", f"@{PROJECT}", "sbroker", "ssh-config",
                              "--login", "cluster.test"], capture_output=True, text=True, timeout=120,
                             env=bed.ssh_env())
    known = re.search(rf"^#    (sbroker\.{ALICE}\.cluster\.test ssh-ed25519 \S+)$", printed.stdout, re.M)
    if printed.returncode != 0 or not known:
        raise RuntimeError(f"sbroker ssh-config: {printed.returncode} {printed.stdout!r} {printed.stderr!r}")
    shutil.rmtree(LOCAL, ignore_errors=True)
    LOCAL.mkdir(mode=0o700, parents=True)
    payload = LOCAL / "payload.bin"
    with open(payload, "wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(1 << 20))
    digest = sha256_file(payload)
    runtime = bed.container_runtime()
    plain = bed.PlainSshd()
    handmade = HandMadeSshd(job, session["instance"], addr, home)
    plain.start()
    samples: dict[str, dict[str, list[float]]] = {k: {"session": [], "handmade": []} for k in ("true", "up", "down")}
    try:
        handmade.start()
        config = _client_config(LOCAL, addr, handmade.port, known.group(1))
        ssh = ["ssh", "-F", str(config)]
        scp = ["scp", "-q", "-F", str(config)]
        for side in ("session", "handmade"):  # both land on the node, in the instance (its image marker)
            out = subprocess.run([*ssh, side, "hostname; test -e /.standin-build && echo in-image"],
                                 capture_output=True, text=True, timeout=120, env=bed.ssh_env())
            if out.returncode != 0 or out.stdout.split() != [node, "in-image"]:
                raise RuntimeError(f"{side}: not in the instance on {node}: {out.returncode} {out.stdout!r} "
                                   f"{out.stderr!r}")
        for rnd in range(max(n_true, n_scp) + 1):
            order = ["session", "handmade"] if rnd % 2 == 0 else ["handmade", "session"]
            for side in order:
                if rnd <= n_true:
                    t = _run([*ssh, side, "true"])
                    if rnd:
                        samples["true"][side].append(t)
                if rnd <= n_scp:
                    back = LOCAL / f"back-{side}.bin"
                    t_up = _run([*scp, str(payload), f"{side}:{remote}"])
                    t_down = _run([*scp, f"{side}:{remote}", str(back)])
                    if sha256_file(back) != digest:
                        raise RuntimeError(f"{side}: scp round trip of {size_mb} MiB differs")
                    back.unlink()
                    if rnd:
                        samples["up"][side].append(t_up)
                        samples["down"][side].append(t_down)
            if rnd:
                log(f"sshendpoint round {rnd}: true {samples['true']['session'][-1]:.3f}/"
                    f"{samples['true']['handmade'][-1]:.3f}s" + (
                        f"; scp up {samples['up']['session'][-1]:.2f}/{samples['up']['handmade'][-1]:.2f}s down "
                        f"{samples['down']['session'][-1]:.2f}/{samples['down']['handmade'][-1]:.2f}s"
                        if rnd <= n_scp else ""))
    finally:
        handmade.stop()
        plain.stop()
        shutil.rmtree(LOCAL, ignore_errors=True)
        bed.as_user(ALICE, "rm", "-f", str(remote), check=False)

    note = (f"sbroker: `ssh session` = ProxyCommand `ssh login @{PROJECT} sbroker ssh-proxy` → the image's "
            f"`sshd -i` run by the session agent (job {job}); hand-made: sbalice's own `sshd -D` as an "
            f"`srun --overlap` step of the same job on {node} ({addr}), in the same instance, reached with "
            f"ProxyJump through plain ssh to the login node (bench-only sshd, port {bed.PLAIN_SSH_PORT})")
    s = samples["true"]
    ratio = statistics.median(s["session"]) / statistics.median(s["handmade"])
    rows = [Row("sshendpoint", "`ssh HOST true` into the session: sbroker's SSH endpoint vs the hand-made two-hop "
                "path (own sshd on the compute node, ProxyJump via the login node)", "s", s["session"],
                s["handmade"], goal=f"≤ {TRUE_GOAL}×", met=ratio <= TRUE_GOAL, ratio=ratio, ratio_label="×",
                runtime=runtime, note=note)]
    for direction in ("up", "down"):
        s = samples[direction]
        a = [size_mb * 1.048576 / t for t in s["session"]]
        b = [size_mb * 1.048576 / t for t in s["handmade"]]
        ratio = statistics.median(a) / statistics.median(b)
        rows.append(Row("sshendpoint", f"scp {'upload' if direction == 'up' else 'download'} of {size_mb} MiB "
                        "through sbroker's SSH endpoint vs the hand-made two-hop path", "MB/s", a, b,
                        goal=f"≥ {SCP_GOAL}×", met=ratio >= SCP_GOAL, ratio=ratio, ratio_label="×", runtime=runtime,
                        extra={"seconds": {"session": s["session"], "handmade": s["handmade"]}}))
    for r in rows:
        log(f"{r.metric[:90]}: {r.ratio:.2f}{r.ratio_label} ({'met' if r.met else 'MISSED'})")
    return rows
