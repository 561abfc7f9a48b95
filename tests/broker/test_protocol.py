"""Framing and request envelope checks (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from broker import protocol as p
from broker.client import Client


def test_roundtrip_json_frame():
    frame = p.encode_json({"v": 1, "op": "ping"})
    kind, length = p.parse_header(frame[:5])
    assert kind == p.KIND_JSON and length == len(frame) - 5
    assert p.decode_json(frame[5:]) == {"v": 1, "op": "ping"}


@pytest.mark.parametrize("header, field", [
    (b"X\x00\x00\x00\x01", "frame"),
    (b"J" + (p.MAX_JSON + 1).to_bytes(4, "big"), "frame"),
    (b"O" + (p.MAX_DATA + 1).to_bytes(4, "big"), "frame"),
])
def test_bad_headers_are_refused(header, field):
    with pytest.raises(p.ProtocolError) as err:
        p.parse_header(header)
    assert err.value.field == field


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1,2]", b"nope", b'"str"'])
def test_non_object_json_is_refused(payload):
    with pytest.raises(p.ProtocolError, match="frame"):
        p.decode_json(payload)


@pytest.mark.parametrize("message, field", [
    ({"op": "ping"}, "v"), ({"v": 2, "op": "ping"}, "v"), ({"v": 1, "op": "rm -rf"}, "op"),
    ({"v": 1}, "op"),
])
def test_request_envelope(message, field):
    with pytest.raises(p.ProtocolError) as err:
        p.check_request(message)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_field_getters_enforce_type_and_bounds():
    assert p.get_str({"a": "x"}, "a") == "x"
    with pytest.raises(p.ProtocolError, match="a: must be a string"):
        p.get_str({"a": 3}, "a")
    with pytest.raises(p.ProtocolError, match="at most 2"):
        p.get_str({"a": "xyz"}, "a", max_len=2)
    with pytest.raises(p.ProtocolError, match="between 1 and 5"):
        p.get_int({"n": 9}, "n", default=1, low=1, high=5)
    with pytest.raises(p.ProtocolError, match="integer"):
        p.get_int({"n": True}, "n", default=1, low=0, high=5)


def test_oversized_payload_cannot_be_encoded():
    with pytest.raises(p.ProtocolError):
        p.encode(p.KIND_OUTPUT, b"x" * (p.MAX_DATA + 1))


@given(st.lists(st.binary(max_size=3000), max_size=20), st.integers(min_value=1, max_value=97))
def test_client_reassembles_frames_split_anywhere(chunks, step):
    """Bytes split at arbitrary points (e.g. inside a UTF-8 sequence) come out intact."""
    stream = b"".join(p.encode(p.KIND_OUTPUT, c) for c in chunks)
    client = Client.__new__(Client)
    client._buf = bytearray()
    out = []
    for start in range(0, len(stream), step):
        out += client.feed(stream[start:start + step])
    assert [payload for _, payload in out] == chunks


def test_large_replies_pass_large_requests_do_not():
    """``list`` of a thousand sessions is ~0.5 MB: fine as a reply, refused as a request."""
    message = {"type": "result", "sessions": [{"id": str(i), "reason": "x" * 400} for i in range(1000)]}
    with pytest.raises(p.ProtocolError):
        p.encode_json(message)
    frame = p.encode_json(message, max_json=p.MAX_REPLY)
    client = Client.__new__(Client)
    client._buf = bytearray()
    [(kind, payload)] = client.feed(frame)
    assert p.decode_json(payload) == message
    with pytest.raises(p.ProtocolError):
        p.parse_header(frame[:5])  # the daemon's reading side keeps the small bound


# ``sbroker login`` frames and reads JSON without importing ``json`` (p.dumps, p.loads): the
# bytes and values must be exactly json's, for anything a message can hold.
_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(_plain)
def test_dumps_is_compact_json_dumps(value):
    import json

    assert p.dumps(value) == json.dumps(value, separators=(",", ":"))


@given(_plain, st.sampled_from(["", " ", "\n", " \t\r\n"]))
def test_loads_is_json_loads(value, space):
    import json

    text = space + json.dumps(value) + space
    assert p.loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "   ", "{", '{"a":1}x', '{"a":1} {}', "[1,]", "{'a':1}", '"\x01"', "tru"])
def test_loads_refuses_what_json_refuses(text):
    import json

    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        p.loads(text)


@pytest.mark.parametrize("value", [{1: "a"}, {"a": {1, 2}}, b"bytes", float("nan"), float("inf"), object()])
def test_dumps_refuses_what_is_not_plain_data(value):
    with pytest.raises(TypeError):
        p.dumps(value)


def test_login_path_does_not_import_json_re_or_enum():
    """What every SSH login imports (measured in docs/benchmarks.md): the login client, its
    transfer, direct-stream and SSH-endpoint (``sbroker ssh-proxy``) paths never load ``json``,
    ``re`` or ``enum`` (9-14 ms), nor ``subprocess`` or ``socket`` (~10 ms more)."""
    import subprocess
    import sys

    code = ("import sys; from broker.cli import main; import broker.login, broker.client, broker.direct, "
            "broker.loginxfer, broker.sshendpoint; "
            "print(sorted({'json', 're', 'enum', 'signal', 'typing', 'subprocess', 'socket'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
