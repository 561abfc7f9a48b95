"""Helpers for tests/hostile: raw protocol clients run as a test user against the test broker."""

from __future__ import annotations

import json
import subprocess

from tests.cluster import config as tb
from tests.integration.daemon import SOCKET

#: Runs as a user: one attach request (fields from argv[2] as JSON), prints the broker's first
#: reply, types argv[3] if given, detaches and waits until the broker has closed the connection.
ATTACH_CODE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from broker import protocol as p
from broker.client import Client
c = Client(sys.argv[4])
c.send({"v": p.VERSION, "op": "attach", **json.loads(sys.argv[2])})
kind, payload = c.recv_frame()
while kind != p.KIND_JSON:
    kind, payload = c.recv_frame()
print(json.dumps(p.decode_json(payload)), flush=True)
try:  # after an error reply (a refusal) the broker has closed the connection already
    if sys.argv[3]:
        c.send_data(sys.argv[3].encode())
    c.send({"type": "detach"})
    while c.sock.recv(65536):
        pass
except OSError:
    pass
"""


def attach_once(user: str, fields: dict[str, object], typed: str = "") -> dict[str, object]:
    result = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", ATTACH_CODE, str(tb.REPO),
                             json.dumps(fields), typed, str(SOCKET)],
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[0])


def broker_with(toml: str):
    """A fresh test daemon whose broker.toml also carries ``toml`` (e.g. a ``[limits]`` table)."""
    from tests.integration import daemon as bed

    plain = bed.config_text
    bed.config_text = lambda **kw: plain(**kw) + toml
    bed.reset_state()
    proc = bed.BrokerProcess()
    try:
        proc.start()
    finally:
        bed.config_text = plain
    return proc
