"""``make demo`` (``python -m tests.cluster demo``): bring the test bed up and show how to
get a shell inside a SLURM allocation.

Steps:
  1. the test bed comes up (SLURM, munge, loopback sshd; the product installed into VENV);
  2. ``start_broker()`` starts the broker daemon -- a hook for the lead, not wired yet;
  3. with a broker: print the one ``ssh`` command that lands sbalice in a container shell;
     without one: submit a raw batch job as sbalice and print the ``srun --overlap --pty``
     command that attaches a shell to it, plus the ssh command for the admin.
"""

from __future__ import annotations

import pwd
import shlex
import subprocess
import time

from . import config as C
from . import harness

DEMO_JOB_NAME = "sbroker-demo"


def start_broker() -> bool:
    """Start the broker for the demo; return True once it listens on C.BROKER_SOCKET.

    Not wired yet (the broker daemon is being written): returns False, and the demo falls
    back to the raw sbatch + srun path."""
    return False


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
        print("The broker is running. Log in as a test user; you land in a container shell")
        print("inside a SLURM allocation:\n")
        print(f"    {ssh_line(user)}\n")
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
