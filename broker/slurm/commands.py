"""Pure argv builders for the SLURM commands the broker itself runs.

Submission and attach argv come from :mod:`broker.container` builders; these are
the queries and controls around them. Nothing here runs anything.
"""

from __future__ import annotations

from collections.abc import Iterable

from .parse import SQUEUE_FORMAT


def squeue_jobs(job_ids: Iterable[str]) -> list[str]:
    """One ``squeue`` for many jobs, every state, fixed format, no header."""
    ids = set(job_ids)
    for job_id in ids:
        if not job_id.isdigit():
            raise ValueError(f"job_id: must be digits (got {job_id!r})")
    ids = sorted(ids, key=int)
    return ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}", f"--jobs={','.join(ids)}"]


def squeue_all() -> list[str]:
    """Every job the controller knows (used once at start to find tagged jobs)."""
    return ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"]


def scancel(job_id: str, *, signal: str | None = None) -> list[str]:
    if not job_id.isdigit():
        raise ValueError(f"job_id: must be digits (got {job_id!r})")
    argv = ["scancel"]
    if signal:
        argv.append(f"--signal={signal}")
    return [*argv, job_id]


def sdiag() -> list[str]:
    return ["sdiag"]
