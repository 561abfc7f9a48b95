"""The daemon's Unix socket: identity from ``SO_PEERCRED``, one handler per operation.

Every connection gets the peer's uid from the kernel; nothing in a message can
change who the peer is. Admin rights come from membership of the configured group.
A bad frame or request gets one error reply naming the field and the rule, is
logged, and never affects other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from . import log as _log
from . import protocol as p
from . import userfs
from .identity import User, UnknownUser, in_group, lookup_name, lookup_uid, peer_uid
from .manager import Manager, SessionError
from .session import TERMINAL, Session, State
from .shells import command_argv, safe_term

FIRST_REQUEST_TIMEOUT = 30.0
LOG_TAIL_MAX = 256 * 1024


class StartupError(RuntimeError):
    """The daemon cannot start (socket or state dir in use, bad permissions): one clear line."""


class Connection:
    """One client connection: framed reads and writes with the peer's identity."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: User,
                 admin: bool, pid: int) -> None:
        self.reader = reader
        self.writer = writer
        self.user = user
        self.admin = admin
        self.pid = pid

    async def read_frame(self) -> tuple[bytes, bytes]:
        header = await self.reader.readexactly(p.HEADER.size)
        kind, length = p.parse_header(header)
        payload = await self.reader.readexactly(length) if length else b""
        return kind, payload

    async def read_json(self) -> dict[str, Any]:
        kind, payload = await self.read_frame()
        if kind != p.KIND_JSON:
            raise p.ProtocolError("frame", "expected a JSON frame")
        return p.decode_json(payload)

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(p.encode_json(message, max_json=p.MAX_REPLY))
        await self.writer.drain()

    async def send_frame(self, frame: bytes) -> None:
        """Send a reply framed elsewhere (a large one is encoded off the event loop)."""
        self.writer.write(frame)
        await self.writer.drain()

    async def send_error(self, field: str, rule: str, code: str = "invalid") -> None:
        await self.send(p.error(field, rule, code=code))


Handler = Callable[[Connection, dict[str, Any]], Awaitable[None]]


class Server:
    def __init__(self, manager: Manager, socket_path: str) -> None:
        self.manager = manager
        self.config = manager.config
        self.socket_path = socket_path
        self.log = _log.get("sbroker.server")
        self.handlers: dict[str, Handler] = {
            "ensure": self.op_ensure, "list": self.op_list, "show": self.op_show, "kill": self.op_kill,
            "logs": self.op_logs, "events": self.op_events, "ping": self.op_ping,
        }
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0
        #: Open connections per uid, for ``limits.connections_per_user``.
        self.connections_by_uid: dict[int, int] = {}
        self.unsafe_shells_logged: set[str] = set()
        #: Each adds fields to a session's description (attachers, policy state).
        self.describers: list[Callable[[Session], dict[str, Any]]] = []
        #: Called as ``(session, warm, seconds)`` once an ``ensure`` has a ready session.
        self.on_ensured: list[Callable[[Session, bool, float], None]] = []
        #: Awaited with the sessions about to be described (``ls``/``show``): fresh agent status.
        self.refreshers: list[Callable[[list[Session]], Awaitable[None]]] = []
        #: ``ensure`` with ``attach``: the argv and environment of the login's terminal
        #: (:class:`broker.attach.AttachHub`).
        self.attach_exec: Callable[..., Awaitable[dict[str, Any]]] | None = None
        #: ``ensure`` with a command and no terminal: where the session agent's direct stream is
        #: (:class:`broker.attach.AttachHub`), or None to run it through ``srun``.
        self.direct_stream: Callable[..., Awaitable[dict[str, Any] | None]] | None = None
        #: ``ensure`` with a command and no terminal: the login node's form of a transfer on
        #: shared storage (:meth:`broker.attach.AttachHub.login_side`), or None.
        self.login_side: Callable[[User, str, str | None, str], dict[str, Any] | None] | None = None

    async def start(self) -> None:
        sock = bind_unix(Path(self.socket_path), "broker.socket", umask=0o111)
        os.chmod(self.socket_path, 0o666)  # any local user may connect; identity comes from SO_PEERCRED
        self.server = await asyncio.start_unix_server(self._handle, sock=sock, limit=p.MAX_JSON * 2)

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        sock = writer.get_extra_info("socket")
        counted: int | None = None
        try:
            pid, uid, _gid = peer_uid(sock)
            if not self._admit(uid):
                writer.write(p.encode_json(p.error(
                    "limits.connections_per_user", f"at most {self.config.limit_connections} connections "
                    "per user at once; close some (logins, sbroker commands) and retry", code="limit")))
                await writer.drain()
                return
            counted = uid
            try:
                user = lookup_uid(uid)
            except UnknownUser as exc:
                writer.write(p.encode_json(p.error("peer", str(exc), code="unknown_user")))
                await writer.drain()
                return
            self._check_login_shell(user)
            conn = Connection(reader, writer, user, in_group(user, self.config.admin_group), pid)
            await self._serve(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug must not take the daemon down; log it with the traceback
            self.log.exception("connection_error")
        finally:
            self.connections -= 1
            if counted is not None:
                left = self.connections_by_uid.get(counted, 1) - 1
                if left > 0:
                    self.connections_by_uid[counted] = left
                else:
                    self.connections_by_uid.pop(counted, None)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    def _admit(self, uid: int) -> bool:
        """Count a new connection of ``uid``; False (and logged) past ``limits.connections_per_user``.

        Each connection holds a task and buffers in the daemon: without a bound, one user's
        thousands of idle connections cost every other user's logins. Root is not counted.
        """
        if uid == 0:
            return True
        open_now = self.connections_by_uid.get(uid, 0)
        if open_now >= self.config.limit_connections:
            self.log.warning("limit_refused", uid=uid, limit="connections_per_user",
                             value=self.config.limit_connections)
            return False
        self.connections_by_uid[uid] = open_now + 1
        return True

    def _check_login_shell(self, user: User) -> None:
        """Log (once per user) a login whose login shell is not the wrapper: it reads dotfiles.

        sshd runs the ForceCommand through the login shell, so with bash there a user's
        ``~/.bashrc`` runs on the login node before ``sbroker login`` (docs/admin.md,
        "ForceCommand hardening"). The daemon cannot undo that, only make it visible.
        """
        wanted = self.config.login_shell
        if not wanted or user.uid == 0 or user.shell == wanted or user.name in self.unsafe_shells_logged:
            return
        if not in_group(user, self.config.login_group):
            return  # not a forced user (admins keep their shell)
        self.unsafe_shells_logged.add(user.name)
        self.log.warning("login_shell_unsafe", user=user.name, uid=user.uid, shell=user.shell, wanted=wanted)

    async def _serve(self, conn: Connection) -> None:
        try:
            message = await asyncio.wait_for(conn.read_json(), FIRST_REQUEST_TIMEOUT)
            op = p.check_request(message)
        except asyncio.TimeoutError:
            await conn.send_error("request", f"none received within {FIRST_REQUEST_TIMEOUT:g}s", "timeout")
            return
        except p.ProtocolError as exc:
            self.log.warning("bad_request", uid=conn.user.uid, user=conn.user.name, field=exc.field, rule=exc.rule)
            await conn.send_error(exc.field, exc.rule)
            return
        handler = self.handlers.get(op)
        if handler is None:
            await conn.send_error("op", f"{op} is not available on this broker", "unsupported")
            return
        try:
            await handler(conn, message)
        except p.ProtocolError as exc:
            self.log.warning("bad_request", uid=conn.user.uid, op=op, field=exc.field, rule=exc.rule)
            await conn.send_error(exc.field, exc.rule)
        except SessionError as exc:
            await conn.send({"type": "error", "code": exc.code, "field": "session", "message": exc.message})
        except ValueError as exc:
            field = str(exc).split(":", 1)[0] if ":" in str(exc) else "request"
            await conn.send({"type": "error", "code": "invalid", "field": field, "message": str(exc)})

    # ------------------------------------------------------------------ operations

    def project_of(self, message: dict[str, Any]) -> str:
        project = p.get_str(message, "project", max_len=64)
        return project or self.config.default_project

    async def op_ping(self, conn: Connection, message: dict[str, Any]) -> None:
        await conn.send({"type": "result", "user": conn.user.name, "admin": conn.admin, "version": p.VERSION})

    async def op_ensure(self, conn: Connection, message: dict[str, Any]) -> None:
        project = self.project_of(message)
        command = p.get_str(message, "command", max_len=128 * 1024)
        tty = message.get("tty", False)
        if not isinstance(tty, bool):
            raise p.ProtocolError("tty", "must be true or false")
        term = p.get_str(message, "term", default="", max_len=64) or ""
        attach = message.get("attach")
        if attach is not None and (not isinstance(attach, dict) or command is not None):
            raise p.ProtocolError("attach", "must be an object of attach fields, and only without a command")
        endpoint = message.get("endpoint")
        if endpoint is not None and (endpoint != "ssh" or command is not None or attach is not None or tty):
            raise p.ProtocolError("endpoint", 'must be "ssh", and only without a command, attach or tty')
        if endpoint is not None and not self.config.ssh_endpoint:
            raise SessionError("unsupported", "ssh-proxy: the SSH endpoint is off on this cluster "
                                              "([transfer] ssh_endpoint = false); ask your administrator")
        profile = p.get_str(message, "profile", max_len=64) or None
        mismatch = p.get_str(message, "mismatch", default="refuse", max_len=16)
        if mismatch not in ("refuse", "keep", "replace"):
            raise p.ProtocolError("mismatch", "must be refuse, keep or replace")
        local = message.get("local", True)
        if not isinstance(local, bool):
            raise p.ProtocolError("local", "must be true or false")
        if local and command is not None and not tty and self.login_side is not None:
            spec = self.login_side(conn.user, project, profile, command)
            if spec is not None:  # served on the login node: no session needed, none ensured
                await conn.send({"type": "result", "local": spec})
                return
        before = self.manager.current(conn.user.name, project)
        warm = before is not None and before.state == State.READY
        started = time.monotonic()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        token = object()  # this login: a ^C cancels only a submission it made (Manager.cancel_pending)
        ask = message.get("ask", False)
        if not isinstance(ask, bool):
            raise p.ProtocolError("ask", "must be true or false")
        answers: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1)  # one question at most: junk is dropped

        async def question(q: dict[str, Any]) -> str | None:
            """A question to this (interactive) login; its answer, or None when it left."""
            await conn.send(q)
            return await answers.get()

        task = asyncio.ensure_future(self.manager.ensure(conn.user, project, queue.put_nowait, profile=profile,
                                                         mismatch=mismatch, token=token,
                                                         ask=question if ask else None,
                                                         first_term=_first_term(message.get("attach"))))
        # While it waits, the login may say {"type": "cancel"} (^C) or answer a question; its
        # leaving says nothing (the session goes on).
        # An interactive login that can start its terminal while the instance starts (Early in
        # broker.login): it gets the attach argv as soon as a new session's agent is up.
        early = attach if message.get("early") is True and attach is not None else None
        early_sent = ""  # the job the early terminal went to
        incoming = asyncio.ensure_future(conn.read_json())
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({task, getter, incoming}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    event = getter.result()
                    if early is not None and event.get("agent_up") and not early_sent:
                        early_sent = await self._early_exec(conn, project, early, event)
                        if early_sent:
                            continue
                    await conn.send(event)
                else:
                    getter.cancel()
                if incoming in done and not task.done():
                    choice = self._answer(incoming)
                    if choice is not None:
                        with contextlib.suppress(asyncio.QueueFull):
                            answers.put_nowait(choice)
                        incoming = asyncio.ensure_future(conn.read_json())
                        continue
                    if self._is_cancel(incoming):
                        with contextlib.suppress(asyncio.QueueFull):  # a waiting question is answered too
                            answers.put_nowait("cancel")
                        task.cancel()
                        try:
                            await task
                        except (asyncio.CancelledError, SessionError):
                            pass
                        what = await self.manager.cancel_pending(conn.user, project, token)
                        await conn.send({"type": "error", "code": "cancelled", "field": "session",
                                         "message": what})
                        return
                    with contextlib.suppress(asyncio.QueueFull):  # gone or noise: a question goes on
                        answers.put_nowait(None)
                    incoming = asyncio.ensure_future(asyncio.Event().wait())
            while not queue.empty():
                await conn.send(queue.get_nowait())
            session = task.result()
        finally:
            incoming.cancel()
            if not task.done():
                task.cancel()  # the creation itself is shielded in the manager and goes on
        for observer in self.on_ensured:
            observer(session, warm, time.monotonic() - started)
        reply: dict[str, Any] = {"type": "result", "session": self.describe(session, conn)}
        if command is not None and not tty and self.direct_stream is not None:
            direct = await self.direct_stream(session, command, term)
            if direct is not None:
                reply["direct"] = direct
        elif endpoint is not None:
            direct = await self.direct_stream(session, None, "", endpoint) if self.direct_stream else None
            if direct is None:  # sshd's stdio through srun would be the 3x slower path: say so instead
                raise SessionError("unsupported", "ssh-proxy: the session has no direct stream (its agent "
                                                  "has none, or [transfer] direct = false)")
            reply["direct"] = direct
        if command is not None and "direct" not in reply:
            argv = command_argv(session.job_id, session.instance, session.user, session.project, command,
                                tty=tty, term=term)
            reply["exec"] = {"argv": argv, "env": self.manager.runner.env(conn.user, {"TERM": safe_term(term)})}
        elif attach is not None and early_sent == session.job_id:
            reply["early"] = True  # its terminal runs already
        elif attach is not None and early_sent:  # the session moved to another login node's job:
            reply["exec"] = await self.attach_exec(conn, session, attach)  # the login ends the early one
        elif attach is not None:  # interactive login: the argv of its terminal, in the same reply
            if self.attach_exec is None:
                raise SessionError("unsupported", "attach: this broker has no terminal support loaded")
            reply["exec"] = await self.attach_exec(conn, session, attach)
        await conn.send(reply)

    async def _early_exec(self, conn: Connection, project: str, attach: dict[str, Any],
                          event: dict[str, Any]) -> str:
        """Send the login its terminal's argv before the session is ready (its agent is up and
        holds the shell until the instance is); the job it went to, "" when it cannot be had yet."""
        session = self.manager.current(conn.user.name, project)
        if session is None or self.attach_exec is None or session.id != event.get("session"):
            return ""
        try:
            spec = await self.attach_exec(conn, session, attach, early=True)
        except SessionError:
            return ""
        await conn.send({**event, "early": spec})
        self.log.info("early_attach", session=session.id, user=session.user, state=session.state.value,
                      job_id=session.job_id)
        return session.job_id

    @staticmethod
    def _answer(incoming: asyncio.Future[dict[str, Any]]) -> str | None:
        """The choice of an ``{"type": "answer", "choice": ...}`` frame (a short string), else None."""
        if incoming.cancelled() or incoming.exception() is not None:
            return None
        message = incoming.result()
        choice = message.get("choice") if isinstance(message, dict) and message.get("type") == "answer" else None
        return choice if isinstance(choice, str) and len(choice) <= 64 else None

    @staticmethod
    def _is_cancel(incoming: asyncio.Future[dict[str, Any]]) -> bool:
        """Whether the frame a waiting login sent is ``{"type": "cancel"}`` (anything else, a
        bad frame or the connection closing, is not)."""
        if incoming.cancelled() or incoming.exception() is not None:
            return False
        message = incoming.result()
        return isinstance(message, dict) and message.get("type") == "cancel"

    async def op_list(self, conn: Connection, message: dict[str, Any]) -> None:
        await self.manager.discover()  # sessions other login nodes started (one shared scan)
        sessions = self.manager.visible(conn.user, conn.admin)
        for refresh in self.refreshers:
            await refresh(sessions)
        await conn.send({"type": "result", "sessions": [self.describe(s, conn) for s in sessions]})

    async def op_show(self, conn: Connection, message: dict[str, Any]) -> None:
        session = await self.manager.find(self.ref_of(message), conn.user, conn.admin)
        for refresh in self.refreshers:
            await refresh([session])
        data = self.describe(session, conn, full=True)
        data["log_tail"] = (await self.read_log(session, -1, 4096))[0].decode(errors="replace")
        await conn.send({"type": "result", "session": data})

    async def op_kill(self, conn: Connection, message: dict[str, Any]) -> None:
        session = await self.manager.find(self.ref_of(message), conn.user, conn.admin)
        reason = p.get_str(message, "reason", default="", max_len=200) or ""
        if session.state in TERMINAL:
            # Nothing to end. Audited once per caller and session an hour: repeating it
            # must not be a way to grow everyone's audit log.
            self.manager.audit.record_noop(("kill", conn.user.uid, session.id), "kill_noop", user=session.user,
                                           project=session.project, session=session.id, by=conn.user.name,
                                           peer_uid=conn.user.uid, reason=reason, state=session.state.value)
        else:
            await self.manager.kill(session, by=conn.user.name, by_uid=conn.user.uid, reason=reason)
        await conn.send({"type": "result", "session": self.describe(session, conn)})

    async def op_logs(self, conn: Connection, message: dict[str, Any]) -> None:
        session = await self.manager.find(self.ref_of(message), conn.user, conn.admin)
        offset = p.get_int(message, "offset", default=-1, low=-1, high=1 << 40)
        data, end = await self.read_log(session, offset, LOG_TAIL_MAX)
        await conn.send({"type": "result", "data": data.decode(errors="replace"), "offset": end,
                         "state": session.state.value})

    async def op_events(self, conn: Connection, message: dict[str, Any]) -> None:
        since = message.get("since", 0)
        if isinstance(since, bool) or not isinstance(since, (int, float)) or since < 0:
            raise p.ProtocolError("since", "must be a non-negative number (unix time)")
        limit = p.get_int(message, "limit", default=1000, low=1, high=10000)
        users = None if conn.admin else {conn.user.name}
        # Read, filtered and encoded off the event loop; costs the caller's own entries only.
        frame = await self.manager.audit.reply(since=float(since), limit=limit, users=users, max_json=p.MAX_REPLY)
        await conn.send_frame(frame)

    async def read_log(self, session: Session, offset: int, size: int) -> tuple[bytes, int]:
        """Part of a session's job log, read as the session's user (it is their file, in
        shared storage) in a worker thread; ``offset=-1``: the last ``size`` bytes."""
        try:
            owner = lookup_name(session.user)
        except UnknownUser:
            return b"", 0
        return await anyio.to_thread.run_sync(userfs.read_from, owner, session.log_path, offset, size)

    def ref_of(self, message: dict[str, Any]) -> str:
        ref = p.get_str(message, "session", max_len=160)
        if not ref:
            raise p.ProtocolError("session", "is required (a session id, user/project or project)")
        return ref

    def describe(self, session: Session, conn: Connection, full: bool = False) -> dict[str, Any]:
        now = time.time()
        data = {
            "id": session.id, "user": session.user, "project": session.project, "profile": session.profile,
            "state": session.state.value,
            "reason": session.reason, "job_id": session.job_id, "node": session.node,
            "instance": session.instance, "image": session.image, "image_digest": session.image_digest,
            "pending_reason": session.pending_reason, "expected_start": session.expected_start,
            "time_left": session.time_left, "age": round(now - session.created, 1),
            "idle": round(now - session.last_activity, 1),
        }
        for describer in self.describers:
            data.update(describer(session))
        if full:
            data.update(created=session.created, submitted_at=session.submitted_at,
                        ready_at=session.ready_at, ended_at=session.ended_at,
                        log_path=session.log_path, script_path=session.script_path)
        return data


def bind_unix(path: Path, field: str, *, umask: int) -> socket.socket:
    """Bind a listening Unix socket at ``path``, replacing only a stale one.

    A socket file that still answers belongs to a running daemon: starting a second
    one would steal its clients, so that is a :class:`StartupError` naming ``field``.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left behind by a daemon that died
        else:
            raise StartupError(f"{field}: another broker is already serving on {path}")
        finally:
            probe.close()
    elif path.exists():
        raise StartupError(f"{field}: {path} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(umask)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    return sock


__all__ = ["Connection", "Server", "State"]


def _first_term(attach: object) -> str | None:
    """The TERM of an interactive login that may create a session: its new agent starts that
    login's shell as soon as the instance is up (a hint only; the attach checks it again)."""
    if not isinstance(attach, dict) or attach.get("tty", True) is not True or attach.get("mode", "write") != "write":
        return None
    term = attach.get("term", "")
    return term[:64] if isinstance(term, str) else None
