"""Admin and user commands over the socket: ls, show, kill, logs, events, attach.

What a caller may see is decided by the daemon (admins: everything; users: their
own sessions); this module only formats. Tables fit an 80-column terminal.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

from .client import BrokerError, Client, call


def run(ns: Any) -> int:
    try:
        return _COMMANDS[ns.command](ns)
    except BrokerError as exc:
        print(f"sbroker: {exc.message}", file=sys.stderr)
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


COLUMNS = (("USER", "user", 10), ("PROJECT", "project", 10), ("STATE", "state", 8), ("JOB", "job_id", 7),
           ("NODE", "node", 8), ("IMAGE", "image_version", 10), ("ATT", "attachers", 3),
           ("IDLE", "idle", 5), ("LEFT", "time_left", 9))


def format_table(sessions: list[dict[str, Any]]) -> str:
    """A fixed-width table no wider than 80 columns (long values are cut with '~')."""
    lines = [" ".join(f"{title:<{width}}" for title, _, width in COLUMNS).rstrip()]
    for s in sessions:
        cells = []
        for _, key, width in COLUMNS:
            value = s.get(key, "")
            if key == "idle":
                value = human_duration(float(value or 0))
            text = str(value if value not in (None, "") else "-")
            cells.append(f"{text if len(text) <= width else text[:width - 1] + '~':<{width}}")
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _show(ns: Any) -> int:
    session = call("show", session=ns.session)["session"]
    if ns.json:
        print(json.dumps(session, indent=2))
        return 0
    tail = session.pop("log_tail", "")
    width = max(len(k) for k in session)
    for key, value in session.items():
        print(f"{key:<{width}}  {value}")
    if tail:
        print("--- log tail ---")
        print(tail.rstrip())
    return 0


def _kill(ns: Any) -> int:
    session = call("kill", session=ns.session, reason=ns.reason)["session"]
    if ns.json:
        print(json.dumps(session, indent=2))
    else:
        print(f"{session['user']}/{session['project']} (job {session['job_id'] or '-'}): {session['state']}")
    return 0


def _logs(ns: Any) -> int:
    offset = -1
    while True:
        reply = call("logs", session=ns.session, offset=offset)
        sys.stdout.write(reply["data"])
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
                print(f"{stamp} {entry.get('event')} {rest}")
            since = max(since, float(entry.get("ts", 0)) + 1e-6)
        sys.stdout.flush()
        if not ns.follow:
            return 0
        time.sleep(1.0)


def _attach(ns: Any) -> int:
    from . import term

    return term.attach(ns.session, mode="observe" if ns.observe else "write", client=Client())


_COMMANDS = {"ls": _ls, "show": _show, "kill": _kill, "logs": _logs, "events": _events, "attach": _attach}
