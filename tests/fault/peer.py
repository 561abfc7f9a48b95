"""A raw socket client run *as a test user* (``runuser -u USER -- python3 peer.py ...``).

Standard library + :mod:`broker.protocol` only. Prints one JSON line per frame received.

    peer.py SOCKET attach SESSION      attach as writer, print the reply, then hold the
                                       connection open until the broker closes it
    peer.py SOCKET request JSON        send one JSON request (sent verbatim), print replies
                                       until a result or error
    peer.py SOCKET batch -             for each stdin line ``{"raw": base64}``: a new connection,
                                       send the bytes, half-close, print one line
                                       ``{"frames": [...], "closed": bool}`` of what came back
"""

from __future__ import annotations

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from broker import protocol as p  # noqa: E402


def frames(sock: socket.socket):
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while len(buf) >= p.HEADER.size:
            kind, length = p.parse_header(bytes(buf[:p.HEADER.size]))
            if len(buf) < p.HEADER.size + length:
                break
            payload = bytes(buf[p.HEADER.size:p.HEADER.size + length])
            del buf[:p.HEADER.size + length]
            yield kind, payload


def batch(path: str) -> int:
    import base64

    for line in sys.stdin:
        raw = base64.b64decode(json.loads(line)["raw"])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        out: dict = {"frames": [], "closed": False}
        try:
            sock.connect(path)
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            for kind, payload in frames(sock):
                if kind == p.KIND_JSON:
                    out["frames"].append(json.loads(payload))
                else:
                    out["frames"].append({"type": "_data", "bytes": len(payload)})
            out["closed"] = True
        except p.ProtocolError as exc:
            out["bad_frame_from_daemon"] = str(exc)
        except OSError as exc:
            out["error"] = f"{exc.__class__.__name__}: {exc}"
        finally:
            sock.close()
        print(json.dumps(out), flush=True)
    return 0


def main() -> int:
    path, what, arg = sys.argv[1:4]
    if what == "batch":
        return batch(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if what == "attach":
        sock.sendall(p.encode_json({"v": p.VERSION, "op": "attach", "session": arg, "rows": 24, "cols": 80,
                                    "mode": sys.argv[4] if len(sys.argv) > 4 else "write"}))
    else:
        sock.sendall(p.encode(p.KIND_JSON, arg.encode()))
    for kind, payload in frames(sock):
        if kind == p.KIND_JSON:
            msg = json.loads(payload)
            print(json.dumps(msg), flush=True)
            if what == "request" and msg.get("type") in ("result", "error"):
                return 0
        else:
            print(json.dumps({"type": "_data", "bytes": len(payload)}), flush=True)
    print(json.dumps({"type": "_closed"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
