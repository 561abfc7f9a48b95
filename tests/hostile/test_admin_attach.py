"""Issue 14 item 6: an admin's attach to someone else's shell observes; typing needs --write (audited).

sbadmin attaches to sbalice's detached shell the way ``sbroker attach alice/default`` does
(mode write, no flag) and types a command: the broker must answer ``observe``, record an
``observe`` audit entry, and the command must never reach her shell. With ``write_other``
(``sbroker attach --write``) the typing works, is audited as ``admin_write`` (who, whose
session, when) and alice sees a notice in her shell's output when she comes back.
"""

from __future__ import annotations

import json
import os
import pwd
import signal

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import broker, ensure_as  # noqa: F401
from tests.integration.daemon import STATE_DIR
from tests.ops.conftest import attach

from ._peer import attach_once

pytestmark = [pytest.mark.cluster]
ALICE = tb.USERS[0]


def _audit() -> list[dict]:
    return [json.loads(line) for line in (STATE_DIR / "audit.jsonl").read_text().splitlines() if line.strip()]


def _close(child) -> None:
    child.kill(signal.SIGKILL)
    child.close(force=True)


def test_admin_attach_observes_unless_write_is_asked_for(broker, tmp_path):
    reply = ensure_as(ALICE, "default")
    assert reply["type"] == "result", reply
    session = reply["session"]["id"]
    canary = f"/tmp/sbhostile-admin-typed-{session}"
    if os.path.exists(canary):
        os.unlink(canary)
    shell = attach(ALICE, session)
    shell.sendline("export HOSTILE_MARK=alice-$((6*7)); echo ex''ported")
    shell.expect("exported")  # the shell has it before her client goes away
    _close(shell)  # alice's shell is now detached, kept for her to reattach

    seen = attach_once(tb.ADMIN, {"session": session, "mode": "write", "rows": 24, "cols": 80},
                       typed=f"touch {canary}\r")
    assert seen["type"] == "attached" and seen["mode"] == "observe", seen
    entry = [e for e in _audit() if e.get("by") == tb.ADMIN][-1]
    assert (entry["event"], entry["user"], entry["session"]) == ("observe", ALICE, session)

    back = attach(ALICE, session)  # her detached shell: anything the admin typed was read before this
    back.sendline("echo mark=$HOSTILE_MARK canary=$(test -e " + canary + " && echo yes || echo no)")
    back.expect(r"mark=alice-42 canary=(yes|no)")
    assert back.match.group(1) == b"no", "the admin's keys reached alice's shell without --write"
    _close(back)

    seen = attach_once(tb.ADMIN, {"session": session, "mode": "write", "write_other": True, "rows": 24,
                                  "cols": 80}, typed="echo ADMIN-WROTE-$((40+2))\r")
    assert seen["type"] == "attached" and seen["mode"] == "write", seen
    entry = [e for e in _audit() if e.get("event") == "admin_write"][-1]
    assert (entry["user"], entry["session"], entry["by"], entry["peer_uid"]) == \
        (ALICE, session, tb.ADMIN, pwd.getpwnam(tb.ADMIN).pw_uid)
    assert isinstance(entry["ts"], float)
    again = attach(ALICE, session)  # the scrollback she is shown on reattaching carries the notice
    # (attach() matched an older "attached-42" early in the replayed scrollback; the notice and
    # the admin's command come after it)
    again.expect(rb"administrator sbadmin is typing into shell \d+ of this session")
    again.expect("ADMIN-WROTE-42")
    _close(again)
