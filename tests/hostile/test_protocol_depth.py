"""Item 11: a deeply nested JSON frame gets a protocol error reply, never a RecursionError.

Runs the real :class:`broker.server.Server` on a temporary socket in this process
(the nested frame is refused before any operation, so a stand-in manager that only
carries the config suffices) and talks to it with the real client.
"""

from __future__ import annotations

from types import SimpleNamespace

from broker import protocol as p
from broker.client import Client
from broker.config import Config

from ._inproc import serving

NESTED = b"[" * 50_000  # ~1,000x deeper than the C decoder's recursion limit allows


def test_deeply_nested_frame_is_refused_with_one_error_line() -> None:
    with serving(SimpleNamespace(config=Config(image="/x.sif"))) as (socket_path, _loop):
        with Client(socket_path, timeout=10) as client:
            client.sock.sendall(p.encode(p.KIND_JSON, NESTED))
            reply = client.recv()
        assert reply["type"] == "error"
        assert reply["field"] == "frame"
        assert reply["message"] == f"frame: JSON nests deeper than {p.MAX_DEPTH} levels"
        with Client(socket_path, timeout=10) as client:  # and the daemon still serves
            assert client.request("ping")["type"] == "result"


def test_depth_bound_is_exact_and_ignores_brackets_in_strings() -> None:
    ok = b'{"a":' * (p.MAX_DEPTH - 1) + b'["[[[[\\"{{{{"]' + b"}" * (p.MAX_DEPTH - 1)
    assert p.json_depth(ok) == p.MAX_DEPTH
    assert p.decode_json(ok)
    too_deep = b'{"a":' * p.MAX_DEPTH + b"[1]" + b"}" * p.MAX_DEPTH
    try:
        p.decode_json(too_deep)
    except p.ProtocolError as exc:
        assert (exc.field, exc.rule) == ("frame", f"JSON nests deeper than {p.MAX_DEPTH} levels")
    else:
        raise AssertionError("a frame nested MAX_DEPTH + 1 levels was accepted")
