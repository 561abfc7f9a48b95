"""``sbroker serve``: wire config, SLURM runner, store, manager and socket together."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from pathlib import Path

from . import log as _log
from . import userfs
from .agents import Agents
from .attach import AttachHub
from .extend import Extender
from .audit import Audit, Rotation
from .config import Config
from .manager import Manager
from .ops import Operations
from .sdnotify import Notifier
from .server import Server, StartupError
from .slurm.runner import Runner
from .store import Store


def prepare_state_dir(state_dir: Path) -> int:
    """Root-owned and traverse-only (jobs append to their own logs below it by name),
    and locked: two daemons must never share one store. Returns the lock's fd."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o711)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"broker.state_dir: {state_dir} is in use by another broker") from None
    return fd


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    _log.configure(config.log_level)
    log = _log.get("sbroker.daemon")
    # Files read for a user are opened with their fsuid (broker.userfs); root's own
    # supplementary groups must not come along.
    userfs.drop_groups()
    lock_fd = prepare_state_dir(config.state_dir)
    runner = Runner(path=config.path, slurm_conf=config.slurm_conf, timeout=config.command_timeout)
    store = Store(config.state_dir / "sessions.db")
    audit = Audit(Path(config.audit_log) if config.audit_log else config.state_dir / "audit.jsonl",
                  Rotation(max_bytes=config.audit_max_bytes, keep=config.audit_keep,
                           user_max_bytes=config.audit_user_max_bytes, user_keep=config.audit_user_keep))
    manager = Manager(config, runner, store, audit)
    server = Server(manager, config.socket)
    extensions = _load_extensions(manager, server)
    notifier = Notifier()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await manager.start()
    await server.start()
    poller = asyncio.ensure_future(manager.run_poller())
    watchdog = asyncio.ensure_future(_watchdog(notifier, manager, poller)) if notifier.watchdog_interval else None
    log.info("serving", socket=config.socket, state_dir=str(config.state_dir), live=len(manager.by_key))
    notifier.notify(READY="1", STATUS=f"serving {len(manager.by_key)} sessions")
    try:
        await stop.wait()
    finally:
        notifier.notify(STOPPING="1")
        log.info("stopping")
        for task in (poller, watchdog):
            if task:
                task.cancel()
        for ext in extensions:
            await ext.close()
        await server.close()
        await manager.close()
        audit.close()
        store.close()
        os.close(lock_fd)


async def _watchdog(notifier: Notifier, manager: Manager, poller: asyncio.Task[None]) -> None:
    """Ping only while the event loop runs and the poller is alive: a wedged loop or a dead
    poller stops the pings, and systemd restarts the daemon (WatchdogSec)."""
    assert notifier.watchdog_interval
    while not poller.done():
        notifier.notify(WATCHDOG="1", STATUS=f"{len(manager.by_key)} live sessions, "
                        f"controller {'ok' if manager.controller_ok else 'unavailable'}")
        await asyncio.sleep(notifier.watchdog_interval)


def _load_extensions(manager: Manager, server: Server) -> list[AttachHub | Operations]:
    """The way to terminals (agents' status, attach) and the operations plane (policies, metrics)."""
    agents = Agents(manager)
    hub = AttachHub(manager, server, agents)
    Extender(manager, server, agents)  # `sbroker extend`: nothing to close
    return [hub, Operations(manager, server, hub, agents)]
