"""Admin and user commands over the socket: ls, show, kill, logs, events, attach.

What a caller may see is decided by the daemon (admins: everything; users: their
own sessions); this module only formats. Tables fit an 80-column terminal.

Everything printed for a terminal goes through :mod:`broker.visible` first: session
fields, logs and audit entries hold text users chose, and an admin's terminal must
show escape sequences, never obey them. ``--json`` is printed with ASCII escapes
(``json.dumps`` default), which is lossless and holds no control byte either.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

from .client import BrokerError, Client, call
from .visible import visible_line, visible_log


def run(ns: Any) -> int:
    try:
        return _COMMANDS[ns.command](ns)
    except BrokerError as exc:
        print(f"sbroker: {visible_line(exc.message)}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sbroker: {exc}", file=sys.stderr)
        return 2


def _ls(ns: Any) -> int:
    sessions = call("list")["sessions"]
    if ns.json:
        print(json.dumps(sessions, indent=2))
        return 0
    print(format_table(sessions))
    return 0


#: (title, key, width): 11 columns + separators = 79. Full values are in ``--json`` and ``show``
#: (the instance name among them: the profile took its column, it says more in a list).
COLUMNS = (("USER", "user", 8), ("PROJECT", "project", 8), ("STATE", "state", 8), ("JOB", "job_id", 6),
           ("NODE", "node", 6), ("PROF", "profile", 6), ("IMAGE@DIGEST", "image", 13), ("A", "attachers", 1),
           ("IDLE", "idle", 4), ("LEFT", "time_left", 5), ("AGE", "age", 4))


def _cell(session: dict[str, Any], key: str, width: int) -> str:
    value = session.get(key, "")
    if key in ("idle", "age"):
        return human_duration(value) if isinstance(value, (int, float)) else "-"
    if key == "time_left":
        return compact_left(str(value or ""))
    if key == "instance":  # sb-<user>-<project>-<token>: the token is the unique part
        return str(value).rsplit("-", 1)[-1] if value else "-"
    if key == "attachers":
        n = value if isinstance(value, int) else 0
        return str(n) if n <= 9 else "+"
    if key == "image":
        version = str(session.get("image_version") or "") or str(value).rsplit("/", 1)[-1].removesuffix(".sif")
        digest = str(session.get("image_digest") or "").split(":")[-1][:6]
        if not digest:
            return version or "-"
        room = width - len(digest) - 1
        if len(version) > room:
            version = version[:room - 1] + "~"
        return f"{version}@{digest}"
    return str(value if value not in (None, "") else "-")


def format_table(sessions: list[dict[str, Any]]) -> str:
    """A fixed-width table no wider than 80 columns (long values are cut with '~')."""
    lines = [" ".join(f"{title:<{width}}" for title, _, width in COLUMNS).rstrip()]
    for s in sessions:
        cells = []
        for _, key, width in COLUMNS:
            text = visible_line(_cell(s, key, width))
            cells.append(f"{text if len(text) <= width else text[:width - 1] + '~':<{width}}")
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def compact_left(text: str) -> str:
    """``squeue %L`` (``1-02:03:04``, ``1:59:30``, ``45:10``) in at most 5 characters."""
    from .slurm.parse import parse_duration

    seconds = parse_duration(text) if text else None
    if seconds is None:
        return text or "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h" if days < 10 else f"{days}d"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m" if minutes >= 5 else f"{minutes * 60 + secs}s"


def _show(ns: Any) -> int:
    session = call("show", session=ns.session)["session"]
    if ns.json:
        print(json.dumps(session, indent=2))
        return 0
    tail = session.pop("log_tail", "")
    width = max(len(k) for k in session)
    for key, value in session.items():
        print(f"{visible_line(key):<{width}}  {visible_line(value)}")
    if tail:
        print("--- log tail ---")
        print(visible_log(str(tail)).rstrip())
    return 0


def _kill(ns: Any) -> int:
    session = call("kill", session=ns.session, reason=ns.reason)["session"]
    if ns.json:
        print(json.dumps(session, indent=2))
    else:
        print(visible_line(f"{session['user']}/{session['project']} (job {session['job_id'] or '-'}): "
                           f"{session['state']}"))
    return 0


def _extend(ns: Any) -> int:
    reply = call("extend", session=ns.session)
    if ns.json:
        print(json.dumps(reply, indent=2))
    else:
        print(visible_line(f"{reply['project']} (job {reply['job_id']}): time limit {reply['old']} -> {reply['new']}"
                           f" (at most {reply['max']} here)"))
    return 0


def _logs(ns: Any) -> int:
    offset = -1
    while True:
        reply = call("logs", session=ns.session, offset=offset)
        sys.stdout.write(visible_log(reply["data"]))
        sys.stdout.flush()
        offset = reply["offset"]
        if not ns.follow or reply["state"] in ("ended", "failed"):
            return 0
        time.sleep(0.5)


_SINCE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])(?:\s+ago)?$")


def parse_since(text: str, now: float | None = None) -> float:
    """Unix time from ``1700000000`` or a duration ago (``90s``, ``10m``, ``2h``, ``1d``)."""
    text = text.strip()
    now = time.time() if now is None else now
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = _SINCE_RE.match(text)
    if not match:
        raise ValueError(f"--since: must be unix seconds or a duration like 10m, 2h, 1d (got {text!r})")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return now - float(match.group(1)) * scale


def _events(ns: Any) -> int:
    since = parse_since(ns.since)
    while True:
        events = call("events", since=since)["events"]
        for entry in events:
            if ns.json:
                print(json.dumps(entry))
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("ts", 0)))
                rest = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("ts", "event"))
                print(visible_line(f"{stamp} {entry.get('event')} {rest}"))
            since = max(since, float(entry.get("ts", 0)) + 1e-6)
        sys.stdout.flush()
        if not ns.follow:
            return 0
        time.sleep(1.0)


def _attach(ns: Any) -> int:
    """One's own session: run the ``srun`` the broker names (straight to the session agent).
    Someone else's (administrators): the broker runs it as the owner and bridges it here."""
    from . import term
    from .login import run_exec

    if ns.observe and ns.write:
        raise ValueError("--write: cannot be combined with --observe")
    mode = "observe" if ns.observe else "write"
    client = Client()
    fields: dict[str, Any] = {"session": ns.session, **term.attach_request(mode)}
    if ns.write:
        fields["write_other"] = True
    try:
        reply = client.request("attach", **fields)
    except BaseException:
        client.close()
        raise
    if reply.get("type") == "result":
        client.close()
        return run_exec(reply["exec"])
    return term.attach(ns.session, mode=mode, client=client, requested=True, write_other=bool(ns.write),
                       first=reply)


def _reap(ns: Any) -> int:
    report = call("reap", dry_run=ns.dry_run)["report"]
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0
    verb = "would remove" if report["dry_run"] else "removed"
    for job in report["orphan_jobs"]:
        print(visible_line(f"orphan job {job['job_id']} ({job['user']}/{job['project']}): {job['why']} -> "
                           f"{'would cancel' if report['dry_run'] else 'cancelled'}"))
    for inst in report["stale_instances"]:
        print(visible_line(f"stale instance state {inst['path']}: {verb}"))
    for item in report["old_job_files"]:
        print(visible_line(f"old job file {item['path']} ({item['age_days']} days): {verb}"))
    for error in report["errors"]:
        print(visible_line(f"error: {error}"), file=sys.stderr)
    counts = [len(report[k]) for k in ("orphan_jobs", "stale_instances", "old_job_files")]
    print(f"reap: {counts[0]} orphan jobs, {counts[1]} stale instance dirs, {counts[2]} old job files "
          f"({report['seconds']}s)")
    return 1 if report["errors"] else 0


_COMMANDS = {"reap": _reap, "ls": _ls, "show": _show, "kill": _kill, "logs": _logs, "events": _events, "attach": _attach,
             "extend": _extend}
