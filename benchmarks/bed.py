"""The test bed side: our broker daemon, raw jobs submitted like the broker does, cleanup."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

from broker import images, jobspec
from broker.client import BrokerError, Client
from broker.config import Config
from broker.identity import lookup_name
from broker.shells import shell_argv
from broker.slurm.runner import user_env
from tests.cluster import config as tb
from tests.integration import daemon as d

from .common import log

SOCKET = str(d.SOCKET)
#: Raw jobs write their output where the broker's jobs do: shared storage (the home), as
#: the user; a login-node-only path would fail at launch on a compute node.
BENCH_SUBDIR = ".sbroker/bench"
PATH = f"{tb.BIN}:/usr/local/bin:/usr/bin:/bin"
SBROKER_ENV_BIN = str(tb.SBROKER_BIN)
TERM = "xterm"

#: The broker settings of every benchmark run (the test bed's, as the integration tests use).
#: The product's defaults except the log level and a shorter detach grace. The spare shell is on,
#: as it is by default (the test suite turns it off to count shells); the warm benchmark measures
#: what a user gets.
#: ``/home`` is declared shared storage (``[transfer] login_paths``), as it is on the bed (one
#: file system for the login node and both compute nodes) and on nearly every cluster: the
#: transfer benchmark's files in the home are served on the login node (broker.xferroute).
BROKER_OVERRIDES: dict[str, object] = {"broker_log_level": "info", "timeouts_detach_grace": 30,
                                       "timeouts_spare_shell": True, "transfer_login_paths": ["/home"]}


def bring_up() -> None:
    from tests import cluster as testbed

    log("test bed: up (installs the working tree into the venv)")
    testbed.up()


def slurm(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, env=tb.slurm_env(), check=check,
                          timeout=timeout)


def as_user(user: str, *argv: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", *env_pairs(user), *argv], input=input,
                          capture_output=True, text=True, check=check, timeout=timeout,
                          cwd=lookup_name(user).home)


def env_pairs(user: str, **extra: str) -> list[str]:
    """The environment the broker's runner gives a user's SLURM commands, as ``K=V`` words."""
    env = user_env(lookup_name(user), path=PATH, slurm_conf=str(tb.SLURM_CONF), extra={"TERM": TERM, **extra})
    return [f"{k}={v}" for k, v in env.items()]


class Broker:
    """The real daemon on the test bed socket (what sshd's ForceCommand talks to)."""

    def __init__(self, **overrides: object) -> None:
        self.proc = d.BrokerProcess(**{**BROKER_OVERRIDES, **overrides})

    def start(self) -> None:
        d.reset_state()
        self.proc.start()
        log(f"broker: started, pid {self.proc.proc.pid}")

    def stop(self) -> None:
        self.proc.stop()
        log("broker: stopped")

    def request(self, op: str, **fields: object) -> dict:
        with Client(SOCKET, timeout=120) as c:
            return c.request(op, **fields)

    def ensure(self, user: str, project: str) -> dict:
        """``ensure`` as ``user`` (identity comes from SO_PEERCRED, so run a client as them)."""
        code = ("import json,sys; sys.path.insert(0, sys.argv[1]); from broker.client import Client\n"
                "print(json.dumps(Client(sys.argv[2]).request('ensure', project=sys.argv[3])['session']))")
        out = as_user(user, "/opt/sbroker/venv/bin/python", "-c", code, str(tb.REPO), SOCKET, project,
                      timeout=180).stdout
        import json

        return json.loads(out)

    def kill(self, user: str, project: str) -> None:
        try:
            self.request("kill", session=f"{user}/{project}", reason="benchmark")
        except BrokerError:
            pass


def bench_config() -> Config:
    """The same settings the test bed's broker runs with (for building identical jobs)."""
    from broker.config import parse
    import tomllib

    return parse(tomllib.loads(d.config_text(**BROKER_OVERRIDES)))


def _bench_job(user: str, project: str) -> tuple[object, str, jobspec.JobSpec, Path, Path]:
    """``(user, project, spec, image, log path)`` of a raw job built as the broker builds it, its
    output in the user's bench directory (shared storage, as the broker's job_dir)."""
    account = lookup_name(user)
    cfg = bench_config()
    image = images.resolve(cfg.image)
    spec = jobspec.build(cfg, account, project, str(image), images.digest(image))
    out_dir = Path(account.home) / BENCH_SUBDIR
    # The job dir too: the start script's agent writes its status there, as in a broker's job
    # (the broker makes it for its users; a user who never had a session has none).
    as_user(user, "mkdir", "-p", "-m", "0700", "--", str(out_dir), str(spec.job_dir))
    return account, project, spec, image, out_dir / f"{spec.instance}.log"


class RawJob:
    """The broker's start script submitted with plain ``sbatch`` as the user (no broker, no tag)."""

    def __init__(self, user: str, project: str) -> None:
        self.user, self.project, spec, image, self.log_path = _bench_job(user, project)
        self.instance = spec.instance
        self.script = spec.script
        # What a user without sbroker submits: the same script and resources, no broker tag and
        # no cross-login-node singleton (that is sbroker's own cost), named after the instance.
        self.argv = [a for a in spec.sbatch_argv
                     if not a.startswith(("--comment=", "--output=", "--dependency=", "--job-name="))]
        self.argv[1:1] = [f"--output={self.log_path}", f"--job-name={spec.instance}"]
        self.project_dir = spec.host_project_dir
        self.job_id = ""

    def prepare(self) -> None:
        as_user(self.user.name, "mkdir", "-p", "--", self.project_dir)

    def submit(self) -> None:
        out = as_user(self.user.name, *self.argv, input=self.script).stdout
        self.job_id = out.strip().split(";")[0]

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.005) -> float:
        """Poll the output file for the marker; return the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = self.log_path.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            if "INSTANCE_READY" in text:
                return time.monotonic()
            if "INSTANCE_FAILED" in text:
                raise RuntimeError(f"raw job {self.job_id}: {text.strip()}")
            time.sleep(interval)
        raise RuntimeError(f"raw job {self.job_id}: no INSTANCE_READY within {timeout:g}s")

    def cancel(self) -> None:
        if self.job_id:
            as_user(self.user.name, "scancel", self.job_id, check=False)

    def shell_argv(self) -> list[str]:
        return shell_argv(self.job_id, self.instance, self.user.name, self.project, TERM)


def wait_jobs_gone(job_ids: list[str], timeout: float = 30.0) -> None:
    ids = [j for j in job_ids if j]
    if not ids:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = slurm("squeue", "--noheader", "-t", "PD,R,CG,CF,S", "-o", "%i", f"--jobs={','.join(ids)}",
                    check=False).stdout
        if not out.strip():
            return
        time.sleep(0.2)


def ssh_argv(user: str, *remote: str) -> list[str]:
    return ["ssh", "-tt", "-o", "SendEnv=SBROKER_PROJECT", *tb.SSH_OPTS, f"{user}@{tb.SSH_HOST}", *remote]


def ssh_env(project: str | None = None) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "TERM": TERM, "LANG": "C.UTF-8", "HOME": "/root"}
    if project:
        env["SBROKER_PROJECT"] = project
    return env


def local_login_argv(user: str, project: str) -> list[str]:
    """The ForceCommand exactly as sshd runs it (``<login shell> -c <ForceCommand>``, both the
    sbroker-login wrapper on the bed), minus ssh itself."""
    return ["runuser", "-u", user, "--", "env", "-i", f"HOME=/home/{user}", f"USER={user}", f"LOGNAME={user}",
            "PATH=/usr/local/bin:/usr/bin:/bin", f"TERM={TERM}", "LANG=C.UTF-8",
            f"SLURM_CONF={tb.SLURM_CONF}", f"SBROKER_PROJECT={project}", str(tb.LOGIN_WRAPPER), "-c",
            tb.FORCE_COMMAND]


def local_srun_argv(user: str, argv: list[str]) -> list[str]:
    """The same ``srun --overlap --pty ...`` the broker spawns, run by hand as the user."""
    return ["runuser", "-u", user, "--", "env", "-i", *env_pairs(user), *argv]


def ssh_srun_remote(argv: list[str]) -> str:
    """The command line a user without sbroker types after ``ssh login-node``."""
    return f"env PATH={shlex.quote(PATH)} " + shlex.join(argv)


def cleanup_bench_files() -> None:
    for user in (*tb.USERS, tb.ADMIN):
        as_user(user, "rm", "-rf", "--", str(Path(lookup_name(user).home) / BENCH_SUBDIR), check=False)


def sanitize(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower())


def shell_argv_for(session: dict, user: str, project: str) -> list[str]:
    """The argv the broker spawns for an interactive shell of ``session``."""
    return shell_argv(session["job_id"], session["instance"], user, project, TERM)


def raw_cold_remote(job: RawJob) -> str:
    """What a user without sbroker does after ``ssh``: submit, wait for the marker, ``srun --pty``.

    The script goes to ``sbatch`` on stdin from a file the user can read, as the broker does.
    """
    script_path = job.log_path.with_suffix(".sh")
    script_path.write_text(job.script)
    os.chown(script_path, job.user.uid, job.user.gid)
    attach = shlex.join(shell_argv("1", job.instance, job.user.name, job.project, TERM)).replace(
        "--jobid=1", '--jobid="$jid"', 1)
    inner = (f"jid=$({shlex.join(job.argv)} < {shlex.quote(str(script_path))}) || exit 1; jid=${{jid%%;*}}; "
             f"until grep -qx INSTANCE_READY {shlex.quote(str(job.log_path))} 2>/dev/null; do sleep 0.005; done; "
             f"exec {attach}")
    return f"env PATH={shlex.quote(PATH)} bash -c {shlex.quote(inner)}"


class RawImmediate:
    """What a user without sbroker types for an immediate allocation and a container shell:
    ``salloc --no-shell --immediate`` (the broker's resources), a step that starts the same
    instance and keeps it (an instance started by a step that ends dies with the step), and
    ``srun --overlap --pty ... instance://`` once the instance is up. Same user, image, flags."""

    def __init__(self, user: str, project: str) -> None:
        self.user, self.project, spec, image, self.log_path = _bench_job(user, project)
        self.instance = spec.instance
        as_user(user, "mkdir", "-p", "--", spec.host_project_dir)
        salloc = [a for a in spec.salloc_argv if not a.startswith(("--comment=", "--job-name="))]
        salloc.append(f"--job-name={spec.instance}")
        exec_args = shell_argv("1", spec.instance, user, project, TERM)
        start = ["apptainer", "instance", "start", *_instance_flags(spec), str(image), spec.instance]
        keep = f"{shlex.join(start)} >&2 && echo READY && exec sleep infinity"
        attach = shlex.join(exec_args).replace("--jobid=1", '--jobid="$jid"', 1)
        self.inner = (
            f"jid=$({shlex.join(salloc)} 2>&1 | sed -n 's/.*Granted job allocation \\([0-9]*\\).*/\\1/p'); "
            '[ -n "$jid" ] || exit 1; '
            f'srun --overlap --jobid="$jid" --ntasks=1 --output={shlex.quote(str(self.log_path))} '
            f"bash -c {shlex.quote(keep)} </dev/null & "
            f"until grep -qx READY {shlex.quote(str(self.log_path))} 2>/dev/null; do sleep 0.005; done; "
            f"exec {attach}")

    def argv(self) -> list[str]:
        return ["runuser", "-u", self.user.name, "--", "env", "-i", *env_pairs(self.user.name), "bash", "-c",
                self.inner]

    def cancel(self) -> list[str]:
        ids = jobs_named(self.user.name, self.instance)
        as_user(self.user.name, "scancel", f"--name={self.instance}", check=False)
        return ids


def _instance_flags(spec: jobspec.JobSpec) -> list[str]:
    """The flags the spec's start script gives ``apptainer instance start`` (read from the script)."""
    line = next(l for l in spec.script.splitlines() if l.startswith("apptainer instance start "))
    words = shlex.split(line)
    return words[3:words.index("$CONTAINER")]


def jobs_named(user: str, name: str) -> list[str]:
    out = slurm("squeue", "--noheader", "-u", user, "-n", name, "-o", "%i", check=False).stdout
    return out.split()


# ------------------------------------------------------------------ extra broker config sections

class _SectionsBrokerProcess(d.BrokerProcess):
    """The test bed's daemon with config sections ``d.config_text`` has no table for
    (``[limits]``): its ``section_key`` overrides only reach the sections it already writes."""

    def __init__(self, sections: dict[str, dict[str, object]], **overrides: object) -> None:
        super().__init__(**overrides)
        self.sections = sections

    def start(self, timeout: float = 20.0) -> None:
        import json

        plain = d.config_text
        extra = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
                        for name, table in self.sections.items())
        # BrokerProcess.start writes config_text(**overrides) to the bed's broker.toml and starts
        # the daemon on it; the extra tables are appended for this start only.
        d.config_text = lambda **o: plain(**o) + extra
        try:
            super().start(timeout)
        finally:
            d.config_text = plain


class SectionsBroker(Broker):
    """:class:`Broker` with extra config tables, e.g. ``SectionsBroker({"limits": {"shells_per_user": 128}})``."""

    def __init__(self, sections: dict[str, dict[str, object]], **overrides: object) -> None:
        self.proc = _SectionsBrokerProcess(sections, **{**BROKER_OVERRIDES, **overrides})


# ------------------------------------------------------------------ a plain sshd (no ForceCommand)

PLAIN_SSH_PORT = 2824
PLAIN_SSHD_DIR = Path("/run/sbroker-bench-sshd")


def plain_ssh_argv(user: str, *remote: str) -> list[str]:
    """``ssh -tt`` as ``user`` to the bench-only plain sshd (:class:`PlainSshd`)."""
    opts = [f"Port={PLAIN_SSH_PORT}" if o == f"Port={tb.SSH_PORT}" else o for o in tb.SSH_OPTS]
    return ["ssh", "-tt", *opts, f"{user}@{tb.SSH_HOST}", *remote]


class PlainSshd:
    """A second sshd on 127.0.0.1:PLAIN_SSH_PORT: the bed's sshd config (same host key, same
    ``AuthorizedKeysFile``, PAM, ``SetEnv SLURM_CONF``) without its ``Match Group`` /
    ``ForceCommand`` block. It lets the raw side of a benchmark log in as the very user the
    sbroker side logs in as (sbalice), and type ``srun`` by hand.

    The bed's users have the ``sbroker-login`` wrapper as their login shell, and sshd runs
    every session as ``<login shell> -c CMD``; the wrapper ignores ``-c``, so without more a
    plain sshd would still land in ``sbroker login``. This sshd therefore runs in a private
    mount namespace where ``/etc/passwd`` is a copy giving those users ``/bin/bash``: what
    they have on a login node without sbroker. Nothing outside that namespace sees the copy
    (private propagation), and the namespace ends with the sshd, which :meth:`stop` ends by pid.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = PLAIN_SSHD_DIR / "sshd_config"
        self.passwd = PLAIN_SSHD_DIR / "passwd"
        self.log_path = PLAIN_SSHD_DIR / "sshd.log"

    def _config_text(self) -> str:
        from tests.cluster import harness

        text = harness.sshd_config_text(PLAIN_SSH_PORT, PLAIN_SSHD_DIR / "sshd.pid")
        block = harness.forcecommand_match_block()
        if block not in text:
            raise RuntimeError("bench sshd: the bed's sshd_config has no ForceCommand block to leave out")
        text = text.replace(block, "")
        directives = [line.split(None, 1)[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if {"ForceCommand", "Match"} & set(directives):
            raise RuntimeError("bench sshd: the config still has a Match/ForceCommand line")
        return ("# benchmarks/bed.py PlainSshd: the test bed's sshd_config without its Match/ForceCommand "
                "block (bench only)\n" + text)

    def _passwd_text(self) -> str:
        forced = set(tb.USERS)
        out = []
        for line in Path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) == 7 and fields[0] in forced:
                fields[6] = "/bin/bash"
            out.append(":".join(fields))
        return "\n".join(out) + "\n"

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection((tb.SSH_HOST, PLAIN_SSH_PORT), timeout=1) as s:
                s.settimeout(2)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def start(self, timeout: float = 15.0) -> None:
        if self._answers():
            raise RuntimeError(f"bench sshd: something already answers on {tb.SSH_HOST}:{PLAIN_SSH_PORT}")
        PLAIN_SSHD_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.write_text(self._config_text())
        self.passwd.write_text(self._passwd_text())
        self.passwd.chmod(0o644)
        t = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(self.config)], capture_output=True, text=True,
                           timeout=30)
        if t.returncode != 0:
            raise RuntimeError(f"bench sshd: sshd rejects {self.config}: {t.stdout}{t.stderr}")
        # unshare execs sh, which execs sshd: self.proc.pid is the listening sshd itself (-D).
        err_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             'mount --bind "$1" /etc/passwd && exec /usr/sbin/sshd -D -f "$2" -E "$3"', "-",
             str(self.passwd), str(self.config), str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_fh, start_new_session=True)
        err_fh.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                err = self.log_path.read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"bench sshd exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bench sshd: no answer on port {PLAIN_SSH_PORT} within {timeout:g}s")
            time.sleep(0.1)
        log(f"bench sshd: pid {self.proc.pid} on {tb.SSH_HOST}:{PLAIN_SSH_PORT} (no ForceCommand, login shell "
            "/bin/bash for the bed's users)")

    def check_plain(self, user: str, timeout: float = 30.0) -> None:
        """Fail unless a command as ``user`` runs in a plain login-node shell under sshd."""
        remote = "echo plain-$((6*7)) $(id -un); ps -o comm= -p $PPID"
        argv = ["ssh", *plain_ssh_argv(user)[2:], remote]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ssh_env())
        words = p.stdout.split()
        if p.returncode != 0 or words[:3] != ["plain-42", user, "sshd"]:
            raise RuntimeError(f"bench sshd: `{remote}` as {user} gave {p.returncode}: {p.stdout!r} {p.stderr!r}")

    def _children(self) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if self.proc and fields[1] == str(self.proc.pid) and "sshd" in stat[:stat.rindex(")")]:
                out.append(int(entry.name))
        return out

    def stop(self) -> None:
        import signal

        if self.proc is None:
            return
        if self.proc.poll() is None:
            children = self._children()   # per-connection sshd processes still open, if any
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            for pid in children:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            log("bench sshd: stopped")
        self.proc = None
        subprocess.run(["rm", "-rf", "--", str(PLAIN_SSHD_DIR)], check=False)

    def __enter__(self) -> PlainSshd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def agent_status(broker: Broker, user: str, project: str) -> dict:
    """The session agent's status file (``{job_dir}/{instance}.agent.json``), read as root."""
    import json

    info = broker.request("show", session=f"{user}/{project}")["session"]
    path = Path(info["log_path"]).parent / f"{info['instance']}.agent.json"
    return json.loads(path.read_text())


def container_runtime() -> str:
    """Which container runtime the bed's jobs run: the stand-in or a real apptainer."""
    from tests import standin

    real = standin.real_apptainer()
    return f"real apptainer ({real})" if real else "apptainer stand-in (tests/standin: bubblewrap), not real apptainer"
