"""Interactive shells: ``srun --overlap --pty`` under a pty the broker owns, bridged to clients.

Rules for attachers (explicit, and tested):

* A terminal has at most one *writer*; its keys go to the shell and its window size
  is the terminal's. Any number of *observers* (the owner, or an admin with
  ``sbroker attach --observe``) see the output and cannot type.
* When the writer goes away (SSH connection dropped) the shell keeps running for
  ``timeouts.detach_grace`` seconds. The next interactive login for the same
  (user, project) reattaches to the oldest detached shell and first receives its
  recent output (``timeouts.scrollback_bytes``); a login while every shell has a
  writer opens a new shell, as a second ``ssh`` window would on any host.
* Someone else's session (an admin's attach) is observed, never typed into, unless the
  request says ``write_other`` (``sbroker attach --write``): that is audited
  (``admin_write``: who, whose session, when) and announced in the session's terminals.
* Per user at most ``limits.shells_per_user`` shells (each an ``srun --pty`` in the
  broker's cgroup) and ``limits.detached_shells_per_user`` kept for reattaching (the
  oldest detached one is ended beyond that).
* Output is never decoded, so split UTF-8 sequences pass intact. A writer that
  does not read makes the broker stop reading the pty (backpressure, bounded
  memory); an observer that does not read is dropped instead of slowing the shell.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import signal
import struct
import termios
import time
from dataclasses import dataclass, field
from typing import Any

import anyio.abc

from . import limits
from . import log as _log
from . import protocol as p
from .identity import lookup_name
from .manager import Manager, SessionError
from .server import Connection, Server
from .session import Session, State
from .shells import safe_term, shell_argv

WRITER_HIGH_WATER = 256 * 1024
OBSERVER_LIMIT = 1024 * 1024
INPUT_LIMIT = 1024 * 1024
#: ``signal`` messages become the keys that raise them in the remote terminal: the shell's
#: pty, not srun or the broker, knows which job is in the foreground.
SIGNAL_KEYS = {"INT": b"\x03", "QUIT": b"\x1c"}
_ids = itertools.count(1)


@dataclass(eq=False)
class Terminal:
    session: Session
    master: int
    proc: anyio.abc.Process
    scrollback_limit: int
    id: int = field(default_factory=lambda: next(_ids))
    scrollback: bytearray = field(default_factory=bytearray)
    writer: Connection | None = None
    observers: set[Connection] = field(default_factory=set)
    detached_at: float | None = None
    last_input: float = field(default_factory=time.time)
    pending_input: bytearray = field(default_factory=bytearray)
    reading: bool = False
    closed: bool = False
    input_drained: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, data: bytes) -> None:
        self.scrollback += data
        excess = len(self.scrollback) - self.scrollback_limit
        if excess > 0:
            del self.scrollback[:excess]


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class AttachHub:
    """Owns every bridged terminal; plugs the ``attach`` operation into the server."""

    def __init__(self, manager: Manager, server: Server) -> None:
        self.manager = manager
        self.server = server
        self.config = manager.config
        self.log = _log.get("sbroker.attach")
        self.loop = asyncio.get_running_loop()
        self.terminals: dict[str, list[Terminal]] = {}
        self.attach_count = 0
        server.handlers["attach"] = self.op_attach
        server.describers.append(self.describe)
        manager.on_change.append(self._on_session_change)

    # ------------------------------------------------------------------ queries

    def describe(self, session: Session) -> dict[str, Any]:
        terms = self.terminals.get(session.id, [])
        return {"attachers": sum(1 for t in terms if t.writer) + sum(len(t.observers) for t in terms),
                "shells": len(terms), "image_version": os.path.basename(session.image).removesuffix(".sif")}

    def attached(self, session_id: str) -> bool:
        return any(t.writer or t.observers for t in self.terminals.get(session_id, []))

    def last_input(self, session_id: str) -> float:
        return max((t.last_input for t in self.terminals.get(session_id, [])), default=0.0)

    def broadcast(self, session_id: str, text: str) -> int:
        """Write a notice (e.g. a walltime warning) into every attached terminal."""
        frame = p.encode(p.KIND_OUTPUT, text.encode())
        sent = 0
        for term in self.terminals.get(session_id, []):
            for conn in [term.writer, *term.observers]:
                if conn is not None:
                    conn.writer.write(frame)
                    sent += 1
        return sent

    # ------------------------------------------------------------------ attach

    async def op_attach(self, conn: Connection, message: dict[str, Any]) -> None:
        session = await self.manager.find(self.server.ref_of(message), conn.user, conn.admin)
        mode = p.get_str(message, "mode", default="write", max_len=16)
        if mode not in ("write", "observe"):
            raise p.ProtocolError("mode", "must be write or observe")
        write_other = message.get("write_other", False)
        if not isinstance(write_other, bool):
            raise p.ProtocolError("write_other", "must be true or false")
        rows, cols = _size(message)
        if session.state != State.READY:
            raise SessionError("not_ready", f"session: {session.user}/{session.project} is {session.state.value}, "
                                            "not ready")
        intruding = session.user != conn.user.name and mode == "write"
        if intruding and not write_other:
            mode, intruding = "observe", False  # admins watch; typing needs --write (audited)
        if mode == "write" and self._pick_detached(session) is None:
            refusal = limits.shells_refusal(self.config, self._open_shells(session.user))
            if refusal:
                self.log.warning("limit_refused", user=session.user, session=session.id, by=conn.user.name,
                                 rule=refusal)
                raise SessionError("limit", refusal)
        if mode == "observe":
            term = self._pick_observed(session)
            term.observers.add(conn)
            reattached = True
        else:
            term = self._pick_detached(session)
            reattached = term is not None
            if term is None:
                term = await self._spawn(session, rows, cols, str(message.get("term") or ""))
            term.writer, term.detached_at = conn, None
            set_winsize(term.master, rows, cols)
        self.attach_count += 1
        session.last_activity = time.time()
        event = "observe" if mode == "observe" else ("reattach" if reattached else "attach")
        self.manager.audit.record(event, user=session.user, project=session.project, session=session.id,
                                  terminal=term.id, by=conn.user.name, peer_uid=conn.user.uid)
        self.log.info("attached", session=session.id, terminal=term.id, mode=mode, by=conn.user.name,
                      reattached=reattached)
        await conn.send({"type": "attached", "terminal": term.id, "mode": mode, "reattached": reattached})
        if intruding:
            self._announce_intrusion(term, conn)
        if term.scrollback and reattached:
            conn.writer.write(p.encode(p.KIND_OUTPUT, bytes(term.scrollback[-p.MAX_DATA:])))
        try:
            await self._pump_client(term, conn, mode)
        finally:
            self._detach(term, conn)

    def _announce_intrusion(self, term: Terminal, conn: Connection) -> None:
        """An admin types into someone else's shell: audit it and say so in every terminal of the session.

        The notice also goes into the shell's scrollback, so the owner sees it on reattaching.
        """
        session = term.session
        self.manager.audit.record("admin_write", user=session.user, project=session.project, session=session.id,
                                  terminal=term.id, by=conn.user.name, peer_uid=conn.user.uid)
        self.log.warning("admin_write", session=session.id, user=session.user, terminal=term.id,
                         by=conn.user.name, peer_uid=conn.user.uid)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        notice = (f"\r\n[sbroker: administrator {conn.user.name} is typing into shell {term.id} of this session "
                  f"since {stamp} (audited)]\r\n").encode()
        for other in self.terminals.get(session.id, []):
            if other is not term:
                other.record(notice)
                for attached in [other.writer, *other.observers]:
                    if attached is not None:
                        attached.writer.write(p.encode(p.KIND_OUTPUT, notice))
        self._deliver(term, notice)

    def _open_shells(self, user: str) -> int:
        return sum(1 for terms in self.terminals.values() for t in terms if t.session.user == user and not t.closed)

    def _pick_detached(self, session: Session) -> Terminal | None:
        for term in self.terminals.get(session.id, []):
            if term.writer is None and term.detached_at is not None and not term.closed:
                return term
        return None

    def _pick_observed(self, session: Session) -> Terminal:
        terms = [t for t in self.terminals.get(session.id, []) if not t.closed]
        if not terms:
            raise SessionError("no_shell", f"session: {session.user}/{session.project} has no shell to observe")
        return max(terms, key=lambda t: (t.writer is not None, t.last_input))

    async def _spawn(self, session: Session, rows: int, cols: int, term_name: str) -> Terminal:
        user = lookup_name(session.user)
        master, slave = os.openpty()
        try:
            os.fchown(slave, user.uid, -1)
            os.fchmod(slave, 0o620)
            set_winsize(master, rows, cols)
            argv = shell_argv(session.job_id, session.instance, session.user, session.project, term_name)
            proc = await self.manager.runner.spawn_pty(argv, user=user, tty_fd=slave,
                                                       extra_env={"TERM": safe_term(term_name)})
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        term = Terminal(session, master, proc, self.config.scrollback_bytes)
        self.terminals.setdefault(session.id, []).append(term)
        self._start_reading(term)
        asyncio.ensure_future(self._wait_exit(term))
        self.log.info("shell_started", session=session.id, terminal=term.id, pid=proc.pid)
        return term

    # ------------------------------------------------------------------ pty → clients

    def _start_reading(self, term: Terminal) -> None:
        if not term.reading and not term.closed:
            self.loop.add_reader(term.master, self._on_output, term)
            term.reading = True

    def _stop_reading(self, term: Terminal) -> None:
        if term.reading:
            self.loop.remove_reader(term.master)
            term.reading = False

    def _on_output(self, term: Terminal) -> None:
        # A pty read returns at most a few KiB. Under a stream of output, reading until the
        # pty is empty (or a frame is full) sends one frame and one socket write instead of
        # one per read, which is most of the bridge's cost per byte.
        chunks: list[bytes] = []
        size = 0
        while size < p.MAX_DATA:
            try:
                data = os.read(term.master, p.MAX_DATA - size)
            except BlockingIOError:
                break
            except OSError:  # EIO: the last process holding the slave has gone
                data = b""
            if not data:
                if not chunks:
                    self._stop_reading(term)
                    return
                break  # deliver what was read; the next callback sees the end again
            chunks.append(data)
            size += len(data)
        if chunks:
            self._deliver(term, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _deliver(self, term: Terminal, data: bytes) -> None:
        term.record(data)
        frame = p.encode(p.KIND_OUTPUT, data)
        for conn in list(term.observers):
            if conn.writer.transport.get_write_buffer_size() > OBSERVER_LIMIT:
                term.observers.discard(conn)
                conn.writer.close()
                self.log.warning("observer_dropped", terminal=term.id, by=conn.user.name, reason="not reading")
            else:
                conn.writer.write(frame)
        writer = term.writer
        if writer is not None:
            writer.writer.write(frame)
            if writer.writer.transport.get_write_buffer_size() > WRITER_HIGH_WATER:
                self._stop_reading(term)
                asyncio.ensure_future(self._resume_after_drain(term, writer))

    async def _resume_after_drain(self, term: Terminal, conn: Connection) -> None:
        try:
            await conn.writer.drain()
        except (ConnectionError, OSError):
            pass
        self._start_reading(term)

    # ------------------------------------------------------------------ client → pty

    async def _pump_client(self, term: Terminal, conn: Connection, mode: str) -> None:
        while not term.closed:
            kind, payload = await conn.read_frame()
            if kind == p.KIND_INPUT:
                if mode != "write" or term.writer is not conn:
                    continue  # observers cannot type
                await self._write_input(term, payload)
            elif kind == p.KIND_JSON:
                message = p.decode_json(payload)
                control = message.get("type")
                writer = mode == "write" and term.writer is conn
                if control == "resize" and writer:
                    rows, cols = _size(message)
                    set_winsize(term.master, rows, cols)
                elif control == "signal" and writer:
                    key = SIGNAL_KEYS.get(message.get("signal"))  # type: ignore[arg-type]
                    if key is None:
                        raise p.ProtocolError("signal", f"must be one of {', '.join(SIGNAL_KEYS)}")
                    await self._write_input(term, key)
                elif control == "detach":
                    return

    async def _write_input(self, term: Terminal, data: bytes) -> None:
        """Queue what the writer typed (keys or a passed-on signal): it is also activity."""
        term.last_input = time.time()
        term.session.last_activity = term.last_input
        term.pending_input += data
        self._flush_input(term)
        while len(term.pending_input) > INPUT_LIMIT and not term.closed:
            term.input_drained.clear()
            await term.input_drained.wait()  # the shell is not reading: stop reading the client

    def _flush_input(self, term: Terminal) -> None:
        while term.pending_input and not term.closed:
            try:
                n = os.write(term.master, term.pending_input[:p.MAX_DATA])
            except BlockingIOError:
                self.loop.add_writer(term.master, self._on_writable, term)
                return
            except OSError:
                term.pending_input.clear()
                break
            del term.pending_input[:n]
        term.input_drained.set()

    def _on_writable(self, term: Terminal) -> None:
        self.loop.remove_writer(term.master)
        self._flush_input(term)

    # ------------------------------------------------------------------ detach / exit

    def _detach(self, term: Terminal, conn: Connection) -> None:
        term.observers.discard(conn)
        if term.writer is conn:
            term.writer = None
            if not term.closed:
                term.detached_at = time.time()
                self.manager.audit.record("detach", user=term.session.user, project=term.session.project,
                                          session=term.session.id, terminal=term.id, by=conn.user.name)
                asyncio.ensure_future(self._expire(term, term.detached_at))
                self._enforce_detached_limit(term.session.user)

    def _enforce_detached_limit(self, user: str) -> None:
        """Keep at most ``limits.detached_shells_per_user`` detached shells; end the oldest beyond.

        Each kept shell is an ``srun`` and a timer in the broker for up to ``detach_grace``:
        a user dropping connections in a loop must not pile them up.
        """
        detached = sorted((t for terms in self.terminals.values() for t in terms
                           if t.session.user == user and t.writer is None and t.detached_at is not None
                           and not t.closed), key=lambda t: t.detached_at or 0.0)
        for term in detached[:max(0, len(detached) - self.config.limit_detached)]:
            self.log.warning("limit_detached", user=user, session=term.session.id, terminal=term.id,
                             limit=self.config.limit_detached,
                             rule="limits.detached_shells_per_user: oldest detached shell ended")
            term.detached_at = None  # no longer kept: its timer must not fire on a reattached shell
            self.hangup(term)

    async def _expire(self, term: Terminal, detached_at: float) -> None:
        await asyncio.sleep(self.config.detach_grace)
        if term.writer is None and term.detached_at == detached_at and not term.closed:
            self.log.info("shell_expired", session=term.session.id, terminal=term.id,
                          grace=self.config.detach_grace)
            self.hangup(term)

    def hangup(self, term: Terminal) -> None:
        """SIGHUP to srun's process group: srun cancels the step and exits."""
        try:
            os.killpg(term.proc.pid, signal.SIGHUP)
        except ProcessLookupError:
            pass

    async def _wait_exit(self, term: Terminal) -> None:
        code = await term.proc.wait()
        # Drain what the shell wrote last, then tell every attacher how it ended.
        while True:
            try:
                data = os.read(term.master, p.MAX_DATA)
            except OSError:
                break
            if not data:
                break
            self._deliver(term, data)
        self._stop_reading(term)
        try:
            self.loop.remove_writer(term.master)
        except (ValueError, OSError):
            pass
        term.closed = True
        term.input_drained.set()
        status = 128 - code if code < 0 else code
        for conn in [term.writer, *term.observers]:
            if conn is not None:
                try:
                    await conn.send({"type": "exit", "status": status})
                except (ConnectionError, OSError):
                    pass
                conn.writer.close()
        os.close(term.master)
        terms = self.terminals.get(term.session.id, [])
        if term in terms:
            terms.remove(term)
        if not terms:
            self.terminals.pop(term.session.id, None)
        self.log.info("shell_exited", session=term.session.id, terminal=term.id, status=status)

    def _on_session_change(self, session: Session, old: State) -> None:
        if not session.live:
            for term in self.terminals.get(session.id, []):
                self.hangup(term)

    async def close(self) -> None:
        for terms in list(self.terminals.values()):
            for term in terms:
                self.hangup(term)


def _size(message: dict[str, Any]) -> tuple[int, int]:
    """A usable window size; a broken one (0, negative, absurd) becomes 24x80."""
    rows, cols = message.get("rows"), message.get("cols")
    if not (isinstance(rows, int) and isinstance(cols, int) and 1 <= rows <= 1000 and 1 <= cols <= 1000):
        return 24, 80
    return rows, cols


__all__ = ["AttachHub", "Terminal"]
