"""The immediate launch mode: an interactive allocation and a held agent step (pure builders).

A batch job waits for the controller's scheduling pass (``sched_min_interval``, about once a
second); an interactive allocation does not: ``salloc --no-shell`` is granted inside the
submitting RPC when the resources are free (15-30 ms on an idle node). ``[slurm] launch =
"immediate"`` uses it:

1. ``salloc --no-shell --immediate`` (as the user, through the runner), tagged and sized
   exactly like the batch job. ``--dependency=singleton`` cannot be used (SLURM refuses an
   immediate request with a dependency), so one allocation per (user, project) comes from
   the broker's scan before and after the allocation (:mod:`broker.manager`). When the
   resources are busy the request fails at once and the session is queued as a batch job:
   immediate when it can be, queued when it must.
2. The start script runs as the allocation's first step, ``srun --overlap`` (step ``J.0``),
   whose output goes to the same log the batch job writes, with the same markers. An
   allocation has no batch step, and every other step dies with its ``srun`` client, so
   that client is held by a **holder** outside the broker: a broker restart, crash or
   upgrade does not touch it. When the step ends (the session ended), the holder releases
   the allocation (``scancel``), as the end of a batch script does.

What a lost login node does, stated in ``docs/admin.md``: the holder's ``srun`` only
launches the step. The step's output goes to a file, so its ``slurmstepd`` needs nothing from
``srun`` and the step, its instance and its shells outlive it (checked on the bed: a ``kill -9``
of the holder's process group leaves the step, the shells and their variables; a session
reached through another login node goes on). What is lost with the holder is the release of
the allocation when the step ends: a broker (on any login node) that sees the allocation
running without its agent step for :data:`broker.manager.AGENT_STEP_GRACE` releases it,
with a reason that says so. A signal to the holder (``SIGTERM``/``SIGINT``) is forwarded to
the step by ``srun`` and ends the session: that is why the holder is in a session (and, under
systemd, a unit) of its own, where no terminal and no stop of ``sbroker.service`` reach it.

``InactiveLimit`` does not apply: since SLURM 20.02 ``salloc --no-shell`` jobs have no
allocating command to ping (SchedMD commit 874442f, "Don't check InactiveLimit for salloc
--no-shell jobs"), so the allocation ends only by ``scancel`` or its time limit.

Holders: ``setsid`` (a detached session of its own, reparented to init; the only kind this
test bed, without systemd, can run) and ``systemd-run`` (a transient unit outside the
broker's cgroup, which ``KillMode=mixed`` of ``sbroker.service`` would otherwise kill on a
restart). ``auto`` picks ``systemd-run`` when systemd is PID 1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from . import profiles
from .container._validate import validate_job_id
from .container.apptainer._builders import _slurm_resource_flags

#: The agent step's name (``squeue --steps``) and its id: the allocation's first step.
STEP_NAME = "sbroker-agent"
STEP_ID = "0"
#: bash reads the start script from srun's stdin into memory, then runs it with stdin at end of
#: file: a command in the script that reads stdin can never eat the script's own text.
_RUN_STDIN = 'exec /bin/bash -c "$(cat)" sbroker-start-script </dev/null'
#: What the holder runs as the user: the agent step; when it ends, the allocation is released.
_HOLD = 'srun "$@"; exec scancel --quiet "$SBROKER_JOB_ID"'
_GRANTED_RE = re.compile(r"Granted job allocation (\d{1,12})\b")
HOLDERS = ("auto", "setsid", "systemd-run")


def salloc_argv(*, job_name: str, partition: str, time_limit: str, cpus: int, memory_gb: int,
                profile: profiles.Profile, comment: str, home: str) -> list[str]:
    """``salloc --no-shell --immediate`` with the batch job's name, size, tags and directory."""
    return ["salloc", "--no-shell", "--immediate",
            *_slurm_resource_flags(partition, time_limit, cpus, memory_gb),
            f"--job-name={job_name}", *profiles.sbatch_flags(profile), f"--comment={comment}",
            f"--chdir={home}"]


def parse_salloc(stderr: str) -> str:
    """The job id from salloc's ``Granted job allocation N``; ``ValueError`` when absent."""
    found = _GRANTED_RE.search(stderr)
    if found is None:
        raise ValueError(f"salloc: no 'Granted job allocation' in its output ({stderr.strip()[-200:]!r})")
    return validate_job_id(found.group(1))


def step_argv(job_id: str, log_path: str) -> list[str]:
    """The agent step's ``srun`` options and command (the start script comes on stdin)."""
    return ["--overlap", f"--jobid={validate_job_id(job_id)}", "--ntasks=1", "--nodes=1",
            f"--job-name={STEP_NAME}", f"--output={log_path}", "--open-mode=append", "--quiet",
            "/bin/bash", "-c", _RUN_STDIN]


def holder_argv(kind: str, job_id: str, log_path: str, *, uid: int, gid: int,
                stdin_path: str) -> list[str]:
    """The holder's argv, as the runner starts it (the runner drops to the user for ``setsid``;
    ``systemd-run`` is started as root and tells systemd the user, groups included).

    ``stdin_path`` is the broker's root-only copy of the start script: the ``setsid`` holder
    gets it as an open descriptor, ``systemd-run`` has systemd open it."""
    job_id = validate_job_id(job_id)
    hold = ["/bin/sh", "-c", _HOLD, "sbroker-holder", *step_argv(job_id, log_path)]
    if kind == "setsid":
        return ["setsid", "--fork", *hold]
    if kind == "systemd-run":
        return ["systemd-run", "--quiet", "--collect", f"--unit=sbroker-hold-{job_id}",
                f"--uid={int(uid)}", f"--gid={int(gid)}", f"--setenv=SBROKER_JOB_ID={job_id}",
                f"--property=StandardInput=file:{stdin_path}", "--property=StandardOutput=journal",
                "--property=KillMode=mixed", "--", *hold]
    raise ValueError(f"slurm.holder: must be one of {', '.join(HOLDERS)} (got {kind!r})")


def choose_holder(kind: str) -> str:
    """``auto``: ``systemd-run`` when systemd runs this machine (its cgroups would otherwise
    take the holders down with the broker), ``setsid`` elsewhere."""
    if kind != "auto":
        return kind
    return "systemd-run" if os.path.isdir("/run/systemd/system") else "setsid"


def steps_with_agent(lines: Sequence[str]) -> set[str]:
    """The jobs whose agent step runs, from ``squeue --steps --format=%i`` lines (``J.0``)."""
    jobs = set()
    for line in lines:
        job, _, step = line.strip().partition(".")
        if step == STEP_ID and job.isdigit():
            jobs.add(job)
    return jobs
