"""Append-only audit trail (JSON lines in the state dir): who did what, when, why.

Layout (``<log>`` is ``broker.audit_log``, default ``<state_dir>/audit.jsonl``)::

    <log>, <log>.1 ... <log>.<keep>                every entry, newest file first
    <log>.users/<user>.jsonl, <user>.jsonl.1 ...    the entries whose ``user`` is <user>

Each line is written to the full log and, when it is about a user, to that user's
own file. Every file rotates by size (``audit.max_bytes`` / ``audit.user_max_bytes``)
into a bounded number of older files (``audit.keep`` / ``audit.user_keep``); the
oldest falls off. So the trail's disk use is bounded, and one user who makes the
broker write many lines about themselves rotates away only their own history and
the shared log's oldest lines, never stalls anyone.

Reading (``events``) walks a user's own files, or for admins the full log, from the
newest line backwards and stops at ``since`` or ``limit``: its cost is the number of
entries the caller gets back, not the size of the trail. Reads run on a small
dedicated thread pool, never on the event loop, and the reply is encoded there too.

Writing the audit log must never take the daemon down: a full disk is logged as an
error and counted, and the operation it records goes on.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import log as _log
from . import protocol as p

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")
_BLOCK = 64 * 1024
#: How long a repeated no-op line (same key) is suppressed, and how many keys are remembered.
NOOP_WINDOW = 3600.0
NOOP_KEYS = 4096


@dataclass(frozen=True)
class Rotation:
    """Size-based rotation of the full log and of each user's file (``[audit]`` in broker.toml)."""

    max_bytes: int = 64 * 1024 * 1024
    keep: int = 5
    user_max_bytes: int = 1024 * 1024
    user_keep: int = 2


class Audit:
    def __init__(self, path: Path, rotation: Rotation | None = None) -> None:
        self.path = Path(path)
        self.rotation = rotation or Rotation()
        self.user_dir = self.path.with_name(self.path.name + ".users")
        self.failures = 0
        self.rotations = 0
        #: No-op lines not written because the same one was written within NOOP_WINDOW.
        self.suppressed = 0
        #: key -> [monotonic time of the line written, repeats suppressed since], oldest first.
        self._noop: collections.OrderedDict[tuple[Any, ...], list[float]] = collections.OrderedDict()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="audit-read")
        self._log = _log.get("sbroker.audit")

    # ------------------------------------------------------------------ writing

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": time.time(), "event": event, **fields}
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        rot = self.rotation
        self._append(self.path, line, rot.max_bytes, rot.keep, event)
        user = fields.get("user")
        if isinstance(user, str) and user:
            self._append(self.user_file(user), line, rot.user_max_bytes, rot.user_keep, event)
        return entry

    def record_noop(self, key: tuple[Any, ...], event: str, **fields: Any) -> dict[str, Any] | None:
        """Record a request that changed nothing, at most once per ``key`` per :data:`NOOP_WINDOW`.

        A user may repeat such a request (``kill`` of an ended session) as fast as they
        can connect; each would otherwise be one more line for everyone's log. The
        first is kept, repeats are counted (``suppressed``) and the next line written
        for the key after the window carries the count as ``repeated``.
        """
        now = time.monotonic()
        state = self._noop.get(key)
        if state is not None and now - state[0] < NOOP_WINDOW:
            state[1] += 1
            self.suppressed += 1
            return None
        repeated = int(state[1]) if state is not None else 0
        self._noop[key] = [now, 0]
        self._noop.move_to_end(key)
        while len(self._noop) > NOOP_KEYS:
            self._noop.popitem(last=False)
        return self.record(event, **fields, **({"repeated": repeated} if repeated else {}))

    def user_file(self, user: str) -> Path:
        """``<log>.users/<user>.jsonl``; a name that is not a plain account name is hex-encoded."""
        name = user if _SAFE_NAME.fullmatch(user) else "~" + user.encode()[:128].hex()
        return self.user_dir / f"{name}.jsonl"

    def _append(self, path: Path, line: bytes, max_bytes: int, keep: int, event: str) -> None:
        try:
            fd = self._open_append(path)
            try:
                size = os.fstat(fd).st_size
                if size and size + len(line) > max_bytes:
                    os.close(fd)
                    fd = -1
                    self._rotate(path, keep, size)
                    fd = self._open_append(path)
                os.write(fd, line)
            finally:
                if fd >= 0:
                    os.close(fd)
        except OSError as exc:
            self.failures += 1
            self._log.error("audit_write_failed", path=str(path), error=str(exc), audit_event=event)

    def _open_append(self, path: Path) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            if path.parent != self.user_dir:
                raise
            self.user_dir.mkdir(mode=0o700, exist_ok=True)
            return os.open(path, flags, 0o600)

    def _rotate(self, path: Path, keep: int, size: int) -> None:
        """``path`` -> ``path.1`` -> ... -> ``path.<keep>``; the oldest is replaced (dropped)."""
        if keep < 1:
            os.unlink(path)
        else:
            for i in range(keep - 1, 0, -1):
                try:
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
                except FileNotFoundError:
                    pass
            os.replace(path, f"{path}.1")
        self.rotations += 1
        self._log.info("audit_rotated", path=str(path), size=size, keep=keep)

    # ------------------------------------------------------------------ reading

    def read(self, *, since: float = 0.0, limit: int = 1000, users: set[str] | None = None) -> list[dict[str, Any]]:
        """Entries at or after ``since`` (newest last), optionally only about ``users``.

        Blocking file I/O: call it from a thread (:meth:`reply` does).
        """
        if users is None:
            return _newest(self._files(self.path, self.rotation.keep), since, limit, lambda e: True)
        out: list[dict[str, Any]] = []
        for user in users:
            mine = _newest(self._files(self.user_file(user), self.rotation.user_keep), since, limit,
                           lambda e, user=user: e.get("user") == user)
            out.extend(mine)
        out.sort(key=lambda e: e.get("ts", 0) if isinstance(e.get("ts"), (int, float)) else 0)
        return out[-limit:]

    async def reply(self, *, since: float, limit: int, users: set[str] | None, max_json: int) -> bytes:
        """The framed ``events`` result, read and encoded on the audit reader threads."""

        def work() -> bytes:
            entries = self.read(since=since, limit=limit, users=users)
            return p.encode_json({"type": "result", "events": entries}, max_json=max_json)

        return await asyncio.get_running_loop().run_in_executor(self._readers, work)

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _files(path: Path, keep: int) -> list[Path]:
        return [path, *(Path(f"{path}.{i}") for i in range(1, keep + 1))]


def _newest(paths: list[Path], since: float, limit: int,
            wanted: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Up to ``limit`` wanted entries at or after ``since`` from ``paths`` (newest file first).

    All files are opened before any is read, newest first, and a file seen twice
    (same inode) is read once: a rotation that happens meanwhile renames the open
    newest file to ``.1``, so nothing is skipped or doubled.
    """
    fds: list[int] = []
    seen: set[tuple[int, int]] = set()
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                continue
            except OSError:
                continue  # not a regular file we may read (a planted link, a fifo): skip it
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                os.close(fd)
                continue
            seen.add((st.st_dev, st.st_ino))
            fds.append(fd)
        out: list[dict[str, Any]] = []
        for fd in fds:
            for raw in _lines_backwards(fd):
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(entry, dict):
                    continue
                ts = entry.get("ts", 0)
                if isinstance(ts, (int, float)) and ts < since:
                    return out[::-1]
                if wanted(entry):
                    out.append(entry)
                    if len(out) >= limit:
                        return out[::-1]
        return out[::-1]
    finally:
        for fd in fds:
            os.close(fd)


def _lines_backwards(fd: int) -> Iterator[bytes]:
    """The complete lines of an open file, last first, read in blocks from the end."""
    end = os.fstat(fd).st_size
    pos = end
    rest = b""
    while pos > 0:
        size = min(_BLOCK, pos)
        pos -= size
        block = os.pread(fd, size, pos) + rest
        lines = block.split(b"\n")
        rest = lines[0]  # maybe the tail of a line that starts in an earlier block
        for line in reversed(lines[1:]):
            if line:
                yield line
    if rest:
        yield rest
