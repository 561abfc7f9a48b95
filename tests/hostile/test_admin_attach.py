"""Issue 14 item 6, in the issue 15 model: an admin's attach to someone else's session
observes; typing needs ``--write``, which is audited and announced in the session.

Where the rules live now: the owner's agent (``broker/agent/sessionagent.py``) holds the
shells and answers only the owner's uid, so for an administrator the broker
(``broker/attach.py``, ``AttachHub.op_attach``/``_bridge``) runs the owner's ``srun ...
agent.py attach`` under a pty of its own and bridges it. The broker decides the mode
(``observe`` unless the request says ``write_other``), drops an observer's keys, writes the
audit entries (``observe``, ``admin_attach``, ``admin_write``); the agent ignores input from
observers and, for ``--announce``, prints the notice in every terminal and scrollback of
the session.

sbalice has a shell with a mark in it. sbadmin attaches the way ``sbroker attach
alice/default`` does (mode write, no flag) with a hostile raw client that types a command
anyway: the broker answers ``observe`` (audited), the client sees her output, and once the
agent has let the observer go the command has not reached her shell. With ``write_other``
(``sbroker attach --write``) sbadmin types into her detached shell: audited as
``admin_write``, the notice shown in the terminal she has open on another shell at that
moment, and in the scrollback of the shell typed into when she reattaches it.
"""

from __future__ import annotations

import json
import pwd
import secrets
import subprocess

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import broker, ensure_as  # noqa: F401
from tests.integration.daemon import STATE_DIR
from tests.waiting import wait_for

from ._peer import agent_status, answers, attach_argv, close, session_files, terminal, wait_event

pytestmark = [pytest.mark.cluster]
ALICE = tb.USERS[0]
NOTICE = rb"\[sbroker: administrator sbadmin is typing into this session since [0-9: -]+ \(audited\)\]"


def _audit() -> list[dict]:
    return [json.loads(line) for line in (STATE_DIR / "audit.jsonl").read_text().splitlines() if line.strip()]


def test_admin_attach_observes_unless_write_is_asked_for(broker, tmp_path):
    reply = ensure_as(ALICE, "default")
    assert reply["type"] == "result", reply
    session, job_id = reply["session"]["id"], reply["session"]["job_id"]
    log, status = session_files(ALICE, session)
    canary = f"/tmp/sbhostile-admin-typed-{secrets.token_hex(6)}"  # new per run: no leftover can answer
    admin_uid = pwd.getpwnam(tb.ADMIN).pw_uid

    first = terminal(ALICE, "attach", session)  # her shell 1
    try:
        answers(first, "first")
        first.send(b"export HOSTILE_MARK=alice-$((6*7)); echo ex''ported\r")
        first.expect("exported")

        # --- observe: no flag. A raw client that types anyway (the real CLI stops sending keys).
        admin = subprocess.Popen(attach_argv(tb.ADMIN, {"session": session, "mode": "write", "rows": 24,
                                                        "cols": 80}, typed=f"touch {canary}\r",
                                             until="OBSERVED-42"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        try:
            seen = json.loads(admin.stdout.readline())
            assert (seen["type"], seen["mode"], seen["reattached"]) == ("attached", "observe", True), seen
            entry = [e for e in _audit() if e.get("by") == tb.ADMIN][-1]
            assert {k: entry.get(k) for k in ("event", "user", "session", "job_id", "peer_uid", "mode")} == \
                {"event": "observe", "user": ALICE, "session": session, "job_id": job_id, "peer_uid": admin_uid,
                 "mode": "observe"}, entry
            wait_event(log, "observe", shell=1)  # the agent has the observer on her shell
            wait_for(lambda: agent_status(status)["observers"] == 1, 20,
                     "the agent's status to count the observer (written 0.1 s after a change)")
            first.send(b"echo OBSERVED-$((6*7))\r")  # she types; the observer sees it
            first.expect("OBSERVED-42")
            assert json.loads(admin.stdout.readline()) == {"saw": True}
            assert json.loads(admin.stdout.readline()) == {"closed": True}
            assert admin.wait(30) == 0, admin.stderr.read()
        finally:
            admin.kill()
            admin.wait()
        # The broker handled the typed frame before the detach after it (one connection, in
        # order); the agent has ended the observer's connection, so whatever came through it
        # was handled before: her next command runs after any key the admin got through.
        wait_for(lambda: agent_status(status)["observers"] == 0, 20,
                 "the agent's status to show the observer gone (it writes it 0.1 s after a change)")
        first.send(f"echo mark=$HOSTILE_MARK canary=$(test -e {canary} && echo yes || echo no)\r".encode())
        first.expect(rb"mark=(\S+) canary=(yes|no)")
        assert first.match.group(1, 2) == (b"alice-42", b"no"), "the admin's keys reached alice's shell"

        # --- write: `sbroker attach --write` into her shell 1, detached, while she has shell 2 open.
        second = terminal(ALICE, "attach", session)  # a new shell: shell 1 still has its writer
        try:
            answers(second, "second")
            wait_event(log, "attach", shell=2)
            close(first)
            wait_event(log, "detach", shell=1)  # kept for her (detach grace): the admin's target

            writer = terminal(tb.ADMIN, "attach", "--write", session)
            try:
                writer.expect(NOTICE)  # the agent's notice, after the replay of her shell's scrollback
                writer.send(b"echo mark=$HOSTILE_MARK admin=ADMIN-WROTE-$((40+2))\r")
                writer.expect(rb"mark=alice-42 admin=ADMIN-WROTE-42")  # typed into her shell 1
                second.expect(NOTICE)  # shown at once in the terminal she has open
                entry = [e for e in _audit() if e.get("event") == "admin_write"][-1]
                assert (entry["user"], entry["session"], entry["by"], entry["peer_uid"]) == \
                    (ALICE, session, tb.ADMIN, admin_uid)
                assert isinstance(entry["ts"], float)
                attach = [e for e in _audit() if e.get("by") == tb.ADMIN][-1]
                assert (attach["event"], attach["mode"], attach["session"], attach["job_id"]) == \
                    ("admin_attach", "write", session, job_id), attach
                announced = wait_event(log, "announce", shell=1)
                assert announced[-1]["text"].startswith(f"administrator {tb.ADMIN} is typing into this session")
                assert [e["shell"] for e in wait_event(log, "reattach")] == [1]
            finally:
                close(writer)
            wait_event(log, "detach", shell=1, count=2)  # the bridge's srun ended with the admin's client

            again = terminal(ALICE, "attach", session)  # reattaches shell 1: its scrollback holds it all
            try:
                again.expect(NOTICE)
                again.expect(rb"mark=alice-42 admin=ADMIN-WROTE-42")
                answers(again, "again")
                assert [e["shell"] for e in wait_event(log, "reattach", count=2)] == [1, 1]
            finally:
                close(again)
        finally:
            close(second)
    finally:
        close(first)
