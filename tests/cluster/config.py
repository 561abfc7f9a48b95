"""Fixed constants of the local test bed (SLURM + munge + loopback sshd).

Other test modules and the broker's test fixtures import these names; keep them stable.
Everything lives under ROOT so a system-wide SLURM/sshd is never touched: the daemons
and every client get ``SLURM_CONF`` from the environment (see ``slurm_env``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# --- layout -----------------------------------------------------------------------------
ROOT = Path("/opt/sbroker-testbed")
ETC = ROOT / "etc"            # world-readable: slurm.conf, sshd_config
BIN = ROOT / "bin"            # world-readable: the apptainer stand-in is installed here
IMAGES = ROOT / "images"      # world-readable: the test container image(s)
STATE = ROOT / "state"        # slurmctld/slurmd state (traverse-only for users; see harness)
LOG = ROOT / "log"            # root-only daemon logs
RUN = ROOT / "run"            # root-only pid files of the daemons *we* started
SSH_DIR = ROOT / "ssh"        # root-only: client key and sshd host keys

APPTAINER_BIN_DIR = BIN

# --- SLURM ------------------------------------------------------------------------------
SLURM_CONF = ETC / "slurm.conf"
CLUSTER_NAME = "sbtest"
SLURMCTLD_PORT = 16817
PARTITION = "compute"         # both nodes, least-loaded first (LLN), the default
NODE_CPUS = 64                # fake CPU slots per node (SlurmdParameters=config_overrides)
NODE_MEMORY_MB = 10000
DEF_MEM_PER_CPU_MB = 256
#: Fake GPUs per node (issue 16): SLURM accounts them as gres/gpu and sets CUDA_VISIBLE_DEVICES;
#: each is a character device 195:N (NVIDIA's major) under GPU_DEV_DIR/<node>/, gres.conf's File=.
GPUS_PER_NODE = 2
GPU_DEV_DIR = ROOT / "dev"
GRES_CONF = ETC / "gres.conf"
#: Slurmd's timeout: a node whose slurmd stops answering is DOWN (and its jobs NODE_FAIL)
#: within about this many seconds plus one ping interval.
SLURMD_TIMEOUT = 10

# --- compute nodes: each its own UTS + mount + PID namespace (tests/cluster/node-init.sh) --
#: name -> (address, slurmd port). Every node also has a partition of its own name, for
#: tests that must run on one given node.
NODES = {"node1": ("127.0.0.2", 16821), "node2": ("127.0.0.3", 16822)}
#: Login-node directories shared with the nodes besides /home and /opt (re-bound over the
#: nodes' private /run): munged's socket.
NODE_SHARED_DIRS = ("/run/munge",)

# --- a second login node: its own UTS + mount namespace (tests/cluster/login-init.sh) ---------
#: Its sshd listens on LOGIN2_SSH_PORT; inside it, the broker's socket and state dirs are
#: private tmpfs, so its broker is a second broker at the same paths, as on a real cluster.
LOGIN2 = "login2"
LOGIN2_SSH_PORT = 2823
LOGIN2_PRIVATE_DIRS = ("/run/sbroker-test", "/var/lib/sbroker-test")

# --- users ------------------------------------------------------------------------------
USER_GROUP = "sbroker-users"
ADMIN_GROUP = "sbroker-admins"
USERS = ("sbalice", "sbbob")  # ordinary users: supplementary group USER_GROUP
ADMIN = "sbadmin"             # group ADMIN_GROUP, NOT in USER_GROUP: gets a normal shell

# --- ssh --------------------------------------------------------------------------------
SSH_HOST = "127.0.0.1"
SSH_PORT = 2822
SSHD_CONFIG = ETC / "sshd_config"
SSH_KEY = SSH_DIR / "id_ed25519"
SSHD_LOG = LOG / "sshd.log"
# Usable with ssh, scp and sftp alike (all as -o options).
SSH_OPTS = [
    "-o", f"Port={SSH_PORT}",
    "-o", f"IdentityFile={SSH_KEY}",
    "-o", "IdentitiesOnly=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "LogLevel=ERROR",
]

# --- product ----------------------------------------------------------------------------
VENV = Path("/opt/sbroker/venv")
SBROKER_BIN = VENV / "bin" / "sbroker"
BROKER_SOCKET = Path("/run/sbroker-test/broker.sock")
#: session_scripts/sbroker-login installed for the bed (its socket set to BROKER_SOCKET): the
#: forced users' login shell on the login node and sshd's ForceCommand. `sbroker login`
#: takes its socket from this root-owned file only, never from the user's environment.
LOGIN_WRAPPER = BIN / "sbroker-login"
FORCE_COMMAND = str(LOGIN_WRAPPER)

REPO = Path(__file__).resolve().parents[2]


def hostname() -> str:
    """The login node's short hostname (SlurmctldHost); never a compute node's."""
    return socket.gethostname().split(".")[0]


def slurm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for SLURM clients/daemons that points at the test bed's slurm.conf."""
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = str(SLURM_CONF)
    return env


def ssh_command(user: str, *remote: str, tty: bool = False, port: int = SSH_PORT) -> list[str]:
    """argv for ``ssh`` as USER to the loopback sshd (root's client key); ``port=LOGIN2_SSH_PORT``
    reaches the second login node."""
    opts = [f"Port={port}" if o == f"Port={SSH_PORT}" else o for o in SSH_OPTS]  # ssh takes the first -o
    return ["ssh", *(["-tt"] if tty else []), *opts, f"{user}@{SSH_HOST}", *remote]


def as_user(user: str, *argv: str) -> list[str]:
    """argv to run ARGV as USER with the test bed's SLURM_CONF (for root-run tests)."""
    return ["runuser", "-u", user, "--", "env", f"SLURM_CONF={SLURM_CONF}", *argv]
