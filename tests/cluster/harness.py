"""Bring the local test bed up and down: munge, slurmctld, slurmd and a loopback sshd.

Runs as root. Everything is written under ``config.ROOT``; the system's own SLURM/sshd
configuration is never touched. ``down`` only stops daemons whose pid files ``up`` wrote
under ``config.RUN`` (and checks the process name before signalling, so a recycled pid is
never hit). A munged that was already running is reused and never stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as C

LOG_TAIL_LINES = 30
APT_PACKAGES = [
    "slurm-wlm", "munge", "openssh-server", "openssh-client", "openssh-sftp-server",
    "bubblewrap", "tmux", "rsync", "procps", "iproute2", "util-linux",
]
# binary -> the Debian package that provides it (checked before `up` does anything)
REQUIRED_BINARIES = {
    "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
    "munged": "munge", "munge": "munge", "/usr/sbin/sshd": "openssh-server",
    "ssh": "openssh-client", "bwrap": "bubblewrap", "runuser": "util-linux",
}


class HarnessError(RuntimeError):
    """A step of the test bed failed; the message says which and why (with a log tail)."""

    def __init__(self, message: str, log: Path | None = None):
        if log is not None:
            message += "\n" + log_tail(log)
        super().__init__(message)


def log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"--- (no log at {path}: {e.strerror}) ---"
    tail = "\n".join(text[-lines:])
    return f"--- last {min(lines, len(text))} lines of {path} ---\n{tail}\n--- end of {path} ---"


def run(argv: list[str], *, check: bool = True, env: dict | None = None, timeout: float = 60,
        **kw) -> subprocess.CompletedProcess:
    """Run a short command, capturing its output (text)."""
    try:
        p = subprocess.run(argv, env=env, timeout=timeout, text=True,
                           stdin=subprocess.DEVNULL, capture_output=True, **kw)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    if check and p.returncode != 0:
        raise HarnessError(f"`{' '.join(argv)}` failed (rc {p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def write_if_changed(path: Path, text: str, mode: int) -> bool:
    old = path.read_text() if path.exists() else None
    if old != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
    path.chmod(mode)
    return old != text


@contextlib.contextmanager
def testbed_lock():
    """Serialise up/down across processes (several engineers/pytest sessions share a machine)."""
    C.RUN.mkdir(parents=True, exist_ok=True)
    with open(C.RUN / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# processes we started: pid files under RUN, checked against the expected process name
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Daemon:
    name: str          # also the expected /proc/PID/comm
    pidfile: Path
    logfile: Path

    def pid(self) -> int | None:
        """The pid from our pid file if that process is alive and is really NAME."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if proc_name(pid) == self.name else None


MUNGED = Daemon("munged", C.RUN / "munged.pid", Path("/var/log/munge/munged.log"))
SLURMCTLD = Daemon("slurmctld", C.RUN / "slurmctld.pid", C.LOG / "slurmctld.log")
SSHD = Daemon("sshd", C.RUN / "sshd.pid", C.SSHD_LOG)
DAEMONS = (MUNGED, SLURMCTLD, SSHD)
LEGACY_SLURMD = Daemon("slurmd", C.RUN / "slurmd.pid", C.LOG / "slurmd.log")
NODE_INIT = Path(__file__).with_name("node-init.sh")
CGROUP_CONF = C.ETC / "cgroup.conf"


@dataclass(frozen=True)
class Node:
    """One compute node: ``unshare`` (pid file) → its PID 1 (node-init.sh) → slurmd.

    Pids here are the login (root) namespace's; a pid the node itself reports means
    nothing outside it."""

    name: str

    @property
    def pidfile(self) -> Path:
        return C.RUN / f"node-{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return C.LOG / f"slurmd-{self.name}.log"

    @property
    def console(self) -> Path:
        return C.LOG / f"node-{self.name}.console"

    def init_pid(self) -> int | None:
        """The node's PID 1 (node-init.sh), if the node is up."""
        return namespace_holder(self.pidfile)

    def pids(self) -> list[int]:
        """Every process of the node (its PID namespace), init included."""
        init = self.init_pid()
        if init is None:
            return []
        ns = _pidns(init)
        return [p for p in _all_pids() if _pidns(p) == ns]

    def slurmd_pid(self) -> int | None:
        return next((p for p in self.pids() if proc_name(p) == "slurmd"), None)


NODES = tuple(Node(name) for name in C.NODES)


def namespace_holder(pidfile: Path) -> int | None:
    """The child of the ``unshare`` whose pid PIDFILE holds: the process that holds (is PID 1
    of, for a node) the namespaces; None when it is gone."""
    try:
        unshare = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if proc_name(unshare) != "unshare":
        return None
    kids = [p for p in children_of(unshare) if proc_name(p)]
    return kids[0] if kids else None


def on_node(name: str, *argv: str, user: str | None = None) -> list[str]:
    """argv that runs ARGV inside node NAME's namespaces (as USER, with the bed's SLURM_CONF):
    what a process on that compute node sees (its /tmp, /run, hostname and processes)."""
    init = node(name).init_pid()
    if init is None:
        raise HarnessError(f"{name} is down")
    inner = list(argv) if user is None else C.as_user(user, *argv)
    return ["nsenter", "-t", str(init), "-u", "-m", "-p", "--", *inner]


def node(name: str) -> Node:
    return next(n for n in NODES if n.name == name)


def _all_pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _pidns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def proc_name(pid: int) -> str | None:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if stat.rsplit(")", 1)[1].split()[0] == "Z":   # a zombie is not a running daemon
        return None
    return comm


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def our_slurmstepds() -> list[int]:
    """slurmstepd processes forked by *our* slurmd (they inherit SLURM_CONF=our conf)."""
    needle = f"SLURM_CONF={C.SLURM_CONF}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and proc_name(int(d.name)) == "slurmstepd":
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if proc_name(p) is not None]
    return alive


def terminate(pids: list[int], what: str, timeout: float = 10) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    for p in left:
        log(f"{what} pid {p} ignored SIGTERM for {timeout:.0f}s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    if wait_gone(left, 5):
        raise HarnessError(f"{what} {left} did not exit even after SIGKILL")


def start_daemon(d: Daemon, argv: list[str], ready, what_ready: str, *, env=None,
                 timeout: float = 30, pid_from: Path | None = None) -> int:
    """Start a self-daemonising program, then wait (bounded) until READY() is true.

    On failure raise HarnessError with the tail of the daemon's log."""
    C.LOG.mkdir(parents=True, exist_ok=True)
    out = C.LOG / f"{d.name}.stdout"    # what the program prints before it daemonises
    with open(out, "ab") as f:
        f.write(f"=== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
        f.flush()
        offset = f.tell()
        p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                           start_new_session=True, timeout=60)

    def printed() -> str:
        with open(out, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace").strip()
        return f"it printed:\n{text}\n" if text else "it printed nothing.\n"

    if p.returncode != 0:
        raise HarnessError(f"{d.name} failed to start (`{' '.join(argv)}` exited"
                           f" {p.returncode}); {printed()}", d.logfile)
    t0 = time.monotonic()
    seen = None
    while True:
        if pid_from is not None and pid_from.exists():   # copy a pid file we cannot place
            with contextlib.suppress(OSError):
                d.pidfile.write_text(pid_from.read_text())
        pid = d.pid()
        if pid is not None and ready():
            log(f"{d.name} running, pid {pid}")
            return pid
        seen = seen or pid
        waited = time.monotonic() - t0
        if seen and pid is None:
            raise HarnessError(f"{d.name} (pid {seen}) exited right after starting; "
                               + printed(), d.logfile)
        if pid is None and waited > min(10, timeout):
            raise HarnessError(f"{d.name} did not start: no live process in {d.pidfile}"
                               f" after {waited:.0f}s; " + printed(), d.logfile)
        if waited > timeout:
            raise HarnessError(f"{d.name} (pid {pid}) did not get {what_ready} within"
                               f" {timeout:.0f}s; " + printed(), d.logfile)
        time.sleep(0.2)


# --------------------------------------------------------------------------------------
# system prerequisites
# --------------------------------------------------------------------------------------

def require_root() -> None:
    if os.geteuid() != 0:
        raise HarnessError("the test bed needs root (it creates users and starts daemons)")


def ensure_packages() -> None:
    missing = sorted({pkg for b, pkg in REQUIRED_BINARIES.items()
                      if not (Path(b).exists() if b.startswith("/") else shutil.which(b))})
    if not missing:
        return
    log(f"installing missing Debian packages ({', '.join(missing)}) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES], env=env,
        timeout=1200)


def ensure_hostname() -> None:
    host = C.hostname()
    try:
        socket.gethostbyname(host)
    except OSError:
        log(f"hostname {host!r} does not resolve; adding '127.0.0.1 {host}' to /etc/hosts")
        with open("/etc/hosts", "a") as f:
            f.write(f"\n127.0.0.1 {host}\n")


def ensure_dirs() -> None:
    layout = {
        C.ROOT: 0o755, C.ETC: 0o755, C.BIN: 0o755, C.IMAGES: 0o755,
        # slurmstepd creates state/slurmd/job<N>/ for the job's group and the job's user
        # must reach it, so state/ is traverse-only and the spool dir 0755 (like Debian's).
        C.STATE: 0o711, C.STATE / "slurmctld": 0o700,
        C.LOG: 0o700, C.RUN: 0o700, C.SSH_DIR: 0o700,
    }
    for path, mode in layout.items():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    # privilege-separation dir of sshd; /run is a tmpfs
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def ensure_groups_and_users() -> None:
    for g in (C.USER_GROUP, C.ADMIN_GROUP):
        try:
            grp.getgrnam(g)
        except KeyError:
            run(["groupadd", g])
    wanted = {u: C.USER_GROUP for u in C.USERS} | {C.ADMIN: C.ADMIN_GROUP}
    # Forced users' login shell on the login node is the wrapper (sshd runs `shell -c
    # ForceCommand`: bash would read their dotfiles first); node-init gives the compute
    # nodes a passwd with bash, as a login-node-only override (sssd override_shell) does.
    shells = {u: str(C.LOGIN_WRAPPER) for u in C.USERS} | {C.ADMIN: "/bin/bash"}
    for user, group in wanted.items():
        try:
            pwd.getpwnam(user)
        except KeyError:
            # '*' (not '!'): no password login, but not "locked" for sshd either
            run(["useradd", "--create-home", "--shell", shells[user], "--password", "*",
                 "--groups", group, user])
        else:
            # Only when something differs: usermod rewrites /etc/passwd (a new inode), which
            # silently undoes every bind-mounted passwd copy (the compute nodes' bash override,
            # the benchmarks' plain sshd) made from the old one.
            if (pwd.getpwnam(user).pw_shell != shells[user] or user not in grp.getgrnam(group).gr_mem
                    or _shadow_password(user) != "*"):
                run(["usermod", "--shell", shells[user], "--password", "*", "-a", "-G", group, user])
        other = C.ADMIN_GROUP if group == C.USER_GROUP else C.USER_GROUP
        if user in grp.getgrnam(other).gr_mem:
            run(["gpasswd", "-d", user, other])
        pw = pwd.getpwnam(user)
        home = Path(pw.pw_dir)
        home.mkdir(exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        home.chmod(0o700)   # private; SLURM writes job output as the user, so this is fine


def ensure_ssh_keys() -> None:
    if not C.SSH_KEY.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sbroker-testbed",
             "-f", str(C.SSH_KEY)])
    hostkey = C.SSH_DIR / "ssh_host_ed25519_key"
    if not hostkey.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
    pub = C.SSH_KEY.with_suffix(".pub").read_text()
    for user in (*C.USERS, C.ADMIN):
        pw = pwd.getpwnam(user)
        sshdir = Path(pw.pw_dir) / ".ssh"
        sshdir.mkdir(mode=0o700, exist_ok=True)
        os.chown(sshdir, pw.pw_uid, pw.pw_gid)
        sshdir.chmod(0o700)
        ak = sshdir / "authorized_keys"
        lines = ak.read_text().splitlines(keepends=True) if ak.exists() else []
        if pub not in lines:
            with open(ak, "a") as f:
                f.write(pub)
        os.chown(ak, pw.pw_uid, pw.pw_gid)
        ak.chmod(0o600)


# --------------------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------------------

def slurm_conf_text() -> str:
    h = C.hostname()
    nodes = "\n".join(
        f"NodeName={name} NodeAddr={addr} Port={port} CPUs={C.NODE_CPUS}"
        f" RealMemory={C.NODE_MEMORY_MB} Gres=gpu:{C.GPUS_PER_NODE} State=UNKNOWN"
        for name, (addr, port) in C.NODES.items())
    partitions = "\n".join(
        f"PartitionName={name} Nodes={name} MaxTime=INFINITE State=UP"
        for name in C.NODES)
    return f"""\
# Generated by tests/cluster (sbroker test bed); `python -m tests.cluster up` rewrites it.
# Used only through SLURM_CONF={C.SLURM_CONF}; the system's /etc/slurm is untouched.
# The controller runs on the login node; node1 and node2 are slurmds in namespaces of their
# own (node-init.sh): private hostname, /tmp, /run, /var/lib, /var/spool; shared /home.
ClusterName={C.CLUSTER_NAME}
SlurmctldHost={h}(127.0.0.1)
SlurmctldPort={C.SLURMCTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# Every process of a job is in its cgroup (freezer), however it forks: a daemonized
# instance dies with its job, as on production clusters.
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmdTimeout={C.SLURMD_TIMEOUT}
# lets a node claim more CPUs than the machine has (dozens of 1-CPU sessions on 2 cores)
SlurmdParameters=config_overrides
# fake GPUs (gres.conf: character devices 195:N under {C.GPU_DEV_DIR}): accounted, no driver
GresTypes=gpu
SlurmctldPidFile={SLURMCTLD.pidfile}
# node-private paths (each node has its own /run and /var/spool)
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation={C.STATE / "slurmctld"}
SlurmctldLogFile={SLURMCTLD.logfile}
SlurmdLogFile={C.LOG}/slurmd-%n.log
SchedulerType=sched/backfill
# start batch jobs within ~1 s of submission (default batch_sched_delay=3)
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# required: without it every job takes all the node's memory and jobs run one at a time
DefMemPerCPU={C.DEF_MEM_PER_CPU_MB}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
MailProg=/bin/true
{nodes}
PartitionName={C.PARTITION} Nodes={",".join(C.NODES)} Default=YES LLN=YES MaxTime=INFINITE State=UP
{partitions}
"""


def gpu_devices(name: str) -> list[Path]:
    """The fake GPU device files of node NAME (gres.conf's File=)."""
    return [C.GPU_DEV_DIR / name / f"nvidia{i}" for i in range(C.GPUS_PER_NODE)]


def gres_conf_text() -> str:
    lines = "\n".join(f"NodeName={name} Name=gpu File={C.GPU_DEV_DIR / name}/nvidia[0-{C.GPUS_PER_NODE - 1}]"
                      for name in C.NODES)
    return f"""\
# Generated by tests/cluster. Fake GPUs: SLURM ignores a GPU without File=, so each is a
# character device with NVIDIA's major (195) made by the harness; no driver, no CUDA.
{lines}
"""


def ensure_gpu_devices() -> None:
    """Make each node's fake GPU devices (idempotent; a wrong file is replaced)."""
    minor = 0
    for name in C.NODES:
        for path in gpu_devices(name):
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            want = os.makedev(195, minor)
            try:
                st = path.lstat()
                ok = stat.S_ISCHR(st.st_mode) and st.st_rdev == want
            except FileNotFoundError:
                ok = False
            if not ok:
                path.unlink(missing_ok=True)
                try:
                    os.mknod(path, 0o666 | stat.S_IFCHR, want)
                except OSError as e:
                    raise HarnessError(f"cannot make the fake GPU device {path} (mknod c 195 {minor}: {e});"
                                       " the bed's gres.conf needs it (a container without CAP_MKNOD?)")
            minor += 1


def cgroup_conf_text() -> str:
    return """\
# Generated by tests/cluster. cgroup v1 (this machine's hierarchy); proctrack only.
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
"""


def forcecommand_match_block(*, group: str = C.USER_GROUP, force_command: str = C.FORCE_COMMAND,
                             slurm_conf: Path | str = C.SLURM_CONF) -> str:
    """The sshd ``Match`` block that sends members of GROUP into the broker.

    The product's own version is ``session_scripts/sshd_config.snippet`` (owned by the lead);
    this one is the test bed's. Note: a ``SetEnv`` inside a Match block *replaces* the global
    ``SetEnv`` list for matching users, so SLURM_CONF is repeated here.
    """
    return f"""\
Match Group {group}
    ForceCommand {force_command}
    SetEnv SLURM_CONF={slurm_conf}
    PermitUserRC no
    AllowTcpForwarding no
    AllowStreamLocalForwarding no
    AllowAgentForwarding no
    X11Forwarding no
    PermitTunnel no
"""


def sshd_config_text(port: int = C.SSH_PORT, pidfile: Path = SSHD.pidfile) -> str:
    return f"""\
# Generated by tests/cluster (sbroker test bed); `python -m tests.cluster up` rewrites it.
Port {port}
ListenAddress {C.SSH_HOST}
HostKey {C.SSH_DIR / "ssh_host_ed25519_key"}
PidFile {pidfile}
# login storms: the default 10:30:100 refuses connections before they reach sbroker
MaxStartups 200:30:400
# VERBOSE logs "Starting session: forced-command (config) '...' for USER" (tests read it)
LogLevel VERBOSE
PermitRootLogin no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
UseDNS no
PrintMotd no
X11Forwarding no
AcceptEnv SBROKER_PROJECT SBROKER_PROFILE LANG LC_*
SetEnv SLURM_CONF={C.SLURM_CONF}
# ForceCommand overrides subsystems for the Match group below anyway
Subsystem sftp /usr/lib/openssh/sftp-server

{forcecommand_match_block()}"""


# --------------------------------------------------------------------------------------
# daemons
# --------------------------------------------------------------------------------------

def munge_works() -> bool:
    try:
        m = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if m.returncode != 0:
            return False
        u = subprocess.run(["unmunge"], input=m.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return u.returncode == 0 and b"Success" in u.stdout


def ensure_munge() -> None:
    if munge_works():
        if MUNGED.pid() is None:
            MUNGED.pidfile.unlink(missing_ok=True)
            log("munged: reusing the one already running (not ours; never stopped by down)")
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        run(["mungekey", "-c", "-k", str(key)])
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for d, mode in ((Path("/run/munge"), 0o755), (Path("/var/log/munge"), 0o700),
                    (Path("/var/lib/munge"), 0o700)):
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
        d.chmod(mode)
    # munged runs as user munge and cannot write into RUN (root-only): it keeps its own
    # pid file and we copy the pid into RUN, which marks it as ours for `down`.
    start_daemon(MUNGED, ["runuser", "-u", "munge", "--", "munged"], munge_works,
                 "answering `munge -n | unmunge`", pid_from=Path("/run/munge/munged.pid"))


def scontrol_ping() -> bool:
    p = subprocess.run(["scontrol", "ping"], env=C.slurm_env(), capture_output=True, text=True,
                       timeout=30)
    return "is UP" in p.stdout


def node_states() -> dict[str, str]:
    """``{node: sinfo state}`` for every node of the bed (``"(sinfo failed: ...)"`` on error)."""
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=C.slurm_env(),
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return {n: f"(sinfo failed: {p.stderr.strip()})" for n in C.NODES}
    seen = dict(line.split(None, 1) for line in p.stdout.splitlines() if line.strip())
    return {n: seen.get(n, "(not listed)").strip() for n in C.NODES}


def node_state(name: str) -> str:
    return node_states()[name]


def node_reason(name: str) -> str:
    p = subprocess.run(["sinfo", "-h", "-N", "-n", name, "-o", "%E"],
                       env=C.slurm_env(), capture_output=True, text=True, timeout=30)
    return p.stdout.strip()


def wait_nodes_ready(names=tuple(C.NODES), timeout: float = 60) -> dict[str, str]:
    """Wait until every node answers and is schedulable; resume each once if drained/down."""
    deadline = time.monotonic() + timeout
    resumed: set[str] = set()
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {n: s for n, s in node_states().items() if n in names}
        if all(s in ("idle", "mixed", "allocated", "completing") for s in states.values()):
            return states
        for name, state in states.items():
            base = state.rstrip("*~#!%$@^-+")
            if not state.endswith("*") and base in ("drained", "draining", "down", "inval") \
                    and name not in resumed:
                log(f"{name} is {state} ({node_reason(name)}); resuming it")
                subprocess.run(["scontrol", "update", f"nodename={name}", "state=resume"],
                               env=C.slurm_env(), capture_output=True, timeout=30)
                resumed.add(name)
        time.sleep(0.25)
    raise HarnessError(
        f"nodes did not become idle within {timeout:.0f}s: sinfo says {states}",
        node(next(iter(names))).logfile)


def start_node(n: Node) -> None:
    """Boot node N (its namespaces, tmpfs and slurmd), or start its slurmd if only that died."""
    init = n.init_pid()
    env = C.slurm_env()
    if init is None:
        C.LOG.mkdir(parents=True, exist_ok=True)
        with open(n.console, "ab") as out:
            out.write(f"=== {time.strftime('%F %T')} boot {n.name}\n".encode())
            out.flush()
            p = subprocess.Popen(
                ["unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc",
                 "--propagation", "private", "--kill-child", "bash", str(NODE_INIT), n.name,
                 str(C.SLURM_CONF), *C.NODE_SHARED_DIRS],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        n.pidfile.write_text(f"{p.pid}\n")
    elif n.slurmd_pid() is None:
        with open(n.console, "ab") as out:   # not a pipe: the daemon keeps its stdio open
            subprocess.run(["nsenter", "-t", str(init), "-u", "-m", "-p", "--", "slurmd", "-f",
                            str(C.SLURM_CONF)], env=env, stdin=subprocess.DEVNULL, stdout=out,
                           stderr=out, timeout=30)
    if not _wait(lambda: n.slurmd_pid() is not None and not node_state(n.name).endswith("*")
                 and not node_state(n.name).startswith("("), 30):
        raise HarnessError(f"{n.name}: slurmd did not register with slurmctld within 30s"
                           f" (sinfo: {node_state(n.name)!r}); console:\n{log_tail(n.console)}",
                           n.logfile)
    log(f"{n.name} up (init pid {n.init_pid()}, slurmd pid {n.slurmd_pid()})")


def kill_node(n: Node) -> None:
    """A node failure: SIGKILL the node's PID 1; the kernel kills all its processes."""
    init = n.init_pid()
    if init is not None:
        os.kill(init, signal.SIGKILL)
        wait_gone([init], 10)
    n.pidfile.unlink(missing_ok=True)


def stop_node(n: Node) -> None:
    """A clean shutdown: TERM to slurmd (via node-init), then the node's PID 1."""
    init = n.init_pid()
    if init is None:
        n.pidfile.unlink(missing_ok=True)
        return
    slurmd = n.slurmd_pid()
    if slurmd:
        terminate([slurmd], f"{n.name} slurmd")
    terminate([init], f"{n.name} init", timeout=5)
    n.pidfile.unlink(missing_ok=True)
    log(f"stopped {n.name}")


def ensure_slurm(conf_changed: bool) -> None:
    if conf_changed and (SLURMCTLD.pid() or LEGACY_SLURMD.pid() or any(n.init_pid() for n in NODES)):
        log("slurm.conf changed: restarting slurmctld and the nodes")
        stop_slurm(cancel_jobs=False)
    env = C.slurm_env()
    if SLURMCTLD.pid() is None:
        # With no node alive every job in the saved state is dead (its node's PID namespace
        # is gone), but slurmctld would recover them as RUNNING or PENDING and start them on
        # the fresh nodes (a machine stopped mid-run, or a CI image taken from one): start
        # from a clean slate instead (-c: no jobs, no node states; slurm.conf defines both).
        fresh = not any(n.init_pid() for n in NODES)
        start_daemon(SLURMCTLD, ["slurmctld", *(["-c"] if fresh else [])], scontrol_ping,
                     "answering `scontrol ping`", env=env)
        if fresh:
            log("slurmctld started with a clean state (-c): no compute node was alive")
    for n in NODES:
        if n.slurmd_pid() is None:
            start_node(n)
    states = wait_nodes_ready()
    log("nodes: " + ", ".join(f"{k} {v}" for k, v in states.items()))


def sshd_answers(port: int = C.SSH_PORT) -> bool:
    try:
        with socket.create_connection((C.SSH_HOST, port), timeout=2) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


LOGIN_INIT = Path(__file__).with_name("login-init.sh")
LOGIN2_SSHD_CONFIG = C.ETC / "sshd_config_login2"
LOGIN2_SSHD = Daemon("sshd", C.RUN / "sshd-login2.pid", C.LOG / "sshd-login2.log")
LOGIN2_PIDFILE = C.RUN / "login-login2.pid"


def login2_pid() -> int | None:
    """The process holding the second login node's namespaces (login-init.sh), if it is up."""
    return namespace_holder(LOGIN2_PIDFILE)


def on_login2(*argv: str) -> list[str]:
    """argv that runs ARGV on the second login node (its hostname, broker socket and state)."""
    pid = login2_pid()
    if pid is None:
        raise HarnessError(f"{C.LOGIN2} is down")
    return ["nsenter", "-t", str(pid), "-u", "-m", "--", *argv]


def _login2_mounts_intact() -> bool:
    """Its private dirs are still mounted (removing a mount point elsewhere detaches them)."""
    mounts = subprocess.run(on_login2("cat", "/proc/self/mounts"), capture_output=True, text=True,
                            timeout=10).stdout.split("\n")
    points = {line.split()[1] for line in mounts if len(line.split()) > 1}
    return all(d in points for d in C.LOGIN2_PRIVATE_DIRS)


def ensure_login2(conf_changed: bool) -> None:
    """The second login node: namespaces, private broker dirs, its own sshd."""
    if conf_changed and login2_pid() is not None:
        stop_login2()
    if login2_pid() is not None and LOGIN2_SSHD.pid() is not None and sshd_answers(C.LOGIN2_SSH_PORT) \
            and _login2_mounts_intact():
        return
    stop_login2()
    t = run(["/usr/sbin/sshd", "-t", "-f", str(LOGIN2_SSHD_CONFIG)], check=False)
    if t.returncode != 0:
        raise HarnessError(f"sshd rejects {LOGIN2_SSHD_CONFIG}:\n{t.stdout}{t.stderr}")
    for d in C.LOGIN2_PRIVATE_DIRS:
        Path(d).mkdir(parents=True, exist_ok=True)   # mount points
    console = C.LOG / "login2.console"
    with open(console, "ab") as out:
        p = subprocess.Popen(["unshare", "--uts", "--mount", "--propagation", "private", "--fork",
                              "--kill-child", "bash", str(LOGIN_INIT), C.LOGIN2, str(LOGIN2_SSHD_CONFIG),
                              str(LOGIN2_SSHD.logfile), *C.LOGIN2_PRIVATE_DIRS],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    LOGIN2_PIDFILE.write_text(f"{p.pid}\n")
    if not _wait(lambda: LOGIN2_SSHD.pid() is not None and sshd_answers(C.LOGIN2_SSH_PORT), 15):
        raise HarnessError(f"{C.LOGIN2}: sshd does not answer on port {C.LOGIN2_SSH_PORT};"
                           f" console:\n{log_tail(console)}", LOGIN2_SSHD.logfile)
    log(f"{C.LOGIN2} up (pid {login2_pid()}, sshd pid {LOGIN2_SSHD.pid()}, port {C.LOGIN2_SSH_PORT})")


def stop_login2() -> None:
    pid = LOGIN2_SSHD.pid()
    if pid is not None:
        terminate([pid], f"{C.LOGIN2} sshd")
    LOGIN2_SSHD.pidfile.unlink(missing_ok=True)
    holder = login2_pid()
    if holder is not None:
        terminate([holder], f"{C.LOGIN2} init", timeout=5)
    LOGIN2_PIDFILE.unlink(missing_ok=True)


def ensure_sshd(conf_changed: bool) -> None:
    t = run(["/usr/sbin/sshd", "-t", "-f", str(C.SSHD_CONFIG)], check=False)
    if t.returncode != 0:
        raise HarnessError(f"sshd rejects {C.SSHD_CONFIG}:\n{t.stdout}{t.stderr}")
    pid = SSHD.pid()
    if pid is not None and conf_changed:
        log("sshd_config changed: SIGHUP to sshd")
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.5)   # it re-execs itself; the pid stays the same
    if SSHD.pid() is None:
        start_daemon(SSHD, ["/usr/sbin/sshd", "-f", str(C.SSHD_CONFIG), "-E", str(C.SSHD_LOG)],
                     sshd_answers, f"answering on {C.SSH_HOST}:{C.SSH_PORT}", timeout=15)
    elif not _wait(sshd_answers, 10):
        raise HarnessError(f"sshd (pid {SSHD.pid()}) does not answer on port {C.SSH_PORT}",
                           C.SSHD_LOG)


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------------------
# product + apptainer stand-in
# --------------------------------------------------------------------------------------

_COPY_IGNORE = shutil.ignore_patterns(".git", "tests", "build", "dist", "*.egg-info",
                                      "__pycache__", ".pytest_cache", ".hypothesis", ".venv")


def _shadow_password(user: str) -> str | None:
    """``user``'s password field in /etc/shadow (None: no entry)."""
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user and len(fields) > 1:
            return fields[1]
    return None


def install_product() -> None:
    """(Re)install the working tree into VENV so sshd's ForceCommand runs current code.

    Built from a copy of the tree so no build/ or *.egg-info lands in the shared checkout."""
    pip = C.VENV / "bin" / "pip"
    if not pip.exists():
        log(f"{C.VENV} missing: creating it from /usr/bin/python3 (normally `make install`)")
        run(["/usr/bin/python3", "-m", "venv", str(C.VENV)], timeout=300)
        run([str(pip), "install", "-q", "--upgrade", "pip", "setuptools>=68", "wheel"],
            timeout=600)
        deps = True
    else:
        deps = False
    with tempfile.TemporaryDirectory(prefix="sbroker-build-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(C.REPO, src, ignore=_COPY_IGNORE)
        argv = [str(pip), "install", "-q", "--no-build-isolation", "--force-reinstall"]
        if not deps:
            argv.append("--no-deps")
        t0 = time.monotonic()
        run([*argv, str(src)], timeout=600)
        log(f"installed the working tree into {C.VENV} ({time.monotonic() - t0:.1f}s)")


def install_login_wrapper() -> None:
    """session_scripts/sbroker-login as the bed's ForceCommand and forced users' login shell,
    root-owned, with the bed's broker socket (a site edits the same line of its copy)."""
    text = (C.REPO / "session_scripts" / "sbroker-login").read_text()
    line = "SBROKER_SOCKET=/run/sbroker/broker.sock\n"
    if line not in text:
        raise HarnessError(f"session_scripts/sbroker-login has no line {line.strip()!r} to point at the bed")
    C.BIN.mkdir(parents=True, exist_ok=True)
    write_if_changed(C.LOGIN_WRAPPER, text.replace(line, f"SBROKER_SOCKET={C.BROKER_SOCKET}\n"), 0o755)
    os.chown(C.LOGIN_WRAPPER, 0, 0)
    shells = Path("/etc/shells").read_text()
    if str(C.LOGIN_WRAPPER) not in shells.split():
        with open("/etc/shells", "a") as f:
            f.write(f"{C.LOGIN_WRAPPER}\n")


def install_standin() -> None:
    """Install the apptainer stand-in into BIN (unless a real apptainer is on PATH) and
    build the test image into IMAGES. Both come from tests/standin (its own module)."""
    try:
        from tests import standin
    except ImportError as e:
        raise HarnessError(f"tests/standin (the apptainer stand-in) cannot be imported: {e}")
    missing = [f for f in ("install", "build_test_image", "real_apptainer")
               if not hasattr(standin, f)]
    if missing:
        raise HarnessError("tests/standin/__init__.py does not provide "
                           f"{', '.join(missing)} (needed by the test bed)")
    real = standin.real_apptainer()
    if real:
        log(f"real apptainer at {real}: not installing the stand-in")
    else:
        standin.install(C.BIN)
    t0 = time.monotonic()
    try:
        sif = standin.build_test_image(C.IMAGES)
    except subprocess.CalledProcessError as e:
        raise HarnessError(f"building the test image failed: `{' '.join(map(str, e.cmd))}`"
                           f" exited {e.returncode}:\n{(e.stderr or b'').decode(errors='replace')}")
    log(f"test image {sif} ready ({time.monotonic() - t0:.1f}s)")


# --------------------------------------------------------------------------------------
# up / down / status
# --------------------------------------------------------------------------------------

def up(*, reinstall: bool = True) -> None:
    require_root()
    t0 = time.monotonic()
    ensure_packages()
    with testbed_lock():
        ensure_hostname()
        ensure_dirs()
        install_login_wrapper()
        slurm_texts = (slurm_conf_text(), cgroup_conf_text(), gres_conf_text())
        slurm_changed = write_if_changed(C.SLURM_CONF, slurm_texts[0], 0o644)
        slurm_changed |= write_if_changed(CGROUP_CONF, slurm_texts[1], 0o644)
        ensure_gpu_devices()
        slurm_changed |= write_if_changed(C.GRES_CONF, slurm_texts[2], 0o644)
        ensure_groups_and_users()
        ensure_ssh_keys()
        sshd_text = sshd_config_text()
        login2_text = sshd_config_text(C.LOGIN2_SSH_PORT, LOGIN2_SSHD.pidfile)
        sshd_changed = write_if_changed(C.SSHD_CONFIG, sshd_text, 0o644)
        login2_changed = write_if_changed(LOGIN2_SSHD_CONFIG, login2_text, 0o644)
        if reinstall:
            install_product()
        ensure_munge()
        # A config written by an `up` that failed before its daemon took it counts as changed
        # until a daemon has: the stamp is written only after the daemon is up with it.
        ensure_slurm(slurm_changed or not applied("slurm", *slurm_texts))
        mark_applied("slurm", *slurm_texts)
        ensure_sshd(sshd_changed or not applied("sshd", sshd_text))
        mark_applied("sshd", sshd_text)
        ensure_login2(login2_changed or not applied("login2", login2_text))
        mark_applied("login2", login2_text)
        install_standin()   # last: the daemons are up even if the stand-in is broken
    log(f"test bed up ({time.monotonic() - t0:.1f}s)")


def _stamp(name: str) -> Path:
    return C.RUN / f"applied-{name}.sha256"


def applied(name: str, *texts: str) -> bool:
    """Whether the daemons NAME were last (re)started with exactly these config texts."""
    import hashlib

    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    try:
        return _stamp(name).read_text().strip() == digest
    except FileNotFoundError:
        return False  # never recorded (a fresh machine, or a bed from before stamps): apply once


def mark_applied(name: str, *texts: str) -> None:
    import hashlib

    _stamp(name).write_text(hashlib.sha256("\0".join(texts).encode()).hexdigest() + "\n")


def cancel_all_jobs(timeout: float = 20) -> None:
    env = C.slurm_env()
    p = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                       timeout=30)
    ids = p.stdout.split()
    if p.returncode == 0 and ids:
        log(f"cancelling {len(ids)} job(s)")
        subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=30)
        _wait(lambda: not subprocess.run(["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i"],
                                         env=env, capture_output=True, text=True,
                                         timeout=30).stdout.strip(), timeout)


def stop_slurm(*, cancel_jobs: bool = True) -> None:
    if cancel_jobs and SLURMCTLD.pid() is not None:
        cancel_all_jobs()
    for n in NODES:
        stop_node(n)
    legacy = LEGACY_SLURMD.pid()   # the one-host bed's slurmd, from a checkout before the nodes
    if legacy is not None:
        terminate([legacy], "slurmd (one-host bed)")
    LEGACY_SLURMD.pidfile.unlink(missing_ok=True)
    pid = SLURMCTLD.pid()
    if pid is not None:
        terminate([pid], SLURMCTLD.name)
        log(f"stopped slurmctld (pid {pid})")
    SLURMCTLD.pidfile.unlink(missing_ok=True)
    if cancel_jobs:
        stepds = our_slurmstepds()
        if stepds:
            log(f"stopping {len(stepds)} leftover slurmstepd process(es) of our slurmd")
            terminate(stepds, "slurmstepd", timeout=5)


def down() -> None:
    require_root()
    from .demo import stop_broker

    stop_broker()  # the demo's broker runs srun against this cluster: it goes first
    with testbed_lock():
        stop_login2()
        pid = SSHD.pid()
        if pid is not None:
            sessions = children_of(pid)
            terminate([pid], "sshd")
            if sessions:
                terminate([p for p in sessions if proc_name(p)], "sshd sessions", timeout=5)
            log(f"stopped sshd (pid {pid})")
        SSHD.pidfile.unlink(missing_ok=True)
        stop_slurm()
        pid = MUNGED.pid()
        if pid is not None:
            terminate([pid], "munged")
            log(f"stopped munged (pid {pid}), which up had started")
        else:
            log("munged: not ours, left alone" if munge_works() else "munged: not running")
        MUNGED.pidfile.unlink(missing_ok=True)
    log("test bed down")


def status() -> int:
    """Print each daemon and the sinfo line; return 0 if everything is up, else 1."""
    ok = True
    for d in DAEMONS:
        pid = d.pid()
        if d is MUNGED and pid is None and munge_works():
            print(f"{d.name:10} running (system's, reused; not stopped by down)")
            continue
        ok &= pid is not None
        print(f"{d.name:10} " + (f"running, pid {pid}" if pid else "not running"))
    for n in NODES:
        slurmd = n.slurmd_pid()
        ok &= slurmd is not None
        print(f"{n.name:10} " + (f"up, init pid {n.init_pid()}, slurmd pid {slurmd}" if slurmd
                                 else "init pid %s, slurmd not running" % n.init_pid()
                                 if n.init_pid() else "down"))
    holder = login2_pid()
    ok &= holder is not None and LOGIN2_SSHD.pid() is not None
    print(f"{C.LOGIN2:10} " + (f"up, pid {holder}, sshd pid {LOGIN2_SSHD.pid()} on port {C.LOGIN2_SSH_PORT}"
                               if holder else "down"))
    if SLURMCTLD.pid():
        p = subprocess.run(["sinfo", "-h", "-o", "%P %a %l %D %T %N %C"], env=C.slurm_env(),
                           capture_output=True, text=True, timeout=30)
        print(f"sinfo      {(p.stdout or p.stderr).strip()}")
    print(f"ssh        ssh {' '.join(C.SSH_OPTS)} {C.ADMIN}@{C.SSH_HOST}"
          + ("" if sshd_answers() else "   (sshd not answering)"))
    print(f"SLURM_CONF {C.SLURM_CONF}")
    return 0 if ok else 1

