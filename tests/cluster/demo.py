"""``make demo`` (``python -m tests.cluster demo``): bring the test bed up and show how to
get a shell inside a SLURM allocation.

Steps:
  1. the test bed comes up (SLURM, munge, loopback sshd; the product installed into VENV);
  2. ``start_broker()`` starts the real broker daemon, detached (log in LOG/broker.log);
  3. with a broker: print the one ``ssh`` command that lands sbalice in a container shell,
     and run it when stdin is a terminal; if the broker cannot start: submit a raw batch job as sbalice and print the ``srun --overlap --pty``
     command that attaches a shell to it, plus the ssh command for the admin.
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import subprocess
import sys
import time

from . import config as C
from . import harness

DEMO_JOB_NAME = "sbroker-demo"


BROKER_PID = C.RUN / "broker-demo.pid"
BROKER_LOG = C.LOG / "broker.log"


def _broker_answers(timeout: float = 2.0) -> bool:
    from broker.client import BrokerError, Client

    try:
        with Client(str(C.BROKER_SOCKET), timeout=timeout) as client:
            client.request("ping")
        return True
    except (BrokerError, OSError):
        return False


def _demo_pid() -> int | None:
    try:
        pid = int(BROKER_PID.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start_broker(timeout: float = 30.0) -> bool:
    """Start the real broker daemon (test bed config), detached so it outlives the demo.

    Reuses a demo broker that already answers. Logs to BROKER_LOG; pid in BROKER_PID
    (``stop_broker()`` or ``kill $(cat BROKER_PID)`` stops it; test fixtures do so too)."""
    if _demo_pid() and _broker_answers():
        return True
    from tests.integration.daemon import CONFIG_PATH, config_text

    CONFIG_PATH.write_text(config_text())
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(C.REPO), "LANG": "C.UTF-8"}
    with open(BROKER_LOG, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(CONFIG_PATH)],
                                env=env, stdin=devnull, stdout=log, stderr=log, cwd="/",
                                start_new_session=True)
    BROKER_PID.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(BROKER_LOG.read_text(errors="replace").splitlines()[-15:])
            print(f"the broker exited with {proc.returncode}; {BROKER_LOG}:\n{tail}", file=sys.stderr)
            BROKER_PID.unlink(missing_ok=True)
            return False
        if _broker_answers():
            return True
        time.sleep(0.2)
    print(f"the broker did not answer on {C.BROKER_SOCKET} within {timeout:g}s; see {BROKER_LOG}",
          file=sys.stderr)
    return False


def stop_broker(timeout: float = 10.0) -> None:
    """Stop the demo broker, if one runs (by its recorded pid only)."""
    pid = _demo_pid()
    BROKER_PID.unlink(missing_ok=True)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def ssh_line(user: str) -> str:
    """A short, interactive ssh command line (host key checks off: the test bed's own sshd)."""
    return (f"ssh -p {C.SSH_PORT} -i {C.SSH_KEY} -o StrictHostKeyChecking=no"
            f" -o UserKnownHostsFile=/dev/null {user}@{C.SSH_HOST}")


def raw_job(user: str) -> str:
    """A running batch job of USER (replacing an earlier demo job), to attach shells to."""
    home = pwd.getpwnam(user).pw_dir
    env = C.slurm_env()
    subprocess.run(["scancel", "-u", user, "-n", DEMO_JOB_NAME], env=env, timeout=30)
    p = subprocess.run(C.as_user(user, "sbatch", "--parsable", "-J", DEMO_JOB_NAME, "-t", "60",
                                 "--wrap", "sleep 3600"),
                       cwd=home, capture_output=True, text=True, timeout=30, check=True)
    job = p.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env,
                            capture_output=True, text=True, timeout=30).stdout.strip()
        if st == "RUNNING":
            return job
        time.sleep(0.2)
    raise harness.HarnessError(f"demo job {job} did not start within 20s (state {st!r})")


def main() -> int:
    harness.up()
    user = C.USERS[0]
    print()
    if start_broker():
        line = ssh_line(user)
        print(f"The broker is running (pid {_demo_pid()}, log {BROKER_LOG}). Log in as a test user;")
        print("you land in a container shell inside a SLURM allocation (the first login submits it):\n")
        print(f"    {line}\n")
        print(f"A command runs there too:  {line} 'hostname; echo $SLURM_JOB_ID'")
        print(f"Other project:             {line} @myproject")
        print(f"Where it runs:             compute nodes {', '.join(C.NODES)} (own hostname, /tmp, /run,"
              f" processes); `SLURM_CONF={C.SLURM_CONF} sinfo -N`")
        print(f"Admin view:                {ssh_line(C.ADMIN)} "
              f"'SBROKER_SOCKET={C.BROKER_SOCKET} {C.SBROKER_BIN} ls'")
        print(f"Stop the broker: kill $(cat {BROKER_PID});  everything: make down\n")
        if sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("SBROKER_DEMO_NO_LOGIN") != "1":
            print("Logging you in now (leave the shell with `exit`; it keeps running if the connection drops):\n")
            sys.stdout.flush()
            subprocess.call(shlex.split(line))  # the shell's exit status is not the demo's
        return 0

    job = raw_job(user)
    check = subprocess.run(C.as_user(user, "srun", "--overlap", f"--jobid={job}", "sh", "-c",
                                     'echo "$(id -un) in job $SLURM_JOB_ID on $(hostname)"'),
                           capture_output=True, text=True, timeout=60, cwd=pwd.getpwnam(user).pw_dir)
    attach = " ".join(shlex.quote(a) for a in C.as_user(
        user, "srun", "--overlap", "--pty", f"--jobid={job}", "bash", "-l"))
    print("The broker is not wired into the demo yet, so this is the raw SLURM path it will")
    print("automate. The local cluster is up:\n")
    print(f"  export SLURM_CONF={C.SLURM_CONF}; sinfo; squeue\n")
    print(f"A batch job ({job}) is running as {user}; check: {check.stdout.strip() or check.stderr.strip()}")
    print("Attach an interactive shell to it (as root, run as the user):\n")
    print(f"  cd {pwd.getpwnam(user).pw_dir} && {attach}\n")
    print(f"An admin ({C.ADMIN}) gets a plain shell through the loopback sshd:\n")
    print(f"  {ssh_line(C.ADMIN)}\n")
    print(f"Members of {C.USER_GROUP} ({', '.join(C.USERS)}) are sent to the broker by"
          f" sshd's ForceCommand ({C.FORCE_COMMAND}); that works once the broker runs:\n")
    print(f"  {ssh_line(user)}\n")
    print("Stop everything with: make down")
    return 0 if check.returncode == 0 else 1
