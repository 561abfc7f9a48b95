"""Helpers for tests/hostile: clients run as a test user against the test broker, and reads of
what a session's agent wrote (its job log and its status file).

Since issue 15 a session's shells live in its agent (``broker/agent/sessionagent.py``), in
the allocation: the owner's terminals are ``srun`` to the agent (``sbroker attach`` and
``sbroker login`` run it themselves), so the rules about shells (one writer, observers,
detach grace, ``--max-shells``, ``--max-detached``) are the agent's, and the agent's own
account of them is its JSON lines in the session's job log (``log_path``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pexpect

from tests.cluster import config as tb
from tests.integration.conftest import sbroker_json
from tests.integration.daemon import SOCKET
from tests.waiting import wait_for

#: Runs as a user: one ``attach`` request (fields from argv[2] as JSON) on a raw connection;
#: prints the broker's first JSON reply; sends argv[3] (if any) as typed keys, *whatever mode
#: the broker granted* (a hostile client); then, if argv[4] is given, reads the output until
#: that text appears (at most 60 s) and prints ``{"saw": bool}``; sends ``detach`` and prints
#: ``{"closed": true}`` once the broker has closed the connection.
ATTACH_CODE = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from broker import protocol as p
from broker.client import BrokerError, Client
c = Client(sys.argv[5])
c.send({"v": p.VERSION, "op": "attach", **json.loads(sys.argv[2])})
kind, payload = c.recv_frame()
while kind != p.KIND_JSON:
    kind, payload = c.recv_frame()
print(json.dumps(p.decode_json(payload)), flush=True)
try:  # after an error reply (a refusal) the broker has closed the connection already
    if sys.argv[3]:
        c.send_data(sys.argv[3].encode())
    if sys.argv[4]:
        want, seen = sys.argv[4].encode(), b""
        c.sock.settimeout(60)
        try:
            while want not in seen:
                kind, payload = c.recv_frame()
                if kind == p.KIND_OUTPUT:
                    seen = seen[-len(want):] + payload
        except (socket.timeout, BrokerError):
            pass
        print(json.dumps({"saw": want in seen}), flush=True)
        c.sock.settimeout(None)
    c.send({"type": "detach"})
    while c.sock.recv(65536):
        pass
except OSError:
    pass
print(json.dumps({"closed": True}), flush=True)
"""


def attach_argv(user: str, fields: dict[str, object], typed: str = "", until: str = "") -> list[str]:
    return ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", ATTACH_CODE, str(tb.REPO), json.dumps(fields),
            typed, until, str(SOCKET)]


def attach_once(user: str, fields: dict[str, object], typed: str = "") -> dict[str, object]:
    """The broker's first reply to one raw ``attach`` (then detach, and wait for the close)."""
    result = subprocess.run(attach_argv(user, fields, typed), capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[0])


def terminal(user: str, *args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    """The real ``sbroker ARGS`` as ``user`` in a pty (not waited for: see :func:`answers`)."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return pexpect.spawn("runuser", ["-u", user, "--", "env", f"SBROKER_SOCKET={SOCKET}", "TERM=xterm", *extra,
                                     str(tb.SBROKER_BIN), *args], timeout=30, cwd="/", dimensions=(40, 120))


def answers(child: pexpect.spawn, tag: str) -> None:
    """The shell behind ``child`` runs a command and answers (``tag`` unique per call, so an
    answer replayed from the scrollback of a reattached shell never matches)."""
    child.send(f"echo {tag}-$((6*7))\r".encode())
    child.expect(f"{tag}-42".encode())


def close(child: pexpect.spawn) -> None:
    """Drop the terminal as a lost SSH connection does (hang up its pty): its ``srun`` ends,
    the shell stays in the agent, detached (check with an agent ``detach`` event)."""
    child.close(force=True)


def session_files(user: str, session: str) -> tuple[Path, Path]:
    """(job log, agent status file) of a session: ``log_path`` from ``sbroker show``, and the
    ``{instance}.agent.json`` beside it (``broker.agents.status_file``)."""
    shown = sbroker_json(user, "show", session)
    log = Path(shown["log_path"])
    return log, log.with_name(f"{shown['instance']}.agent.json")


def agent_events(log: Path) -> list[dict]:
    """The agent's JSON lines in a session's job log (``logger: sbroker.agent``), in order."""
    events = []
    for line in log.read_bytes().splitlines():
        if line.startswith(b"{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("logger") == "sbroker.agent":
                events.append(entry)
    return events


def wait_event(log: Path, event: str, count: int = 1, **fields: object) -> list[dict]:
    """Every ``event`` (with ``fields``) the agent has logged, once there are ``count`` of them.
    The agent writes each line as the thing happens; 20 s bounds a ``srun`` step ending (a
    dropped terminal) or starting on a loaded test bed."""
    def matching() -> list[dict]:
        found = [e for e in agent_events(log) if e["event"] == event
                 and all(e.get(k) == v for k, v in fields.items())]
        return found if len(found) >= count else []
    return wait_for(matching, 20, lambda: f"{count} agent {event} event(s) {fields} in {log} "
                    f"(agent events: {[(e['event'], e.get('shell')) for e in agent_events(log)]})")


def agent_status(status: Path) -> dict:
    return json.loads(status.read_text())


def broker_with(toml: str, **overrides: object):
    """A fresh test daemon whose broker.toml also carries ``toml`` (e.g. a ``[limits]`` table)
    and ``overrides`` of the base config (``section_key=value``, see ``config_text``)."""
    from tests.integration import daemon as bed

    plain = bed.config_text
    bed.config_text = lambda **kw: plain(**kw) + toml
    bed.reset_state()
    proc = bed.BrokerProcess(**overrides)
    try:
        proc.start()
    finally:
        bed.config_text = plain
    return proc
