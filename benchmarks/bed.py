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
BROKER_OVERRIDES: dict[str, object] = {"broker_log_level": "info", "timeouts_detach_grace": 30}


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


class RawJob:
    """The broker's start script submitted with plain ``sbatch`` as the user (no broker, no tag)."""

    def __init__(self, user: str, project: str) -> None:
        self.user = lookup_name(user)
        self.project = project
        cfg = bench_config()
        image = images.resolve(cfg.image)
        spec = jobspec.build(cfg, self.user, project, str(image), images.digest(image))
        self.instance = spec.instance
        self.script = spec.script
        out_dir = Path(self.user.home) / BENCH_SUBDIR
        as_user(user, "mkdir", "-p", "-m", "0700", "--", str(out_dir))
        self.log_path = out_dir / f"{spec.instance}.log"
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


def jobs_named(user: str, name: str) -> list[str]:
    out = slurm("squeue", "--noheader", "-u", user, "-n", name, "-o", "%i", check=False).stdout
    return out.split()
