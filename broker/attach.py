"""Getting a terminal onto a session's shell: the ``attach`` operation and ``ensure``'s attach.

The shells live in the session's agent, in the allocation (:mod:`broker.agentlaunch`); the
broker only says how to reach them. For the owner (every ``ssh`` login, and ``sbroker
attach`` of one's own session) the answer is an argv: ``srun --overlap --pty --jobid=J
python3 DIR/agent.py attach -- <shell>``, which the owner's ``sbroker login`` runs as the
owner. No byte of the terminal passes through the daemon, so a broker restart, an upgrade
or another login node changes nothing for an attached terminal.

Someone else's session (an administrator's ``sbroker attach``): the owner's agent only
answers the owner's uid, so the daemon runs that same ``srun`` *as the owner* under a pty of
its own and bridges it to the administrator's connection. It is observed (``--mode
observe``: the agent gives observers no input) unless the request says ``write_other``
(``sbroker attach --write``), which is audited (``admin_write``) and announced in the
session's terminals by the agent. These bridges are the only terminals the daemon carries,
and they end with the administrator's connection or with the broker.

The agent's rules (one writer, observers, scrollback, detach grace, limits, walltime
warnings) are the agent's: see :mod:`broker.agent.sessionagent`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import termios
import time
from typing import Any

import anyio.abc

from . import log as _log
from . import protocol as p
from .agentlaunch import attach_argv
from .agents import Agents, key_file
from .identity import User, lookup_name
from .jobspec import container_args, shared_dirs
from .manager import Manager, SessionError
from .server import Connection, Server
from .session import Session, State
from .shells import instance_command_argv, instance_shell_argv, instance_sshd_argv, safe_term
from .xferlibs import Libraries
from .xferroute import binds_of, login_spec

#: A bridge stops reading the pty while this much output waits for the administrator.
BRIDGE_HIGH_WATER = 256 * 1024
#: ``signal`` controls of a writing administrator become these keys in the shell's terminal.
SIGNAL_KEYS = {"INT": b"\x03", "QUIT": b"\x1c"}


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class AttachHub:
    """Answers ``attach`` (and the attach part of ``ensure``); owns the administrators' bridges."""

    def __init__(self, manager: Manager, server: Server, agents: Agents) -> None:
        self.manager = manager
        self.server = server
        self.agents = agents
        self.log = _log.get("sbroker.attach")
        self.attach_count = 0
        self.bridges: set[anyio.abc.Process] = set()
        server.handlers["attach"] = self.op_attach
        server.attach_exec = self.login_exec
        if manager.config.direct_streams:
            server.direct_stream = self.direct_stream
        if manager.config.login_side or manager.config.login_paths:
            server.login_side = self.login_side
        self.libraries = Libraries()
        server.describers.append(self.describe)
        server.refreshers.append(agents.refresh)

    def describe(self, session: Session) -> dict[str, Any]:
        return {**self.agents.describe(session),
                "image_version": os.path.basename(session.image).removesuffix(".sif")}

    # ------------------------------------------------------------------ the owner's way in

    async def exec_spec(self, session: Session, owner: User, *, mode: str, tty: bool, term: str,
                        announce: str = "", early: bool = False) -> dict[str, Any]:
        """The argv and environment that put a terminal on a shell of ``session``'s agent
        (``early``: while it starts too; its agent holds the shell until the instance is up)."""
        if session.state != State.READY and not (early and session.state == State.STARTING and session.job_id):
            raise SessionError("not_ready", f"session: {session.user}/{session.project} is {session.state.value}, "
                                            "not ready")
        status = await self.agents.locate(session)
        if status is None:
            raise SessionError("no_agent", f"session: {session.user}/{session.project} (job {session.job_id}) "
                                           "has no session agent answering (its status file is missing or "
                                           "invalid); end it with `sbroker kill "
                                           f"{session.user}/{session.project}` and log in again")
        shell = instance_shell_argv(session.instance, session.user, session.project, term)
        argv = attach_argv(session.job_id, status.dir, status.python, shell, mode=mode, tty=tty,
                           announce=announce)
        return {"argv": argv, "env": self.manager.runner.env(owner, {"TERM": safe_term(term)})}

    async def login_exec(self, conn: Connection, session: Session, request: dict[str, Any],
                         early: bool = False) -> dict[str, Any]:
        """``ensure`` with ``attach``: the login's own interactive shell (always the owner's)."""
        mode, _, tty, term = _attach_fields(request)
        spec = await self.exec_spec(session, conn.user, mode=mode, tty=tty, term=term, early=early)
        self._record("attach", session, conn, mode)
        return spec

    async def direct_stream(self, session: Session, command: str | None, term: str,
                            endpoint: str | None = None) -> dict[str, Any] | None:
        """Where ``sbroker login`` runs a command without a terminal, or the SSH endpoint
        (``endpoint="ssh"``): the agent's direct stream (host, port, the key file the user
        reads, the argv), or None when the agent has none."""
        status = await self.agents.locate(session)
        if status is None or not status.port:
            return None
        if not session.node:  # ready by its marker before the poller saw the job run: ask SLURM
            info = (await self.manager.scan(max_age=0.0)).get(session.job_id)
            if info is None or not info.nodes or info.nodes == "(null)":
                return None
            session.node = info.nodes
        host = await self.manager.node_addr(session.node)
        if endpoint == "ssh":
            # The home from the passwd entry, never from the message: the host key and the
            # authorized keys are the session owner's files.
            argv = instance_sshd_argv(session.instance, session.user, session.project, session.job_id,
                                      lookup_name(session.user).home, self.manager.config.ssh_authorized_keys)
        else:
            argv = instance_command_argv(session.instance, session.user, session.project, command or "", term)
        return {"host": host, "port": status.port, "key": key_file(session), "argv": argv}

    def login_side(self, user: User, project: str, profile: str | None, command: str) -> dict[str, Any] | None:
        """The login-node form of a transfer on shared storage (:mod:`broker.xferroute`), or None.

        Decided before any session is ensured: a transfer served on the login node needs no
        allocation, so ``scp`` to a cluster whose partition is full works at once and queues
        no job. The binds are those of the live session's profile, or of the profile a login
        would get (a job started later sees the same shared files at the same paths)."""
        config = self.manager.config
        chosen = self.manager.view_profile(user, project, profile)
        if chosen is None:  # adopted from a job whose profile this config does not have: binds unknown
            return None
        args = container_args(config, user.name, project, "/x", chosen)  # the image does not bind anything
        shared = [*shared_dirs(config, user.name, project), *config.login_paths]
        local = login_spec(command, binds_of(args), shared, f"/home/{user.name}", str(config.login_sftp_server))
        self.log.info("command_routed", user=user.name, project=project, profile=chosen.name,
                      where="login" if local is not None else "allocation",
                      program=os.path.basename(local["argv"][0]) if local else "")
        if local is not None and (libraries := self.libraries.get(local["argv"][0])) is not None:
            local["libraries"] = libraries
        return local

    def _record(self, event: str, session: Session, conn: Connection, mode: str) -> None:
        self.attach_count += 1
        session.last_activity = time.time()
        self.manager.audit.record(event, user=session.user, project=session.project, session=session.id,
                                  job_id=session.job_id, by=conn.user.name, peer_uid=conn.user.uid, mode=mode)
        self.log.info("attach_handed_out", session=session.id, user=session.user, by=conn.user.name, mode=mode)

    # ------------------------------------------------------------------ the attach operation

    async def op_attach(self, conn: Connection, message: dict[str, Any]) -> None:
        session = await self.manager.find(self.server.ref_of(message), conn.user, conn.admin)
        mode, write_other, tty, term = _attach_fields(message)
        if session.user == conn.user.name:
            spec = await self.exec_spec(session, conn.user, mode=mode, tty=tty, term=term)
            self._record("observe" if mode == "observe" else "attach", session, conn, mode)
            await conn.send({"type": "result", "exec": spec})
            return
        # An administrator (find() refuses anyone else): watch, or type when asked to (audited).
        writing = mode == "write" and write_other
        mode = "write" if writing else "observe"
        owner = lookup_name(session.user)
        announce = ""
        if writing:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            announce = f"administrator {conn.user.name} is typing into this session since {stamp} (audited)"
            self.manager.audit.record("admin_write", user=session.user, project=session.project,
                                      session=session.id, by=conn.user.name, peer_uid=conn.user.uid)
            self.log.warning("admin_write", session=session.id, user=session.user, by=conn.user.name,
                             peer_uid=conn.user.uid)
        spec = await self.exec_spec(session, owner, mode=mode, tty=True, term=term, announce=announce)
        self._record("observe" if mode == "observe" else "admin_attach", session, conn, mode)
        await self._bridge(conn, session, owner, spec, mode, _size(message))

    # ------------------------------------------------------------------ administrators' bridges

    async def _bridge(self, conn: Connection, session: Session, owner: User, spec: dict[str, Any], mode: str,
                      size: tuple[int, int]) -> None:
        """Run the owner's attach ``srun`` under a pty of the daemon; relay it to ``conn``."""
        master, slave = os.openpty()
        try:
            os.fchown(slave, owner.uid, -1)
            os.fchmod(slave, 0o620)
            set_winsize(master, *size)
            proc = await self.manager.runner.spawn_pty(spec["argv"], user=owner, tty_fd=slave,
                                                       extra_env={"TERM": spec["env"].get("TERM", "xterm")})
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.bridges.add(proc)
        loop = asyncio.get_running_loop()
        os.set_blocking(master, False)
        output: asyncio.Queue[bytes] = asyncio.Queue()

        def on_output() -> None:
            try:
                data = os.read(master, p.MAX_DATA)
            except BlockingIOError:
                return
            except OSError:  # EIO: srun has gone
                data = b""
            if not data:
                loop.remove_reader(master)
            output.put_nowait(data)

        loop.add_reader(master, on_output)
        self.log.info("bridge_started", session=session.id, by=conn.user.name, mode=mode, pid=proc.pid)
        await conn.send({"type": "attached", "mode": mode, "reattached": True})

        async def relay_out() -> None:
            while True:
                data = await output.get()
                if not data:
                    return
                conn.writer.write(p.encode(p.KIND_OUTPUT, data))
                if conn.writer.transport.get_write_buffer_size() > BRIDGE_HIGH_WATER:
                    await conn.writer.drain()

        async def relay_in() -> None:
            while True:
                kind, payload = await conn.read_frame()
                if kind == p.KIND_INPUT and mode == "write":
                    await _write_all(master, payload)
                elif kind == p.KIND_JSON:
                    control = p.decode_json(payload)
                    if control.get("type") == "resize":
                        set_winsize(master, *_size(control))
                    elif control.get("type") == "signal" and mode == "write":
                        key = SIGNAL_KEYS.get(control.get("signal"))  # type: ignore[arg-type]
                        if key is None:
                            raise p.ProtocolError("signal", f"must be one of {', '.join(SIGNAL_KEYS)}")
                        await _write_all(master, key)
                    elif control.get("type") in ("detach", "eof"):
                        return

        out_task = asyncio.ensure_future(relay_out())
        in_task = asyncio.ensure_future(relay_in())
        try:
            await asyncio.wait({out_task, in_task}, return_when=asyncio.FIRST_COMPLETED)
            if in_task.done() and not in_task.cancelled():
                failure = in_task.exception()  # the administrator left (or sent a bad control)
                if isinstance(failure, p.ProtocolError):
                    raise failure
            elif out_task.done():  # srun ended: tell the administrator how
                code = await proc.wait()
                await conn.send({"type": "exit", "status": 128 - code if code < 0 else code})
        except (ConnectionError, OSError):
            pass
        finally:
            for task in (out_task, in_task):
                task.cancel()
            loop.remove_reader(master)
            _hangup(proc)
            with anyio.move_on_after(5):
                await proc.wait()
            os.close(master)
            self.bridges.discard(proc)
            self.log.info("bridge_ended", session=session.id, by=conn.user.name)

    async def close(self) -> None:
        for proc in list(self.bridges):
            _hangup(proc)


def _hangup(proc: anyio.abc.Process) -> None:
    """SIGHUP to srun's process group: srun ends its step (the agent's attach client)."""
    try:
        os.killpg(proc.pid, signal.SIGHUP)
    except ProcessLookupError:
        pass


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await asyncio.sleep(0.01)


def _attach_fields(message: dict[str, Any]) -> tuple[str, bool, bool, str]:
    """``(mode, write_other, tty, term)`` of an attach request, validated."""
    mode = p.get_str(message, "mode", default="write", max_len=16)
    if mode not in ("write", "observe"):
        raise p.ProtocolError("mode", "must be write or observe")
    write_other = message.get("write_other", False)
    if not isinstance(write_other, bool):
        raise p.ProtocolError("write_other", "must be true or false")
    tty = message.get("tty", True)
    if not isinstance(tty, bool):
        raise p.ProtocolError("tty", "must be true or false")
    term = p.get_str(message, "term", default="", max_len=64) or ""
    return mode or "write", write_other, tty, term


def _size(message: dict[str, Any]) -> tuple[int, int]:
    """A usable window size; a broken one (0, negative, absurd) becomes 24x80."""
    rows, cols = message.get("rows"), message.get("cols")
    if not (isinstance(rows, int) and isinstance(cols, int) and 1 <= rows <= 1000 and 1 <= cols <= 1000):
        return 24, 80
    return rows, cols


__all__ = ["AttachHub"]
