"""Queue feedback for a session that waits: is its partition busy, when does SLURM expect it
to start, and roughly how many jobs are ahead of it.

Pure functions over :class:`~broker.slurm.parse.JobInfo` (from ``squeue --json``, which no
user text can forge) and over ``sbatch --test-only``'s one line. The manager decides when to
ask; nothing here runs anything.
"""

from __future__ import annotations

import re

from .slurm.parse import JobInfo

#: ``sbatch: Job 3320 to start at 2026-12-03T07:10:00 using 1 processors on nodes node1 in
#: partition node1`` (SLURM 22.05; the id is a placeholder: nothing is submitted).
_TEST_ONLY_RE = re.compile(r"^sbatch: Job \d+ to start at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d) ", re.M)


def _partitions(info: JobInfo) -> set[str]:
    return {p for p in info.partition.split(",") if p}


#: Pending reasons that are about the job itself, not a full partition: such a job does not
#: make the partition busy for anyone else.
SELF_REASONS = frozenset({"Dependency", "DependencyNeverSatisfied", "JobHeldUser", "JobHeldAdmin", "BeginTime",
                          "AssocGrpJobsLimit", "AssocMaxJobsLimit", "QOSMaxJobsPerUserLimit"})


def waiting(jobs: dict[str, JobInfo], partition: str) -> int:
    """Jobs PENDING in ``partition`` for the partition's sake (a pending job may name several
    partitions; one held, waiting on a dependency or on its own limits does not count)."""
    return sum(1 for j in jobs.values()
               if j.state == "PENDING" and partition in _partitions(j) and j.reason not in SELF_REASONS)


def soon(start: str, now: float, within: float = 60.0) -> bool:
    """Whether a forecast ``start`` (``2026-12-03T07:10:00``, local time) is within ``within``
    seconds of ``now``: then there is nothing to choose."""
    import time

    try:
        return time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S")) - now <= within
    except ValueError:
        return False


def ahead(jobs: dict[str, JobInfo], job_id: str) -> int | None:
    """How many PENDING jobs sharing a partition with ``job_id`` come before it (higher
    priority, or equal priority and submitted earlier); None when the job is not pending.
    "Roughly": backfill may start a later, smaller job first."""
    mine = jobs.get(job_id)
    if mine is None or mine.state != "PENDING":
        return None
    parts = _partitions(mine)
    return sum(1 for j in jobs.values()
               if j.job_id != job_id and j.state == "PENDING" and parts & _partitions(j)
               and j.reason not in SELF_REASONS
               and (j.priority > mine.priority or (j.priority == mine.priority and int(j.job_id) < int(job_id))))


def forecast_start(stderr: str) -> str:
    """The expected start ``sbatch --test-only`` prints, or "" when it says none."""
    match = _TEST_ONLY_RE.search(stderr)
    return match.group(1) if match else ""
