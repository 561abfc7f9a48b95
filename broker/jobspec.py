"""What to submit for a session: names, paths, start script and ``sbatch`` argv.

Pure: everything is computed from server-side config and the peer's identity, and
nothing is written or run here. The script and argv come from the toolkit builders
in :mod:`broker.container.apptainer`; this module only adds the broker's own
tags and places the files.

Two places, on purpose: the broker's record of the script stays in its root-only state
directory on the login node (sbatch gets the script on stdin), while the job's output,
which carries the ``INSTANCE_*`` markers, goes to ``slurm.job_dir``: written by the job on
a compute node, as the user, and read on the login node, so it must be shared storage.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from . import agentlaunch, launch, profiles
from .config import Config
from .container import _validate as v
from .container.apptainer import build_exec_args, build_sbatch_command
from .container.apptainer._builders import with_hostname
from .container.apptainer._start_script import render_instance_start_script
from .identity import User
from .shells import instance_shell_argv, safe_term
from .slurm.parse import format_comment


@dataclass(frozen=True)
class JobSpec:
    instance: str
    script: str
    script_path: Path
    log_path: Path
    sbatch_argv: list[str]
    host_user_dir: str
    host_project_dir: str
    job_dir: Path
    #: Where the session agent writes its status (see :mod:`broker.agentlaunch`).
    agent_status: Path
    #: ``salloc --no-shell --immediate`` for the same job (``[slurm] launch = "immediate"``;
    #: its comment is tagged ``launch=immediate``), see :mod:`broker.launch`.
    salloc_argv: list[str]


def check_project(config: Config, project: str) -> str:
    """Apply the allowed-projects rule; raise ``ValueError`` naming the field and rule."""
    v.validate_slug(project, "project")
    if config.projects:
        if project not in config.projects:
            raise ValueError(f"project: must be one of {', '.join(config.projects)} (got {project!r})")
    elif not re.fullmatch(config.project_pattern, project):
        raise ValueError(f"project: must match {config.project_pattern} (got {project!r})")
    return project


def instance_name(user: str, project: str, token: str | None = None) -> str:
    """Unique per submission, so a stale instance never blocks a new one (B5)."""
    token = token or secrets.token_hex(3)
    # Long user and project names are shortened, never the token: it is what keeps names unique.
    readable = f"sb-{user}-{project}"[:v.MAX_NAME_LENGTH - len(token) - 1]
    return v.validate_instance_name(f"{readable}-{token}")


def singleton_name(project: str) -> str:
    """The job name of every session job of a project: SLURM's ``--dependency=singleton`` is per
    (user, name), so the name holds the project and the owner is SLURM's own."""
    return f"sbroker-session-{v.validate_slug(project)}"


def jobs_dir(config: Config, user: str) -> Path:
    """The broker's own (root-only, login-node) record of submitted scripts."""
    return config.state_dir / "jobs" / v.validate_username(user)


def job_dir(config: Config, user: User) -> Path:
    """Where the user's session jobs write their output (``slurm.job_dir``), shared storage."""
    path = config.job_dir.format(home=user.home.rstrip("/"), user=v.validate_username(user.name))
    return Path(v.validate_path(path, "slurm.job_dir"))


def log_path(config: Config, user: User, instance: str) -> Path:
    return job_dir(config, user) / f"{v.validate_instance_name(instance)}.log"


def shared_dirs(config: Config, username: str, project: str) -> list[str]:
    """The host directories this product already needs shared by login and compute nodes
    (docs/admin.md, section 16): the user's home and the project dir, when
    ``[transfer] login_side`` lets transfers there be served on the login node."""
    if not config.login_side:
        return []
    return [config.user_dir.format(user=username, project=project),
            config.project_dir.format(user=username, project=project)]


def container_args(config: Config, username: str, project: str, image: str,
                   profile: profiles.Profile) -> list[str]:
    """The ``apptainer`` arguments of a session's instance: binds, environment, profile flags.

    One place, because two read them: the start script (the instance is started with them)
    and the transfer route (:mod:`broker.xferroute`: which paths the session sees where)."""
    exec_args = build_exec_args(
        image, username, Path(config.user_dir.format(user=username, project=project)),
        Path(config.project_dir.format(user=username, project=project)), project,
        dev_repos=[{"name": r.name, "host_path": r.host_path} for r in config.dev_repos] or None,
        host_mounts=[{"host_path": m.host_path, "container_path": m.container_path, "mode": m.mode}
                     for m in config.host_mounts] or None,
        texlive_prefix=config.texlive_prefix,
    )
    return profiles.with_profile(with_hostname(exec_args, config.hostname), profile)


def build(config: Config, user: User, project: str, image: str, image_digest: str,
          token: str | None = None, profile: profiles.Profile | None = None,
          first_term: str | None = None) -> JobSpec:
    """The job of a new session of ``project`` sized by ``profile`` (default: the config's
    default profile): its resources, account, container flags and image come from it."""
    username = v.validate_username(user.name)
    profile = profile or config.profile(config.default_profile) or config.profiles[0]
    check_project(config, project)
    instance = instance_name(username, project, token)
    host_user_dir = config.user_dir.format(user=username, project=project)
    host_project_dir = config.project_dir.format(user=username, project=project)
    exec_args = container_args(config, username, project, image, profile)
    shared = job_dir(config, user)
    status = agentlaunch.status_path(shared, instance)
    # The first login's shell, exactly as its attach will ask for it (broker.attach.exec_spec).
    first_shell = ((instance_shell_argv(instance, username, project, first_term), safe_term(first_term))
                   if first_term is not None else None)
    script = render_instance_start_script(exec_args, username, project, instance,
                                          before_start=(profiles.gpu_env_snippet() if profile.gpu else "")
                                          + agentlaunch.start_snippet(config, status, first_shell),
                                          before_ready=agentlaunch.await_snippet(),
                                          keepalive=agentlaunch.keepalive_snippet(),
                                          at_exit=agentlaunch.exit_snippet())
    script_path = jobs_dir(config, username) / f"{instance}.sh"
    # The toolkit names the output after the script path: give it one in the shared dir.
    argv = build_sbatch_command(
        instance, str(shared / f"{instance}.sh"), slurm_partition=profile.partition,
        slurm_time_limit=profile.time_limit, slurm_cpus=profile.cpus, slurm_memory_gb=profile.memory_gb)
    log_flag = next(a for a in argv if a.startswith("--output="))
    log = Path(log_flag.split("=", 1)[1])
    digest = image_digest.split(":")[-1][:16]
    tags = {"user": username, "project": project, "instance": instance, "digest": digest, "profile": profile.name}
    comment = format_comment(tags)
    # The script goes to sbatch on stdin: the file on disk is the broker's record
    # (root-only), so there is no window in which anyone could swap it.
    # --no-requeue: after a node failure SLURM would requeue the job (same id, PENDING) and
    # later rerun the script behind the broker's back; the instance is gone, so it ends.
    # One allocation per (user, project) across login nodes, converged through SLURM itself: a
    # later job of the same name and user stays PENDING (Dependency) while an earlier one is
    # live, whichever login node's broker submitted it (see broker.manager, "Several login nodes").
    extra = [*profiles.sbatch_flags(profile), f"--comment={comment}", f"--chdir={user.home}", "--open-mode=append", "--export=ALL",
             "--no-requeue", "--dependency=singleton"]
    sbatch_argv = [f"--job-name={singleton_name(project)}" if a.startswith("--job-name=") else a
                   for a in argv[:-1]] + extra
    salloc = launch.salloc_argv(job_name=singleton_name(project), partition=profile.partition,
                                time_limit=profile.time_limit, cpus=profile.cpus, memory_gb=profile.memory_gb,
                                profile=profile, comment=format_comment({**tags, "launch": "immediate"}),
                                home=user.home)
    return JobSpec(instance, script, script_path, log, sbatch_argv, host_user_dir, host_project_dir, shared,
                   status, salloc)
