"""Item 9: ``show``, ``logs``, ``events`` (and ``ls``) never send user text's control bytes to a terminal.

A user controls job comments, kill reasons, their start script's log and so the
strings in session fields and audit entries. The daemon's replies are faked here
(``broker.admin.call``) with every C0/C1 control character, DEL, ``ESC`` sequences
and bidi overrides; the admin's terminal output must hold none of them raw, only
``\\n`` (and ``\\t``) for layout. ``--json`` must stay lossless and hold none either.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import pytest

from broker import admin

HOSTILE = ("\x1b]0;pwned\x07\x1b[2J\x1b[1;1H" + "".join(map(chr, range(0x20))) + "\x7f"
           + "".join(map(chr, range(0x80, 0xA0))) + "\u202e\u2066\u2028\u2029\ufeff" + "gnp.exe")
#: What an admin's terminal may receive: printable text plus newline, tab and CR *before* a newline.
RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]"
                         "|\r(?!\n)")

SESSION = {"id": "s1", "user": "bob", "project": "p", "state": "ended", "reason": HOSTILE, "job_id": "12",
           "node": "n1", "instance": "sb-bob-p-abc", "image": HOSTILE, "image_digest": "", "pending_reason": HOSTILE,
           "expected_start": None, "time_left": "", "age": 1.0, "idle": 2.0, "attachers": 0}
EVENTS = [{"ts": 1.0, "event": "kill", "user": "bob", "reason": HOSTILE, "project": "p"}]


def fake_call(op: str, **fields: Any) -> dict[str, Any]:
    if op == "show":
        return {"type": "result", "session": {**SESSION, "log_tail": "line one\r\n" + HOSTILE + "\n"}}
    if op == "logs":
        return {"type": "result", "data": "line one\r\n" + HOSTILE + "\n", "offset": 10, "state": "ended"}
    if op == "events":
        return {"type": "result", "events": EVENTS}
    if op == "list":
        return {"type": "result", "sessions": [SESSION]}
    raise AssertionError(op)


COMMANDS = {
    "show": argparse.Namespace(command="show", session="s1", json=False),
    "logs": argparse.Namespace(command="logs", session="s1", follow=False),
    "events": argparse.Namespace(command="events", since="0", follow=False, json=False),
    "ls": argparse.Namespace(command="ls", json=False),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_terminal_output_shows_control_characters_instead_of_sending_them(
        command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(admin, "call", fake_call)
    assert admin.run(COMMANDS[command]) == 0
    out = capsys.readouterr().out
    assert RAW_CONTROL.findall(out) == []
    if command != "ls":  # ls cuts cells to fit 80 columns; the others show the whole text
        assert "^[]0;pwned^G^[[2J" in out and "gnp.exe" in out


@pytest.mark.parametrize("command", ["show", "events", "ls"])
def test_json_output_is_lossless_and_holds_no_control_bytes(
        command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(admin, "call", fake_call)
    assert admin.run(argparse.Namespace(**{**vars(COMMANDS[command]), "json": True})) == 0
    out = capsys.readouterr().out
    assert RAW_CONTROL.findall(out) == []
    parsed = json.loads(out.splitlines()[0]) if command == "events" else json.loads(out)
    expected = {"show": fake_call("show")["session"], "events": EVENTS[0], "ls": [SESSION]}[command]
    assert parsed == expected
