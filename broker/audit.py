"""Append-only audit trail (JSON lines in the state dir): who did what, when, why.

Writing the audit log must never take the daemon down: a full disk is logged as an
error and counted, and the operation it records goes on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import log as _log


class Audit:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.failures = 0
        self._log = _log.get("sbroker.audit")

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": time.time(), "event": event, **fields}
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            self.failures += 1
            self._log.error("audit_write_failed", path=str(self.path), error=str(exc), audit_event=event)
        return entry

    def read(self, *, since: float = 0.0, limit: int = 1000, users: set[str] | None = None) -> list[dict[str, Any]]:
        """Entries at or after ``since`` (newest last), optionally only about ``users``."""
        try:
            with open(self.path, "rb") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for raw in lines:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("ts", 0) < since:
                continue
            if users is not None and entry.get("user") not in users:
                continue
            out.append(entry)
        return out[-limit:]
