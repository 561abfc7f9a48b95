"""Pure argv builders for the SLURM commands the broker itself runs.

Submission and attach argv come from :mod:`broker.container` builders; these are
the queries and controls around them. Nothing here runs anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .parse import poll_format


def squeue_jobs(job_ids: Iterable[str], token: str) -> list[str]:
    """One ``squeue`` for many jobs, every state, no header, in the poll's unforgeable
    format (:func:`~.parse.poll_format`; no user-controlled field)."""
    ids = set(job_ids)
    for job_id in ids:
        if not (job_id.isdigit() and job_id.isascii()):
            raise ValueError(f"job_id: must be digits (got {job_id!r})")
    ids = sorted(ids, key=int)
    return ["squeue", "--noheader", "--states=all", f"--format={poll_format(token)}", f"--jobs={','.join(ids)}"]


def squeue_all() -> list[str]:
    """Every job the controller knows, as JSON (adoption at start, the reaper): the one
    output whose user-controlled fields (name, comment) cannot forge a record."""
    return ["squeue", "--json"]


def squeue_steps(job_id: str) -> list[str]:
    """The steps of one job, ids only (``J.batch``, ``J.extern``, ``J.0``...): no user text."""
    if not (job_id.isdigit() and job_id.isascii()):
        raise ValueError(f"job_id: must be digits (got {job_id!r})")
    return ["squeue", "--noheader", "--steps", f"--jobs={job_id}", "--format=%i"]


def squeue_agent_steps(job_ids: Iterable[str]) -> list[str]:
    """The running steps of many jobs, ids only (``J.0``...): the immediate sessions' check
    that their agent step still runs (broker.launch). No user-controlled field."""
    ids = set(job_ids)
    for job_id in ids:
        if not (job_id.isdigit() and job_id.isascii()):
            raise ValueError(f"job_id: must be digits (got {job_id!r})")
    return ["squeue", "--noheader", "--steps", f"--jobs={','.join(sorted(ids, key=int))}", "--format=%i"]


def scancel(job_id: str, *, signal: str | None = None) -> list[str]:
    if not job_id.isdigit():
        raise ValueError(f"job_id: must be digits (got {job_id!r})")
    argv = ["scancel"]
    if signal:
        argv.append(f"--signal={signal}")
    return [*argv, job_id]


def node_addr(node: str) -> list[str]:
    """``NODE_ADDR`` of one node (how the login node reaches it: the direct streams)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", node):
        raise ValueError(f"node: must be a plain node name (got {node!r})")
    return ["sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%N %o"]


def sinfo_partitions() -> list[str]:
    """Each partition with the gres its nodes offer (``compute gpu:2``): ``check-config``'s
    view of what profiles may ask for. Admin-defined names only, no user text."""
    return ["sinfo", "--noheader", "--format=%R %G"]


def scontrol_time_limit(job_id: str, minutes: int) -> list[str]:
    """Raise (or set) a job's time limit: the one SLURM action the broker takes as root
    (``sbroker extend``; only root or SLURM's administrator may raise a TimeLimit)."""
    if not (job_id.isdigit() and job_id.isascii()):
        raise ValueError(f"job_id: must be digits (got {job_id!r})")
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= 525600 * 10:
        raise ValueError(f"minutes: must be a whole number of minutes (got {minutes!r})")
    return ["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"]


def sdiag() -> list[str]:
    return ["sdiag"]
