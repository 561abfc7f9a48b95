"""Wire protocol between ``sbroker`` clients and the broker daemon.

One module, standard library only: ``sbroker login`` imports it on every SSH login,
so it must stay cheap (see ``docs/benchmarks.md``).

Framing
-------
Every frame is ``kind (1 byte) | length (4 bytes, big endian) | payload``.

=====  ==============================================================
kind   payload
=====  ==============================================================
``J``  one JSON object (UTF-8), a request, reply, event or control message
``O``  terminal output bytes, daemon → client (raw, never decoded)
``I``  terminal input bytes, client → daemon (raw, never decoded)
=====  ==============================================================

Terminal bytes are never decoded on the way through, so a UTF-8 sequence split
across two reads arrives intact at the other end; binary is binary.

Requests carry ``{"v": VERSION, "op": ...}``. They never name the user they act
for: the daemon takes identity from ``SO_PEERCRED``. Replies are JSON frames with a
``type`` of ``progress``, ``result``, ``error`` or, while attached, ``attached``,
``exit`` and ``notice``. While attached, the client sends ``I`` frames and JSON control
messages of ``type`` ``resize`` (rows, cols), ``signal`` (``INT`` or ``QUIT``: the client was
sent that signal and passes it on to the shell's foreground job), ``eof`` and ``detach``.
"""

from __future__ import annotations

import struct
from itertools import accumulate

try:  # the C half of ``json``; ``import json`` alone costs every login ~9 ms (``re``, ``enum``)
    from _json import encode_basestring_ascii as _quote, make_scanner as _make_scanner
except ImportError:  # an interpreter without it: the pure-Python halves, whatever they cost
    from json.decoder import JSONDecoder as _Decoder
    from json.encoder import py_encode_basestring_ascii as _quote

    def _make_scanner(context: object) -> object:
        return _Decoder().scan_once

VERSION = 1

KIND_JSON = b"J"
KIND_OUTPUT = b"O"
KIND_INPUT = b"I"
KINDS = frozenset((KIND_JSON, KIND_OUTPUT, KIND_INPUT))

HEADER = struct.Struct(">cI")
#: Requests are small; anything bigger is a broken or hostile client.
MAX_JSON = 64 * 1024
#: Replies may be large (``list`` of every live session on a busy login node); the
#: client trusts its broker, so the bound only protects it from a corrupt stream.
MAX_REPLY = 64 * 1024 * 1024
#: Terminal chunks: bounded so one frame never pins much memory.
MAX_DATA = 64 * 1024
#: Deepest nesting of arrays/objects a JSON frame may have. Real messages nest 4 levels;
#: the bound is checked before ``json.loads`` so a hostile ``[[[[...`` frame is refused
#: with an error reply instead of exhausting the recursion limit of the C decoder.
MAX_DEPTH = 32

_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
#: ``[``/``{`` open a level (+1), ``]``/``}`` close one (0xff: -1 as a signed byte).
_LEVEL = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")

#: Operations a client may request, and whether each needs the admin group for
#: sessions it does not own (ownership is checked in the daemon, not here).
OPS = frozenset(
    ("ensure", "attach", "list", "show", "kill", "logs", "events", "ping", "reap", "extend")
)

DEFAULT_SOCKET = "/run/sbroker/broker.sock"


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; ``field`` names what was wrong."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def encode(kind: bytes, payload: bytes, *, max_json: int = MAX_JSON) -> bytes:
    """Frame ``payload`` as one ``kind`` frame."""
    limit = max_json if kind == KIND_JSON else MAX_DATA
    if len(payload) > limit:
        raise ProtocolError("frame", f"payload of {len(payload)} bytes exceeds {limit}")
    return HEADER.pack(kind, len(payload)) + payload


def encode_json(message: dict[str, object], *, max_json: int = MAX_JSON) -> bytes:
    """Frame one JSON message (compact, UTF-8); replies pass ``max_json=MAX_REPLY``.

    The daemon and admin tools, which import ``json`` anyway, frame with it (its C encoder,
    for replies that list every session); ``sbroker login`` frames its few small requests
    with :func:`dumps` (the same bytes) so that it never imports ``json``."""
    import json  # already loaded wherever replies are made

    return encode(KIND_JSON, json.dumps(message, separators=(",", ":")).encode(), max_json=max_json)


def encode_request(message: dict[str, object]) -> bytes:
    """Frame one client request without importing ``json`` (:func:`dumps`)."""
    return encode(KIND_JSON, dumps(message).encode())


def dumps(value: object) -> str:
    """``json.dumps(value, separators=(",", ":"))`` for plain data (dicts with string keys,
    lists, tuples, strings, ints, finite floats, booleans, None); anything else is a
    ``TypeError``, as it is for ``json`` without a ``default``."""
    if isinstance(value, str):
        return _quote(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float) and value - value == 0:  # finite (json's NaN/Infinity are not JSON)
        return float.__repr__(value)
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("dumps: object keys must be strings")
        return "{" + ",".join(_quote(key) + ":" + dumps(item) for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(item) for item in value) + "]"
    raise TypeError(f"dumps: {type(value).__name__} is not plain data")


class _Plain:
    """What the C scanner reads from its ``json.JSONDecoder``: the defaults of ``json.loads``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


_scan = _make_scanner(_Plain())


def loads(text: str) -> object:
    """``json.loads(text)`` without importing ``json``: the C scanner ``json.loads`` itself
    uses, plus the surrounding whitespace and trailing-data checks of ``JSONDecoder.decode``.
    Raises ``ValueError`` (``RecursionError`` for nesting beyond the interpreter's limit)."""
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        value, end = _scan(text, start)
    except StopIteration:
        raise ValueError(f"expecting a value at character {start}") from None
    if text[end:].strip(" \t\n\r"):
        raise ValueError(f"extra data at character {end}")
    return value


def parse_header(header: bytes, *, max_json: int = MAX_JSON) -> tuple[bytes, int]:
    """Validate a 5-byte header and return ``(kind, length)``."""
    kind, length = HEADER.unpack(header)
    if kind not in KINDS:
        raise ProtocolError("frame", f"unknown frame kind {kind!r}")
    limit = max_json if kind == KIND_JSON else MAX_DATA
    if length > limit:
        raise ProtocolError("frame", f"length {length} exceeds {limit} for kind {kind.decode()}")
    return kind, length


def json_depth(payload: bytes) -> int:
    """The deepest array/object nesting in ``payload``, counted without parsing it.

    String literals are removed first (a bracket inside a string is not nesting; a
    UTF-8 multi-byte sequence never contains ``"`` or ``\\``), then the running sum of
    the remaining brackets is taken in C (``accumulate``), so the check costs a few
    microseconds per KiB and no recursion however deep the input.
    """
    skeleton = _json_string().sub(b"", payload).translate(_LEVEL, _NOT_BRACKET)
    return max(accumulate(memoryview(skeleton).cast("b")), default=0)


def _json_string():  # type: ignore[no-untyped-def]
    """The pattern of one JSON string literal, compiled on first use (``re`` is for the
    daemon, which checks depth; ``sbroker login`` trusts its broker's replies)."""
    global _JSON_STRING
    if _JSON_STRING is None:
        import re

        _JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
    return _JSON_STRING


_JSON_STRING = None


def decode_json(payload: bytes, *, max_depth: int | None = MAX_DEPTH) -> dict[str, object]:
    """Decode a JSON frame payload into a dict, or raise :class:`ProtocolError`. ``max_depth``
    None skips the nesting check: for replies from the broker, which the client trusts (a
    corrupt one still ends in a ProtocolError, by way of the interpreter's recursion limit)."""
    if max_depth is not None and json_depth(payload) > max_depth:
        raise ProtocolError("frame", f"JSON nests deeper than {max_depth} levels")
    try:
        message = loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("frame", f"payload is not UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame", "payload must be a JSON object")
    return message


def check_request(message: dict[str, object]) -> str:
    """Check the envelope of a client request and return its ``op``."""
    version = message.get("v")
    if version != VERSION:
        raise ProtocolError("v", f"protocol version must be {VERSION} (got {version!r})")
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError("op", f"must be one of {', '.join(sorted(OPS))} (got {str(op)[:40]!r})")
    return op


def get_str(message: dict[str, object], field: str, *, default: str | None = None,
            max_len: int = 256) -> str | None:
    """Return an optional string field, enforcing type and length."""
    value = message.get(field, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(field, "must be a string")
    if len(value) > max_len:
        raise ProtocolError(field, f"must be at most {max_len} characters")
    return value


def get_int(message: dict[str, object], field: str, *, default: int, low: int, high: int) -> int:
    """Return an integer field within ``[low, high]``."""
    value = message.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(field, "must be an integer")
    if not low <= value <= high:
        raise ProtocolError(field, f"must be between {low} and {high} (got {value})")
    return value


def error(field: str, rule: str, *, code: str = "invalid") -> dict[str, object]:
    """An error reply: one clear line naming the field and the rule."""
    return {"type": "error", "code": code, "field": field, "message": f"{field}: {rule}"}
