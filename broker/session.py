"""The session model: one (user, project) shell environment backed by one SLURM job.

States and the transitions allowed between them live here and nowhere else::

    requested → submitted → pending → starting → ready → ending → ended
                    └──────────┴─────────┴────────→ failed (with a reason)

``unknown`` is entered from any live state when the controller does not answer;
the state before it is kept in ``prev_state`` and restored when it answers again.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class State(str, enum.Enum):
    REQUESTED = "requested"
    SUBMITTED = "submitted"
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"
    UNKNOWN = "unknown"


TERMINAL = frozenset({State.ENDED, State.FAILED})
#: States in which a job exists (or may exist) in SLURM.
WITH_JOB = frozenset({State.SUBMITTED, State.PENDING, State.STARTING, State.READY, State.ENDING, State.UNKNOWN})

_ALLOWED: dict[State, frozenset[State]] = {
    State.REQUESTED: frozenset({State.SUBMITTED, State.FAILED}),
    State.SUBMITTED: frozenset({State.PENDING, State.STARTING, State.READY, State.ENDING, State.FAILED, State.UNKNOWN}),
    State.PENDING: frozenset({State.STARTING, State.READY, State.ENDING, State.FAILED, State.UNKNOWN}),
    State.STARTING: frozenset({State.READY, State.ENDING, State.FAILED, State.UNKNOWN}),
    State.READY: frozenset({State.ENDING, State.ENDED, State.UNKNOWN}),
    State.ENDING: frozenset({State.ENDED, State.FAILED, State.UNKNOWN}),
    State.UNKNOWN: frozenset({State.SUBMITTED, State.PENDING, State.STARTING, State.READY, State.ENDING,
                              State.ENDED, State.FAILED}),
    State.ENDED: frozenset(),
    State.FAILED: frozenset(),
}


class TransitionError(ValueError):
    """A state change the model does not allow (a bug, never user input)."""


@dataclass
class Session:
    user: str
    uid: int
    project: str
    #: The profile (broker.profiles) the session's job was sized by; an attribute, not part of
    #: the key: one session per (user, project) whatever its profile. "" = not known (a job
    #: adopted whose tag names no profile of this config).
    profile: str = ""
    #: How its job was made: "batch" (sbatch) or "immediate" (salloc and a held agent step,
    #: broker.launch). Tagged in the job's comment, so every login node's broker knows it.
    launch: str = "batch"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: State = State.REQUESTED
    prev_state: State | None = None
    reason: str = ""
    job_id: str = ""
    node: str = ""
    instance: str = ""
    image: str = ""
    image_digest: str = ""
    script_path: str = ""
    log_path: str = ""
    pending_reason: str = ""
    expected_start: str = ""
    #: PENDING: roughly how many pending jobs of its partition come first (-1: not known).
    queue_ahead: int = -1
    time_left: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    submitted_at: float = 0.0
    running_at: float = 0.0
    ready_at: float = 0.0
    ended_at: float = 0.0
    last_activity: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.project)

    @property
    def live(self) -> bool:
        return self.state not in TERMINAL

    def can_move(self, new: State) -> bool:
        return new == self.state or new in _ALLOWED[self.state]

    def move(self, new: State, reason: str = "") -> State:
        """Change state; returns the old one. Raises :class:`TransitionError` if not allowed."""
        old = self.state
        if new == old:
            if reason:
                self.reason = reason
            return old
        if new not in _ALLOWED[old]:
            raise TransitionError(f"session {self.id}: {old.value} → {new.value} is not allowed")
        if new == State.UNKNOWN:
            self.prev_state = old
        elif old == State.UNKNOWN:
            self.prev_state = None
        self.state = new
        if reason:
            self.reason = reason
        now = time.time()
        self.updated = now
        if new in TERMINAL:
            self.ended_at = now
        if new == State.READY and not self.ready_at:
            self.ready_at = now
        return old

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["prev_state"] = self.prev_state.value if self.prev_state else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["state"] = State(values["state"])
        values["prev_state"] = State(values["prev_state"]) if values.get("prev_state") else None
        return cls(**values)
