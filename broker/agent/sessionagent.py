#!/usr/bin/env python3
"""sbroker session agent: the shells of one session, held in its allocation.

One agent runs per session, as the user, in the session job's batch step on the compute
node (the one step that lives as long as the job without a client on a login node). It
holds every interactive shell's pty for the job's lifetime, so a broker restart, an
upgrade or a login through another login node loses nothing: the broker is only the
control plane. Standard library only (Python >= 3.9); the batch script writes this file
into a private directory (``mktemp -d``, mode 0700) and starts ``serve``.

``serve``
    Listens on ``DIR/agent.sock`` (the private directory; peers must be the same uid,
    checked with ``SO_PEERCRED``: no abstract sockets, which every network namespace
    peer could reach). Writes a small status file (``--status``) the broker reads to
    judge idleness: the user's word, affecting only the user's own session.
``attach [--mode write|observe] [--announce TEXT] -- ARGV...``
    Run under ``srun --overlap --pty --jobid=J`` by ``sbroker login``: connects this
    terminal to the oldest detached shell (replaying its recent output), or to a new
    shell running ARGV; relays raw bytes until the shell exits, and exits with its
    status. Killed (the SSH connection dropped), the shell stays detached for the grace.
``status``
    Print the agent's status (JSON) and exit.

Rules, those users of tmux or screen expect: a shell has at most one writer; observers
see the output and cannot type; a detached shell lives ``--grace`` seconds and its
background jobs with it (then it is hung up, as a closed terminal would; ``nohup``
work lives on until the job ends); at most ``--max-shells`` shells and ``--max-detached`` detached
ones (the oldest detached is ended beyond). Output is never decoded; a writer that does
not read stops the pty being read (backpressure), an observer that does not read is
dropped. Frames are those of :mod:`broker.protocol`: ``kind | length (4, BE) | payload``.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import termios
import time
import tty
from collections import deque

if False:  # for type checkers: these are imported by ``serve`` only (see _serve_imports)
    import asyncio
    import hashlib
    import hmac
    import secrets


def _serve_imports() -> None:
    """``serve`` needs asyncio and the crypto modules; ``attach`` does not. Importing asyncio
    alone costs about 30 ms, on the path of every interactive login's prompt."""
    global asyncio, hashlib, hmac, secrets
    import asyncio
    import hashlib
    import hmac
    import secrets


HEADER = struct.Struct(">cI")
KIND_JSON, KIND_OUTPUT, KIND_INPUT = b"J", b"O", b"I"
MAX_DATA = 64 * 1024
#: What one wakeup reads of a shell's output at most (several frames, one write).
OUTPUT_BURST = 256 * 1024
MAX_JSON = 64 * 1024
SOCKET_NAME = "agent.sock"
WRITER_HIGH_WATER = 256 * 1024
OBSERVER_LIMIT = 1024 * 1024
INPUT_LIMIT = 1024 * 1024
#: ``signal`` controls become the keys that raise them in the shell's terminal.
SIGNAL_KEYS = {"INT": b"\x03", "QUIT": b"\x1c"}
#: Input alone refreshes the status file at most this often (the broker's idle limit is
#: minutes; attach and detach are written at once).
STATUS_INPUT_INTERVAL = 15.0
FIRST_MESSAGE_TIMEOUT = 30.0
#: How long a login that attached while the instance was starting waits for it (``--await-instance``).
INSTANCE_WAIT = 600.0
#: A spare shell (``--spare 1``) is started this long after a login took one, and replaced
#: when older than SPARE_MAX_AGE or when a dotfile changed since it started.
SPARE_DELAY = 1.0
SPARE_MAX_AGE = 3600.0
DOTFILES = (".bashrc", ".bash_profile", ".bash_login", ".profile", ".inputrc")
HANGUP_KILL_AFTER = 5.0
EXIT_LOST = 255


# --------------------------------------------------------------------------- framing

def encode(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def encode_output(data: bytes) -> bytes:
    """``data`` as output frames of at most :data:`MAX_DATA` bytes each, in one buffer."""
    if len(data) <= MAX_DATA:
        return HEADER.pack(KIND_OUTPUT, len(data)) + data
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start in range(0, len(data), MAX_DATA):
        piece = view[start:start + MAX_DATA]
        parts += (HEADER.pack(KIND_OUTPUT, len(piece)), piece)
    return b"".join(parts)


def encode_json(message: dict) -> bytes:
    return encode(KIND_JSON, json.dumps(message, separators=(",", ":")).encode())


def parse_header(header: bytes) -> tuple[bytes, int]:
    kind, length = HEADER.unpack(header)
    if kind not in (KIND_JSON, KIND_OUTPUT, KIND_INPUT):
        raise ValueError(f"frame: unknown kind {kind!r}")
    if length > (MAX_JSON if kind == KIND_JSON else MAX_DATA):
        raise ValueError(f"frame: length {length} too large")
    return kind, length


def log(event: str, **fields: object) -> None:
    """One JSON line on stderr (the session's job log, the user's file)."""
    line = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "logger": "sbroker.agent",
            "event": event, **fields}
    try:
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def window_size(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 24, 80
    return (rows, cols) if 1 <= rows <= 1000 and 1 <= cols <= 1000 else (24, 80)


def _size(message: dict) -> tuple[int, int]:
    rows, cols = message.get("rows"), message.get("cols")
    if isinstance(rows, int) and isinstance(cols, int) and 1 <= rows <= 1000 and 1 <= cols <= 1000:
        return rows, cols
    return 24, 80


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# --------------------------------------------------------------------------- the agent

class Conn:
    """One attached client: framed reads and writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read_frame(self) -> tuple[bytes, bytes]:
        kind, length = parse_header(await self.reader.readexactly(HEADER.size))
        return kind, (await self.reader.readexactly(length) if length else b"")

    async def read_json(self) -> dict:
        kind, payload = await self.read_frame()
        message = json.loads(payload.decode()) if kind == KIND_JSON else None
        if not isinstance(message, dict):
            raise ValueError("frame: expected a JSON object")
        return message

    async def send(self, message: dict) -> None:
        self.writer.write(encode_json(message))
        await self.writer.drain()

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()


class Shell:
    def __init__(self, number: int, pid: int, master: int, scrollback_limit: int) -> None:
        self.id = number
        self.pid = pid
        self.master = master
        self.scrollback_limit = scrollback_limit
        self.scrollback: deque[bytes] = deque()
        self.scrollback_size = 0
        self.writer: Conn | None = None
        self.observers: set[Conn] = set()
        self.detached_at: float | None = None
        self.started = time.time()
        self.last_input = self.started
        self.pending_input = bytearray()
        self.reading = False
        self.closed = False
        self.exited = False
        self.input_drained = asyncio.Event()
        #: Started ahead for the next login (not yet given to anyone); what it was started with.
        self.spare = False
        self.spare_key: tuple = ()

    def record(self, data: bytes) -> None:
        """Keep (at least) the last ``scrollback_limit`` bytes, as the chunks they came in: a
        flood of output costs an append per chunk, not a move of the whole scrollback (a
        bytearray trimmed at the front is copied whole at the next append)."""
        if not data or self.scrollback_limit <= 0:
            return
        self.scrollback.append(data)
        self.scrollback_size += len(data)
        while self.scrollback_size - len(self.scrollback[0]) >= self.scrollback_limit:
            self.scrollback_size -= len(self.scrollback.popleft())

    def recent(self) -> bytes:
        """The scrollback to replay: its last ``scrollback_limit`` bytes."""
        return b"".join(self.scrollback)[-self.scrollback_limit:]


class Agent:
    def __init__(self, directory: str, *, status_path: str = "", grace: float = 600.0,
                 scrollback: int = 64 * 1024, max_shells: int = 64, max_detached: int = 8,
                 walltime_marks: tuple[int, ...] = (), job_id: str = "", listen: str = "",
                 key_path: str = "", max_commands: int = 128, spare: bool = False,
                 first_shell: tuple[list[str], str] | None = None, await_instance: bool = False) -> None:
        _serve_imports()
        self.directory = directory
        self.spare_enabled = spare
        self.spare: Shell | None = None
        #: The shell of the login that created the session, started when the start script says
        #: the instance is up (SIGUSR1): its prompt is there when that login attaches.
        self.first_shell = first_shell if spare else None
        #: Set when the instance is up (SIGUSR1 from the start script, ``--await-instance 1``): a
        #: login that attached early, while it started, gets its shell then.
        self.instance_up = asyncio.Event()
        if not await_instance:
            self.instance_up.set()
        self.listen = listen
        self.key_path = key_path
        self.streams: Streams | None = None
        self.max_commands = max_commands
        self.status_path = status_path
        self.grace = grace
        self.scrollback_limit = scrollback
        self.max_shells = max_shells
        self.max_detached = max_detached
        self.walltime_marks = tuple(sorted(set(walltime_marks), reverse=True))
        self.job_id = job_id
        self.shells: dict[int, Shell] = {}
        self.next_id = 1
        self.started = time.time()
        self.last_input = 0.0
        self.last_attach = 0.0
        self.unread_notices: list[str] = []
        self.status_written = 0.0
        self.status_timer: asyncio.TimerHandle | None = None
        self.stopping = asyncio.Event()
        #: Set by op ``walltime`` (``sbroker extend`` raised the job's limit).
        self.walltime_moved = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        path = os.path.join(self.directory, SOCKET_NAME)
        staging = os.path.join(self.directory, f".{SOCKET_NAME}.{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(staging)
        finally:
            os.umask(old)
        server = await asyncio.start_unix_server(self._on_client, sock=sock, limit=MAX_JSON * 2)
        stream_tasks = []
        if self.listen and self.key_path:  # before the socket appears: the first status has the port
            self.streams = Streams(self, self.listen, self.key_path, self.max_commands)
            try:
                stream_tasks.append(self.streams.start())
            except OSError as exc:
                log("streams_unavailable", listen=self.listen, error=exc.strerror or str(exc))
                self.streams = None
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(signum, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self.loop.add_signal_handler(signal.SIGUSR1, self._instance_up)
        self._write_status()  # the status (with the port) exists before the socket says "ready"
        os.replace(staging, path)  # the socket appears only once it accepts: the batch script waits for it
        log("agent_started", pid=os.getpid(), socket=path, grace=self.grace, max_shells=self.max_shells,
            max_detached=self.max_detached, python=sys.version.split()[0])
        tasks = [asyncio.ensure_future(self._walltime_loop()), *stream_tasks]
        await self.stopping.wait()
        log("agent_stopping", shells=len(self.shells))
        server.close()
        for shell in list(self.shells.values()):
            self.hangup(shell, "agent stopping")
        deadline = time.monotonic() + 3
        while self.shells and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for shell in list(self.shells.values()):  # ignored SIGHUP: the agent must not leave them behind
            if not shell.exited:
                log("shell_killed", shell=shell.id, why="still running 3s after the hangup")
                self._signal(shell, signal.SIGKILL)
        if self.streams is not None:
            self.streams.stop()
        for task in tasks:
            task.cancel()
        try:
            os.unlink(path)
        except OSError:
            pass
        return 0

    # ------------------------------------------------------------ clients

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid != os.getuid():
                log("peer_refused", uid=uid)
                return
            message = await asyncio.wait_for(conn.read_json(), FIRST_MESSAGE_TIMEOUT)
            op = message.get("op")
            if op == "status":
                await conn.send({"type": "result", **self.status()})
            elif op == "attach":
                await self._attach(conn, message)
            elif op == "walltime":
                self.walltime_moved.set()
                await conn.send({"type": "result"})
            else:
                await conn.send({"type": "error", "message": "op: must be attach, status or walltime"})
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, OSError):
            pass
        finally:
            writer.close()

    async def _attach(self, conn: Conn, message: dict) -> None:
        mode = message.get("mode", "write")
        if mode not in ("write", "observe"):
            await conn.send({"type": "error", "message": "mode: must be write or observe"})
            return
        if not self.instance_up.is_set() and not await self._await_instance():
            await conn.send({"type": "error", "message": "session: its instance did not start (see the login's "
                                                         "next line, or `sbroker logs`)"})
            return
        rows, cols = _size(message)
        fresh = False
        if mode == "observe":
            shell = self._pick_observed()
            if shell is None:
                await conn.send({"type": "error", "message": "session: has no shell to observe"})
                return
            shell.observers.add(conn)
            reattached = True
        else:
            shell = self._pick_detached()
            reattached = shell is not None
            if shell is None:
                argv = message.get("argv")
                if not (isinstance(argv, list) and argv and all(isinstance(a, str) and "\0" not in a for a in argv)):
                    await conn.send({"type": "error", "message": "argv: must be a non-empty list of strings"})
                    return
                term = (message.get("term") if isinstance(message.get("term"), str) else "")[:64]
                shell = self._take_spare(argv, term)
                fresh = shell is not None  # its prompt is in its scrollback: replayed below
                if shell is None:
                    if self._open_shells() >= self.max_shells:
                        log("limit_refused", rule="shells", limit=self.max_shells)
                        await conn.send({"type": "error", "message":
                                         f"limits.shells_per_user: at most {self.max_shells} shells in a session; "
                                         "exit one (or reattach a detached one) and retry"})
                        return
                    shell = self._spawn(argv, rows, cols, term)
                self._schedule_spare(argv, term)
            shell.writer, shell.detached_at = conn, None
            set_winsize(shell.master, rows, cols)
        now = time.time()
        self.last_attach = now
        event = "observe" if mode == "observe" else ("reattach" if reattached else "attach")
        log(event, shell=shell.id, rows=rows, cols=cols)
        self._status_changed()
        await conn.send({"type": "attached", "terminal": shell.id, "mode": mode, "reattached": reattached})
        if (reattached or fresh) and shell.scrollback:
            replay = shell.recent()
            for start in range(0, len(replay), MAX_DATA):
                conn.writer.write(encode(KIND_OUTPUT, replay[start:start + MAX_DATA]))
        announce = message.get("announce")
        if isinstance(announce, str) and announce:
            self._announce(shell, announce[:300])  # after the replay, which would repeat it
        if self.unread_notices and mode == "write":
            for text in self.unread_notices:
                self._deliver(shell, text.encode())
            self.unread_notices.clear()
        try:
            await self._pump(shell, conn, mode)
        finally:
            self._detach(shell, conn)

    def _announce(self, shell: Shell, text: str) -> None:
        """A notice in every shell's terminals and scrollback (an administrator typing)."""
        notice = f"\r\n[sbroker: {text}]\r\n".encode()
        log("announce", shell=shell.id, text=text)
        for other in self.shells.values():
            if not other.spare:
                self._deliver(other, notice)

    # ------------------------------------------------------------ the spare shell

    def _open_shells(self) -> int:
        return sum(1 for s in self.shells.values() if not s.closed and not s.spare)

    def _take_spare(self, argv: list[str], term: str) -> Shell | None:
        """The spare shell for a new login, if it was started the way this login asks, is under
        SPARE_MAX_AGE old and no dotfile changed since (a user who just edited ``~/.bashrc``
        must get a shell that read it); else it is hung up and None is returned."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if (spare.closed or spare.spare_key != (tuple(argv), term, _dotfile_stamps())
                or time.time() - spare.started > SPARE_MAX_AGE):
            self.hangup(spare, "spare shell out of date")
            return None
        spare.spare = False
        log("spare_taken", shell=spare.id)
        return spare

    async def _await_instance(self) -> bool:
        """Hold an early login until the instance is up (bounded by INSTANCE_WAIT); False when
        the agent stops first (the start failed) or the bound passed."""
        stop = asyncio.ensure_future(self.stopping.wait())
        up = asyncio.ensure_future(self.instance_up.wait())
        try:
            await asyncio.wait({stop, up}, timeout=INSTANCE_WAIT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            up.cancel()
        return self.instance_up.is_set() and not self.stopping.is_set()

    def _instance_up(self) -> None:
        """The start script listed the instance: start the first login's shell (once)."""
        first, self.first_shell = self.first_shell, None
        if first is not None:
            self._start_spare(*first)
        self.instance_up.set()

    def _schedule_spare(self, argv: list[str], term: str) -> None:
        if self.spare_enabled and self.spare is None:
            self.loop.call_later(SPARE_DELAY, self._start_spare, list(argv), term)

    def _start_spare(self, argv: list[str], term: str) -> None:
        """Start a shell ahead, so the next login's prompt is already there. It does not count
        against ``--max-shells`` and is started only while there is room for one more."""
        if self.spare is not None or self.stopping.is_set():
            return
        if self._open_shells() >= self.max_shells:
            log("spare_skipped", why=f"{self.max_shells} shells open, the most allowed")
            return
        shell = self._spawn(argv, 24, 80, term)
        shell.spare, shell.spare_key = True, (tuple(argv), term, _dotfile_stamps())
        self.spare = shell
        log("spare_started", shell=shell.id)

    def _pick_detached(self) -> Shell | None:
        detached = [s for s in self.shells.values() if s.writer is None and s.detached_at is not None
                    and not s.closed]
        return min(detached, key=lambda s: s.detached_at or 0.0) if detached else None

    def _pick_observed(self) -> Shell | None:
        shells = [s for s in self.shells.values() if not s.closed and not s.spare]
        return max(shells, key=lambda s: (s.writer is not None, s.last_input)) if shells else None

    async def _pump(self, shell: Shell, conn: Conn, mode: str) -> None:
        while not shell.closed:
            kind, payload = await conn.read_frame()
            writer = mode == "write" and shell.writer is conn
            if kind == KIND_INPUT:
                if writer:
                    await self._write_input(shell, payload)
            elif kind == KIND_JSON:
                message = json.loads(payload.decode())
                control = message.get("type") if isinstance(message, dict) else None
                if control == "resize" and writer:
                    set_winsize(shell.master, *_size(message))
                elif control == "signal" and writer and message.get("signal") in SIGNAL_KEYS:
                    await self._write_input(shell, SIGNAL_KEYS[message["signal"]])
                elif control == "detach":
                    return

    def _detach(self, shell: Shell, conn: Conn) -> None:
        shell.observers.discard(conn)
        if shell.writer is conn:
            shell.writer = None
            if not shell.closed:
                shell.detached_at = detached_at = time.time()
                log("detach", shell=shell.id, grace=self.grace)
                self.loop.call_later(self.grace, self._expire, shell, detached_at)
                self._enforce_detached_limit()
        self._status_changed()

    def _enforce_detached_limit(self) -> None:
        detached = sorted((s for s in self.shells.values() if s.writer is None and s.detached_at is not None
                           and not s.closed), key=lambda s: s.detached_at or 0.0)
        for shell in detached[:max(0, len(detached) - self.max_detached)]:
            shell.detached_at = None
            log("limit_detached", shell=shell.id, limit=self.max_detached,
                rule="limits.detached_shells_per_user: oldest detached shell ended")
            self.hangup(shell, "detached-shell limit")

    def _expire(self, shell: Shell, detached_at: float) -> None:
        if shell.writer is None and shell.detached_at == detached_at and not shell.closed:
            log("shell_expired", shell=shell.id, grace=self.grace)
            self.hangup(shell, "detach grace ended")

    # ------------------------------------------------------------ shells

    def _spawn(self, argv: list[str], rows: int, cols: int, term: str) -> Shell:
        master, slave = os.openpty()
        set_winsize(slave, rows, cols)
        env = dict(os.environ)
        if term:
            env["TERM"] = term
        pid = os.fork()
        if pid == 0:  # child: a session of its own with the pty as controlling terminal
            try:
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                if slave > 2:
                    os.close(slave)
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:  # noqa: BLE001 - the child must never return
                try:
                    os.write(2, f"sbroker agent: cannot run {argv[0]}: {exc}\r\n".encode())
                finally:
                    os._exit(127)
        os.close(slave)
        os.set_blocking(master, False)
        shell = Shell(self.next_id, pid, master, self.scrollback_limit)
        self.next_id += 1
        self.shells[shell.id] = shell
        self._start_reading(shell)
        log("shell_started", shell=shell.id, pid=pid)
        return shell

    def _start_reading(self, shell: Shell) -> None:
        if not shell.reading and not shell.closed:
            self.loop.add_reader(shell.master, self._on_output, shell)
            shell.reading = True

    def _stop_reading(self, shell: Shell) -> None:
        if shell.reading:
            self.loop.remove_reader(shell.master)
            shell.reading = False

    def _on_output(self, shell: Shell) -> None:
        """Read what the pty has, up to :data:`OUTPUT_BURST`, and pass it on in one write.

        A pty hands out at most 4 KiB a read however much is waiting, so a flood is many
        reads; gathering them into one write per wakeup (not one per 64 KiB) saves the
        terminal's connection sends and this loop's wakeups."""
        chunks: list[bytes] = []
        size = 0
        while size < OUTPUT_BURST:
            try:
                data = os.read(shell.master, MAX_DATA)
            except BlockingIOError:
                break
            except OSError:  # EIO: every process holding the pty has gone
                data = b""
            if not data:
                if not chunks:
                    self._stop_reading(shell)
                    return
                break
            chunks.append(data)
            size += len(data)
        if chunks:
            self._deliver(shell, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _deliver(self, shell: Shell, data: bytes) -> None:
        shell.record(data)
        frame = encode_output(data)
        for conn in list(shell.observers):
            if conn.buffered() > OBSERVER_LIMIT:
                shell.observers.discard(conn)
                conn.writer.close()
                log("observer_dropped", shell=shell.id, reason="not reading")
            else:
                conn.writer.write(frame)
        writer = shell.writer
        if writer is not None:
            writer.writer.write(frame)
            if writer.buffered() > WRITER_HIGH_WATER:
                self._stop_reading(shell)
                asyncio.ensure_future(self._resume_after_drain(shell, writer))

    async def _resume_after_drain(self, shell: Shell, conn: Conn) -> None:
        try:
            await conn.writer.drain()
        except (ConnectionError, OSError):
            pass
        self._start_reading(shell)

    async def _write_input(self, shell: Shell, data: bytes) -> None:
        now = time.time()
        shell.last_input = self.last_input = now
        if now - self.status_written > STATUS_INPUT_INTERVAL:
            self._status_changed()
        shell.pending_input += data
        self._flush_input(shell)
        while len(shell.pending_input) > INPUT_LIMIT and not shell.closed:
            shell.input_drained.clear()
            await shell.input_drained.wait()

    def _flush_input(self, shell: Shell) -> None:
        while shell.pending_input and not shell.closed:
            try:
                n = os.write(shell.master, shell.pending_input[:MAX_DATA])
            except BlockingIOError:
                self.loop.add_writer(shell.master, self._on_writable, shell)
                return
            except OSError:
                shell.pending_input.clear()
                break
            del shell.pending_input[:n]
        shell.input_drained.set()

    def _on_writable(self, shell: Shell) -> None:
        self.loop.remove_writer(shell.master)
        self._flush_input(shell)

    def hangup(self, shell: Shell, why: str) -> None:
        """SIGHUP to the shell's process group (an interactive bash passes it on to its
        jobs), SIGKILL if it is still there :data:`HANGUP_KILL_AFTER` seconds later."""
        log("hangup", shell=shell.id, why=why)
        self._signal(shell, signal.SIGHUP)
        self.loop.call_later(HANGUP_KILL_AFTER, lambda: None if shell.exited else self._signal(shell, signal.SIGKILL))

    @staticmethod
    def _signal(shell: Shell, signum: int) -> None:
        try:
            os.killpg(shell.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self) -> None:
        if self.streams is not None:
            self.streams.reap()
        for shell in list(self.shells.values()):
            if shell.exited:
                continue
            try:
                pid, wait_status = os.waitpid(shell.pid, os.WNOHANG)
            except ChildProcessError:
                pid, wait_status = shell.pid, 0
            if pid:
                shell.exited = True
                code = os.waitstatus_to_exitcode(wait_status)
                asyncio.ensure_future(self._finish(shell, 128 - code if code < 0 else code))

    async def _finish(self, shell: Shell, status: int) -> None:
        """The shell exited: pass on what it wrote last, then its exit status, to everyone attached."""
        while True:
            try:
                data = os.read(shell.master, MAX_DATA)
            except OSError:
                break
            if not data:
                break
            self._deliver(shell, data)
        self._stop_reading(shell)
        try:
            self.loop.remove_writer(shell.master)
        except (ValueError, OSError):
            pass
        shell.closed = True
        shell.input_drained.set()
        for conn in [shell.writer, *shell.observers]:
            if conn is not None:
                try:
                    await conn.send({"type": "exit", "status": status})
                except (ConnectionError, OSError):
                    pass
                conn.writer.close()
        os.close(shell.master)
        self.shells.pop(shell.id, None)
        if self.spare is shell:
            self.spare = None
        log("shell_exited", shell=shell.id, status=status)
        self._status_changed()

    # ------------------------------------------------------------ status for the broker

    def status(self) -> dict:
        live = [s for s in self.shells.values() if not s.closed and not s.spare]
        return {"v": 1, "pid": os.getpid(), "dir": self.directory, "python": sys.executable,
                "started": round(self.started, 3), "time": round(time.time(), 3),
                "shells": len(live), "writers": sum(1 for s in live if s.writer is not None),
                "observers": sum(len(s.observers) for s in live),
                "detached": sum(1 for s in live if s.writer is None and s.detached_at is not None),
                "last_input": round(self.last_input, 3), "last_attach": round(self.last_attach, 3),
                "commands": len(self.streams.commands) if self.streams else 0,
                "port": self.streams.port if self.streams else 0}

    def _status_changed(self) -> None:
        if self.status_timer is None:
            self.status_timer = self.loop.call_later(0.1, self._write_status)

    def _write_status(self) -> None:
        self.status_timer = None
        self.status_written = time.time()
        if not self.status_path:
            return
        directory, name = os.path.split(self.status_path)
        staging = os.path.join(directory, f".{name}.tmp")
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.status()) + "\n")
            os.replace(staging, self.status_path)
        except OSError as exc:
            log("status_unwritable", path=self.status_path, error=exc.strerror or str(exc))

    # ------------------------------------------------------------ walltime warnings

    async def _walltime_loop(self) -> None:
        """Warn attached terminals before the allocation's end (``squeue %e``, re-read every
        5 minutes, every minute near a mark: an admin may change the limit). A mark passed
        with nobody attached is shown to the next writer that attaches. ``sbroker extend``
        says when the limit moved (op ``walltime``): the end is read again at once, attached
        terminals are told the new end, and marks that are ahead again will warn again."""
        if not self.walltime_marks or not self.job_id:
            return
        sent: set[int] = set()
        end: float | None = None
        next_query = 0.0
        while True:
            now = time.time()
            moved = self.walltime_moved.is_set()
            if now >= next_query or moved:
                self.walltime_moved.clear()
                end = await self._job_end()
                near = end is not None and end - now <= self.walltime_marks[0] + 120
                next_query = now + (60 if near else 300)
                if moved and end is not None:
                    sent = {m for m in sent if end - now <= m}
                    self._tell_all(f"\r\n*** sbroker: this session's SLURM allocation was extended; it now ends"
                                   f" at {time.strftime('%H:%M', time.localtime(end))}"
                                   f" (in {int(end - now) // 60} minutes). ***\r\n", "walltime_extended")
            if end is not None:
                left = max(0.0, end - now)
                due = [m for m in self.walltime_marks if left <= m and m not in sent]
                if due:
                    sent.update(due)
                    self._warn_walltime(min(due), left)
            try:
                await asyncio.wait_for(self.walltime_moved.wait(), 5)
            except asyncio.TimeoutError:
                pass

    def _tell_all(self, text: str, event: str, **fields: object) -> int:
        """Show ``text`` in every attached terminal (or to the next writer if none); logged."""
        delivered = 0
        for shell in self.shells.values():
            if shell.writer is not None or shell.observers:
                self._deliver(shell, text.encode())
                delivered += 1
        if not delivered:
            self.unread_notices = [text]
        log(event, **fields, delivered=delivered)
        return delivered

    async def _job_end(self) -> float | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "squeue", "--noheader", f"--jobs={self.job_id}", "--format=%e",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except (OSError, asyncio.TimeoutError):
            return None
        text = out.decode(errors="replace").strip()
        try:
            return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return None  # no limit (or no answer): nothing to warn about

    def _warn_walltime(self, mark: int, left: float) -> None:
        seconds = int(left)
        when = f"{seconds // 60} minutes" if seconds >= 120 else f"{seconds} seconds"
        text = (f"\r\n\x07*** sbroker: this session's SLURM allocation ends in {when} (walltime). "
                f"Save your work; the shell and everything running in it will be stopped. ***\r\n")
        self._tell_all(text, "walltime_warning", mark=mark, seconds_left=seconds)


# --------------------------------------------------------------------------- direct streams

#: The first bytes of a direct connection, then the client's nonce.
STREAM_MAGIC = b"SBA1"
NONCE = 32
HANDSHAKE_TIMEOUT = 10.0
PAIR_TIMEOUT = 10.0
MAX_REQUEST = 256 * 1024
#: Connections still proving the key at once (each holds an fd); beyond it the oldest is closed.
MAX_HANDSHAKING = 64
#: stderr waiting for a slow client beyond this stops being read (the command then blocks).
STDERR_HIGH_WATER = 1024 * 1024


def stream_mac(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, role + client_nonce + server_nonce, hashlib.sha256).digest()


class Command:
    """A running command: its pid, its stderr pipe and the client's control connection."""

    def __init__(self, pid: int, err_fd: int, control: socket.socket) -> None:
        self.pid = pid
        self.err_fd = err_fd
        self.control = control
        self.frames: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.pending = 0
        self.reading = True


class Streams:
    """Commands over direct TCP streams from login nodes, bypassing ``srun``'s stdio forwarding.

    Why: ``srun`` forwards a step's stdio through slurmstepd at a fraction of ssh's speed;
    a transfer (scp, sftp, rsync, ``ssh host cmd``) through it is 3-5 times slower than the
    same through plain ssh. Here the command's stdin and stdout *are* a TCP socket from the
    login node: no copy in this process at all.

    A client proves it knows the session key (a file only the user can read, beside the job
    log) and the agent proves it too, before any data: ``SBA1 | client nonce``, then
    ``server nonce | HMAC(key, "server" | nonces)``, then ``HMAC(key, "client" | nonces)``
    (both compared in constant time). So another user who can reach the port can neither use
    it nor, listening on it after the session ends, receive anything from a login. The bytes
    are not encrypted: they stay on the cluster's internal network between login and compute
    nodes, as srun's own stdio does.

    A command is two connections: ``exec`` (its stdin and stdout, handed to the command as
    fds 0 and 1) and ``stderr`` (the command's stderr in frames, then ``exit`` with its
    status). The argv is the user's own to choose: it runs as the user, in the user's job.
    """

    def __init__(self, agent: Agent, listen: str, key_path: str, max_commands: int) -> None:
        self.agent = agent
        self.loop = agent.loop
        self.listen = listen
        self.key_path = key_path
        self.max_commands = max_commands
        self.key = b""
        self.port = 0
        self.commands: dict[int, Command] = {}
        self.waiting: dict[str, tuple[socket.socket, list[str], asyncio.Future]] = {}
        self.listener: socket.socket | None = None
        #: Connections that have not proved the key yet, oldest first.
        self.pending: dict[socket.socket, asyncio.Future] = {}

    def start(self) -> asyncio.Future:
        key = secrets.token_bytes(32)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, key.hex().encode() + b"\n")
        finally:
            os.close(fd)
        self.key = key
        listener = socket.socket(socket.AF_INET6 if ":" in self.listen else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen, 0))
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener
        self.port = listener.getsockname()[1]
        log("streams_listening", listen=self.listen, port=self.port)
        return asyncio.ensure_future(self._accept_loop())

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for command in list(self.commands.values()):
            _kill_group(command.pid, signal.SIGHUP)

    async def _accept_loop(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = await self.loop.sock_accept(self.listener)
            except OSError as exc:  # e.g. out of fds: keep serving once some are free
                log("stream_accept_failed", error=exc.strerror or str(exc))
                await asyncio.sleep(0.5)
                continue
            if len(self.pending) >= MAX_HANDSHAKING:
                # The oldest goes, not the newest: any user who can reach the port can hold
                # connections open without a word, and refusing new ones would lock the owner
                # out for as long as they keep that up. A real client proves the key within
                # milliseconds, so it is never the oldest of a flood for long.
                self.pending.pop(next(iter(self.pending))).cancel()
            self.pending[sock] = asyncio.ensure_future(self._serve(sock))

    async def _recv_exactly(self, sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self.loop.sock_recv(sock, n - len(data))
            if not chunk:
                raise ConnectionError("closed during the handshake")
            data += chunk
        return data

    async def _recv_line(self, sock: socket.socket) -> dict:
        """The request line. Nothing past it is consumed (the rest is the command's stdin):
        what has arrived is peeked at, and only up to the newline is read. (Byte by byte, a
        command's argv of a few hundred bytes cost as many receives, on every command.)"""
        data = b""
        while True:
            if len(data) > MAX_REQUEST:
                raise ValueError("request: too long")
            try:
                seen = sock.recv(MAX_REQUEST + 1 - len(data), socket.MSG_PEEK)
            except BlockingIOError:
                await self._readable(sock)
                continue
            if not seen:
                raise ConnectionError("closed before the request")
            end = seen.find(b"\n") + 1
            data += sock.recv(end or len(seen))  # no more than was just seen: never blocks
            if end:
                break
        message = json.loads(data.decode())
        if not isinstance(message, dict):
            raise ValueError("request: must be a JSON object")
        return message

    async def _readable(self, sock: socket.socket) -> None:
        ready = self.loop.create_future()
        self.loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self.loop.remove_reader(sock.fileno())

    async def _handshake(self, sock: socket.socket) -> None:
        hello = await self._recv_exactly(sock, len(STREAM_MAGIC) + NONCE)
        if not hello.startswith(STREAM_MAGIC):
            raise ValueError("handshake: not a sbroker stream")
        client_nonce, server_nonce = hello[len(STREAM_MAGIC):], secrets.token_bytes(NONCE)
        await self.loop.sock_sendall(sock, server_nonce + stream_mac(self.key, b"server", client_nonce, server_nonce))
        proof = await self._recv_exactly(sock, 32)
        if not hmac.compare_digest(proof, stream_mac(self.key, b"client", client_nonce, server_nonce)):
            raise PermissionError("handshake: wrong session key")

    async def _serve(self, sock: socket.socket) -> None:
        keep = False
        try:
            sock.setblocking(False)
            # No Nagle: the handshake and request/reply protocols (sftp, rsync) over the socket
            # would otherwise wait on the peer's 40 ms delayed ACK (see broker/direct.py).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.wait_for(self._handshake(sock), HANDSHAKE_TIMEOUT)
                request = await asyncio.wait_for(self._recv_line(sock), HANDSHAKE_TIMEOUT)
            finally:
                self.pending.pop(sock, None)
            op = request.get("op")
            if op == "exec":
                keep = await self._exec(sock, request)
            elif op == "stderr":
                keep = self._pair(sock, request)
            else:
                await self.loop.sock_sendall(sock, b'{"error": "op: must be exec or stderr"}\n')
        except PermissionError as exc:
            log("stream_refused", why=str(exc))
        except (ConnectionError, OSError, ValueError, asyncio.TimeoutError) as exc:
            log("stream_dropped", why=str(exc) or type(exc).__name__)
        finally:
            if not keep:
                sock.close()

    async def _exec(self, sock: socket.socket, request: dict) -> bool:
        argv = request.get("argv")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) and "\0" not in a for a in argv)):
            await self.loop.sock_sendall(sock, b'{"error": "argv: must be a non-empty list of strings"}\n')
            return False
        if len(self.commands) + len(self.waiting) >= self.max_commands:
            log("limit_refused", rule="commands", limit=self.max_commands)
            await self.loop.sock_sendall(sock, json.dumps({"error": f"at most {self.max_commands} commands at "
                                                           "once in a session; retry when some have ended"}
                                                          ).encode() + b"\n")
            return False
        token = secrets.token_hex(16)
        paired: asyncio.Future = self.loop.create_future()
        self.waiting[token] = (sock, argv, paired)
        await self.loop.sock_sendall(sock, json.dumps({"token": token}).encode() + b"\n")
        try:
            control = await asyncio.wait_for(paired, PAIR_TIMEOUT)
        except asyncio.TimeoutError:
            log("stream_dropped", why="no stderr connection followed the exec")
            return False
        finally:
            self.waiting.pop(token, None)
        self._spawn(sock, control, argv)
        return False  # the command holds its own copies; this one is closed

    def _pair(self, sock: socket.socket, request: dict) -> bool:
        entry = self.waiting.get(str(request.get("token", "")))
        if entry is None or entry[2].done():
            return False
        entry[2].set_result(sock)
        return True

    def _spawn(self, data: socket.socket, control: socket.socket, argv: list[str]) -> None:
        data.setblocking(True)  # the command's fds 0 and 1: blocking, as any program expects
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                os.dup2(data.fileno(), 0)
                os.dup2(data.fileno(), 1)
                os.dup2(err_w, 2)
                os.closerange(3, 65536)
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                os.execvpe(argv[0], argv, dict(os.environ))
            except BaseException as exc:  # noqa: BLE001 - the child must never return
                try:
                    os.write(2, f"sbroker agent: cannot run {argv[0]}: {exc}\n".encode())
                finally:
                    os._exit(127)
        os.close(err_w)
        data.close()
        os.set_blocking(err_r, False)
        command = Command(pid, err_r, control)
        self.commands[pid] = command
        self.loop.add_reader(err_r, self._on_stderr, command)
        self.loop.add_reader(control.fileno(), self._on_control, command)
        asyncio.ensure_future(self._send_loop(command))
        self.agent.last_input = time.time()
        self.agent._status_changed()
        log("command_started", pid=pid, argv0=os.path.basename(argv[0]))

    def _on_stderr(self, command: Command) -> None:
        try:
            data = os.read(command.err_fd, MAX_DATA)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._pause(command)
            return
        self._send(command, encode(KIND_OUTPUT, data))
        if command.pending > STDERR_HIGH_WATER:
            self._pause(command)  # the client is not reading: the command blocks on its stderr

    def _on_control(self, command: Command) -> None:
        """The client sends nothing after its request: readable means it went away (sshd hung
        up): the command is hung up, as ``srun`` cancels its step on SIGHUP."""
        try:
            self.loop.remove_reader(command.control.fileno())
        except (ValueError, OSError):
            pass
        if command.pid in self.commands:
            log("command_hangup", pid=command.pid, why="the client's connection closed")
            _kill_group(command.pid, signal.SIGHUP)

    def _pause(self, command: Command) -> None:
        if command.reading:
            command.reading = False
            try:
                self.loop.remove_reader(command.err_fd)
            except (ValueError, OSError):
                pass

    def _send(self, command: Command, frame: bytes | None) -> None:
        command.pending += len(frame or b"")
        command.frames.put_nowait(frame)

    async def _send_loop(self, command: Command) -> None:
        """Frames to the control connection in order; None ends it."""
        broken = False
        while True:
            frame = await command.frames.get()
            if frame is None:
                break
            command.pending -= len(frame)
            if not broken:
                try:
                    await self.loop.sock_sendall(command.control, frame)
                except OSError:
                    broken = True  # the client went away; the command still runs to its end
            if (not command.reading and command.pending < STDERR_HIGH_WATER // 2 and command.err_fd >= 0
                    and command.pid in self.commands):
                command.reading = True
                self.loop.add_reader(command.err_fd, self._on_stderr, command)
        try:
            self.loop.remove_reader(command.control.fileno())
        except (ValueError, OSError):
            pass
        command.control.close()

    def reap(self) -> None:
        for pid, command in list(self.commands.items()):
            try:
                done, wait_status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, wait_status = pid, 0
            if not done:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            status = 128 - code if code < 0 else code
            _kill_group(pid, signal.SIGKILL)  # what is left of it ends with it, as in a step
            while True:
                try:
                    data = os.read(command.err_fd, MAX_DATA)
                except OSError:
                    break
                if not data:
                    break
                self._send(command, encode(KIND_OUTPUT, data))
            self._pause(command)
            os.close(command.err_fd)
            command.err_fd = -1
            self._send(command, encode_json({"type": "exit", "status": status}))
            self._send(command, None)
            del self.commands[pid]
            self.agent.last_input = time.time()
            self.agent._status_changed()
            log("command_exited", pid=pid, status=status)


def _dotfile_stamps() -> tuple:
    """``(name, mtime_ns, size)`` of the shell's dotfiles in ``$HOME`` (None when absent)."""
    home = os.environ.get("HOME", "")
    stamps = []
    for name in DOTFILES:
        try:
            st = os.stat(os.path.join(home, name))
            stamps.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((name, None, None))
    return tuple(stamps)


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- attach (client)

class _RawTTY:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list | None = None

    def __enter__(self) -> _RawTTY:
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSAFLUSH, self.saved)
            except termios.error:
                pass
            self.saved = None


def _private_dir(directory: str) -> str | None:
    """Why ``directory`` is not this user's private agent directory, or None."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return f"{directory} is not a private directory of uid {os.getuid()}"
    return None


def connect(directory: str) -> socket.socket:
    """A connection to the agent of ``directory``, checked to be this user's own."""
    problem = _private_dir(directory)
    if problem:
        raise OSError(problem)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(directory, SOCKET_NAME))
        if peer_uid(sock) != os.getuid():
            raise OSError("the agent socket is not served by this user")
    except OSError:
        sock.close()
        raise
    return sock


def _frames(buffer: bytearray) -> list[tuple[bytes, bytes]]:
    out = []
    while len(buffer) >= HEADER.size:
        kind, length = parse_header(bytes(buffer[:HEADER.size]))
        if len(buffer) < HEADER.size + length:
            break
        out.append((kind, bytes(buffer[HEADER.size:HEADER.size + length])))
        del buffer[:HEADER.size + length]
    return out


def _split_frames(data: bytes) -> tuple[list[tuple[bytes, memoryview]], bytes]:
    """The whole frames at the start of ``data`` (payloads are views into it, not copies) and
    the incomplete rest."""
    view = memoryview(data)
    frames = []
    pos = 0
    while len(data) - pos >= HEADER.size:
        kind, length = parse_header(data[pos:pos + HEADER.size])
        end = pos + HEADER.size + length
        if end > len(data):
            break
        frames.append((kind, view[pos + HEADER.size:end]))
        pos = end
    return frames, data[pos:]


def _write_views(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` in order with one ``writev`` when the terminal takes them all (a flood's
    output arrives as several frames a read; no copy joins them)."""
    try:
        written = os.writev(fd, views) if len(views) > 1 else os.write(fd, views[0])
    except BlockingIOError:
        written = 0
    for view in views:
        if written >= len(view):
            written -= len(view)
            continue
        _write_all(fd, view[written:])
        written = 0


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # someone made the terminal non-blocking: wait until it drains
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_WRITE)
                sel.select(1.0)


def attach_main(mode: str, argv: list[str], announce: str = "") -> int:
    """Connect this terminal to a shell of the agent; return the shell's exit status."""
    directory = os.path.dirname(os.path.abspath(__file__))
    try:
        sock = connect(directory)
    except OSError as exc:
        sys.stderr.write(f"sbroker: the session agent is not answering ({exc}); the session may be ending\r\n")
        return EXIT_LOST
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    os.set_blocking(stdout, True)
    rows, cols = window_size(stdin if os.isatty(stdin) else stdout)
    request = {"op": "attach", "mode": mode, "rows": rows, "cols": cols,
               "term": os.environ.get("TERM", "xterm-256color")[:64], "argv": argv}
    if announce:
        request["announce"] = announce
    sock.sendall(encode_json(request))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    stop = {"signal": 0}

    def on_signal(signum: int, frame: object) -> None:
        if signum != signal.SIGWINCH:
            stop["signal"] = signum
        try:
            os.write(wake_w, b"W" if signum == signal.SIGWINCH else b"S")
        except OSError:
            pass

    for signum in (signal.SIGWINCH, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, on_signal)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    try:
        sel.register(stdin, selectors.EVENT_READ, "stdin")
    except (PermissionError, ValueError):
        pass
    rest = b""
    with _RawTTY(stdin):
        while True:
            for key, _ in sel.select():
                if key.data == "stdin":
                    data = os.read(stdin, MAX_DATA)
                    if not data:
                        sel.unregister(stdin)
                    elif mode == "write":
                        sock.sendall(encode(KIND_INPUT, data))
                    elif b"\x03" in data:  # an observer leaves with ^C
                        return 130
                elif key.data == "wake":
                    signals = os.read(wake_r, 64)
                    if b"S" in signals:
                        return 128 + stop["signal"]
                    rows, cols = window_size(stdin if os.isatty(stdin) else stdout)
                    sock.sendall(encode_json({"type": "resize", "rows": rows, "cols": cols}))
                else:
                    chunk = sock.recv(1 << 18)
                    if not chunk:
                        sys.stderr.write("\r\nsbroker: the session agent closed the connection\r\n")
                        return EXIT_LOST
                    frames, rest = _split_frames(rest + chunk if rest else chunk)
                    output: list[memoryview] = []
                    for kind, payload in frames:
                        if kind == KIND_OUTPUT:
                            output.append(payload)
                            continue
                        if output:
                            _write_views(stdout, output)
                            output = []
                        message = json.loads(bytes(payload).decode())
                        if message.get("type") == "exit":
                            return int(message.get("status", EXIT_LOST))
                        if message.get("type") == "error":
                            sys.stderr.write(f"sbroker: {message.get('message')}\r\n")
                            return 1
                    if output:
                        _write_views(stdout, output)


def status_main(op: str = "status") -> int:
    """``status``: print the agent's status; ``walltime``: tell it the job's limit moved."""
    directory = os.path.dirname(os.path.abspath(__file__))
    try:
        sock = connect(directory)
        sock.sendall(encode_json({"op": op}))
        buffer = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return 1
            buffer += chunk
            for kind, payload in _frames(buffer):
                sys.stdout.write(payload.decode() + "\n")
                return 0
    except OSError as exc:
        sys.stderr.write(f"sbroker: the session agent is not answering ({exc})\n")
        return 1


# --------------------------------------------------------------------------- command line

def _first_shell(argv_json: str, term: str) -> tuple[list[str], str] | None:
    """``--first-shell`` (a JSON list of strings) and ``--first-term``, or None."""
    try:
        argv = json.loads(argv_json) if argv_json else None
    except ValueError:
        return None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    return argv, term[:64]


def _options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--name value`` pairs up to ``--``; the rest is the shell's argv."""
    opts: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest = args[i + 1:]
            break
        if not arg.startswith("--") or i + 1 >= len(args):
            raise SystemExit(f"sbroker agent: bad argument {arg!r}")
        opts[arg[2:]] = args[i + 1]
        i += 2
    return opts, rest


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else ""
    opts, rest = _options(args)
    if command == "serve":
        _serve_imports()
        marks = tuple(int(m) for m in opts.get("walltime-warnings", "").split(",") if m.strip().isdigit())
        agent_args = dict(status_path=opts.get("status", ""), grace=float(opts.get("grace", "600")),
                          scrollback=int(opts.get("scrollback", str(64 * 1024))),
                          max_shells=int(opts.get("max-shells", "64")),
                          max_detached=int(opts.get("max-detached", "8")), walltime_marks=marks,
                          job_id=opts.get("job", ""), listen=opts.get("listen", ""),
                          key_path=opts.get("key", ""), max_commands=int(opts.get("max-commands", "128")),
                          spare=opts.get("spare", "0") == "1",
                          first_shell=_first_shell(opts.get("first-shell", ""), opts.get("first-term", "")),
                          await_instance=opts.get("await-instance", "0") == "1")

        async def serve() -> int:
            return await Agent(opts.get("dir") or os.path.dirname(os.path.abspath(__file__)), **agent_args).run()
        return asyncio.run(serve())
    if command == "attach":
        mode = opts.get("mode", "write")
        if mode not in ("write", "observe"):
            raise SystemExit("sbroker agent: --mode must be write or observe")
        return attach_main(mode, rest, opts.get("announce", ""))
    if command in ("status", "walltime"):
        return status_main(command)
    sys.stderr.write("usage: sessionagent.py serve|attach|status|walltime [options] [-- argv]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
