"""Per-user limits: what one user may hold of what every user shares (issue 14, item 4).

The daemon, its cgroup (``TasksMax``), its event loop and the scheduler are shared by every
user of the login node. Without a bound a single user (a script, a typo in a loop) could
hold thousands of connections, sessions or pending jobs and leave nothing for anyone
else. Each check here is a pure function over what the daemon already tracks; a refusal is
one line naming the config key and the rule, shown to the user as is. Connections are
counted where they live (server.py); shells and commands live in each session's agent,
which enforces ``limits.shells_per_user``, ``detached_shells_per_user`` and
``commands_per_session`` per session (broker/agent/sessionagent.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import Config
from .session import Session, State

#: States of a session whose job is asked for but not running an instance yet.
WAITING = frozenset({State.REQUESTED, State.SUBMITTED, State.PENDING, State.STARTING})


def new_session_refusal(config: Config, user: str, sessions: Iterable[Session]) -> str | None:
    """Why ``user`` may not start one more session now, or None if they may."""
    mine = [s for s in sessions if s.user == user and s.live]
    if len(mine) >= config.limit_sessions:
        return (f"limits.sessions_per_user: you have {len(mine)} live sessions, the most allowed is "
                f"{config.limit_sessions}; end one (sbroker kill <project>) first")
    waiting = sum(1 for s in mine if s.state in WAITING or (s.state == State.UNKNOWN and s.prev_state in WAITING))
    if waiting >= config.limit_pending:
        return (f"limits.pending_per_user: {waiting} of your sessions are still waiting for SLURM, the most "
                f"allowed is {config.limit_pending}; wait for one to start or end one")
    return None
