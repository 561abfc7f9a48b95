"""Session persistence: SQLite in the state dir, WAL mode, versioned schema.

The store exists so a broker restart forgets nothing: on start the manager loads
every live session and reconciles it with SLURM. Rows are whole JSON documents of
:class:`~broker.session.Session` plus indexed columns for lookups.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from .session import Session, TERMINAL

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id       TEXT PRIMARY KEY,
    user     TEXT NOT NULL,
    project  TEXT NOT NULL,
    state    TEXT NOT NULL,
    job_id   TEXT NOT NULL DEFAULT '',
    updated  REAL NOT NULL,
    doc      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_key ON sessions (user, project);
CREATE INDEX IF NOT EXISTS sessions_state ON sessions (state);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        os.chmod(path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"store {path}: schema version {version} is newer than this broker ({SCHEMA_VERSION})")
        self.db.executescript(_SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def save(self, session: Session) -> None:
        self.db.execute(
            "INSERT INTO sessions (id, user, project, state, job_id, updated, doc) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET state=excluded.state, job_id=excluded.job_id, "
            "updated=excluded.updated, doc=excluded.doc",
            (session.id, session.user, session.project, session.state.value, session.job_id,
             session.updated, json.dumps(session.to_dict())),
        )

    def live(self) -> list[Session]:
        """Every session not yet ended or failed."""
        terminal = tuple(s.value for s in TERMINAL)
        rows = self.db.execute(
            "SELECT doc FROM sessions WHERE state NOT IN (?, ?) ORDER BY updated", terminal).fetchall()
        return [Session.from_dict(json.loads(doc)) for (doc,) in rows]

    def get(self, session_id: str) -> Session | None:
        row = self.db.execute("SELECT doc FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return Session.from_dict(json.loads(row[0])) if row else None

    def recent(self, limit: int = 200) -> list[Session]:
        rows = self.db.execute("SELECT doc FROM sessions ORDER BY updated DESC LIMIT ?", (limit,)).fetchall()
        return [Session.from_dict(json.loads(doc)) for (doc,) in rows]

    def prune_finished(self, before: float) -> int:
        """Delete ended and failed sessions last updated before ``before``; return how many.

        The audit log keeps the history; the store only needs what may come back to life.
        """
        terminal = tuple(s.value for s in TERMINAL)
        cursor = self.db.execute("DELETE FROM sessions WHERE state IN (?, ?) AND updated < ?", (*terminal, before))
        return cursor.rowcount

    def close(self) -> None:
        self.db.close()
