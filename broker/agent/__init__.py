"""The third place sbroker code runs: in the allocation, as the user, on the compute node.

:mod:`broker.agent.sessionagent` is one self-contained standard-library file. The daemon
never imports it to run it: :mod:`broker.agentlaunch` reads its source and embeds it in the
session's batch script, which writes it into a private directory on the node and starts
it there. Nothing needs to be installed on compute nodes but ``python3`` (>= 3.9).

Every interactive login reaches its shell through it (:mod:`broker.agentlaunch` starts it
and builds the ``srun`` that attaches; :mod:`broker.agents` reads its status).

Trust: the agent runs with the user's identity only and holds only that user's shells;
anything it reports (activity, in a status file in ``slurm.job_dir``) is the user's word
and the daemon lets it affect that user's own session only.
"""
