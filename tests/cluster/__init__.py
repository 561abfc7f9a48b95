"""The local test bed: a real single-node SLURM cluster (munge, slurmctld, slurmd) and a
loopback sshd with a ForceCommand for test users. See README.md, "How tests run".

    python -m tests.cluster up|down|status|demo      (as root)

From Python: ``tests.cluster.up()``, ``down()``, ``status()``; constants in
``tests.cluster.config``.
"""

from .harness import HarnessError, down, forcecommand_match_block, status, up

__all__ = ["HarnessError", "up", "down", "status", "forcecommand_match_block"]
