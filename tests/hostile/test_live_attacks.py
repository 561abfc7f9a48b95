"""Issue 14 items 3, 9, 11 on the live cluster: bob attacks through the real daemon.

(The in-process tests beside this file pin each fix down in detail; these check that the
running daemon on the test bed, reached through its real socket as a real user, behaves the
same, and that alice is unaffected.)

* item 11: bob's frame nested 30,000 deep gets one error line naming the field and the rule;
  the daemon still serves alice.
* item 9: bob writes terminal escapes into his own job log and session; an admin's
  ``sbroker logs`` / ``show`` on a terminal shows them made visible, never raw.
* item 3: bob's 30 kills of his already-ended session add at most one audit line, and
  alice's ``events`` never list bob's entries.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.cluster import config as tb
from tests.fault.conftest import request_as
from tests.integration.conftest import broker, ensure_as, sbroker, sbroker_json  # noqa: F401 (fixture)
from tests.integration.daemon import STATE_DIR
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

ALICE, BOB = tb.USERS


def test_a_deeply_nested_frame_gets_one_error_and_others_are_served(broker):
    raw = '{"op": "ping", "v": ' + "[" * 30000 + "]" * 30000 + "}"  # under the 64 KiB frame limit
    replies = request_as(BOB, raw)
    assert len(replies) == 1 and replies[0]["type"] == "error", replies
    assert replies[0]["field"] == "frame" and "deeper than" in replies[0]["message"], replies
    assert ensure_as(ALICE, "nested")["type"] == "result"


def test_escape_sequences_in_a_users_log_reach_admins_made_visible(broker):
    session = ensure_as(BOB, "escapes")["session"]
    log = sbroker_json(tb.ADMIN, "show", session["id"])["log_path"]
    evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b31m\u202eevil\n"
    subprocess.run(tb.as_user(BOB, "sh", "-c", 'printf "%s" "$1" >> "$2"', "-", evil, log), check=True, cwd="/")
    shown = sbroker(tb.ADMIN, "logs", session["id"]).stdout
    assert "pwned" in shown and "red" in shown
    assert not any(c in shown for c in "\x1b\x07\x9b\u202e"), repr(shown)
    assert "^[" in shown
    data = sbroker_json(tb.ADMIN, "show", session["id"])["log_tail"]
    assert evil in data  # --json stays lossless, for programs


def test_repeated_kills_of_an_ended_session_do_not_grow_the_audit_log(broker):
    session = ensure_as(BOB, "killed")["session"]
    sbroker(BOB, "kill", session["id"])
    wait_for(lambda: sbroker_json(BOB, "show", session["id"])["state"] == "ended", 30, "bob's session ended")
    audit = STATE_DIR / "audit.jsonl"
    before = audit.read_text().count("\n")
    for _ in range(30):
        sbroker(BOB, "kill", session["id"], check=False)
    assert audit.read_text().count("\n") - before <= 1
    ensure_as(ALICE, "mine")
    mine = [json.loads(line) for line in sbroker(ALICE, "events", "--json").stdout.splitlines()]
    assert mine and all(e.get("user") == ALICE for e in mine), mine
