"""``sbroker extend``: raise a session job's time limit within the administrator's policy.

Why it is its own module: it is the one SLURM action the broker takes as **root**. SLURM lets
only root (or its administrator) raise a job's TimeLimit, so a user cannot do this with
their own ``scontrol``; everything else the broker does for a user runs as that user.
Before the root call, three checks, each on SLURM's word and none on the caller's:

1. the session is the caller's (the daemon resolves it for the peer's uid, admins included:
   an administrator has ``scontrol`` already and extends nobody's job through here);
2. the job's SLURM owner (numeric uid in ``squeue --json``) is the caller and its comment
   carries the broker's tag for that owner (a job the user merely named like a session is
   not one);
3. the policy (``[extend]``): a step, a maximum total, and optionally "only while nobody
   waits for the partition".

Then ``scontrol update JobId=J TimeLimit=M`` (through the one runner), an ``extend`` audit
entry with the old and new limit, a structured log line, and a word to the session's agent
(``srun`` into the job *as the owner*) so attached terminals learn the new end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import log as _log
from . import profiles
from . import protocol as p
from .agentlaunch import walltime_argv
from .agents import Agents
from .manager import Manager, SessionError
from .server import Connection, Server
from .session import State
from .slurm import commands
from .slurm.errors import SlurmError
from .slurm.parse import JobInfo

EXTENDABLE = frozenset({State.PENDING, State.STARTING, State.READY})


def decide(info: JobInfo, step: int, max_total: int, waiting: int, only_if_idle: bool) -> tuple[int, str]:
    """``(new limit in minutes, "")`` or ``(0, the one-line refusal)``. Pure.

    A step that would pass the maximum raises the limit to the maximum; a job already there
    is refused with the limit and what is left."""
    if info.time_limit < 0:
        return 0, f"extend: job {info.job_id} has no time limit to raise"
    if info.time_limit >= max_total:
        return 0, (f"extend: job {info.job_id} already has the longest time limit allowed here,"
                   f" {profiles.format_minutes(max_total)} ([extend] max_total); time left:"
                   f" {info.time_left or 'unknown'}")
    if only_if_idle and waiting:
        return 0, (f"extend: {waiting} job(s) wait for partition {info.partition}; extensions are only"
                   " granted while nobody waits there ([extend] only_if_idle_partition)")
    return min(info.time_limit + step, max_total), ""


def waiting_in(jobs: dict[str, JobInfo], partition: str) -> int:
    """Jobs PENDING in any of ``partition``'s names (a pending job may list several)."""
    mine = set(partition.split(","))
    return sum(1 for j in jobs.values() if j.state == "PENDING" and mine & set(j.partition.split(",")))


class Extender:
    """Answers ``extend``."""

    def __init__(self, manager: Manager, server: Server, agents: Agents) -> None:
        self.manager = manager
        self.server = server
        self.agents = agents
        self.log = _log.get("sbroker.extend")
        server.handlers["extend"] = self.op_extend

    async def op_extend(self, conn: Connection, message: dict[str, Any]) -> None:
        config = self.manager.config
        ref = p.get_str(message, "session", max_len=160) or config.default_project
        session = await self.manager.find(ref, conn.user, admin=False)
        step, max_total = profiles.minutes(config.extend_step), profiles.minutes(config.extend_max_total)
        if not config.extend_max_total or not step or not max_total:
            raise SessionError("extend_off", "extend: time limits cannot be extended here ([extend] max_total is"
                                             " not set); ask your administrator")
        if session.state not in EXTENDABLE or not session.job_id:
            raise SessionError("not_ready", f"extend: session {session.project} is {session.state.value}")
        try:
            jobs = await self.manager.scan(max_age=0.0)
        except (SlurmError, ValueError) as exc:
            raise SessionError("controller_unavailable",
                               f"extend: SLURM did not answer ({getattr(exc, 'reason', None) or exc})") from None
        info = jobs.get(session.job_id)
        tagged = self.manager.tagged(info) if info is not None else None
        if info is None or tagged is None or info.uid != conn.user.uid or tagged[0].uid != conn.user.uid:
            self.log.warning("extend_refused", user=conn.user.name, session=session.id, job_id=session.job_id,
                             rule="the job's SLURM owner is not the caller, or it is not a session job")
            raise SessionError("not_owner", f"extend: job {session.job_id} is not a session job of yours")
        info = dataclasses.replace(info, time_left=session.time_left)  # squeue --json has no %L
        new, refusal = decide(info, step, max_total, waiting_in(jobs, info.partition),
                              config.extend_only_if_idle_partition)
        if refusal:
            self.log.info("extend_refused", user=conn.user.name, session=session.id, job_id=info.job_id,
                          rule=refusal)
            raise SessionError("extend_refused", refusal)
        try:
            await self.manager.runner.run(commands.scontrol_time_limit(info.job_id, new))  # as root: see above
        except SlurmError as exc:
            self.log.error("extend_failed", user=conn.user.name, job_id=info.job_id, error=exc.reason)
            raise SessionError("extend_failed", f"extend: SLURM refused: {exc.reason}") from None
        old_text, new_text = profiles.format_minutes(info.time_limit), profiles.format_minutes(new)
        self.manager.audit.record("extend", user=session.user, project=session.project, session=session.id,
                                  job_id=info.job_id, by=conn.user.name, peer_uid=conn.user.uid,
                                  old=old_text, new=new_text)
        self.log.info("session_extended", session=session.id, user=session.user, project=session.project,
                      job_id=info.job_id, old=old_text, new=new_text)
        told = await self._tell_agent(session, conn)
        self.manager._wake.set()  # the next poll reads the new time left
        await conn.send({"type": "result", "session": session.id, "project": session.project,
                         "job_id": info.job_id, "old": old_text, "new": new_text,
                         "max": profiles.format_minutes(max_total), "terminals_told": told})

    async def _tell_agent(self, session: Any, conn: Connection) -> bool:
        """Ask the session's agent, as the owner, to re-read the job's end and tell its terminals."""
        status = await self.agents.locate(session)
        if status is None:
            return False
        try:
            await self.manager.runner.run(walltime_argv(session.job_id, status.dir, status.python), user=conn.user,
                                          timeout=20)
        except (SlurmError, ValueError) as exc:
            self.log.warning("extend_notice_failed", session=session.id, error=getattr(exc, "reason", str(exc)))
            return False
        return True


__all__ = ["Extender", "decide", "waiting_in"]
