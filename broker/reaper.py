"""The reaper: finds and removes what instance hygiene missed, and says what it did.

Three kinds of leftovers, each with a rule that never touches a live session:

``orphan_job``
    A job carrying the broker's tag, RUNNING for longer than ``timeouts.start``,
    whose instance is gone: its start-script log ends in ``INSTANCE_FAILED`` or
    ``INSTANCE_STOPPED`` (and has not been written for ``timeouts.start``), or,
    with ``reaper.instance_check``, ``apptainer instance list --json`` run as the
    user inside the job (``srun --overlap``) does not list it. At most
    :data:`MAX_INSTANCE_CHECKS` such probes per run, each bounded by
    ``slurm.command_timeout``; a probe that fails is no evidence and changes nothing.
``stale_instance``
    An apptainer state directory ``~/.apptainer/instances/app/<host>/<user>/sb-*``
    of a known user whose instance no active tagged job carries and, on this host,
    whose recorded pids are dead. Removed *as the user* (never by root through a
    path the user controls).
``old_job_file``
    A start script or log under ``<state_dir>/jobs/<user>/`` older than
    ``reaper.retention`` that belongs to no live session.

What it must not do: run SLURM commands except through ``manager.runner``, act on
an ambiguous answer (a failed ``squeue`` skips the whole pass), or
decide anything about sessions itself (known sessions are ended via ``manager.kill``).
"""

from __future__ import annotations

import collections
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from . import log as _log
from .container import _validate as v
from .identity import UnknownUser, lookup_name
from .session import State
from .slurm import commands
from .slurm.errors import NotFound, SlurmError
from .slurm.parse import JobInfo, parse_comment, parse_squeue

MAX_INSTANCE_CHECKS = 8
#: A state dir younger than this may belong to a job submitted after our squeue snapshot.
STATE_DIR_GRACE = 120.0
MARKERS = ("INSTANCE_READY", "INSTANCE_FAILED", "INSTANCE_STOPPED")


class Reaper:
    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.config = manager.config
        self.log = _log.get("sbroker.reaper")
        self.totals: collections.Counter[str] = collections.Counter()
        self.last_report: dict[str, Any] | None = None

    async def run_once(self, *, dry_run: bool = False) -> dict[str, Any]:
        """One pass over all three kinds; returns (and audits) the report."""
        started = time.time()
        report: dict[str, Any] = {"ts": started, "dry_run": dry_run, "orphan_jobs": [], "stale_instances": [],
                                  "old_job_files": [], "errors": []}
        jobs: dict[str, JobInfo] | None
        try:
            result = await self.manager.runner.run(commands.squeue_all())
            jobs = parse_squeue(result.stdout)
        except SlurmError as exc:
            jobs = None
            report["errors"].append(f"squeue: {exc.reason} (job and instance checks skipped)")
        if jobs is not None:
            await self._orphan_jobs(jobs, report, dry_run)
            await self._stale_instances(jobs, report, dry_run)
            self._old_job_files(jobs, report, dry_run)
        if not dry_run:
            report["pruned_sessions"] = self.manager.store.prune_finished(
                time.time() - self.config.reaper_retention)
        report["seconds"] = round(time.time() - started, 3)
        found = {k: len(report[k]) for k in ("orphan_jobs", "stale_instances", "old_job_files")}
        if not dry_run:
            for kind, n in found.items():
                self.totals[kind] += n
        self.last_report = report
        if any(found.values()) or report["errors"]:
            self.manager.audit.record("reap", user=None, by="sbroker", dry_run=dry_run, **found,
                                      errors=report["errors"],
                                      jobs=[j["job_id"] for j in report["orphan_jobs"]],
                                      instances=[i["path"] for i in report["stale_instances"]],
                                      files=[f["path"] for f in report["old_job_files"]])
        self.log.info("reaped", dry_run=dry_run, errors=len(report["errors"]), **found)
        return report

    # ------------------------------------------------------------------ orphan jobs

    async def _orphan_jobs(self, jobs: dict[str, JobInfo], report: dict[str, Any], dry_run: bool) -> None:
        now = time.time()
        grace = self.config.start_timeout
        by_job = {s.job_id: s for s in self.manager.sessions.values() if s.live and s.job_id}
        probes = 0
        for info in sorted(jobs.values(), key=lambda j: int(j.job_id)):
            tags = parse_comment(info.comment)
            if not tags or tags.get("user") != info.user or info.state != "RUNNING":
                continue
            session = by_job.get(info.job_id)
            if session is not None and session.state in (State.SUBMITTED, State.PENDING, State.STARTING,
                                                          State.ENDING):
                continue  # the manager is still bringing it up (or already ending it)
            started = _slurm_time(info.start_time)
            if started is None or now - started < grace:
                continue
            instance = tags.get("instance", "")
            try:
                v.validate_instance_name(instance)
                v.validate_username(info.user)
            except ValueError:
                continue
            why = self._log_says_gone(info.user, instance, now, grace)
            if why is None and self.config.reaper_instance_check and probes < MAX_INSTANCE_CHECKS:
                probes += 1
                why = await self._probe_instance(info, instance, report)
            if why is None:
                continue
            entry = {"job_id": info.job_id, "user": info.user, "project": tags.get("project", ""),
                     "instance": instance, "why": why, "session": session.id if session else None}
            report["orphan_jobs"].append(entry)
            self.log.warning("orphan_job", dry_run=dry_run, **entry)
            if dry_run:
                continue
            if session is not None:
                await self.manager.kill(session, by="sbroker", by_uid=0, reason=f"reaper: {why}")
            else:
                await self._scancel(info, report)

    def _log_says_gone(self, user: str, instance: str, now: float, grace: float) -> str | None:
        path = self.config.state_dir / "jobs" / user / f"{instance}.log"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < grace:
                return None
            size = st.st_size
            os.lseek(fd, max(0, size - 16384), os.SEEK_SET)
            tail = os.read(fd, 16384).decode(errors="replace")
        finally:
            os.close(fd)
        last = None
        for line in tail.splitlines():
            word = line.strip().split(":", 1)[0]
            if word in MARKERS:
                last = line.strip()
        if last and not last.startswith("INSTANCE_READY"):
            return f"start script log says {last[:120]}"
        return None

    async def _probe_instance(self, info: JobInfo, instance: str, report: dict[str, Any]) -> str | None:
        try:
            owner = lookup_name(info.user)
        except UnknownUser:
            return None
        argv = ["srun", "--overlap", "--quiet", f"--jobid={info.job_id}", "--ntasks=1",
                "apptainer", "instance", "list", "--json", instance]
        try:
            result = await self.manager.runner.run(argv, user=owner)
            listed = json.loads(result.stdout or "{}").get("instances", [])
        except (SlurmError, ValueError, AttributeError) as exc:
            report["errors"].append(f"job {info.job_id}: instance check failed: "
                                    f"{getattr(exc, 'reason', None) or exc}")
            return None
        if any(isinstance(i, dict) and i.get("instance") == instance for i in listed):
            return None
        return "instance not listed by apptainer inside the job"

    async def _scancel(self, info: JobInfo, report: dict[str, Any]) -> None:
        try:
            owner = lookup_name(info.user)
        except UnknownUser:
            owner = None
        try:
            await self.manager.runner.run(commands.scancel(info.job_id), user=owner)
        except NotFound:
            pass
        except SlurmError as exc:
            report["errors"].append(f"scancel {info.job_id}: {exc.reason}")
        self.manager.audit.record("kill", user=info.user, project=parse_comment(info.comment).get("project"),
                                  job_id=info.job_id, by="sbroker", peer_uid=0, reason="reaper: orphan job")

    # ------------------------------------------------------------------ instance state files

    def known_users(self) -> list[str]:
        names = {s.user for s in self.manager.sessions.values()}
        try:
            names.update(e.name for e in os.scandir(self.config.state_dir / "jobs")
                         if e.is_dir(follow_symlinks=False))
        except OSError:
            pass
        out = []
        for name in sorted(names):
            try:
                out.append(v.validate_username(name))
            except ValueError:
                continue
        return out

    async def _stale_instances(self, jobs: dict[str, JobInfo], report: dict[str, Any], dry_run: bool) -> None:
        active = {parse_comment(j.comment).get("instance") for j in jobs.values() if j.active}
        active |= {s.instance for s in self.manager.sessions.values() if s.live and s.instance}
        here = os.uname().nodename
        now = time.time()
        for name in self.known_users():
            try:
                owner = lookup_name(name)
            except UnknownUser:
                continue
            base = Path(owner.home) / ".apptainer" / "instances" / "app"
            for host_dir in _subdirs(base):
                user_dir = host_dir / name
                for inst_dir in _subdirs(user_dir):
                    inst = inst_dir.name
                    if not inst.startswith("sb-") or inst in active:
                        continue
                    try:
                        st = os.lstat(inst_dir)
                    except OSError:
                        continue
                    if st.st_uid != owner.uid or now - st.st_mtime < STATE_DIR_GRACE:
                        continue
                    if host_dir.name == here and _pids_alive(inst_dir / f"{inst}.json"):
                        continue
                    entry = {"user": name, "host": host_dir.name, "instance": inst, "path": str(inst_dir)}
                    report["stale_instances"].append(entry)
                    self.log.warning("stale_instance", dry_run=dry_run, **entry)
                    if dry_run:
                        continue
                    try:
                        await self.manager.runner.run(["rm", "-rf", "--", str(inst_dir)], user=owner)
                    except SlurmError as exc:
                        report["errors"].append(f"{inst_dir}: {exc.reason}")

    # ------------------------------------------------------------------ old job files

    def _old_job_files(self, jobs: dict[str, JobInfo], report: dict[str, Any], dry_run: bool) -> None:
        keep = {s.instance for s in self.manager.sessions.values() if s.live and s.instance}
        keep |= {parse_comment(j.comment).get("instance") for j in jobs.values() if j.active}
        cutoff = time.time() - self.config.reaper_retention
        root = self.config.state_dir / "jobs"
        for user_dir in _subdirs(root):
            try:
                entries = list(os.scandir(user_dir))
            except OSError:
                continue
            for entry in entries:
                stem, dot, ext = entry.name.rpartition(".")
                if not dot or ext not in ("sh", "log") or stem in keep:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) or st.st_mtime > cutoff:
                    continue
                item = {"user": user_dir.name, "path": entry.path, "age_days": round((time.time() - st.st_mtime)
                                                                                     / 86400, 1)}
                report["old_job_files"].append(item)
                if dry_run:
                    continue
                try:
                    os.unlink(entry.path)  # the jobs dir is root's; unlink never follows a link
                except OSError as exc:
                    report["errors"].append(f"{entry.path}: {exc.strerror or exc}")


def _subdirs(path: Path) -> list[Path]:
    """Real subdirectories (symlinks are never followed)."""
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _pids_alive(state_file: Path) -> bool:
    """True if the instance state file names a live process (or cannot be read: keep it)."""
    try:
        fd = os.open(state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        data = json.loads(os.read(fd, 1 << 16) or b"{}")
    except ValueError:
        return False
    finally:
        os.close(fd)
    for key in ("pid", "ppid"):
        pid = data.get(key) if isinstance(data, dict) else None
        if isinstance(pid, int) and pid > 1:
            try:
                os.kill(pid, 0)
                return True
            except ProcessLookupError:
                continue
            except PermissionError:
                return True
    return False


def _slurm_time(text: str) -> float | None:
    """Unix time from squeue's ``%S`` (local ``2026-01-02T03:04:05``); None for N/A."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
