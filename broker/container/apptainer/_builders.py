"""Pure argv builders for ``apptainer exec``, ``srun`` and ``sbatch``.

Why pure: the broker decides *when* and *as whom* to run things; these functions only
decide *what* the command is, so they can be tested token by token.  Tokens match the
original toolkit for ordinary input; every value is validated first (see
:mod:`broker.container._validate`), so no input can add, remove or split a token's
meaning (a ``,`` in a bind path, a newline, an option-looking image path...).
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath
from typing import Any, Sequence

from .._validate import (
    validate_container_path,
    validate_dev_repo,
    validate_host_mount,
    validate_instance_name,
    validate_job_id,
    validate_path,
    validate_positive_int,
    validate_slug,
    validate_slurm_partition,
    validate_slurm_time,
    validate_texlive_prefix,
    validate_username,
)

__all__ = [
    "TEXLIVE_BIND_BINARIES",
    "TEXLIVE_SHARE_DIRS",
    "CONTAINER_HOSTNAME",
    "CONTAINER_PATH_ENV",
    "SHELL_ENTRY_SNIPPET",
    "build_dev_pythonpath",
    "build_host_mount_binds",
    "build_exec_args",
    "instance_flags",
    "with_hostname",
    "build_srun_command",
    "build_sbatch_command",
    "build_shell_in_allocation_command",
    "sbatch_log_path",
]

#: TeX binaries bound by ``build_host_mount_binds`` (upstream list: six, no biber).
TEXLIVE_BIND_BINARIES = ("pdflatex", "bibtex", "latexmk", "latexdiff", "kpsewhich", "makeindex")
TEXLIVE_SHARE_DIRS = ("texlive", "texmf-dist")
CONTAINER_HOSTNAME = "scitex-cloud"
CONTAINER_PATH_ENV = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"

#: ``bash -c`` program run as the session shell.  It reads identity from the environment
#: (``USER``, ``SCITEX_PROJECT``): makes uid 0 (fakeroot) carry the user's name, sets HOME,
#: enters the project directory, then becomes a login shell.
SHELL_ENTRY_SNIPPET = "\n".join(
    [
        'if [ "$(id -u)" = 0 ] && [ -n "${USER:-}" ] && [ "$USER" != root ]; then',
        '  sed -i "s|^root:\\([^:]*\\):0:0:[^:]*:[^:]*:|$USER:\\1:0:0:$USER:/home/$USER:|" /etc/passwd 2>/dev/null',
        "fi",
        'if [ -n "${USER:-}" ]; then export HOME="/home/$USER"; fi',
        'if [ -n "${SCITEX_PROJECT:-}" ] && [ -n "${USER:-}" ]; then',
        '  if [ -d "/home/$USER/proj/$SCITEX_PROJECT" ]; then cd "/home/$USER/proj/$SCITEX_PROJECT"',
        '  else echo "warning: project directory /home/$USER/proj/$SCITEX_PROJECT does not exist" >&2; fi',
        "fi",
        "exec /bin/bash -l",
    ]
)


def build_dev_pythonpath(dev_repos: Sequence[dict[str, Any]] | None) -> str:
    """``/opt/dev/<name>/src`` per repo, ``:``-joined (src-layout packages); ``''`` if none."""
    if not dev_repos:
        return ""
    names = [validate_dev_repo(repo, f"dev_repos[{i}]", need_host_path=False)["name"] for i, repo in enumerate(dev_repos)]
    return ":".join(f"/opt/dev/{name}/src" for name in names)


def build_host_mount_binds(host_mounts: Sequence[dict[str, Any]] | None = None, texlive_prefix: str = "") -> list[str]:
    """``--bind host:container:mode`` pairs for host mounts, then TeX Live share dirs and binaries.

    TeX paths are mirrored (``<prefix>/bin/pdflatex:<prefix>/bin/pdflatex:ro``) and not
    checked for existence — the image is expected to have the same layout as the host.
    """
    args: list[str] = []
    for i, mount in enumerate(host_mounts or ()):
        args += ["--bind", validate_host_mount(mount, f"host_mounts[{i}]").spec()]
    if texlive_prefix:
        prefix = validate_texlive_prefix(texlive_prefix)
        for name in TEXLIVE_SHARE_DIRS:
            path = f"{prefix}/share/{name}"
            args += ["--bind", f"{path}:{path}:ro"]
        for name in TEXLIVE_BIND_BINARIES:
            path = f"{prefix}/bin/{name}"
            args += ["--bind", f"{path}:{path}:ro"]
    return args


def build_exec_args(
    container_path: str,
    username: str,
    host_user_dir: str | os.PathLike[str],
    host_project_dir: str | os.PathLike[str],
    project_slug: str,
    dev_repos: Sequence[dict[str, Any]] | None = None,
    host_mounts: Sequence[dict[str, Any]] | None = None,
    texlive_prefix: str = "",
) -> list[str]:
    """``apptainer exec`` argv for one user session, image last.

    Always ``--containall --cleanenv --writable-tmpfs`` (SIF and sandbox alike: each
    session gets a private throw-away overlay and no host leakage), the user's home and
    project bound in, dev repos read-only under ``/opt/dev`` with ``PYTHONPATH`` set.
    """
    image = validate_container_path(container_path)
    user = validate_username(username)
    slug = validate_slug(project_slug)
    home_dir = validate_path(host_user_dir, "host_user_dir")
    project_dir = validate_path(host_project_dir, "host_project_dir")
    repos = [validate_dev_repo(repo, f"dev_repos[{i}]") for i, repo in enumerate(dev_repos or ())]
    home = f"/home/{user}"
    workdir = f"{home}/proj/{slug}"

    args = ["apptainer", "exec", "--containall", "--cleanenv", "--writable-tmpfs", "--hostname", CONTAINER_HOSTNAME]
    env = [
        "TERM=xterm-256color",
        "SCITEX_CLOUD=true",
        f"SCITEX_PROJECT={slug}",
        f"SCITEX_USER={user}",
        f"USER={user}",
        f"LOGNAME={user}",
        "SHELL=/bin/bash",
        f"PATH={CONTAINER_PATH_ENV}",
    ]
    if repos:
        env.append(f"PYTHONPATH={build_dev_pythonpath(repos)}")
    for item in env:
        args += ["--env", item]
    args += ["--home", f"{home_dir}:{home}"]
    args += ["--bind", f"{project_dir}:{workdir}:rw"]
    for repo in repos:
        args += ["--bind", f"{repo['host_path']}:/opt/dev/{repo['name']}:ro"]
    args += build_host_mount_binds(host_mounts, texlive_prefix)
    args += ["--pwd", workdir, image]
    return args


def with_hostname(exec_args: Sequence[str], hostname: str) -> list[str]:
    """``exec_args`` with the container hostname set to ``hostname``, or, when it is empty,
    without ``--hostname`` at all, so the container shows the compute node's own name
    (upstream fixes ``scitex-cloud``, which hides where a session runs)."""
    args = list(exec_args)
    if "--hostname" in args:
        at = args.index("--hostname")
        del args[at : at + 2]
    if hostname:
        args[2:2] = ["--hostname", validate_hostname(hostname)]
    return args


def validate_hostname(hostname: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", hostname):
        raise ValueError(f"hostname: must be a hostname of [a-z0-9-] (got {hostname!r})")
    return hostname


def instance_flags(exec_args: Sequence[str]) -> list[str]:
    """The options of an ``apptainer exec`` argv usable with ``instance start``.

    Drops ``apptainer exec``, the trailing image and the ``--pwd <dir>`` pair.
    """
    flags = list(exec_args[2:-1])
    if "--pwd" in flags:
        at = flags.index("--pwd")
        del flags[at : at + 2]
    return flags


def build_srun_command(
    container_path: str,
    username: str,
    host_user_dir: str | os.PathLike[str],
    host_project_dir: str | os.PathLike[str],
    project_slug: str,
    dev_repos: Sequence[dict[str, Any]] | None = None,
    host_mounts: Sequence[dict[str, Any]] | None = None,
    texlive_prefix: str = "",
    slurm_partition: str = "compute",
    slurm_time_limit: str = "8:00:00",
    slurm_cpus: int = 4,
    slurm_memory_gb: int = 16,
    screen_session: str = "scitex-0",
) -> list[str]:
    """``srun --pty`` + ``build_exec_args`` + ``/bin/bash -c <entry snippet>``.

    ``screen_session`` is accepted for compatibility and ignored (no screen is used).
    """
    del screen_session
    exec_args = build_exec_args(
        container_path, username, host_user_dir, host_project_dir, project_slug, dev_repos, host_mounts, texlive_prefix
    )
    return [
        "srun",
        "--pty",
        "--chdir=/tmp",
        *_slurm_resource_flags(slurm_partition, slurm_time_limit, slurm_cpus, slurm_memory_gb),
        f"--job-name=terminal_{username}",
        *exec_args,
        "/bin/bash",
        "-c",
        SHELL_ENTRY_SNIPPET,
    ]


def _slurm_resource_flags(partition: str, time_limit: str, cpus: int, memory_gb: int) -> list[str]:
    return [
        f"--partition={validate_slurm_partition(partition)}",
        f"--time={validate_slurm_time(time_limit)}",
        f"--cpus-per-task={validate_positive_int(cpus, 'slurm_cpus')}",
        f"--mem={validate_positive_int(memory_gb, 'slurm_memory_gb')}G",
    ]


def sbatch_log_path(script_path: str | os.PathLike[str]) -> str:
    """Where the start script's stdout/stderr go: the script path with ``.log`` as suffix."""
    text = validate_path(script_path, "script_path", absolute=False, allow_dotdot=True, bind_safe=False)
    if "%" in text:
        raise ValueError(f"script_path: must not contain '%' (sbatch filename pattern) (got {text!r})")
    return str(PurePosixPath(text).with_suffix(".log"))


def build_sbatch_command(
    instance_name: str,
    script_path: str,
    slurm_partition: str = "compute",
    slurm_time_limit: str = "8:00:00",
    slurm_cpus: int = 4,
    slurm_memory_gb: int = 16,
    username: str = "",
    project_slug: str = "",
) -> list[str]:
    """``sbatch --parsable`` argv submitting a start script from ``build_instance_start_script``.

    Job name: ``scitex_<username>_<project_slug>`` when ``username`` is given, else the
    instance name (names can collide across user/slug splits — track jobs by id).
    Output goes to ``<script_path minus suffix>.log`` (not ``/dev/null``) so the broker can
    read the ``INSTANCE_*`` markers; the directory must be writable by the job's user.
    """
    name = validate_instance_name(instance_name)
    log_path = sbatch_log_path(script_path)
    if username:
        job_name = f"scitex_{validate_username(username)}_{validate_slug(project_slug) if project_slug else ''}"
    else:
        job_name = name
    return [
        "sbatch",
        "--parsable",
        *_slurm_resource_flags(slurm_partition, slurm_time_limit, slurm_cpus, slurm_memory_gb),
        f"--job-name={job_name}",
        f"--output={log_path}",
        os.fspath(script_path),
    ]


def build_shell_in_allocation_command(job_id: str, instance_name: str, username: str = "") -> list[str]:
    """``srun --overlap`` into a running allocation, exec'ing a login shell in the instance.

    With ``username=''`` the tokens are upstream's: the shell's identity comes from the
    environment srun propagates (``USER``, ``SCITEX_PROJECT``), so the caller must control
    that environment.  With a ``username`` (recommended, B9) the shell runs with
    ``--cleanenv`` and the identity is passed explicitly (``TERM``, ``USER``, ``LOGNAME``,
    ``SCITEX_USER``), so nothing else of the caller's environment (e.g. broker secrets)
    leaks in.  Extra variables can still be provided as ``APPTAINERENV_<NAME>`` in the
    caller's environment (e.g. ``APPTAINERENV_SCITEX_PROJECT`` to land in the project dir).
    """
    job = validate_job_id(job_id)
    name = validate_instance_name(instance_name)
    identity: list[str] = []
    if username:
        user = validate_username(username)
        identity = ["--cleanenv"]
        for item in ("TERM=xterm-256color", f"USER={user}", f"LOGNAME={user}", f"SCITEX_USER={user}"):
            identity += ["--env", item]
    return [
        "srun",
        "--pty",
        "--overlap",
        f"--jobid={job}",
        "apptainer",
        "exec",
        *identity,
        f"instance://{name}",
        "/bin/bash",
        "-c",
        SHELL_ENTRY_SNIPPET,
    ]
