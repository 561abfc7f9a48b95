"""Session lifecycle: find or create exactly once, watch readiness, poll, reconcile.

The manager owns every :class:`~broker.session.Session` in memory and is the only
writer of the store. It never trusts a client for identity (the server hands it a
resolved :class:`~broker.identity.User`) and never runs a SLURM command except
through :class:`~broker.slurm.Runner`.

Concurrency rules
-----------------
* One live session per (user, project). Concurrent ``ensure`` calls for a key share
  one in-flight creation task (single-flight), so N logins make one ``sbatch``.
* One poller for all sessions: a single ``squeue`` per cycle for every tracked job.
* Readiness comes from the job's own log (``INSTANCE_READY`` / ``INSTANCE_FAILED``),
  re-opened and read on a short bounded interval so it also works on NFS.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from . import images, jobspec
from . import limits
from . import log as _log
from .audit import Audit
from .config import Config
from .identity import User, UnknownUser, lookup_name
from .session import State, Session, TERMINAL
from .slurm import commands
from .slurm.errors import CommandFailed, ControllerUnavailable, NotFound, SlurmError
from .slurm.parse import JobInfo, parse_comment, parse_sbatch, parse_squeue
from .slurm.runner import Runner
from .store import Store

MARKER_READY = "INSTANCE_READY"
MARKER_FAILED = "INSTANCE_FAILED"
READ_INTERVAL = 0.02
FAST_POLL = 0.5
#: Least time between two polls however often the poller is woken: in a login storm every
#: sbatch, readiness and kill wakes it, and those wakes must share one squeue.
MIN_POLL_GAP = 0.25
#: An ``ending`` session whose job SLURM still reports active gets ``scancel`` again after
#: this long (the first one failed, or the broker died between ``ending`` and ``scancel``).
CANCEL_RETRY = 5.0
_END_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
               "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "COMPLETING", "SPECIAL_EXIT", "REVOKED"}


class SessionError(Exception):
    """An ``ensure`` that cannot give a ready session; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Manager:
    def __init__(self, config: Config, runner: Runner, store: Store, audit: Audit) -> None:
        self.config = config
        self.runner = runner
        self.store = store
        self.audit = audit
        self.log = _log.get("sbroker.manager")
        self.sessions: dict[str, Session] = {}
        self.by_key: dict[tuple[str, str], Session] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[Session]] = {}
        self._listeners: dict[str, set[Callable[[dict[str, Any]], None]]] = defaultdict(set)
        self._absent_since: dict[str, float] = {}
        self._cancel_sent: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.controller_ok = True
        self.last_poll = 0.0
        self.poll_cycles = 0
        self.poll_seconds = 0.0
        self.failures: dict[str, int] = defaultdict(int)
        #: Sessions that ended or failed since start, by state (they leave ``sessions``;
        #: the store keeps them).
        self.finished: dict[str, int] = defaultdict(int)
        self.time_to_ready: list[float] = []
        #: Called with ``(session, old_state)`` after every state change (attach hub, metrics).
        self.on_change: list[Callable[[Session, State], None]] = []

    # ---------------------------------------------------------------- state changes

    def _track(self, session: Session) -> None:
        self.sessions[session.id] = session
        if session.live:
            current = self.by_key.get(session.key)
            if current is None or not current.live:
                self.by_key[session.key] = session

    def transition(self, session: Session, new: State, reason: str = "") -> bool:
        """Move ``session`` to ``new``: persist, log, notify. False if not allowed."""
        if not session.can_move(new):
            self.log.warning("transition_refused", session=session.id, frm=session.state.value, to=new.value)
            return False
        old = session.move(new, reason)
        if old == new and not reason:
            return True
        self.store.save(session)
        self.log.info("session_state", session=session.id, user=session.user, project=session.project,
                      job_id=session.job_id, instance=session.instance, old=old.value, new=new.value,
                      reason=session.reason)
        if new in TERMINAL:
            # Forget it in memory (months of sessions must not pile up here); the store keeps it.
            self._cancel_sent.pop(session.job_id, None)
            self._absent_since.pop(session.job_id, None)
            self.sessions.pop(session.id, None)
            self.finished[new.value] += 1
            if self.by_key.get(session.key) is session:
                del self.by_key[session.key]
            self.audit.record("session_" + new.value, user=session.user, project=session.project,
                              session=session.id, job_id=session.job_id, reason=session.reason)
            if new == State.FAILED:
                self.failures[_reason_class(session.reason)] += 1
        self._notify(session, {"type": "progress", "state": new.value, "reason": session.reason})
        for callback in self.on_change:
            callback(session, old)
        return True

    def _notify(self, session: Session, event: dict[str, Any]) -> None:
        event = {**event, "session": session.id}
        for listener in list(self._listeners.get(session.id, ())):
            listener(event)

    def subscribe(self, session_id: str, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        self._listeners[session_id].add(listener)
        return lambda: self._listeners[session_id].discard(listener)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- ensure

    def current(self, user: str, project: str) -> Session | None:
        return self.by_key.get((user, project))

    async def ensure(self, user: User, project: str,
                     listener: Callable[[dict[str, Any]], None] | None = None) -> Session:
        """Return the ready session for ``(user, project)``, creating it exactly once."""
        jobspec.check_project(self.config, project)
        key = (user.name, project)
        session = self.by_key.get(key)
        if session is None:  # a new session: per-user limits (broker/limits.py says why)
            refusal = limits.new_session_refusal(self.config, user.name, self.sessions.values())
            if refusal:
                self.log.warning("limit_refused", user=user.name, project=project, rule=refusal)
                raise SessionError("limit", refusal)
        if session is not None and session.state == State.READY:
            session.last_activity = time.time()
            return session
        if session is not None and session.state == State.UNKNOWN or not self.controller_ok:
            raise SessionError("controller_unavailable",
                               "SLURM controller unavailable; your session is kept, try again shortly")
        task = self._inflight.get(key)
        if task is None:
            if session is None:
                session = Session(user=user.name, uid=user.uid, project=project)
                self._track(session)
                self.store.save(session)
                self.log.info("session_state", session=session.id, user=user.name, project=project,
                              old=None, new=State.REQUESTED.value, reason="first login")
            task = self._start_bring_up(session, user)
        unsubscribe = self.subscribe(session.id, listener) if listener else None
        try:
            if listener:
                listener({"type": "progress", "state": session.state.value, "session": session.id,
                          "reason": session.reason, "pending_reason": session.pending_reason,
                          "expected_start": session.expected_start})
            return await asyncio.shield(task)
        finally:
            if unsubscribe:
                unsubscribe()

    def _start_bring_up(self, session: Session, user: User) -> asyncio.Task[Session]:
        task = self._spawn(self._bring_up(session, user))
        self._inflight[session.key] = task
        task.add_done_callback(lambda _t, k=session.key: self._inflight.pop(k, None))
        return task

    async def _bring_up(self, session: Session, user: User) -> Session:
        if session.state == State.REQUESTED:
            await self._submit(session, user)
        await self._await_ready(session)
        return session

    async def _submit(self, session: Session, user: User) -> None:
        try:
            image = images.resolve(self.config.image)
            digest = await anyio.to_thread.run_sync(images.digest, image)
        except OSError as exc:
            self._fail(session, f"image {self.config.image} is not usable: {exc.strerror or exc}")
            raise SessionError("image", session.reason) from None
        try:
            spec = jobspec.build(self.config, user, session.project, str(image), digest)
        except ValueError as exc:
            self._fail(session, str(exc))
            raise SessionError("invalid", session.reason) from None
        session.instance, session.image, session.image_digest = spec.instance, str(image), digest
        session.script_path, session.log_path = str(spec.script_path), str(spec.log_path)
        self.store.save(session)
        try:
            _write_job_files(spec, user)
            # Created as the user, never by root (root-squashed NFS); a stat that root is
            # refused there reads as "missing" and costs only the mkdir.
            if self.config.create_project_dir and not os.path.isdir(spec.host_project_dir):
                await self.runner.run(["mkdir", "-p", "--", spec.host_project_dir], user=user)
            result = await self.runner.run(spec.sbatch_argv, user=user, input=spec.script.encode())
            job_id = parse_sbatch(result.stdout)
        except ControllerUnavailable as exc:
            self._fail(session, f"SLURM controller unavailable at submission: {exc.reason}")
            raise SessionError("controller_unavailable", session.reason) from None
        except (SlurmError, OSError, ValueError) as exc:
            self._fail(session, f"submission failed: {getattr(exc, 'reason', None) or exc}")
            raise SessionError("submit_failed", session.reason) from None
        session.job_id = job_id
        session.submitted_at = time.time()
        self.transition(session, State.SUBMITTED, f"job {job_id} submitted")
        self.audit.record("session_started", user=session.user, project=session.project, session=session.id,
                          job_id=job_id, instance=session.instance, image=session.image,
                          digest=session.image_digest)
        self._wake.set()

    def _fail(self, session: Session, reason: str) -> None:
        self.transition(session, State.FAILED, reason)

    async def _await_ready(self, session: Session) -> None:
        """Watch the job log and the job state until ready, failed or a timeout."""
        reader = _MarkerReader(Path(session.log_path)) if session.log_path else None
        while True:
            if session.state == State.READY:
                return
            if session.state in TERMINAL:
                raise SessionError("failed", session.reason or "session failed")
            if session.state == State.ENDING:
                raise SessionError("failed", session.reason or "session is ending")
            marker = reader.poll() if reader else None
            if marker is not None:
                kind, detail = marker
                if kind == MARKER_READY:
                    await self._mark_ready(session)
                    continue
                await self._cancel_failed(session, f"instance failed to start: {detail or 'no reason given'}")
                continue
            now = time.time()
            cfg = self.config
            if session.state in (State.SUBMITTED, State.PENDING) and now - session.submitted_at > cfg.pending_timeout:
                why = f" ({session.pending_reason})" if session.pending_reason else ""
                await self._cancel_failed(session, f"job pending longer than {cfg.pending_timeout:g}s{why}")
            elif session.state == State.STARTING and now - (session.running_at or now) > cfg.start_timeout:
                await self._cancel_failed(
                    session, f"no INSTANCE_READY within {cfg.start_timeout:g}s of the job starting")
            await asyncio.sleep(READ_INTERVAL)

    async def _mark_ready(self, session: Session) -> None:
        # The user is waiting for a prompt: no SLURM call here. When the marker beat the
        # poller to the job, the node and time left are not known yet; waking the poller
        # fills them in with its next (batched) squeue, a few milliseconds later.
        if not session.node:
            self._wake.set()
        if session.state in (State.SUBMITTED, State.PENDING):
            session.running_at = session.running_at or time.time()
            self.transition(session, State.STARTING, "job running")
        if self.transition(session, State.READY, "instance ready") and session.submitted_at:
            self.time_to_ready.append(session.ready_at - session.submitted_at)

    async def _cancel_failed(self, session: Session, reason: str) -> None:
        await self._scancel(session)
        self._fail(session, reason)

    async def _scancel(self, session: Session) -> None:
        if not session.job_id:
            return
        self._cancel_sent[session.job_id] = time.time()
        try:
            owner = lookup_name(session.user)
        except UnknownUser:
            owner = None
        try:
            await self.runner.run(commands.scancel(session.job_id), user=owner)
        except NotFound:
            pass
        except SlurmError as exc:
            self.log.error("scancel_failed", session=session.id, job_id=session.job_id, error=exc.reason)

    # ---------------------------------------------------------------- kill

    async def kill(self, session: Session, *, by: str, by_uid: int, reason: str) -> None:
        why = f"killed by {by}" + (f": {reason}" if reason else "")
        self.audit.record("kill", user=session.user, project=session.project, session=session.id,
                          job_id=session.job_id, by=by, peer_uid=by_uid, reason=reason)
        if session.state in TERMINAL:
            return
        if not session.job_id:
            self._fail(session, why)
            return
        self.transition(session, State.ENDING, why)
        await self._scancel(session)
        self._wake.set()

    # ---------------------------------------------------------------- poller

    async def run_poller(self) -> None:
        """The one status loop: one ``squeue`` per cycle for every tracked job."""
        last = -MIN_POLL_GAP
        while True:
            busy = any(s.state in (State.SUBMITTED, State.PENDING, State.STARTING, State.ENDING,
                                   State.UNKNOWN) for s in self.by_key.values())
            interval = min(FAST_POLL, self.config.poll_interval) if busy else self.config.poll_interval
            interval *= random.uniform(0.9, 1.1)
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            gap = MIN_POLL_GAP - (time.monotonic() - last)
            if gap > 0:
                await asyncio.sleep(gap)  # wakes that arrive meanwhile are served by this poll
            self._wake.clear()
            last = time.monotonic()
            await self.poll_once()

    async def poll_once(self) -> None:
        tracked = [s for s in self.sessions.values() if s.live and s.job_id]
        if not tracked:
            return
        started = time.monotonic()
        try:
            result = await self.runner.run(commands.squeue_jobs(s.job_id for s in tracked))
            jobs = parse_squeue(result.stdout)
        except NotFound:
            jobs = {}
        except ControllerUnavailable as exc:
            self._controller_down(exc.reason, tracked)
            return
        except CommandFailed as exc:
            # A query error is not evidence that jobs are gone: change nothing.
            self.log.error("poll_failed", error=exc.reason, stderr=exc.stderr[-500:])
            return
        finally:
            self.poll_cycles += 1
            self.poll_seconds += time.monotonic() - started
        self.last_poll = time.time()
        if not self.controller_ok:
            self.controller_ok = True
            self.log.info("controller_available")
        now = time.time()
        for session in tracked:
            self.apply(session, jobs.get(session.job_id), now)

    def _controller_down(self, reason: str, tracked: list[Session]) -> None:
        if self.controller_ok:
            self.log.warning("controller_unavailable", reason=reason)
        self.controller_ok = False
        for session in tracked:
            if session.state != State.UNKNOWN:
                self.transition(session, State.UNKNOWN, f"controller unavailable: {reason}")

    def apply(self, session: Session, info: JobInfo | None, now: float) -> None:
        """The truth table: map one job's scheduler view onto its session."""
        if session.state == State.UNKNOWN and session.prev_state is not None:
            self.transition(session, session.prev_state, "controller available again")
        if info is None:
            first = self._absent_since.setdefault(session.job_id, now)
            if now - first < self.config.gone_grace:
                return
            self._absent_since.pop(session.job_id, None)
            if session.state in (State.READY, State.ENDING):
                self.transition(session, State.ENDED, session.reason if session.state == State.ENDING
                                else "job no longer known to SLURM")
            else:
                self._fail(session, "job vanished before the instance was ready")
            return
        self._absent_since.pop(session.job_id, None)
        state = info.state
        if (session.state == State.ENDING and info.active
                and now - self._cancel_sent.get(session.job_id, 0.0) > CANCEL_RETRY):
            self.log.warning("scancel_again", session=session.id, job_id=session.job_id, job_state=state)
            self._spawn(self._scancel(session))
        if info.nodes and info.nodes != "(null)":
            session.node = info.nodes
        session.time_left = info.time_left
        if state == "PENDING":
            changed = (info.reason, info.start_time) != (session.pending_reason, session.expected_start)
            session.pending_reason, session.expected_start = info.reason, info.start_time
            if session.state == State.SUBMITTED:
                self.transition(session, State.PENDING, _pending_text(info))
            elif session.state in (State.STARTING, State.READY):
                # Requeued (node failure, admin): the instance died with the first run.
                why = "job was requeued by SLURM" + (f" ({info.reason})" if info.reason not in ("", "None") else "")
                self.transition(session, State.ENDING, f"{why}; its instance is gone")
                self._spawn(self._scancel(session))
            elif changed:
                self._notify(session, {"type": "progress", "state": session.state.value,
                                       "pending_reason": info.reason, "expected_start": info.start_time})
        elif state in ("RUNNING", "CONFIGURING"):
            if session.state in (State.SUBMITTED, State.PENDING):
                session.running_at = now
                self.transition(session, State.STARTING, f"job running on {info.nodes}")
        elif state in _END_STATES:
            what = f"job {state.lower()}" + (f" ({info.reason})" if info.reason not in ("", "None") else "")
            if session.state in (State.READY, State.ENDING):
                if state != "COMPLETING" or session.state == State.READY:
                    self.transition(session, State.ENDED, session.reason if session.state == State.ENDING
                                    else what)
            else:
                detail = _failure_from_log(session.log_path)
                self._fail(session, detail or f"{what} before the instance was ready")

    # ---------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Load the store, reconcile with SLURM, resume in-flight sessions."""
        for session in self.store.live():
            self._track(session)
        try:
            result = await self.runner.run(commands.squeue_all())
            jobs = parse_squeue(result.stdout)
            self.controller_ok = True
        except SlurmError as exc:
            self.log.warning("reconcile_deferred", reason=exc.reason)
            jobs = None
            self.controller_ok = not isinstance(exc, ControllerUnavailable)
        if jobs is not None:
            self._reconcile(jobs)
        for session in list(self.sessions.values()):
            if session.state in (State.SUBMITTED, State.PENDING, State.STARTING) and session.key not in self._inflight:
                try:
                    user = lookup_name(session.user)
                except UnknownUser:
                    continue
                self._start_bring_up(session, user)
        adopted = sum(1 for s in self.sessions.values() if s.live)
        self.log.info("reconciled", live_sessions=adopted)

    def _reconcile(self, jobs: dict[str, JobInfo]) -> None:
        by_instance = {}
        for info in jobs.values():
            tags = parse_comment(info.comment)
            if tags and tags.get("user") == info.user and info.active:
                by_instance[tags.get("instance", "")] = (info, tags)
        now = time.time()
        for session in list(self.sessions.values()):
            found = by_instance.pop(session.instance, None) if session.instance else None
            if session.state == State.REQUESTED:
                if found:
                    session.job_id = found[0].job_id
                    session.submitted_at = session.submitted_at or now
                    self.transition(session, State.SUBMITTED, "adopted after restart")
                else:
                    self._fail(session, "broker restarted before the job was submitted")
                    continue
            if session.live and session.job_id:
                info = found[0] if found else jobs.get(session.job_id)
                if info is None:
                    self.apply(session, None, now)
                else:
                    self.apply(session, info, now)
                    if session.state == State.STARTING and _log_has_ready(session.log_path):
                        session.running_at = session.running_at or now
                        self.transition(session, State.READY, "adopted after restart")
        for instance, (info, tags) in by_instance.items():
            self._adopt(info, tags, now)

    def _adopt(self, info: JobInfo, tags: dict[str, str], now: float) -> None:
        """A tagged job this broker does not know (lost write, or another login node)."""
        try:
            user = lookup_name(info.user)
            project = jobspec.check_project(self.config, tags.get("project", ""))
            jobspec.v.validate_instance_name(tags.get("instance", ""))
        except (UnknownUser, ValueError) as exc:
            self.log.warning("adopt_refused", job_id=info.job_id, reason=str(exc))
            return
        existing = self.by_key.get((user.name, project))
        session = Session(user=user.name, uid=user.uid, project=project, instance=tags["instance"],
                          job_id=info.job_id, submitted_at=now)
        session.log_path = str(jobspec.jobs_dir(self.config, user.name) / f"{session.instance}.log")
        session.script_path = session.log_path[:-4] + ".sh"
        session.image_digest = tags.get("digest", "")
        self.sessions[session.id] = session
        self.store.save(session)
        self.transition(session, State.SUBMITTED, "adopted tagged job")
        if existing is not None and existing.live:
            self.log.warning("duplicate_allocation", user=user.name, project=project,
                             kept=existing.job_id, cancelled=info.job_id)
            self.transition(session, State.ENDING, f"duplicate of job {existing.job_id}")
            self._spawn(self._scancel(session))
            return
        self.by_key[session.key] = session
        self.apply(session, info, now)
        if session.state == State.STARTING and _log_has_ready(session.log_path):
            self.transition(session, State.READY, "adopted after restart")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # ---------------------------------------------------------------- queries

    def visible(self, user: User, admin: bool) -> list[Session]:
        live = [s for s in self.sessions.values() if s.live]
        return sorted((s for s in live if admin or s.user == user.name), key=lambda s: (s.user, s.project))

    def resolve(self, ref: str, user: User, admin: bool) -> Session:
        """Find a session by id, ``user/project`` or (own) ``project``; hide others' sessions."""
        candidates = [s for s in self.sessions.values() if s.id == ref]
        if not candidates and "/" in ref:
            owner, _, project = ref.partition("/")
            s = self.by_key.get((owner, project))
            candidates = [s] if s else []
        if not candidates:
            s = self.by_key.get((user.name, ref))
            candidates = [s] if s else []
        if not candidates:
            stored = self.store.get(ref)
            candidates = [stored] if stored else []
        for s in candidates:
            if admin or s.user == user.name:
                return s
        # Same answer whether it exists or not: users must not learn of others' sessions.
        raise SessionError("not_found", f"session: no session {ref!r} visible to you")


class _MarkerReader:
    """Reads new complete lines of a job log, re-opening it each time (NFS-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def poll(self) -> tuple[str, str] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < self.offset:
                self.offset, self.partial = 0, b""
            if size == self.offset:
                return None
            os.lseek(fd, self.offset, os.SEEK_SET)
            data = os.read(fd, min(size - self.offset, 1 << 20))
        finally:
            os.close(fd)
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-4096:]
        for raw in lines:
            marker = parse_marker(raw.decode(errors="replace"))
            if marker:
                return marker
        return None


def parse_marker(line: str) -> tuple[str, str] | None:
    """``(MARKER, detail)`` for a marker line of the start script, else None."""
    line = line.strip()
    if line == MARKER_READY:
        return MARKER_READY, ""
    if line == MARKER_FAILED or line.startswith(MARKER_FAILED + ":"):
        return MARKER_FAILED, line[len(MARKER_FAILED) + 1:].strip()
    return None


def _scan_log(path: str) -> tuple[str, str] | None:
    if not path:
        return None
    reader = _MarkerReader(Path(path))
    last = None
    while (marker := reader.poll()) is not None:
        last = marker
    return last


def _log_has_ready(path: str) -> bool:
    marker = _scan_log(path)
    return marker is not None and marker[0] == MARKER_READY


def _failure_from_log(path: str) -> str:
    marker = _scan_log(path)
    if marker and marker[0] == MARKER_FAILED:
        return f"instance failed to start: {marker[1] or 'no reason given'}"
    return ""


def _pending_text(info: JobInfo) -> str:
    """``waiting for Resources, expected start 2026-...`` (SLURM says ``None`` before its first pass)."""
    text = "waiting for the scheduler" if info.reason in ("", "None") else f"waiting for {info.reason}"
    if info.start_time not in ("", "N/A", "Unknown"):
        text += f", expected start {info.start_time}"
    return text


def _reason_class(reason: str) -> str:
    """A short label for metrics: the reason up to its first colon or parenthesis."""
    head = reason.split(":", 1)[0].split("(", 1)[0].strip()
    return head[:40] or "unknown"


def _write_job_files(spec: jobspec.JobSpec, user: User) -> None:
    """Root-owned record of the script; a log file the job (as the user) can append to."""
    directory = spec.script_path.parent
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    os.chmod(directory.parent, 0o711)
    directory.mkdir(exist_ok=True, mode=0o711)
    os.chmod(directory, 0o711)
    fd = os.open(spec.script_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(spec.script)
    fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)
