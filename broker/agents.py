"""What the daemon knows of each session's agent: its status file, read as the user, cached.

The agent (:mod:`broker.agent.sessionagent`) writes ``{instance}.agent.json`` beside the
job log in ``slurm.job_dir`` when terminals attach or detach and, at most every 15 s,
when keys are typed. The daemon reads it with the owner's file-system identity
(:mod:`broker.userfs`), in a worker thread, at most every :data:`MAX_AGE` seconds per
session: one small read instead of carrying every terminal's bytes.

Trust: the file is the user's to write. Every field is checked (types, ranges, plain
absolute paths), a bad file reads as "no status", and what it says only ever affects the
owner's own session: whether it counts as attached (idle culling), the counts ``ls``
shows, and the directory and python the owner's own ``srun`` runs in the owner's own job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from . import userfs
from .agentlaunch import KEY_SUFFIX, STATUS_SUFFIX, safe_path
from .identity import UnknownUser, lookup_name
from .manager import Manager
from .session import Session

#: How old a cached status may be for policy, ``ls`` and ``show`` (an attach uses the cached
#: one: the directory and python it needs do not change during a job).
MAX_AGE = 10.0
MAX_STATUS_BYTES = 4096
_COUNTS = ("pid", "shells", "writers", "observers", "detached", "commands", "port")
_TIMES = ("started", "time", "last_input", "last_attach")


@dataclass(frozen=True)
class AgentStatus:
    dir: str
    python: str
    pid: int
    shells: int
    writers: int
    observers: int
    detached: int
    commands: int
    port: int
    started: float
    time: float
    last_input: float
    last_attach: float

    @property
    def attachers(self) -> int:
        return self.writers + self.observers

    @property
    def busy(self) -> bool:
        """A terminal is attached or a command runs over a direct stream: the session is in use."""
        return bool(self.attachers or self.commands)


def parse_status(data: bytes) -> AgentStatus | None:
    """A validated :class:`AgentStatus`, or None for anything else (never raises)."""
    try:
        raw = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("v") != 1:
        return None
    directory, python = safe_path(raw.get("dir")), safe_path(raw.get("python"))
    if directory is None or python is None:
        return None
    values: dict[str, Any] = {"dir": directory, "python": python}
    for key in _COUNTS:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (65536 if key == "port" else 1 << 31):
            return None
        values[key] = value
    now = time.time()
    for key in _TIMES:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= now + 86400:
            return None
        values[key] = float(value)
    return AgentStatus(**values)


def status_file(session: Session) -> str:
    """``{instance}.agent.json`` beside the session's job log (both in ``slurm.job_dir``)."""
    if not session.log_path or not session.instance:
        return ""
    return str(Path(session.log_path).with_name(f"{session.instance}{STATUS_SUFFIX}"))


def key_file(session: Session) -> str:
    """The agent's session key beside the job log (the user's file, mode 0600)."""
    return str(Path(session.log_path).with_name(f"{session.instance}{KEY_SUFFIX}"))


class Agents:
    """Cached agent status per session; plugs ``attachers``/``shells`` into ``ls`` and ``show``."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self._cache: dict[str, tuple[float, str, AgentStatus | None]] = {}

    def cached(self, session: Session) -> AgentStatus | None:
        entry = self._cache.get(session.id)
        return entry[2] if entry is not None and entry[1] == session.job_id else None

    async def status_of(self, session: Session, max_age: float = MAX_AGE) -> AgentStatus | None:
        """The agent's status, read again when the cached one is older than ``max_age``."""
        entry = self._cache.get(session.id)
        now = time.monotonic()
        if entry is not None and entry[1] == session.job_id and now - entry[0] < max_age:
            return entry[2]
        status = await self._read(session)
        self._cache[session.id] = (now, session.job_id, status)
        return status

    async def locate(self, session: Session, attempts: int = 10) -> AgentStatus | None:
        """A status to attach by: the cached one, else read (bounded retries, 0.2 s apart).

        A job is ready only once its agent has written the file, but shared storage may
        show a file created on another machine a moment late (attribute caching).
        """
        status = self.cached(session)
        for attempt in range(attempts):
            if status is not None:
                return status
            if attempt:
                await anyio.sleep(0.2)
            status = await self.status_of(session, max_age=0.0)
        return status

    async def refresh(self, sessions: list[Session]) -> None:
        for session in sessions:
            if session.job_id and session.live:
                await self.status_of(session)

    async def _read(self, session: Session) -> AgentStatus | None:
        path = status_file(session)
        if not path:
            return None
        try:
            owner = lookup_name(session.user)
        except UnknownUser:
            return None
        data, _ = await anyio.to_thread.run_sync(userfs.read_from, owner, path, 0, MAX_STATUS_BYTES)
        return parse_status(data) if data else None

    def prune(self, live: set[str]) -> None:
        """Drop the cache of sessions no longer tracked."""
        for sid in [sid for sid in self._cache if sid not in live]:
            del self._cache[sid]

    def describe(self, session: Session) -> dict[str, Any]:
        status = self.cached(session)
        return {"attachers": status.attachers if status else 0, "shells": status.shells if status else 0,
                "detached_shells": status.detached if status else 0,
                "commands": status.commands if status else 0}

    def attached_sessions(self) -> int:
        live = {s.id for s in self.manager.by_key.values() if s.live}
        return sum(1 for sid, (_, _, status) in self._cache.items()
                   if sid in live and status is not None and status.attachers)


__all__ = ["AgentStatus", "Agents", "key_file", "parse_status", "status_file"]
