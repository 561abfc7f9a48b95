"""Pure parsers for SLURM command output. No I/O here; tests feed them text."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

#: Fields the poll asks of ``squeue``, in this order: none of them is text a user controls
#: (the job name ``%j`` and comment ``%k`` may hold ``|`` and any line boundary, and users
#: change their own job's comment at will). ``%U`` is SLURM's numeric owner: the only owner.
POLL_FIELDS = ("%i", "%T", "%r", "%N", "%S", "%L", "%U", "%u")

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
    """The scheduler's view of one job. ``uid`` is SLURM's numeric owner; ``name`` and
    ``comment`` are the user's text (empty when the query did not ask for them)."""

    job_id: str
    state: str
    reason: str
    nodes: str
    start_time: str
    time_left: str
    user: str
    name: str
    comment: str
    uid: int = -1
    #: ``squeue --json`` only: the partition(s) and the time limit in minutes (-1: none or
    #: unknown), for ``sbroker extend``; the priority, for the queue position of a pending job.
    partition: str = ""
    time_limit: int = -1
    priority: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


ACTIVE_STATES = frozenset(
    ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "RESIZING", "REQUEUED", "STAGE_OUT", "SIGNALING")
)


def poll_format(token: str) -> str:
    """``--format`` for the poll: each record between a per-call random ``token`` and ``|``."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", token):
        raise ValueError("token: must be 16-64 lowercase hex digits")
    return "|".join((token, *POLL_FIELDS, token))


def parse_poll(text: str, token: str, asked: set[str]) -> dict[str, JobInfo]:
    """Parse the poll's ``squeue`` output strictly; only jobs that were ``asked`` for.

    A record is one line split on ``|`` into exactly ``len(POLL_FIELDS) + 2`` fields,
    framed by ``token`` on both sides, with a numeric job id and uid. Anything else is
    ignored, and so is every record of a job id that appears more than once: a forged line
    cannot carry the token, and if one ever did, the duplicate makes the job unknown rather
    than wrong (the truth table then waits out its grace period)."""
    seen: dict[str, JobInfo] = {}
    dup: set[str] = set()
    for line in text.split("\n"):
        parts = line.split("|")
        if len(parts) != len(POLL_FIELDS) + 2 or parts[0] != token or parts[-1] != token:
            continue
        job_id, state, reason, nodes, start, left, uid, user = parts[1:-1]
        if not (job_id.isdigit() and job_id.isascii() and uid.isdigit() and uid.isascii()) \
                or job_id not in asked:
            continue
        if job_id in seen:
            dup.add(job_id)
        seen[job_id] = JobInfo(job_id, state, reason, nodes, start, left, user, "", "", int(uid))
    return {k: v for k, v in seen.items() if k not in dup}


def parse_squeue_json(text: str) -> dict[str, JobInfo]:
    """Parse ``squeue --json`` (22.05: OpenAPI v0.0.38; it ignores filters, so this is every
    job the controller knows). JSON cannot be forged from inside a field, which makes it the
    form to use where the comment matters (adoption, the reaper). Raises ``ValueError``."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise ValueError("squeue --json: no jobs list")
    jobs: dict[str, JobInfo] = {}
    dup: set[str] = set()
    for job in data["jobs"]:
        if not isinstance(job, dict):
            continue
        job_id, uid = job.get("job_id"), job.get("user_id")
        if not isinstance(job_id, int) or isinstance(job_id, bool) or not isinstance(uid, int) \
                or isinstance(uid, bool):
            continue
        key = str(job_id)
        if key in jobs:
            dup.add(key)
        start = job.get("start_time")
        jobs[key] = JobInfo(
            key, _text(job.get("job_state")), _text(job.get("state_reason")), _text(job.get("nodes")),
            time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)) if isinstance(start, int) and start > 0
            else "N/A", "", _text(job.get("user_name")), _text(job.get("name")), _text(job.get("comment")), uid,
            _text(job.get("partition")), _int(job.get("time_limit"), -1), _int(job.get("priority"), 0))
    return {k: v for k, v in jobs.items() if k not in dup}


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


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
