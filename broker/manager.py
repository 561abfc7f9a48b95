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
import collections
import contextlib
import os
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from . import agentlaunch, images, jobspec, launch, profiles, queue, userfs
from . import limits
from . import log as _log
from .audit import Audit
from .config import Config
from .identity import User, UnknownUser, in_group, lookup_name, lookup_uid
from .session import State, Session, TERMINAL
from .slurm import commands
from .slurm.errors import CommandFailed, ControllerUnavailable, NotFound, SlurmError
from .slurm.parse import JobInfo, parse_comment, parse_poll, parse_sbatch, parse_squeue_json
from .slurm.runner import Runner
from .store import Store

MARKER_READY = "INSTANCE_READY"
MARKER_FAILED = "INSTANCE_FAILED"
READ_INTERVAL = 0.02
#: For STARTING_FAST seconds after its job started running, a session's log is read every
#: READ_INTERVAL_STARTING: the marker is due then, and each read is a few microseconds.
READ_INTERVAL_STARTING = 0.005
STARTING_FAST = 5.0
#: A job still queued after QUEUED_FAST seconds has its log read every QUEUED_INTERVAL only: no
#: marker can be there before it runs, and 20 ms per pending session is most of a core with
#: a couple of hundred queued (the poller moves it to STARTING, and back to READ_INTERVAL, once
#: it runs).
QUEUED_FAST = 10.0
QUEUED_INTERVAL = 0.5
#: A login for a key whose session is ending waits this long for its job to leave SLURM (the
#: poller's cycle plus scancel's grace), checking every ENDING_POLL, before it says so.
ENDING_WAIT = 60.0
ENDING_POLL = 0.2
#: At most this much of a job log is read per poll: the log is the user's file, and a user
#: who floods it must cost only their own session's readiness, never the daemon's time.
READ_CHUNK = 64 * 1024
#: slurmstepd creates the job's output file before the script runs; when the login node has
#: not seen it this long after the job started, the broker asks the job's node whether it is
#: there (then slurm.job_dir is node-local, not shared) instead of waiting for the timeout.
LOG_APPEAR_GRACE = 5.0
FAST_POLL = 0.5
#: How long an immediate session's running allocation may lack its agent step before it is
#: released: covers the holder's srun creating the step right after the allocation.
AGENT_STEP_GRACE = 10.0
#: Least time between two polls however often the poller is woken: in a login storm every
#: sbatch, readiness and kill wakes it, and those wakes must share one squeue.
MIN_POLL_GAP = 0.25
#: How often the poller looks for tagged jobs it does not track (another login node's
#: sessions), so ``ls``/``show`` here list them; a lookup that misses looks at once.
DISCOVER_INTERVAL = 30.0
#: How many ended jobs a broker remembers, so that no scan taken before their end revives them.
GONE_MEMORY = 1000
#: A whole-cluster ``squeue --json`` answer is shared by callers for this long.
SCAN_MAX_AGE = 1.0
#: An ``ending`` session whose job SLURM still reports active gets ``scancel`` again after
#: this long (the first one failed, or the broker died between ``ending`` and ``scancel``).
CANCEL_RETRY = 5.0
#: How long the broker waits for a login's answer at a busy forecast before going on.
QUESTION_TIMEOUT = 120.0
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
        #: The ensure call (its token) that created each session still coming up, and how many
        #: ensure calls wait on each: ^C cancels a pending submission only for its maker, alone.
        self._made_by: dict[str, object] = {}
        self._waiting: dict[str, int] = defaultdict(int)
        #: The maker's question channel (interactive logins): asked once, at a busy forecast.
        self._askers: dict[str, Callable[[dict[str, Any]], Awaitable[str | None]]] = {}
        #: Sessions whose maker chose another profile at the forecast (its token): no mismatch for it.
        self._switched: dict[str, object] = {}
        self._last_ahead = 0.0
        self._listeners: dict[str, set[Callable[[dict[str, Any]], None]]] = defaultdict(set)
        self._absent_since: dict[str, float] = {}
        self._cancel_sent: dict[str, float] = {}
        #: Sessions whose job waits on another of the same key (Dependency) or ended before
        #: ready: the next poll looks for the key's winning job before anything else.
        self._converge: dict[str, str] = {}
        #: Sessions whose ready job SLURM showed COMPLETING: ending, unless it comes back (requeue).
        self._completing: set[str] = set()
        #: The TERM of the interactive login that created each session not yet submitted.
        self._first_term: dict[str, str] = {}
        #: Immediate sessions' jobs seen running without their agent step, since when (broker.launch).
        self._stepless: dict[str, float] = {}
        self._scan: tuple[float, dict[str, JobInfo]] | None = None
        #: Jobs whose end this broker has seen (newest last, bounded): a scan taken a moment
        #: earlier may still list one as running, and no login may join a job that is gone.
        self._gone: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._scan_task: asyncio.Task[dict[str, JobInfo]] | None = None
        self._last_discover = time.monotonic()  # start() scans; the poller looks again later
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.controller_ok = True
        #: NodeAddr by node name (how this login node reaches a session's agent directly).
        self._node_addrs: dict[str, str] = {}
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
        if new in TERMINAL or new == State.READY:
            self._made_by.pop(session.id, None)
            self._askers.pop(session.id, None)
        if new in TERMINAL:
            self._switched.pop(session.id, None)
            # Forget it in memory (months of sessions must not pile up here); the store keeps it.
            self._cancel_sent.pop(session.job_id, None)
            self._absent_since.pop(session.job_id, None)
            self._converge.pop(session.id, None)
            self._completing.discard(session.id)
            if session.job_id:
                self._gone[session.job_id] = None
                while len(self._gone) > GONE_MEMORY:
                    self._gone.popitem(last=False)
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

    def view_profile(self, user: User, project: str, profile: str | None) -> profiles.Profile | None:
        """The profile whose binds say what ``(user, project)``'s session sees: the live
        session's, else the one a login asking for ``profile`` would get. The same refusals as
        :meth:`ensure` (project rule, a profile the user may not use); None when a live session
        was adopted with a profile this config does not have (its binds are not known)."""
        jobspec.check_project(self.config, project)
        session = self.by_key.get((user.name, project))
        if session is not None and session.state not in TERMINAL:
            return self.config.profile(session.profile)
        try:
            return profiles.choose(self.config.profiles, self.config.default_profile, profile,
                                   lambda group: in_group(user, group))
        except profiles.ProfileRefused as exc:
            self.log.info("profile_refused", user=user.name, project=project, rule=str(exc))
            raise SessionError("profile", str(exc)) from None

    async def ensure(self, user: User, project: str,
                     listener: Callable[[dict[str, Any]], None] | None = None, *,
                     profile: str | None = None, mismatch: str = "refuse", token: object = None,
                     ask: Callable[[dict[str, Any]], Awaitable[str | None]] | None = None,
                     first_term: str | None = None) -> Session:
        """Return the ready session for ``(user, project)``, creating it exactly once.

        ``profile`` is the name the login asked for (None: whatever runs, else the default).
        When the live session runs another profile, ``mismatch`` decides: ``refuse`` (a
        :class:`SessionError` ``profile_mismatch`` naming the live one), ``keep`` (use the
        live one) or ``replace`` (end it, as the user asked, and start the one asked for).
        ``first_term``: the TERM of an interactive login; a session it creates has its agent start
        that login's shell as soon as the instance is up (the prompt is there when it attaches)."""
        jobspec.check_project(self.config, project)
        if mismatch not in ("refuse", "keep", "replace"):
            raise SessionError("invalid", "mismatch: must be refuse, keep or replace")
        try:
            chosen = profiles.choose(self.config.profiles, self.config.default_profile, profile,
                                     lambda group: in_group(user, group))
        except profiles.ProfileRefused as exc:
            self.log.info("profile_refused", user=user.name, project=project, rule=str(exc))
            raise SessionError("profile", str(exc)) from None
        key = (user.name, project)
        session = self.by_key.get(key)
        if session is not None and profile and session.profile != chosen.name and mismatch != "keep":
            if mismatch == "refuse":
                raise SessionError("profile_mismatch", mismatch_text(session, chosen.name))
            await self._replace(session, user, chosen.name, listener)
            session = self.by_key.get(key)
        if session is not None and session.state == State.ENDING:
            session = await self._await_ended(session, listener)
        if session is None:  # a new session: per-user limits (broker/limits.py says why)
            refusal = limits.new_session_refusal(self.config, user.name, self.sessions.values())
            if refusal:
                self.log.warning("limit_refused", user=user.name, project=project, rule=refusal)
                raise SessionError("limit", refusal)
        if session is not None and session.state == State.READY:
            session.last_activity = time.time()
            return self._checked(session, profile, chosen.name, mismatch, token)
        if session is not None and session.state == State.UNKNOWN or not self.controller_ok:
            raise SessionError("controller_unavailable",
                               "SLURM controller unavailable; your session is kept, try again shortly")
        task = self._inflight.get(key)
        if task is None:
            if session is None:
                session = Session(user=user.name, uid=user.uid, project=project, profile=chosen.name)
                if token is not None:
                    self._made_by[session.id] = token
                if ask is not None:
                    self._askers[session.id] = ask
                if first_term is not None and self.config.spare_shell:
                    self._first_term[session.id] = first_term
                self._track(session)
                self.store.save(session)
                self.log.info("session_state", session=session.id, user=user.name, project=project,
                              profile=chosen.name, old=None, new=State.REQUESTED.value, reason="first login")
            task = self._start_bring_up(session, user)
        unsubscribe = self.subscribe(session.id, listener) if listener else None
        self._waiting[session.id] += 1
        try:
            if listener:
                listener({"type": "progress", "state": session.state.value, "session": session.id,
                          "reason": session.reason, "pending_reason": session.pending_reason,
                          "expected_start": session.expected_start, "profile": session.profile})
            return self._checked(await asyncio.shield(task), profile, chosen.name, mismatch, token)
        finally:
            self._waiting[session.id] -= 1
            if self._waiting[session.id] <= 0:
                self._waiting.pop(session.id, None)
            if unsubscribe:
                unsubscribe()

    async def cancel_pending(self, user: User, project: str, token: object) -> str:
        """A login's ^C while its session waits: end the session if that login submitted it and
        no other login waits for it; either way, one line saying what happened."""
        session = self.by_key.get((user.name, project))
        if session is None or session.user != user.name:
            return "cancelled"
        if session.state not in (State.REQUESTED, State.SUBMITTED, State.PENDING):
            return f"cancelled; the session of {project} is {session.state.value} and stays"
        if self._made_by.get(session.id) is not token:
            return f"cancelled; the session of {project} was started by another login and stays"
        if self._waiting.get(session.id, 0) > 0:
            return f"cancelled; another login waits for the session of {project}, so it stays"
        job = session.job_id
        await self.kill(session, by=user.name, by_uid=user.uid, reason="cancelled (^C) while pending")
        self.log.info("pending_cancelled", session=session.id, user=user.name, project=project, job_id=job)
        return f"cancelled; job {job} was cancelled" if job else "cancelled before submission"

    def _checked(self, session: Session, requested: str | None, chosen: str, mismatch: str,
                 token: object = None) -> Session:
        """Never a silent mismatch: a session that turned out to run another profile than the
        one asked for (another login node made it first) is refused unless the login keeps it
        or chose that profile itself at the busy partition's forecast."""
        chose = token is not None and self._switched.get(session.id) is token
        if requested and session.profile != chosen and mismatch != "keep" and not chose:
            raise SessionError("profile_mismatch", mismatch_text(session, chosen))
        return session

    async def _replace(self, session: Session, user: User, wanted: str,
                       listener: Callable[[dict[str, Any]], None] | None) -> None:
        """End the live session (the owner asked for another profile) and wait until its job is
        gone: a new job of the key would wait behind it (``--dependency=singleton``)."""
        if listener:
            listener({"type": "progress", "state": "ending", "session": session.id,
                      "reason": f"ending the session running profile {session.profile or '?'} to start {wanted}"})
        await self.kill(session, by=user.name, by_uid=user.uid, reason=f"replaced by profile {wanted}")
        deadline = time.monotonic() + max(60.0, self.config.gone_grace + 30.0)
        while session.live and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.2)
        if session.live:
            raise SessionError("profile_mismatch", f"session: {session.project} (profile {session.profile}) did"
                                                   " not end within a minute; try again shortly")

    def _start_bring_up(self, session: Session, user: User) -> asyncio.Task[Session]:
        task = self._spawn(self._bring_up(session, user))
        self._inflight[session.key] = task
        task.add_done_callback(lambda _t, k=session.key: self._inflight.pop(k, None))
        return task

    async def _bring_up(self, session: Session, user: User) -> Session:
        try:
            if session.state == State.REQUESTED and not await self._join_existing(session, user):
                await self._submit(session, user)
        finally:
            self._first_term.pop(session.id, None)  # a hint for this submission only
        await self._await_ready(session, user)
        return session

    async def _submit(self, session: Session, user: User) -> None:
        profile = self.config.profile(session.profile)
        if profile is None:
            self._fail(session, f"profile: {session.profile!r} is no longer configured")
            raise SessionError("profile", session.reason)
        try:
            image = images.resolve(profile.image)
            digest = await anyio.to_thread.run_sync(images.digest, image)
        except OSError as exc:
            self._fail(session, f"image {profile.image} is not usable: {exc.strerror or exc}")
            raise SessionError("image", session.reason) from None
        try:
            spec = jobspec.build(self.config, user, session.project, str(image), digest, profile=profile,
                                 first_term=self._first_term.pop(session.id, None))
        except ValueError as exc:
            self._fail(session, str(exc))
            raise SessionError("invalid", session.reason) from None
        session.instance, session.image, session.image_digest = spec.instance, str(image), digest
        session.script_path, session.log_path = str(spec.script_path), str(spec.log_path)
        self.store.save(session)
        try:
            await self._ensure_job_dir(spec.job_dir, user)
        except SessionError as exc:
            self._fail(session, exc.message)
            raise SessionError("job_dir", session.reason) from None
        try:
            _write_job_files(spec)
            # Created as the user, never by root (root-squashed NFS); a stat that root is
            # refused there reads as "missing" and costs only the mkdir.
            mkdir = (self.runner.run(["mkdir", "-p", "--", spec.host_project_dir], user=user)
                     if self.config.create_project_dir and not os.path.isdir(spec.host_project_dir) else None)
            if self.config.launch == "immediate":
                if await self._allocate(session, user, spec, mkdir):
                    return
            elif mkdir is not None:
                await mkdir
            switch = await self._forecast(session, user, spec, profile.partition)
            if switch:  # the login chose another profile at the forecast: build that one instead
                session.profile = switch
                self._switched[session.id] = self._made_by.get(session.id)
                self.store.save(session)
                self.log.info("profile_switched", session=session.id, user=user.name, project=session.project,
                              profile=switch, reason="busy partition")
                return await self._submit(session, user)
            result = await self.runner.run(spec.sbatch_argv, user=user, input=spec.script.encode())
            job_id = parse_sbatch(result.stdout)
        except ControllerUnavailable as exc:
            self._fail(session, f"SLURM controller unavailable at submission: {exc.reason}")
            raise SessionError("controller_unavailable", session.reason) from None
        except (SlurmError, OSError, ValueError) as exc:
            self._fail(session, f"submission failed: {getattr(exc, 'reason', None) or exc}")
            raise SessionError("submit_failed", session.reason) from None
        if session.state in TERMINAL:  # ended (^C, kill) while sbatch ran: its job must not outlive it
            await self._cancel_job(job_id, user)
            raise SessionError("failed", session.reason or "session ended while it was being submitted")
        session.job_id = job_id
        session.submitted_at = time.time()
        self.transition(session, State.SUBMITTED, f"job {job_id} submitted")
        self.audit.record("session_started", user=session.user, project=session.project, session=session.id,
                          job_id=job_id, instance=session.instance, image=session.image,
                          digest=session.image_digest, profile=session.profile)
        self._wake.set()

    async def _allocate(self, session: Session, user: User, spec: jobspec.JobSpec,
                        mkdir: Awaitable[Any] | None = None) -> bool:
        """The immediate launch (broker.launch): an allocation granted now (``salloc --no-shell
        --immediate``, as the user) and its agent step started under a holder that outlives
        this broker. False when SLURM cannot grant it now: the caller queues a batch job.

        ``mkdir`` (the project directory, as the user) runs while salloc does: the directory is
        needed only when the instance starts on the node, a process less on a first login's path."""
        result, made = await asyncio.gather(self.runner.run(spec.salloc_argv, user=user), mkdir or _nothing(),
                                            return_exceptions=True)
        if isinstance(made, BaseException):
            if not isinstance(result, BaseException):
                with contextlib.suppress(ValueError):
                    await self._cancel_job(launch.parse_salloc(result.stderr), user)
            raise made
        try:
            if isinstance(result, BaseException):
                raise result
            job_id = launch.parse_salloc(result.stderr)
        except ControllerUnavailable:
            raise
        except (SlurmError, ValueError) as exc:
            self.log.info("immediate_not_granted", session=session.id, user=user.name, project=session.project,
                          reason=getattr(exc, "reason", None) or str(exc))
            return False
        if session.state in TERMINAL:  # ended (^C, kill) while salloc ran: its allocation must not outlive it
            await self._cancel_job(job_id, user)
            raise SessionError("failed", session.reason or "session ended while it was being allocated")
        session.job_id, session.launch = job_id, "immediate"
        session.submitted_at = time.time()
        self.transition(session, State.SUBMITTED, f"job {job_id} allocated at once (immediate launch)")
        session.running_at = time.time()  # granted means running: its step starts now
        self.transition(session, State.STARTING, "allocation granted")
        self.audit.record("session_started", user=session.user, project=session.project, session=session.id,
                          job_id=job_id, instance=session.instance, image=session.image,
                          digest=session.image_digest, profile=session.profile, launch="immediate")
        kind = launch.choose_holder(self.config.holder)
        argv = launch.holder_argv(kind, job_id, str(spec.log_path), uid=user.uid, gid=user.gid,
                                  stdin_path=str(spec.script_path))
        # Two login nodes may allocate for one key at the same moment (no singleton here): a
        # fresh scan, while the holder starts, finds an older job of the key (job ids grow with
        # time, so the one allocated first is older on every node) before this one is ready.
        held, jobs = await asyncio.gather(
            self.runner.detach(argv, user=user if kind == "setsid" else None, stdin_path=str(spec.script_path),
                               output_path=os.devnull, extra_env={"SBROKER_JOB_ID": job_id}),
            self.scan(max_age=0.0), return_exceptions=True)
        if isinstance(held, BaseException):
            await self._cancel_failed(session, f"the session's agent step could not be started ({kind}):"
                                               f" {getattr(held, 'reason', None) or held}")
            raise SessionError("submit_failed", session.reason) from None
        self.log.info("agent_step_held", session=session.id, user=user.name, job_id=job_id, holder=kind)
        found = None if isinstance(jobs, BaseException) else self.winner(jobs, user.uid, session.project)
        if isinstance(jobs, BaseException):
            self._converge[session.id] = ""  # no evidence now: the next poll looks again
            self._wake.set()
        elif found is not None and int(found[0].job_id) < int(job_id):
            await self._scancel(session)
            self._point_at(session, user, *found)
            self.log.warning("duplicate_allocation", user=user.name, project=session.project,
                             kept=found[0].job_id, cancelled=job_id)
            self.audit.record("session_joined", user=session.user, project=session.project, session=session.id,
                              job_id=session.job_id, instance=session.instance, left=job_id)
            self.apply(session, found[0], time.time())
        return True

    async def _forecast(self, session: Session, user: User, spec: jobspec.JobSpec, partition: str) -> str | None:
        """When jobs already wait in the partition (the scan just taken says so; no extra
        query otherwise), ask SLURM when this one would start (``sbatch --test-only``, as the
        user, nothing submitted) and tell the waiting logins before they wait. The login that
        made the session, if it is interactive, is asked once: go on, another allowed profile
        (returned), or cancel (:class:`SessionError`)."""
        if self._scan is None or time.monotonic() - self._scan[0] > 5.0:
            return None
        busy = queue.waiting(self._scan[1], partition)
        if not busy:
            return None
        argv = [spec.sbatch_argv[0], "--test-only", *spec.sbatch_argv[1:]]
        try:
            result = await self.runner.run(argv, user=user, input=spec.script.encode(), check=False)
        except SlurmError:
            return None
        start = queue.forecast_start(result.stderr)
        text = f"partition {partition} is busy ({busy} job(s) waiting)"
        if start:
            text += f"; SLURM expects this session to start at {start}"
        session.expected_start = start or session.expected_start
        self.log.info("queue_forecast", session=session.id, user=user.name, partition=partition, waiting=busy,
                      expected_start=start)
        self._notify(session, {"type": "progress", "state": session.state.value, "reason": text,
                               "expected_start": start, "queue_waiting": busy})
        ask = self._askers.pop(session.id, None)
        if ask is None or (start and queue.soon(start, time.time())):
            return None  # nobody to ask, or it starts within a minute anyway
        others = [p.name for p in profiles.allowed(self.config.profiles, lambda group: in_group(user, group))
                  if p.name != session.profile]
        try:
            answer = await asyncio.wait_for(ask({"type": "question", "kind": "busy", "text": text,
                                                 "profile": session.profile, "choices": others}), QUESTION_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            answer = None  # nobody answered: go on, as a login that was not asked
        self.log.info("forecast_answer", session=session.id, user=user.name, answer=answer or "go")
        if answer == "cancel":
            self._fail(session, "cancelled at the queue forecast; nothing was submitted")
            raise SessionError("cancelled", "cancelled; nothing was submitted")
        return answer if answer in others else None

    async def _queue_positions(self) -> None:
        """For sessions that wait: roughly how many jobs are ahead (one shared ``squeue --json``
        at most every 5 s, and only while a session is pending)."""
        pending = [s for s in self.sessions.values() if s.state == State.PENDING and s.job_id]
        if not pending or time.monotonic() - self._last_ahead < 5.0:
            return
        self._last_ahead = time.monotonic()
        try:
            jobs = await self.scan(max_age=5.0)
        except (SlurmError, ValueError):
            return
        for session in pending:
            ahead = queue.ahead(jobs, session.job_id)
            if ahead is not None and ahead != session.queue_ahead:
                self.log.info("queue_position", session=session.id, job_id=session.job_id, ahead=ahead)
                session.queue_ahead = ahead
                self._notify(session, {"type": "progress", "state": session.state.value,
                                       "pending_reason": session.pending_reason,
                                       "expected_start": session.expected_start, "queue_ahead": ahead})

    # ------------------------------------------------------- several login nodes, one truth

    async def scan(self, max_age: float = SCAN_MAX_AGE) -> dict[str, JobInfo]:
        """Every job SLURM knows (``squeue --json``: unforgeable), shared by concurrent callers
        and reused for ``max_age`` seconds. Raises :class:`SlurmError` or ``ValueError``."""
        if self._scan is not None and time.monotonic() - self._scan[0] <= max_age:
            return self._scan[1]
        if self._scan_task is None or self._scan_task.done():
            async def run() -> dict[str, JobInfo]:
                result = await self.runner.run(commands.squeue_all())
                jobs = parse_squeue_json(result.stdout)
                self._scan = (time.monotonic(), jobs)
                return jobs
            self._scan_task = asyncio.ensure_future(run())
        return await asyncio.shield(self._scan_task)

    def winner(self, jobs: dict[str, JobInfo], uid: int, project: str) -> tuple[JobInfo, dict[str, str]] | None:
        """The key's one true job, the same on every login node: the oldest (lowest id) active
        job tagged for (``uid``, ``project``) whose SLURM owner is ``uid``."""
        best = None
        for info in jobs.values():
            if info.job_id in self._gone:
                continue
            found = self.tagged(info)
            if found is None or info.uid != uid or found[1].get("project") != project:
                continue
            if best is None or int(info.job_id) < int(best[0].job_id):
                best = (info, found[1])
        return best

    async def _join_existing(self, session: Session, user: User) -> bool:
        """Before submitting: if SLURM already runs this key's job (another login node made it,
        or this broker lost it), join that one instead. A failed scan is no evidence: submit;
        ``--dependency=singleton`` and :meth:`_converge_all` still converge on one job."""
        try:
            jobs = await self.scan(max_age=0.0)  # fresh: a job may have ended a moment ago
        except (SlurmError, ValueError) as exc:
            self.log.warning("scan_failed", session=session.id, reason=getattr(exc, "reason", None) or str(exc))
            return False
        found = self.winner(jobs, user.uid, session.project)
        if found is None or session.state != State.REQUESTED:
            return False
        info, tags = found
        self._point_at(session, user, info, tags)
        session.submitted_at = time.time()
        self.transition(session, State.SUBMITTED, f"joined job {info.job_id} (already running for this project)")
        self.audit.record("session_joined", user=session.user, project=session.project, session=session.id,
                          job_id=info.job_id, instance=session.instance)
        self.apply(session, info, time.time())
        self._wake.set()
        return True

    def _point_at(self, session: Session, user: User, info: JobInfo, tags: dict[str, str]) -> None:
        """Make ``session`` track job ``info`` (its instance, log and digest from its tags)."""
        self._absent_since.pop(session.job_id, None)
        self._cancel_sent.pop(session.job_id, None)
        session.job_id = info.job_id
        session.instance = jobspec.v.validate_instance_name(tags.get("instance", ""))
        session.log_path = str(jobspec.log_path(self.config, user, session.instance))
        session.script_path = str(jobspec.jobs_dir(self.config, user.name) / f"{session.instance}.sh")
        session.image_digest = tags.get("digest", "")
        session.profile = self.tag_profile(tags)
        session.launch = tag_launch(tags)
        session.node = info.nodes if info.nodes not in ("", "(null)") else ""
        self.store.save(session)

    async def _converge_all(self) -> None:
        """Sessions whose job waits behind another of its key, or ended before ready: move each
        to the key's winning job (cancelling its own, as the user) or, with none, fail it."""
        waiting = {sid: why for sid, why in self._converge.items() if sid in self.sessions}
        self._converge.clear()
        if not waiting:
            return
        try:
            jobs = await self.scan(max_age=0.0)
        except (SlurmError, ValueError) as exc:
            self.log.warning("scan_failed", reason=getattr(exc, "reason", None) or str(exc))
            self._converge.update({sid: why for sid, why in waiting.items() if why})
            return
        now = time.time()
        for sid, why in waiting.items():
            session = self.sessions.get(sid)
            if session is None or not session.live or session.state in (State.READY, State.ENDING):
                continue
            user = self._owner(session)
            found = self.winner(jobs, session.uid, session.project) if user else None
            if found is None or found[0].job_id == session.job_id:
                if why:
                    self._fail(session, why)
                continue
            info, tags = found
            loser = session.job_id
            if why == "" and loser:   # its own job is still live, behind the winner: cancel it
                await self._scancel(session)
            self._point_at(session, user, info, tags)
            self.log.info("session_moved", session=session.id, user=session.user, project=session.project,
                          frm=loser, to=info.job_id)
            self.audit.record("session_joined", user=session.user, project=session.project, session=session.id,
                              job_id=info.job_id, instance=session.instance, left=loser)
            self._notify(session, {"type": "progress", "state": session.state.value,
                                   "reason": f"joined job {info.job_id} (another login node started it first)"})
            self.apply(session, info, now)

    async def discover(self, max_age: float = 2.0) -> int:
        """Track the tagged jobs of other login nodes' sessions (for ``ls``/``show`` here);
        returns how many were adopted. Each stays the session it is: nothing is cancelled
        unless two live jobs hold one key (then the newer one goes, whoever sees it)."""
        try:
            jobs = await self.scan(max_age=max_age)
        except (SlurmError, ValueError) as exc:
            self.log.warning("discover_failed", reason=getattr(exc, "reason", None) or str(exc))
            return 0
        self._last_discover = time.monotonic()
        known = {s.job_id for s in self.sessions.values() if s.job_id}
        adopted = 0
        now = time.time()
        for info in sorted(jobs.values(), key=lambda j: int(j.job_id)):
            if info.job_id in known or info.job_id in self._gone:
                continue
            found = self.tagged(info)
            if found is None:
                continue
            self._adopt(info, found[1], now)
            adopted += 1
        return adopted

    async def _ensure_job_dir(self, directory: Path, user: User) -> None:
        """Make ``slurm.job_dir`` exist and be writable, as the user; say why when it cannot.

        Checked with the user's own file-system identity (never root's), created by the user
        (``mkdir`` run as them) only when missing. The compute node's view is checked by SLURM
        itself: a job that cannot open its output there fails with ``JobLaunchFailure``."""
        def check() -> str:
            with userfs.identity(user):
                if not os.path.isdir(directory):
                    return "missing"
                return "ok" if os.access(directory, os.W_OK | os.X_OK, effective_ids=True) else "unwritable"
        state = await anyio.to_thread.run_sync(check)
        if state == "unwritable":
            raise SessionError("job_dir", f"slurm.job_dir: {directory} is not writable by {user.name}"
                                          " (session job output must go there)")
        if state == "missing":
            try:
                await self.runner.run(["mkdir", "-p", "-m", "0700", "--", str(directory)], user=user)
            except SlurmError as exc:
                detail = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else exc.reason
                raise SessionError("job_dir", f"slurm.job_dir: cannot create {directory} as {user.name}:"
                                              f" {detail}") from None

    def _fail(self, session: Session, reason: str) -> None:
        """Fail ``session``; one that has already ended or failed keeps its first reason (the
        poller then sees the job it cancelled as "cancelled" or "completing", which says less)."""
        if session.state in TERMINAL:
            return
        self.transition(session, State.FAILED, reason)

    async def _await_ended(self, session: Session,
                           listener: Callable[[dict[str, Any]], None] | None) -> Session | None:
        """A login while the key's previous session is still ending (just killed, or its job
        finishing): wait until SLURM says its job is gone, then the login starts a new one.
        Bounded by ENDING_WAIT; the session that then holds the key (None: a new one)."""
        self.log.info("login_waits_for_ending", session=session.id, user=session.user, project=session.project)
        if listener:
            listener({"type": "progress", "state": "ending", "session": session.id,
                      "reason": f"waiting for the previous session to end ({session.reason or 'ending'})"})
        deadline = time.monotonic() + ENDING_WAIT
        while session.state == State.ENDING:
            if time.monotonic() > deadline:
                raise SessionError("ending", f"your previous session is still ending ({session.reason or 'no reason'})"
                                             f" after {ENDING_WAIT:g}s; try again in a minute")
            await asyncio.sleep(ENDING_POLL)
        return self.by_key.get(session.key)

    async def _await_ready(self, session: Session, user: User) -> None:
        """Watch the job log and the job state until ready, failed or a timeout."""
        reader = _MarkerReader(user, session.log_path) if session.log_path else None
        probed = False
        agent_up = False
        while True:
            if session.log_path and (reader is None or reader.path != session.log_path):
                reader, probed = _MarkerReader(user, session.log_path), False  # moved to the winning job
            if session.state == State.READY:
                return
            if session.state in TERMINAL:
                raise SessionError("failed", session.reason or "session failed")
            if session.state == State.ENDING:
                raise SessionError("failed", session.reason or "session is ending")
            marker = await anyio.to_thread.run_sync(reader.poll) if reader else None
            if marker is not None:
                kind, detail = marker
                if kind == MARKER_READY:
                    await self._mark_ready(session)
                    continue
                await self._cancel_failed(session, f"instance failed to start: {detail or 'no reason given'}")
                continue
            if not agent_up and session.state == State.STARTING and self._listeners.get(session.id):
                agent_up = await anyio.to_thread.run_sync(userfs.exists, user, agent_status_of(session))
                if agent_up:  # an interactive login may start its terminal now (broker.server, "early")
                    self._notify(session, {"type": "progress", "state": session.state.value, "session": session.id,
                                           "agent_up": True})
            now = time.time()
            cfg = self.config
            if session.state in (State.SUBMITTED, State.PENDING) and now - session.submitted_at > cfg.pending_timeout:
                why = f" ({session.pending_reason})" if session.pending_reason else ""
                await self._cancel_failed(session, f"job pending longer than {cfg.pending_timeout:g}s{why}")
            elif session.state == State.STARTING and now - (session.running_at or now) > cfg.start_timeout:
                why = f"no INSTANCE_READY within {cfg.start_timeout:g}s of the job starting"
                if reader is not None and not reader.seen:
                    why += (f"; its output {session.log_path} never appeared on this login node:"
                            f" slurm.job_dir is probably not shared with {session.node or 'the job node'}")
                await self._cancel_failed(session, why)
            elif (session.state == State.STARTING and reader is not None and not reader.seen and not probed
                  and now - (session.running_at or now) > LOG_APPEAR_GRACE):
                probed = True
                self._spawn(self._probe_node_local(session, user))
            queued = session.state in (State.SUBMITTED, State.PENDING) and now - session.submitted_at > QUEUED_FAST
            # A job that just started has its marker a few hundred ms away: a user waits for it.
            starting = session.state == State.STARTING and now - (session.running_at or now) < STARTING_FAST
            await asyncio.sleep(QUEUED_INTERVAL if queued else READ_INTERVAL_STARTING if starting else READ_INTERVAL)

    async def _probe_node_local(self, session: Session, user: User) -> None:
        """Ask the job's node (``srun --overlap``, as the user) whether the job's output is
        there; if it is while this login node cannot see it, job_dir is node-local: say so
        now rather than at the start timeout."""
        argv = ["srun", "--overlap", "--quiet", f"--jobid={session.job_id}", "--ntasks=1",
                "test", "-f", session.log_path]
        try:
            await self.runner.run(argv, user=user)
        except SlurmError:
            return  # not there, or no answer: no evidence; the start timeout stays the bound
        if session.state != State.STARTING or await anyio.to_thread.run_sync(
                userfs.exists, user, session.log_path):
            return
        await self._cancel_failed(
            session, f"the job's output {session.log_path} exists on {session.node or 'the job node'} but not"
                     f" on this login node: slurm.job_dir ({self.config.job_dir}) is node-local; it must be"
                     " on storage the compute and login nodes share (e.g. the home)")

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
        """Fail ``session`` for ``reason``, then cancel its job: failed first, so a poll that
        sees the job end while ``scancel`` runs cannot put its own reason before this one."""
        self._fail(session, reason)
        await self._scancel(session)

    async def _cancel_job(self, job_id: str, owner: User) -> None:
        """``scancel`` a job that no session tracks any more, as its owner."""
        self._cancel_sent[job_id] = time.time()
        try:
            await self.runner.run(commands.scancel(job_id), user=owner)
        except NotFound:
            pass
        except SlurmError as exc:
            self.log.error("scancel_failed", job_id=job_id, error=exc.reason)

    async def _scancel(self, session: Session) -> None:
        if not session.job_id:
            return
        if session.state not in TERMINAL:  # the poller retries cancels of sessions it still tracks
            self._cancel_sent[session.job_id] = time.time()
        owner = self._owner(session)
        if owner is None or owner.uid != session.uid or owner.uid < self.config.min_uid:
            self.log.error("scancel_refused", session=session.id, job_id=session.job_id,
                           reason=f"{session.user} (uid {session.uid}) is not a session user here")
            return
        try:
            await self.runner.run(commands.scancel(session.job_id), user=owner)
        except NotFound:
            pass
        except SlurmError as exc:
            self.log.error("scancel_failed", session=session.id, job_id=session.job_id, error=exc.reason)

    # ---------------------------------------------------------------- kill

    async def kill(self, session: Session, *, by: str, by_uid: int, reason: str) -> None:
        if session.state in TERMINAL:
            return  # nothing to do, nothing to audit (a user must not grow the audit log for free)
        why = f"killed by {by}" + (f": {reason}" if reason else "")
        self.audit.record("kill", user=session.user, project=session.project, session=session.id,
                          job_id=session.job_id, by=by, peer_uid=by_uid, reason=reason)
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
            await self._queue_positions()
            await self._converge_all()
            if time.monotonic() - self._last_discover > DISCOVER_INTERVAL:
                await self.discover()

    async def poll_once(self) -> None:
        tracked = [s for s in self.sessions.values() if s.live and s.job_id]
        if not tracked:
            return
        started = time.monotonic()
        token = secrets.token_hex(8)
        asked = {s.job_id for s in tracked}
        try:
            result = await self.runner.run(commands.squeue_jobs(asked, token))
            jobs = parse_poll(result.stdout, token, asked)
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
        held = [s for s in tracked if s.launch == "immediate" and s.state in (State.STARTING, State.READY)
                and (info := jobs.get(s.job_id)) is not None and info.state == "RUNNING"]
        if held:
            await self._check_agent_steps(held)

    async def _check_agent_steps(self, sessions: list[Session]) -> None:
        """An immediate session lives in its agent step (broker.launch): a running allocation
        without it for AGENT_STEP_GRACE (its holder's login node was lost, or the step was
        killed) has no shells and no instance any more. It is released, and the reason says so."""
        try:
            result = await self.runner.run(commands.squeue_agent_steps(s.job_id for s in sessions))
        except SlurmError as exc:
            self.log.warning("step_check_failed", reason=exc.reason)
            return  # no evidence either way
        running = launch.steps_with_agent(result.stdout.split("\n"))
        now = time.monotonic()
        for session in sessions:
            if session.job_id in running:
                self._stepless.pop(session.job_id, None)
                continue
            since = self._stepless.setdefault(session.job_id, now)
            if now - since < AGENT_STEP_GRACE:
                continue
            self._stepless.pop(session.job_id, None)
            why = "its agent step ended without releasing the allocation (the login node holding it was lost" \
                  " or the step was killed); the session's shells and instance are gone"
            self.log.warning("agent_step_lost", session=session.id, user=session.user, job_id=session.job_id)
            await self._scancel(session)
            if session.state == State.READY:
                self.transition(session, State.ENDING, why)
            else:
                self._fail(session, why)

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
            if info.reason == "Dependency" and session.state in (State.SUBMITTED, State.PENDING):
                self._converge.setdefault(session.id, "")  # another job of this key is live
            if session.state == State.SUBMITTED:
                self.transition(session, State.PENDING, _pending_text(info))
            elif session.state in (State.STARTING, State.READY) or session.id in self._completing:
                # Requeued (node failure, admin): the instance died with the first run.
                self._completing.discard(session.id)
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
                if state == "COMPLETING":
                    if session.state == State.READY:
                        # Not over yet: a requeue passes through COMPLETING back to PENDING. It
                        # ends when the job leaves SLURM or ends; if it comes back, the requeue
                        # guard below cancels it.
                        self._completing.add(session.id)
                        self.transition(session, State.ENDING, what)
                else:
                    self.transition(session, State.ENDED, session.reason if session.state == State.ENDING
                                    else what)
            else:
                detail = _failure_from_log(self._owner(session), session.log_path)
                if not detail and info.reason == "JobLaunchFailure":
                    detail = (f"{what} before the instance was ready: probably slurm.job_dir"
                              f" ({Path(session.log_path).parent}) is missing or not writable on"
                              f" {info.nodes or 'the job node'} (SLURM could not open the job's output there)")
                if state in ("CANCELLED", "COMPLETED", "FAILED") and session.id not in self._converge \
                        and not detail:
                    # Perhaps cancelled as the loser of a race between login nodes: the next
                    # converge step moves it to the winner, or fails it with this reason.
                    self._converge[session.id] = f"{what} before the instance was ready"
                    return
                self._fail(session, detail or f"{what} before the instance was ready")

    # ---------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Load the store, reconcile with SLURM, resume in-flight sessions."""
        for session in self.store.live():
            self._track(session)
        try:
            result = await self.runner.run(commands.squeue_all())
            jobs = parse_squeue_json(result.stdout)
            self.controller_ok = True
        except ValueError as exc:
            self.log.warning("reconcile_deferred", reason=f"squeue --json: {exc}")
            jobs = None
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

    def tag_profile(self, tags: dict[str, str]) -> str:
        """The profile a job's comment names, if this config has it ("" otherwise). The comment
        is the user's to rewrite: it only ever selects among the administrator's profiles, and
        a job without the tag (an older broker's) ran the default."""
        name = tags.get("profile", self.config.default_profile if "profile" not in tags else "")
        return name if self.config.profile(name) is not None else ""

    def owner_of(self, info: JobInfo) -> User | None:
        """The job's owner by SLURM's numeric uid (never the comment's ``user=``); None for
        root, system accounts (below ``broker.min_uid``) and unknown uids: nothing is done as
        them on the scheduler's word."""
        if info.uid < self.config.min_uid:
            return None
        try:
            return lookup_uid(info.uid)
        except UnknownUser:
            return None

    def tagged(self, info: JobInfo) -> tuple[User, dict[str, str]] | None:
        """``(owner, tags)`` of an active job carrying the broker's tag *for its own owner*:
        a user can write any comment on their own job, so ``user=`` must name SLURM's owner."""
        tags = parse_comment(info.comment)
        if not tags or not info.active:
            return None
        owner = self.owner_of(info)
        if owner is None or tags.get("user") != owner.name:
            return None
        return owner, tags

    def _reconcile(self, jobs: dict[str, JobInfo]) -> None:
        by_instance = {}
        for info in sorted(jobs.values(), key=lambda j: -int(j.job_id)):  # the oldest wins a clash
            found = self.tagged(info)
            if found:
                by_instance[found[1].get("instance", "")] = (info, found[1])
        now = time.time()
        for session in list(self.sessions.values()):
            found = by_instance.pop(session.instance, None) if session.instance else None
            if found and found[0].uid != session.uid:
                found = None
            if found and not session.profile:  # stored by a broker from before profiles
                session.profile = self.tag_profile(found[1])
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
                    if session.state == State.STARTING and _log_has_ready(self._owner(session), session.log_path):
                        session.running_at = session.running_at or now
                        self.transition(session, State.READY, "adopted after restart")
        for instance, (info, tags) in by_instance.items():
            self._adopt(info, tags, now)

    def _adopt(self, info: JobInfo, tags: dict[str, str], now: float) -> None:
        """A tagged job this broker does not know (lost write, or another login node)."""
        try:
            user = self.owner_of(info)
            if user is None:
                raise UnknownUser(f"uid {info.uid} is not a session user")
            project = jobspec.check_project(self.config, tags.get("project", ""))
            jobspec.v.validate_instance_name(tags.get("instance", ""))
        except (UnknownUser, ValueError) as exc:
            self.log.warning("adopt_refused", job_id=info.job_id, reason=str(exc))
            return
        existing = self.by_key.get((user.name, project))
        if existing is not None and existing.live and existing.job_id and int(info.job_id) < int(existing.job_id):
            # The adopted job is the older one: the key's job on every login node. The session
            # moves to it; its own, newer job is cancelled (as the user).
            old = existing.job_id
            self._point_at(existing, user, info, tags)
            self.log.warning("duplicate_allocation", user=user.name, project=project, kept=info.job_id,
                             cancelled=old)
            self._spawn(self._cancel_job(old, user))
            self.apply(existing, info, now)
            return
        if existing is not None and existing.live and not existing.job_id:
            return  # being brought up here right now: it joins that job or converges on it itself
        session = Session(user=user.name, uid=user.uid, project=project, instance=tags["instance"],
                          job_id=info.job_id, submitted_at=now)
        session.log_path = str(jobspec.log_path(self.config, user, session.instance))
        session.script_path = str(jobspec.jobs_dir(self.config, user.name) / f"{session.instance}.sh")
        session.image_digest = tags.get("digest", "")
        session.profile = self.tag_profile(tags)
        session.launch = tag_launch(tags)
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
        if session.state == State.STARTING and _log_has_ready(user, session.log_path):
            self.transition(session, State.READY, "adopted after restart")

    def _owner(self, session: Session) -> User | None:
        try:
            return lookup_name(session.user)
        except UnknownUser:
            return None

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

    async def find(self, ref: str, user: User, admin: bool) -> Session:
        """:meth:`resolve`, and on a miss look once for sessions other login nodes started."""
        try:
            return self.resolve(ref, user, admin)
        except SessionError as exc:
            if exc.code != "not_found" or not await self.discover():
                raise
        return self.resolve(ref, user, admin)

    async def node_addr(self, node: str) -> str:
        """The node's ``NodeAddr`` from SLURM (cached: it changes only with slurm.conf)."""
        addr = self._node_addrs.get(node)
        if addr is None:
            result = await self.runner.run(commands.node_addr(node))
            for line in result.stdout.splitlines():
                name, _, value = line.strip().partition(" ")
                if name == node and value.strip():
                    addr = value.strip()
            if not addr:
                raise SessionError("no_node", f"session: SLURM gives no address for node {node!r}")
            self._node_addrs[node] = addr
        return addr

    async def job_has_steps(self, session: Session) -> bool | None:
        """Whether the session's job runs an ``srun`` step (a shell or command attached from any
        login node): activity this broker cannot see otherwise. None when SLURM does not say."""
        try:
            result = await self.runner.run(commands.squeue_steps(session.job_id))
        except (SlurmError, ValueError):
            return None
        steps = [line.strip() for line in result.stdout.split("\n") if line.strip()]
        return any(s.partition(".")[2].isdigit() for s in steps if s.partition(".")[0] == session.job_id)

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
    """Reads new complete lines of a job log as its user, re-opening it each time (NFS
    close-to-open consistency), at most :data:`READ_CHUNK` bytes per call.

    Synchronous: the daemon calls :meth:`poll` in a worker thread. Only lines holding
    ``INSTANCE_`` are decoded, so a log of a million empty lines costs a ``find``, not a
    million objects."""

    def __init__(self, user: User | None, path: str) -> None:
        self.user = user
        self.path = path
        self.offset = 0
        self.partial = b""
        #: Whether the file was ever there (a job whose output never appears on the login
        #: node writes it to a directory the login node does not share).
        self.seen = False

    def poll(self) -> tuple[str, str] | None:
        if self.user is None:
            return None
        data, end = userfs.read_from(self.user, self.path, self.offset, READ_CHUNK)
        if end == 0 and not data:
            self.seen = self.seen or userfs.exists(self.user, self.path)
            return None
        self.seen = True
        if end < self.offset:           # truncated or replaced: start over
            self.offset, self.partial = 0, b""
            return None
        self.offset = end
        chunk = self.partial + data
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self.partial = chunk[-4096:]
            return None
        self.partial = chunk[cut + 1:][-4096:]
        return _first_marker(chunk[:cut])


def _first_marker(block: bytes) -> tuple[str, str] | None:
    at = block.find(b"INSTANCE_")
    while at >= 0:
        start = block.rfind(b"\n", 0, at) + 1
        stop = block.find(b"\n", at)
        stop = len(block) if stop < 0 else stop
        marker = parse_marker(block[start:stop][:4096].decode(errors="replace"))
        if marker:
            return marker
        at = block.find(b"INSTANCE_", stop)
    return None


def parse_marker(line: str) -> tuple[str, str] | None:
    """``(MARKER, detail)`` for a marker line of the start script, else None."""
    line = line.strip()
    if line == MARKER_READY:
        return MARKER_READY, ""
    if line == MARKER_FAILED or line.startswith(MARKER_FAILED + ":"):
        return MARKER_FAILED, line[len(MARKER_FAILED) + 1:].strip()
    return None


def _scan_log(user: User | None, path: str) -> tuple[str, str] | None:
    """The last marker in the last 64 KiB of a job log (markers are few and near the end)."""
    if not path or user is None:
        return None
    data, _ = userfs.read_from(user, path, -1, READ_CHUNK)
    last = None
    for line in data.split(b"\n"):
        if b"INSTANCE_" in line:
            last = parse_marker(line[:4096].decode(errors="replace")) or last
    return last


def _log_has_ready(user: User | None, path: str) -> bool:
    marker = _scan_log(user, path)
    return marker is not None and marker[0] == MARKER_READY


def _failure_from_log(user: User | None, path: str) -> str:
    marker = _scan_log(user, path)
    if marker and marker[0] == MARKER_FAILED:
        return f"instance failed to start: {marker[1] or 'no reason given'}"
    return ""


def mismatch_text(session: Session, wanted: str) -> str:
    """The one line a login gets when the live session runs another profile."""
    live = session.profile or "unknown"
    return (f"session: project {session.project} runs profile {live}, not {wanted}; to use {wanted}, end it"
            f" first with `sbroker kill {session.project}` (or connect without a profile to use it)")


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


def tag_launch(tags: dict[str, str]) -> str:
    """How a job was made, from its comment (the user's word: it only decides whether the
    broker checks that job's agent step, which affects that user's own session)."""
    return "immediate" if tags.get("launch") == "immediate" else "batch"


async def _nothing() -> None:
    return None


def agent_status_of(session: Session) -> str:
    """The session agent's status file: beside the job's log (``slurm.job_dir``)."""
    return str(agentlaunch.status_path(Path(session.log_path).parent, session.instance))


def _write_job_files(spec: jobspec.JobSpec) -> None:
    """The broker's root-only record of the submitted script (sbatch reads it from stdin).

    The job's output file is not made here: slurmstepd creates it on the compute node, as
    the user, in ``slurm.job_dir``."""
    directory = spec.script_path.parent
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.mkdir(exist_ok=True, mode=0o700)
    fd = os.open(spec.script_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(spec.script)
