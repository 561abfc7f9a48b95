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
    An apptainer state directory ``~/.apptainer/instances/app/<node>/<user>/sb-*``
    of a known user, older than :data:`STATE_DIR_GRACE`, whose instance no active
    tagged job carries. SLURM's word decides, never a pid: the pids recorded there are
    the compute node's and mean nothing on the login node, and a node that died
    cannot be asked. (Processes of an ended job are the job's cgroup's to kill.)
    Listed and removed *as the user* (never by root through a path the user controls).
``old_job_file``
    A start script under ``<state_dir>/jobs/<user>/`` (root's record) or a job log in
    the user's ``slurm.job_dir`` (removed as the user), older than
    ``reaper.retention``, that belongs to no live session.

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

import anyio

from . import jobspec, userfs
from .agentlaunch import KEY_SUFFIX, STATUS_SUFFIX
from . import log as _log
from .container import _validate as v
from .identity import UnknownUser, User, lookup_name
from .session import State
from .slurm import commands
from .slurm.errors import NotFound, SlurmError
from .slurm.parse import JobInfo, parse_squeue_json

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
            jobs = parse_squeue_json(result.stdout)
        except SlurmError as exc:
            jobs = None
            report["errors"].append(f"squeue: {exc.reason} (job and instance checks skipped)")
        except ValueError as exc:
            jobs = None
            report["errors"].append(f"squeue --json: {exc} (job and instance checks skipped)")
        if jobs is not None:
            await self._orphan_jobs(jobs, report, dry_run)
            await self._stale_instances(jobs, report, dry_run)
            self._old_job_files(jobs, report, dry_run)
            await self._old_job_logs(jobs, report, dry_run)
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
            found = self.manager.tagged(info)
            if found is None or info.state != "RUNNING":
                continue
            owner, tags = found
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
            why = self._log_says_gone(owner, instance, now, grace)
            if why is None and self.config.reaper_instance_check and probes < MAX_INSTANCE_CHECKS:
                probes += 1
                why = await self._probe_instance(info, owner, instance, report)
            if why is None:
                continue
            entry = {"job_id": info.job_id, "user": owner.name, "project": tags.get("project", ""),
                     "instance": instance, "why": why, "session": session.id if session else None}
            report["orphan_jobs"].append(entry)
            self.log.warning("orphan_job", dry_run=dry_run, **entry)
            if dry_run:
                continue
            if session is not None:
                await self.manager.kill(session, by="sbroker", by_uid=0, reason=f"reaper: {why}")
            else:
                await self._scancel(info, owner, tags, report)

    def _log_says_gone(self, owner: User, instance: str, now: float, grace: float) -> str | None:
        """What the job's own log says of its instance, read as its owner (shared storage)."""
        path = jobspec.log_path(self.config, owner, instance)
        with userfs.identity(owner):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError:
                return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < grace:
                return None
            tail = os.pread(fd, 16384, max(0, st.st_size - 16384)).decode(errors="replace")
        finally:
            os.close(fd)
        last = None
        for line in tail.split("\n"):
            word = line.strip().split(":", 1)[0]
            if word in MARKERS:
                last = line.strip()
        if last and not last.startswith("INSTANCE_READY"):
            return f"start script log says {last[:120]}"
        return None

    async def _probe_instance(self, info: JobInfo, owner: User, instance: str,
                              report: dict[str, Any]) -> str | None:
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

    async def _scancel(self, info: JobInfo, owner: User, tags: dict[str, str], report: dict[str, Any]) -> None:
        """Cancel a job as its SLURM owner (never as root: ``owner`` comes from ``tagged``)."""
        try:
            await self.manager.runner.run(commands.scancel(info.job_id), user=owner)
        except NotFound:
            pass
        except SlurmError as exc:
            report["errors"].append(f"scancel {info.job_id}: {exc.reason}")
        self.manager.audit.record("kill", user=owner.name, project=tags.get("project"),
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
        active = _active_instances(self.manager, jobs)
        now = time.time()
        for name in self.known_users():
            try:
                owner = lookup_name(name)
            except UnknownUser:
                continue
            base = Path(owner.home) / ".apptainer" / "instances" / "app"
            for host, inst, path, st in await anyio.to_thread.run_sync(_instance_dirs, owner, base, name):
                if inst in active or st.st_uid != owner.uid or now - st.st_mtime < STATE_DIR_GRACE:
                    continue
                entry = {"user": name, "host": host, "instance": inst, "path": str(path)}
                report["stale_instances"].append(entry)
                self.log.warning("stale_instance", dry_run=dry_run, **entry)
                if dry_run:
                    continue
                try:
                    await self.manager.runner.run(["rm", "-rf", "--", str(path)], user=owner)
                except SlurmError as exc:
                    report["errors"].append(f"{path}: {exc.reason}")

    # ------------------------------------------------------------------ old job files

    def _old_job_files(self, jobs: dict[str, JobInfo], report: dict[str, Any], dry_run: bool) -> None:
        keep = _active_instances(self.manager, jobs)
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
                item = {"user": user_dir.name, "path": entry.path, "age_days": _age_days(st.st_mtime, time.time())}
                report["old_job_files"].append(item)
                if dry_run:
                    continue
                try:
                    os.unlink(entry.path)  # the jobs dir is root's; unlink never follows a link
                except OSError as exc:
                    report["errors"].append(f"{entry.path}: {exc.strerror or exc}")


    async def _old_job_logs(self, jobs: dict[str, JobInfo], report: dict[str, Any], dry_run: bool) -> None:
        """Job logs in users' ``slurm.job_dir`` past the retention: listed and removed as the user."""
        keep = _active_instances(self.manager, jobs)
        cutoff = time.time() - self.config.reaper_retention
        for name in self.known_users():
            try:
                owner = lookup_name(name)
                directory = jobspec.job_dir(self.config, owner)
            except (UnknownUser, ValueError):
                continue
            now = time.time()
            old = [(path, mtime) for path, instance, mtime in await anyio.to_thread.run_sync(_job_logs, owner, directory)
                   if mtime < cutoff and instance not in keep]
            for path, mtime in old:
                report["old_job_files"].append({"user": name, "path": str(path), "age_days": _age_days(mtime, now)})
            if old and not dry_run:
                try:
                    await self.manager.runner.run(["rm", "-f", "--", *(str(path) for path, _ in old)], user=owner)
                except SlurmError as exc:
                    report["errors"].append(f"{directory}: {exc.reason}")


def _age_days(mtime: float, now: float) -> float:
    """Every reported job file carries its age (``sbroker reap`` prints it)."""
    return round((now - mtime) / 86400, 1)


def _active_instances(manager: Any, jobs: dict[str, JobInfo]) -> set[str]:
    """Instances of live sessions and of active jobs tagged for their own SLURM owner."""
    active = {s.instance for s in manager.sessions.values() if s.live and s.instance}
    for info in jobs.values():
        found = manager.tagged(info)
        if found:
            active.add(found[1].get("instance", ""))
    return active


def _subdirs(path: Path) -> list[Path]:
    """Real subdirectories (symlinks are never followed)."""
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


#: Bounds on what one user's instance tree can cost a reaper pass.
MAX_INSTANCE_DIRS = 1000


def _instance_dirs(owner: User, base: Path, name: str) -> list[tuple[str, str, Path, os.stat_result]]:
    """``(node, instance, path, lstat)`` of the user's ``sb-*`` instance state dirs, listed
    with the user's own file-system identity (it is their tree); odd entries are skipped."""
    found: list[tuple[str, str, Path, os.stat_result]] = []
    with userfs.identity(owner):
        for host_dir in _subdirs(base):
            for inst_dir in _subdirs(host_dir / name):
                if not inst_dir.name.startswith("sb-"):
                    continue
                try:
                    v.validate_instance_name(inst_dir.name)
                    found.append((host_dir.name, inst_dir.name, inst_dir, os.lstat(inst_dir)))
                except (ValueError, OSError):
                    continue
                if len(found) >= MAX_INSTANCE_DIRS:
                    return found
    return found


def _job_logs(owner: User, directory: Path) -> list[tuple[Path, str, float]]:
    """``(path, instance, mtime)`` of the regular ``sb-*.log`` files and agent status files
    (``sb-*.agent.json``, left behind when a job was killed hard) in a user's job dir, as the user."""
    out: list[tuple[Path, str, float]] = []
    with userfs.identity(owner):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return out
        for entry in entries[:10000]:
            suffix = next((s for s in (".log", STATUS_SUFFIX, KEY_SUFFIX) if entry.name.endswith(s)), "")
            if not (entry.name.startswith("sb-") and suffix):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((Path(entry.path), entry.name[:-len(suffix)], st.st_mtime))
    return out


def _slurm_time(text: str) -> float | None:
    """Unix time from squeue's ``%S`` (local ``2026-01-02T03:04:05``); None for N/A."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
