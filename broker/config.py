"""Broker configuration: ``/etc/sbroker/broker.toml`` (or ``$SBROKER_CONFIG``).

Configuration is plain data, validated once at start. Every bad field is reported
as one line naming the field and the rule, all of them at once, so an admin fixes a
file in one round instead of one error per restart.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import profiles as _profiles
from .profiles import Bind, Profile

DEFAULT_PATH = "/etc/sbroker/broker.toml"

_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/{}@+-]*$")
_HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ConfigError(Exception):
    """One or more invalid fields; ``problems`` holds one line per field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


#: A host path bound into the container: ``[container] host_mounts`` and profiles' ``binds``
#: are the same thing, one type (:class:`broker.profiles.Bind`).
Mount = Bind


@dataclass(frozen=True)
class DevRepo:
    name: str
    host_path: str


@dataclass(frozen=True)
class Config:
    """Validated broker settings. Field names mirror the TOML keys (``section_key``)."""

    socket: str = "/run/sbroker/broker.sock"
    state_dir: Path = Path("/var/lib/sbroker")
    admin_group: str = "sbroker-admins"
    #: Jobs owned (per SLURM's numeric uid) by a uid below this are never adopted, probed or
    #: cancelled on the scheduler's word: root and system accounts are not session users.
    min_uid: int = 1000
    log_level: str = "info"
    metrics_socket: str = ""
    metrics_port: int = 0
    audit_log: str = ""

    partition: str = "compute"
    time_limit: str = "8:00:00"
    cpus: int = 4
    memory_gb: int = 16
    slurm_conf: str = ""
    #: Where a session's job output (the start script's markers) goes: written by the job on
    #: a compute node, read on the login node, so it must be on storage both share. ``{home}``
    #: is the user's home from the passwd database, ``{user}`` the user name.
    job_dir: str = "{home}/.sbroker/jobs"
    path: str = "/usr/local/bin:/usr/bin:/bin"
    poll_interval: float = 5.0
    command_timeout: float = 30.0
    gone_grace: float = 10.0
    #: ``batch`` (sbatch: waits for the scheduler's pass, survives any login node's loss) or
    #: ``immediate`` (salloc --no-shell: granted at once when free; see broker.launch).
    launch: str = "batch"
    #: What holds an immediate session's agent step beyond the broker (broker.launch).
    holder: str = "auto"

    image: str = ""
    #: The container's hostname; empty: the compute node's own name (what users need to see).
    hostname: str = ""
    user_dir: str = "/home/{user}"
    project_dir: str = "/home/{user}/proj/{project}"
    create_project_dir: bool = True
    default_project: str = "default"
    project_pattern: str = r"^[a-z0-9][a-z0-9_-]{0,31}$"
    projects: tuple[str, ...] = ()
    dev_repos: tuple[DevRepo, ...] = ()
    host_mounts: tuple[Mount, ...] = ()
    texlive_prefix: str = ""

    pending_timeout: float = 900.0
    start_timeout: float = 120.0
    detach_grace: float = 600.0
    idle_timeout: float = 0.0
    walltime_warnings: tuple[int, ...] = (1800, 300)
    scrollback_bytes: int = 64 * 1024
    spare_shell: bool = True
    idle_grace: float = 300.0

    reaper_interval: float = 600.0
    reaper_retention: float = 14 * 86400.0
    reaper_instance_check: bool = True

    #: Audit log rotation (docs/admin.md "Audit log"): the full log and each user's own file
    #: rotate at a size into a bounded number of older files.
    audit_max_bytes: int = 64 * 1024 * 1024
    audit_keep: int = 5
    audit_user_max_bytes: int = 1024 * 1024
    audit_user_keep: int = 2

    #: The login shell forced users must have on this node (the wrapper): the daemon logs a
    #: warning for a login whose shell is anything else, ``check-config`` lists them. "" = off.
    login_shell: str = "/usr/local/sbin/sbroker-login"
    #: The sshd ``Match Group`` of forced users, for ``check-config``'s login-node report.
    login_group: str = "sbroker-users"

    #: Per-user limits (issue 14): one user must not exhaust what every user shares.
    limit_connections: int = 64
    limit_sessions: int = 8
    limit_pending: int = 4
    limit_detached: int = 8
    limit_shells: int = 32
    #: ``[transfer]``: commands without a terminal over a direct stream to the session agent.
    direct_streams: bool = True
    stream_listen: str = "0.0.0.0"
    limit_commands: int = 128
    #: The SSH endpoint (``sbroker ssh-proxy``): an ``sshd -i`` of the image over the direct stream.
    ssh_endpoint: bool = True
    #: sshd's ``AuthorizedKeysFile`` for it (relative paths are to the home; ``%h``/``%u`` allowed).
    ssh_authorized_keys: str = ".ssh/authorized_keys"
    #: Transfers (sftp, scp, rsync, cat) whose every path the session sees at the same place
    #: in its home or project directory are served on the login node (:mod:`broker.xferroute`):
    #: both must already be the same files on login and compute nodes (docs/admin.md, 16).
    login_side: bool = True
    #: Further host directories that are the same files on login and compute nodes (identity
    #: binds of ``host_mounts`` or profiles there are served on the login node too).
    login_paths: tuple[str, ...] = ()
    #: The login node's sftp-server, for those transfers.
    login_sftp_server: str = "/usr/lib/openssh/sftp-server"

    #: ``[profiles.NAME]``: the session sizes users choose at login (:mod:`broker.profiles`);
    #: without that section, one profile ``default`` made of ``[slurm]`` and ``[container]``.
    profiles: tuple[Profile, ...] = ()
    default_profile: str = "default"

    #: ``[extend]``: ``sbroker extend`` raises a session job's time limit by ``extend_step``
    #: up to a total of ``extend_max_total`` ("" = extension off); with
    #: ``extend_only_if_idle_partition`` only while no job waits in the job's partition.
    extend_step: str = "1:00:00"
    extend_max_total: str = ""
    extend_only_if_idle_partition: bool = False

    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.profiles:  # built in code (tests) rather than parsed: the one implicit profile
            object.__setattr__(self, "profiles", (Profile(
                "default", partition=self.partition, time_limit=self.time_limit, cpus=self.cpus,
                memory_gb=self.memory_gb, image=str(self.image)),))
            object.__setattr__(self, "default_profile", "default")

    def profile(self, name: str) -> Profile | None:
        """The profile called ``name``, if the config has one."""
        return next((p for p in self.profiles if p.name == name), None)


# (section, key, attribute, kind, check) — one table drives loading and validation.
_FIELDS: list[tuple[str, str, str, str]] = [
    ("broker", "socket", "socket", "abspath"),
    ("broker", "state_dir", "state_dir", "abspath"),
    ("broker", "admin_group", "admin_group", "name"),
    ("broker", "min_uid", "min_uid", "int:1:4294967294"),
    ("broker", "log_level", "log_level", "loglevel"),
    ("broker", "metrics_socket", "metrics_socket", "abspath_or_empty"),
    ("broker", "metrics_port", "metrics_port", "int:0:65535"),
    ("broker", "audit_log", "audit_log", "abspath_or_empty"),
    ("slurm", "partition", "partition", "name"),
    ("slurm", "time_limit", "time_limit", "slurmtime"),
    ("slurm", "cpus", "cpus", "int:1:4096"),
    ("slurm", "memory_gb", "memory_gb", "int:1:65536"),
    ("slurm", "slurm_conf", "slurm_conf", "abspath_or_empty"),
    ("slurm", "job_dir", "job_dir", "jobdir"),
    ("slurm", "path", "path", "pathlist"),
    ("slurm", "poll_interval", "poll_interval", "float:0.2:600"),
    ("slurm", "command_timeout", "command_timeout", "float:1:600"),
    ("slurm", "gone_grace", "gone_grace", "float:0:3600"),
    ("slurm", "launch", "launch", "choice:batch,immediate"),
    ("slurm", "holder", "holder", "choice:auto,setsid,systemd-run"),
    ("container", "image", "image", "abspath"),
    ("container", "hostname", "hostname", "hostname"),
    ("container", "user_dir", "user_dir", "template"),
    ("container", "project_dir", "project_dir", "template"),
    ("container", "create_project_dir", "create_project_dir", "bool"),
    ("container", "default_project", "default_project", "name"),
    ("container", "project_pattern", "project_pattern", "regex"),
    ("container", "projects", "projects", "namelist"),
    ("container", "dev_repos", "dev_repos", "devrepos"),
    ("container", "host_mounts", "host_mounts", "mounts"),
    ("container", "texlive_prefix", "texlive_prefix", "abspath_or_empty"),
    ("timeouts", "pending", "pending_timeout", "float:1:604800"),
    ("timeouts", "start", "start_timeout", "float:1:3600"),
    ("timeouts", "detach_grace", "detach_grace", "float:0:604800"),
    ("timeouts", "idle", "idle_timeout", "float:0:604800"),
    ("timeouts", "walltime_warnings", "walltime_warnings", "intlist"),
    ("timeouts", "scrollback_bytes", "scrollback_bytes", "int:0:16777216"),
    ("timeouts", "spare_shell", "spare_shell", "bool"),
    ("timeouts", "idle_grace", "idle_grace", "float:0:604800"),
    ("reaper", "interval", "reaper_interval", "float:0:604800"),
    ("reaper", "retention", "reaper_retention", "float:3600:31536000"),
    ("reaper", "instance_check", "reaper_instance_check", "bool"),
    ("audit", "max_bytes", "audit_max_bytes", "int:4096:1099511627776"),
    ("audit", "keep", "audit_keep", "int:0:1000"),
    ("audit", "user_max_bytes", "audit_user_max_bytes", "int:4096:1099511627776"),
    ("audit", "user_keep", "audit_user_keep", "int:0:1000"),
    ("login", "shell", "login_shell", "abspath_or_empty"),
    ("login", "group", "login_group", "name"),
    ("limits", "connections_per_user", "limit_connections", "int:1:100000"),
    ("limits", "sessions_per_user", "limit_sessions", "int:1:10000"),
    ("limits", "pending_per_user", "limit_pending", "int:1:10000"),
    ("limits", "detached_shells_per_user", "limit_detached", "int:0:10000"),
    ("limits", "shells_per_user", "limit_shells", "int:1:10000"),
    ("limits", "commands_per_session", "limit_commands", "int:1:10000"),
    ("transfer", "direct", "direct_streams", "bool"),
    ("transfer", "listen", "stream_listen", "address"),
    ("transfer", "ssh_endpoint", "ssh_endpoint", "bool"),
    ("transfer", "authorized_keys", "ssh_authorized_keys", "keysfile"),
    ("transfer", "login_side", "login_side", "bool"),
    ("transfer", "login_paths", "login_paths", "abspathlist"),
    ("transfer", "sftp_server", "login_sftp_server", "abspath"),
    ("extend", "step", "extend_step", "slurmtime"),
    ("extend", "max_total", "extend_max_total", "slurmtime_or_empty"),
    ("extend", "only_if_idle_partition", "extend_only_if_idle_partition", "bool"),
]


def _check(kind: str, value: Any) -> tuple[Any, str | None]:
    """Convert and check one value; return ``(value, rule_broken_or_None)``."""
    if kind.startswith(("int:", "float:")):
        typ, low, high = kind.split(":")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"must be a number between {low} and {high}"
        if typ == "int" and not isinstance(value, int):
            return value, f"must be an integer between {low} and {high}"
        if not float(low) <= value <= float(high):
            return value, f"must be between {low} and {high} (got {value})"
        return (int(value) if typ == "int" else float(value)), None
    if kind == "bool":
        return value, None if isinstance(value, bool) else "must be true or false"
    if kind.startswith("choice:"):
        choices = kind.split(":", 1)[1].split(",")
        return value, None if value in choices else f"must be one of {', '.join(choices)}"
    if kind == "intlist":
        if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value):
            return value, "must be a list of positive integers (seconds)"
        return tuple(sorted(value, reverse=True)), None
    if not isinstance(value, (str, list)):
        return value, "has the wrong type"
    if kind == "keysfile":  # one sshd AuthorizedKeysFile word: no spaces, no "..", tokens %h %u %%
        ok = (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._/%-]{1,256}", value) is not None
              and ".." not in value.split("/") and re.fullmatch(r"([^%]|%[hu%])*", value) is not None)
        return value, None if ok else "must be one path (letters, digits, . _ / -, and %h %u), without '..'"
    if kind == "namelist":
        if not isinstance(value, list) or not all(isinstance(v, str) and _NAME_RE.fullmatch(v) for v in value):
            return value, f"must be a list of names matching {_NAME_RE.pattern}"
        return tuple(value), None
    if kind == "devrepos":
        return _check_devrepos(value)
    if kind == "abspathlist":
        ok = isinstance(value, list) and all(isinstance(v, str) and _check("abspath", v)[1] is None and v != "/"
                                             for v in value)
        return (tuple(v.rstrip("/") for v in value) if ok else value), (
            None if ok else "must be a list of absolute directories of [A-Za-z0-9._/@+-] without '..', not '/'")
    if kind == "mounts":
        return _check_mounts(value)
    if not isinstance(value, str):
        return value, "must be a string"
    if kind == "abspath":
        return (Path(value) if value.startswith("/") else value), (
            None if value.startswith("/") and _SAFE_PATH_RE.fullmatch(value) and ".." not in value.split("/")
            else "must be an absolute path of [A-Za-z0-9._/@+-] without '..'")
    if kind == "abspath_or_empty":
        return value, (None if value == "" else _check("abspath", value)[1])
    if kind == "name":
        return value, None if _NAME_RE.fullmatch(value) else f"must match {_NAME_RE.pattern}"
    if kind == "loglevel":
        ok = value in ("debug", "info", "warning", "error")
        return value, None if ok else "must be one of debug, info, warning, error"
    if kind == "slurmtime":
        return value, None if _TIME_RE.fullmatch(value) else "must be a SLURM time like 8:00:00 or 1-00:00:00"
    if kind == "slurmtime_or_empty":
        ok = value == "" or (_TIME_RE.fullmatch(value) and _profiles.minutes(value))
        return value, None if ok else "must be empty (off) or a SLURM time like 12:00:00 or 2-00:00:00"
    if kind == "pathlist":
        parts = value.split(":")
        ok = all(p.startswith("/") and _SAFE_PATH_RE.fullmatch(p) for p in parts)
        return value, None if ok else "must be ':'-separated absolute directories"
    if kind == "template":
        if not _SAFE_PATH_RE.fullmatch(value) or ".." in value.split("/"):
            return value, "must be an absolute path template using {user} and {project} only"
        try:
            value.format(user="u", project="p")
        except (KeyError, IndexError, ValueError):
            return value, "may only use the placeholders {user} and {project}"
        return value, None
    if kind == "jobdir":
        rule = "must be an absolute path template using {home} and {user} only"
        if not _SAFE_PATH_RE.fullmatch(value.replace("{home}", "/h")) or ".." in value.split("/"):
            return value, rule
        try:
            value.format(home="/h", user="u")
        except (KeyError, IndexError, ValueError):
            return value, rule
        return value, None
    if kind == "hostname":
        ok = value == "" or _HOSTNAME_RE.fullmatch(value)
        return value, None if ok else "must be empty (the node's name) or a hostname of [a-z0-9-]"
    if kind == "address":
        import ipaddress

        try:
            ipaddress.ip_address(value)
        except ValueError:
            return value, "must be an IP address to listen on (0.0.0.0: every interface of the node)"
        return value, None
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            return value, f"must be a valid regular expression ({exc})"
        return value, None
    raise AssertionError(kind)


def _check_devrepos(value: Any) -> tuple[Any, str | None]:
    rule = "must be a list of {name, host_path} tables with a simple name and an absolute path"
    if not isinstance(value, list):
        return value, rule
    repos = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"name", "host_path"}:
            return value, rule
        name, host = item["name"], item["host_path"]
        if not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
            return value, rule
        if _check("abspath", host)[1] is not None:
            return value, rule
        repos.append(DevRepo(name, host))
    return tuple(repos), None


def _check_mounts(value: Any) -> tuple[Any, str | None]:
    rule = "must be a list of {host_path, container_path, mode} tables (absolute paths, mode ro|rw)"
    if not isinstance(value, list):
        return value, rule
    mounts = []
    for item in value:
        if not isinstance(item, dict) or not {"host_path", "container_path"} <= set(item):
            return value, rule
        mode = item.get("mode", "ro")
        if mode not in ("ro", "rw") or set(item) - {"host_path", "container_path", "mode"}:
            return value, rule
        for key in ("host_path", "container_path"):
            if _check("abspath", item[key])[1] is not None:
                return value, rule
        mounts.append(Mount(item["host_path"], item["container_path"], mode))
    return tuple(mounts), None


def parse(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from parsed TOML, or raise :class:`ConfigError`."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    known: dict[str, set[str]] = {}
    for section, key, attr, kind in _FIELDS:
        known.setdefault(section, set()).add(key)
        table = data.get(section, {})
        if not isinstance(table, dict) or key not in table:
            continue
        value, problem = _check(kind, table[key])
        if problem:
            problems.append(f"{section}.{key}: {problem}")
        else:
            values[attr] = value
    known["profiles"] = set()  # its own parser (broker.profiles): NAME tables, not keys
    for section, table in data.items():
        if section == "profiles":
            continue
        if section not in known:
            problems.append(f"{section}: unknown section (known: {', '.join(sorted(known))})")
        elif isinstance(table, dict):
            for key in table:
                if key not in known[section]:
                    problems.append(f"{section}.{key}: unknown key")
        else:
            problems.append(f"{section}: must be a table")
    if "image" not in values and not problems:
        problems.append("container.image: is required (an image file, sandbox dir or current link)")
    if not problems:
        base = {"partition": values.get("partition", Config.partition),
                "time_limit": values.get("time_limit", Config.time_limit),
                "cpus": values.get("cpus", Config.cpus), "memory_gb": values.get("memory_gb", Config.memory_gb),
                "image": str(values["image"])}
        profiles, default, its_problems = _profiles.parse(data.get("profiles"), base)
        problems += its_problems
        values.update(profiles=profiles, default_profile=default)
    if problems:
        raise ConfigError(problems)
    return Config(**values)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config file (``$SBROKER_CONFIG`` or the default path)."""
    path = Path(path or os.environ.get("SBROKER_CONFIG") or DEFAULT_PATH)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"config: file {path} does not exist"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: {path} is not valid TOML ({exc})"]) from None
    return parse(data)
