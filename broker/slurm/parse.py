"""Pure parsers for SLURM command output. No I/O here; tests feed them text."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Fields asked of ``squeue`` in this order; ``%k`` (comment) last because only it
#: may contain the separator.
SQUEUE_FIELDS = ("%i", "%T", "%r", "%N", "%S", "%L", "%u", "%j", "%k")
SQUEUE_FORMAT = "|".join(SQUEUE_FIELDS)

_CONTROLLER_DOWN = (
    "unable to contact slurm controller",
    "socket timed out",
    "zero bytes were transmitted",
    "connection refused",
    "slurm_receive_msg",
    "communication connection failure",
)
_NOT_FOUND = ("invalid job id specified", "invalid job id", "job not found")


@dataclass(frozen=True)
class JobInfo:
    """One line of ``squeue``: the scheduler's view of a job."""

    job_id: str
    state: str
    reason: str
    nodes: str
    start_time: str
    time_left: str
    user: str
    name: str
    comment: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


ACTIVE_STATES = frozenset(
    ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "RESIZING", "REQUEUED", "STAGE_OUT", "SIGNALING")
)


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Parse ``squeue --noheader --format=SQUEUE_FORMAT`` output keyed by job id."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) != len(SQUEUE_FIELDS) or not parts[0].strip().isdigit():
            continue
        info = JobInfo(*(p.strip() for p in parts))
        jobs[info.job_id] = info
    return jobs


def parse_sbatch(text: str) -> str:
    """Return the job id from ``sbatch --parsable`` output (``id`` or ``id;cluster``)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    job_id = first.split(";", 1)[0].strip()
    if not job_id.isdigit():
        raise ValueError(f"sbatch output has no job id: {text.strip()[:200]!r}")
    return job_id


def classify_stderr(stderr: str) -> str:
    """Return ``"controller"``, ``"not_found"`` or ``"failed"`` for a failed command."""
    low = stderr.lower()
    if any(s in low for s in _CONTROLLER_DOWN):
        return "controller"
    if any(s in low for s in _NOT_FOUND):
        return "not_found"
    return "failed"


_TIME_RE = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


def parse_duration(text: str) -> int | None:
    """Seconds from a SLURM duration (``1-02:03:04``, ``02:03:04``, ``3:04``); None if unknown."""
    match = _TIME_RE.match(text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_comment(comment: str) -> dict[str, str]:
    """Read the broker's tags from a job comment (``sbroker/v1 key=value ...``)."""
    words = comment.split()
    if not words or words[0] != COMMENT_TAG:
        return {}
    tags = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            tags[key] = value
    return tags


COMMENT_TAG = "sbroker/v1"


def format_comment(tags: dict[str, str]) -> str:
    """The job comment carrying broker tags, so SLURM itself is the source of truth."""
    for key, value in tags.items():
        if not re.fullmatch(r"[a-z_]+", key) or not re.fullmatch(r"[A-Za-z0-9._:@+-]*", value):
            raise ValueError(f"comment tag {key}: value must match [A-Za-z0-9._:@+-]*")
    return " ".join([COMMENT_TAG, *(f"{k}={v}" for k, v in tags.items())])
