"""Input validation shared by every builder in :mod:`broker.container`.

Why this module exists: every value that ends up in an ``apptainer``/``srun``/``sbatch``
argv or in a generated bash script comes from a user or a config file.  Apptainer splits
``--bind`` values on ``,`` and ``:``; bash treats a newline in a comment as the start of a
command; ``..`` walks out of the directory a mount was meant to expose.  Rather than
escaping each of those cases at each use site, values are checked once, here, against
strict rules, and rejected with a :class:`ValueError` that names the field and the rule::

    project_slug: must match ^[A-Za-z0-9][A-Za-z0-9._-]*$ (got 'a;b')

The broker daemon reuses these functions for its own input, so they are public and
return the (normalised) value on success.  They never touch the filesystem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "NAME_PATTERN",
    "USERNAME_PATTERN",
    "MountSpec",
    "validate_name",
    "validate_username",
    "validate_slug",
    "validate_instance_name",
    "validate_job_id",
    "validate_path",
    "validate_mount_mode",
    "validate_mount_spec",
    "validate_host_mount",
    "validate_dev_repo",
    "validate_texlive_prefix",
    "validate_container_path",
    "validate_positive_int",
    "validate_slurm_partition",
    "validate_slurm_time",
]

#: Names that become path components, instance names, job-name parts or env values.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
#: POSIX-portable user names (a leading underscore is allowed, a leading dot/dash is not).
USERNAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"
_NAME_RE = re.compile(NAME_PATTERN)
_USERNAME_RE = re.compile(USERNAME_PATTERN)
_JOB_ID_RE = re.compile(r"^[0-9]+$")
_PARTITION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(,[A-Za-z0-9][A-Za-z0-9._-]*)*$")
# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED/infinite.
_TIME_RE = re.compile(r"^(?:[0-9]+(?:-[0-9]+)?(?::[0-9]+){0,2}|UNLIMITED|infinite)$")

MAX_NAME_LENGTH = 64
MAX_USERNAME_LENGTH = 32
MAX_PATH_LENGTH = 4096
MOUNT_MODES = ("ro", "rw")
# Characters that change the meaning of an apptainer --bind/--home value or of a line.
_PATH_FORBIDDEN = {":": "':'", ",": "','", "\n": "newline", "\r": "carriage return", "\0": "NUL"}


def _fail(field: str, rule: str, value: object) -> ValueError:
    return ValueError(f"{field}: {rule} (got {value!r})")


def _check_str(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(field, "must be a string", value)
    return value


def _match(field: str, value: object, pattern: re.Pattern[str], max_length: int) -> str:
    text = _check_str(field, value)
    if not pattern.fullmatch(text):
        raise _fail(field, f"must match {pattern.pattern}", text)
    if len(text) > max_length:
        raise _fail(field, f"must be at most {max_length} characters", text)
    return text


def validate_name(value: object, field: str = "name", *, max_length: int = MAX_NAME_LENGTH) -> str:
    """Check a generic identifier against :data:`NAME_PATTERN` and a length bound."""
    return _match(field, value, _NAME_RE, max_length)


def validate_username(value: object, field: str = "username") -> str:
    """A login name: used in ``/home/<user>``, ``--env USER=…`` and ``sed`` inside the shell."""
    return _match(field, value, _USERNAME_RE, MAX_USERNAME_LENGTH)


def validate_slug(value: object, field: str = "project_slug") -> str:
    """A project identifier: one path component below ``~/proj`` and an env value."""
    return validate_name(value, field)


def validate_instance_name(value: object, field: str = "instance_name") -> str:
    """An apptainer instance name (also the sbatch job name when no user is given)."""
    return validate_name(value, field)


def validate_job_id(value: object, field: str = "job_id") -> str:
    """A SLURM job id as passed to ``--jobid=`` (digits only; ints are accepted)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    text = _check_str(field, value)
    if not _JOB_ID_RE.fullmatch(text) or len(text) > 20:
        raise _fail(field, "must be 1-20 decimal digits", text)
    return text


def validate_path(
    value: object,
    field: str = "path",
    *,
    absolute: bool = True,
    allow_dotdot: bool = False,
    bind_safe: bool = True,
) -> str:
    """Check a filesystem path that is placed in an argv token or a bind spec.

    ``bind_safe`` rejects ``:`` and ``,`` (apptainer's bind separators); newlines, carriage
    returns and NUL are always rejected, as are ``..`` components unless ``allow_dotdot``.
    Accepts :class:`os.PathLike`; returns ``str``.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    text = _check_str(field, value)
    if not text:
        raise _fail(field, "must not be empty", text)
    if len(text) > MAX_PATH_LENGTH:
        raise _fail(field, f"must be at most {MAX_PATH_LENGTH} characters", text)
    for char, label in _PATH_FORBIDDEN.items():
        if char in (":", ",") and not bind_safe:
            continue
        if char in text:
            raise _fail(field, f"must not contain {label}", text)
    if absolute and not text.startswith("/"):
        raise _fail(field, "must be an absolute path", text)
    if not absolute and text.startswith("-"):
        raise _fail(field, "must not start with '-'", text)
    if not allow_dotdot and ".." in text.split("/"):
        raise _fail(field, "must not contain '..' components", text)
    return text


def validate_container_path(value: object, field: str = "container_path") -> str:
    """The image argument of ``apptainer exec``/``instance start``: a path or a URI.

    It is a positional argument, so ``:`` is fine (``docker://…``); it must not look like
    an option and must not contain line breaks or NUL.
    """
    return validate_path(value, field, absolute=False, allow_dotdot=True, bind_safe=False)


def validate_mount_mode(value: object, field: str = "mode") -> str:
    text = _check_str(field, value)
    if text not in MOUNT_MODES:
        raise _fail(field, "must be 'ro' or 'rw'", text)
    return text


@dataclass(frozen=True)
class MountSpec:
    """One validated bind mount: ``host:container:mode``."""

    host: str
    container: str
    mode: str = "rw"

    def spec(self) -> str:
        return f"{self.host}:{self.container}:{self.mode}"

    def as_dict(self) -> dict[str, str]:
        return {"host": self.host, "container": self.container, "mode": self.mode}


def validate_mount_spec(value: object, field: str = "mount", *, default_mode: str = "rw") -> MountSpec:
    """Parse ``host:container[:ro|rw]`` into a :class:`MountSpec` (both paths absolute)."""
    text = _check_str(field, value).strip()
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise _fail(field, "must be host:container or host:container:ro|rw with no empty parts", text)
    host = validate_path(parts[0], f"{field}.host")
    container = validate_path(parts[1], f"{field}.container")
    mode = validate_mount_mode(parts[2] if len(parts) == 3 else default_mode, f"{field}.mode")
    return MountSpec(host, container, mode)


def _require_key(entry: object, key: str, field: str) -> Any:
    if not isinstance(entry, Mapping):
        raise _fail(field, "must be a mapping", entry)
    if key not in entry:
        raise _fail(f"{field}.{key}", "is required", entry)
    return entry[key]


def validate_host_mount(entry: object, field: str = "host_mounts[]") -> MountSpec:
    """A ``{host_path, container_path, mode}`` dict as used by ``build_host_mount_binds``."""
    host = validate_path(_require_key(entry, "host_path", field), f"{field}.host_path")
    container = validate_path(_require_key(entry, "container_path", field), f"{field}.container_path")
    mode = validate_mount_mode(_require_key(entry, "mode", field), f"{field}.mode")
    return MountSpec(host, container, mode)


def validate_dev_repo(entry: object, field: str = "dev_repos[]", *, need_host_path: bool = True) -> dict[str, str]:
    """A ``{name, host_path}`` dev repo; ``name`` becomes ``/opt/dev/<name>``."""
    name = validate_name(_require_key(entry, "name", field), f"{field}.name")
    result = {"name": name}
    if need_host_path:
        result["host_path"] = validate_path(_require_key(entry, "host_path", field), f"{field}.host_path")
    return result


def validate_texlive_prefix(value: object, field: str = "texlive_prefix") -> str:
    """A TeX Live install prefix (``''`` = none). Returned without trailing slashes."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    text = _check_str(field, value)
    if text == "":
        return ""
    validate_path(text, field)
    return text.rstrip("/")


def validate_positive_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(field, "must be a positive integer", value)
    return value


def validate_slurm_partition(value: object, field: str = "slurm_partition") -> str:
    text = _check_str(field, value)
    if not _PARTITION_RE.fullmatch(text) or len(text) > 256:
        raise _fail(field, "must be a comma-separated list of names matching " + NAME_PATTERN, text)
    return text


def validate_slurm_time(value: object, field: str = "slurm_time_limit") -> str:
    text = _check_str(field, value)
    if not _TIME_RE.fullmatch(text):
        raise _fail(field, "must be a SLURM time such as 8:00:00, 1-00:00:00, 90 or UNLIMITED", text)
    return text
