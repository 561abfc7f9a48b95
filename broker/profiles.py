"""Session profiles: named resource sizes (``[profiles.NAME]`` in broker.toml) users choose at login.

Why a module of its own: a profile is read in three places with three jobs — the config
(validation, one line per bad field), the daemon (which profiles a user may use, and the
one-line refusal listing them) and the job builders (what ``sbatch`` and ``apptainer instance
start`` get). All three are pure functions of this data; nothing here runs anything.

A profile never comes from the user as anything but a *name*: every value that reaches
``sbatch`` or apptainer is the administrator's, validated here once.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

#: A profile's name: what users type after ``@project:`` and what the job comment carries.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_GRES_ITEM_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(:[A-Za-z0-9._-]{1,64})?(:[1-9][0-9]{0,3})?$")
#: ``--constraint`` features joined with SLURM's operators; one argv word, never a shell's.
_CONSTRAINT_RE = re.compile(r"^[A-Za-z0-9_.&|\[\]*:()-]{1,256}$")
_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/@+-]*$")
#: The container runtime's GPU flags a profile may ask for (apptainer's, and nothing else:
#: any other flag could undo ``--containall``).
CONTAINER_FLAGS = ("--nv", "--rocm")
#: Variables SLURM's gres/gpu plugin (and the vendors' runtimes) use to name a job's GPUs.
#: ``--cleanenv`` drops them; the start script hands them on as ``APPTAINERENV_*``.
GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL",
                 "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK", "SLURM_GPUS_ON_NODE")

_KEYS = ("partition", "time_limit", "cpus", "memory_gb", "gres", "account", "qos", "constraint", "image",
         "container_flags", "binds", "groups", "default", "description")


@dataclass(frozen=True)
class Bind:
    host_path: str
    container_path: str
    mode: str = "ro"


@dataclass(frozen=True)
class Profile:
    """One named session size. Empty strings mean "not given to sbatch" (SLURM's default)."""

    name: str
    partition: str
    time_limit: str
    cpus: int
    memory_gb: int
    image: str
    gres: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    container_flags: tuple[str, ...] = ()
    binds: tuple[Bind, ...] = ()
    #: Unix groups whose members may use it; empty: everyone.
    groups: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def gpu(self) -> bool:
        return bool(set(self.container_flags) & set(CONTAINER_FLAGS)) or any(
            item.split(":", 1)[0] == "gpu" for item in self.gres.split(",") if item)

    def summary(self) -> str:
        """``partition, 1 cpus, 4G, 8:00:00, gres gpu:1`` — for refusals and ``check-config``."""
        parts = [self.partition, f"{self.cpus} cpus", f"{self.memory_gb}G", self.time_limit]
        parts += [f"{k} {v}" for k, v in (("gres", self.gres), ("account", self.account), ("qos", self.qos),
                                          ("constraint", self.constraint)) if v]
        return ", ".join(parts)


def parse(table: Any, base: dict[str, Any]) -> tuple[tuple[Profile, ...], str, list[str]]:
    """``(profiles, default name, problems)`` from the ``[profiles]`` table.

    ``base`` holds the ``[slurm]``/``[container]`` values (partition, time_limit, cpus,
    memory_gb, image) every profile inherits unless it sets its own. Without a ``[profiles]``
    table there is one profile, ``default``, made of exactly those.
    """
    if table is None:
        return (Profile("default", **base),), "default", []
    if not isinstance(table, dict) or not table:
        return (), "", ["profiles: must hold at least one [profiles.NAME] table"]
    problems: list[str] = []
    profiles: list[Profile] = []
    defaults: list[str] = []
    for name, entry in table.items():
        where = f"profiles.{name}"
        if not NAME_RE.fullmatch(name):
            problems.append(f"{where}: a profile name must match {NAME_RE.pattern}")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        profile, its_problems = _one(name, entry, base)
        problems += [f"{where}.{p}" for p in its_problems]
        if profile is not None:
            profiles.append(profile)
            if entry.get("default") is True:
                defaults.append(name)
    if len(defaults) > 1:
        problems.append(f"profiles: only one profile may say default = true (got {', '.join(defaults)})")
    elif not defaults and len(profiles) > 1:
        problems.append("profiles: one profile must say default = true (the one used when a login names none)")
    default = defaults[0] if defaults else (profiles[0].name if profiles else "")
    return tuple(profiles), default, problems


def _one(name: str, entry: dict[str, Any], base: dict[str, Any]) -> tuple[Profile | None, list[str]]:
    problems = [f"{key}: unknown key (known: {', '.join(_KEYS)})" for key in entry if key not in _KEYS]
    values: dict[str, Any] = dict(base)

    def text(key: str, pattern: re.Pattern[str], rule: str) -> None:
        if key in entry:
            value = entry[key]
            if isinstance(value, str) and (pattern.fullmatch(value) or (value == "" and key != "partition")):
                values[key] = value
            else:
                problems.append(f"{key}: {rule}")

    text("partition", _SLURM_NAME_RE, f"must be a partition name matching {_SLURM_NAME_RE.pattern}")
    text("time_limit", _TIME_RE, "must be a SLURM time like 8:00:00 or 1-00:00:00")
    text("account", _SLURM_NAME_RE, f"must be an account name matching {_SLURM_NAME_RE.pattern}")
    text("qos", _SLURM_NAME_RE, f"must be a QOS name matching {_SLURM_NAME_RE.pattern}")
    text("constraint", _CONSTRAINT_RE, "must be node features joined by & | ( ) [ ] * (no spaces)")
    text("image", _PATH_RE, "must be an absolute path of [A-Za-z0-9._/@+-] without '..'")
    if isinstance(values.get("image"), str) and ".." in values["image"].split("/"):
        problems.append("image: must be an absolute path of [A-Za-z0-9._/@+-] without '..'")
    if "gres" in entry:
        gres = entry["gres"]
        if isinstance(gres, str) and (gres == "" or all(_GRES_ITEM_RE.fullmatch(i) for i in gres.split(","))):
            values["gres"] = gres
        else:
            problems.append("gres: must be SLURM gres like gpu:1 or gpu:a100:2 (comma-separated)")
    for key, low, high in (("cpus", 1, 4096), ("memory_gb", 1, 65536)):
        if key in entry:
            value = entry[key]
            if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
                values[key] = value
            else:
                problems.append(f"{key}: must be an integer between {low} and {high}")
    if "container_flags" in entry:
        flags = entry["container_flags"]
        if isinstance(flags, list) and all(f in CONTAINER_FLAGS for f in flags) and len(set(flags)) == len(flags):
            values["container_flags"] = tuple(flags)
        else:
            problems.append(f"container_flags: must be a list of distinct flags out of {', '.join(CONTAINER_FLAGS)}")
    if "binds" in entry:
        binds = _binds(entry["binds"])
        if binds is None:
            problems.append("binds: must be a list of {host_path, container_path, mode} tables "
                            "(absolute paths without '..', mode ro|rw)")
        else:
            values["binds"] = binds
    if "groups" in entry:
        groups = entry["groups"]
        if isinstance(groups, list) and all(isinstance(g, str) and _SLURM_NAME_RE.fullmatch(g) for g in groups):
            values["groups"] = tuple(groups)
        else:
            problems.append(f"groups: must be a list of group names matching {_SLURM_NAME_RE.pattern}")
    if "default" in entry and not isinstance(entry["default"], bool):
        problems.append("default: must be true or false")
    if "description" in entry:
        value = entry["description"]
        if isinstance(value, str) and len(value) <= 200 and value.isprintable():
            values["description"] = value
        else:
            problems.append("description: must be printable text of at most 200 characters")
    if problems:
        return None, problems
    return Profile(name=name, **values), []


def _binds(value: Any) -> tuple[Bind, ...] | None:
    if not isinstance(value, list):
        return None
    binds = []
    for item in value:
        if not isinstance(item, dict) or not {"host_path", "container_path"} <= set(item) \
                or set(item) - {"host_path", "container_path", "mode"}:
            return None
        mode = item.get("mode", "ro")
        paths = (item["host_path"], item["container_path"])
        if mode not in ("ro", "rw") or not all(
                isinstance(p, str) and _PATH_RE.fullmatch(p) and ".." not in p.split("/") for p in paths):
            return None
        binds.append(Bind(paths[0], paths[1], mode))
    return tuple(binds)


# ---------------------------------------------------------------------- who may use which


class ProfileRefused(ValueError):
    """An unknown or forbidden profile: the message is the one line the user sees."""


def allowed(profiles: Iterable[Profile], member: Callable[[str], bool]) -> list[Profile]:
    """The profiles a user may use; ``member(group)`` says whether they are in a group."""
    return [p for p in profiles if not p.groups or any(member(g) for g in p.groups)]


def choose(profiles: Iterable[Profile], default: str, requested: str | None,
           member: Callable[[str], bool]) -> Profile:
    """The profile a login asked for (``None``: the default), or :class:`ProfileRefused`.

    An unknown name and a forbidden one get the same answer (the allowed list), so a user
    does not learn which other profiles exist."""
    profiles = list(profiles)
    mine = allowed(profiles, member)
    name = default if requested in (None, "") else requested
    for profile in mine:
        if profile.name == name:
            return profile
    names = ", ".join(p.name for p in mine) or "none"
    what = f"{name!r}" if isinstance(name, str) and NAME_RE.fullmatch(name) else "that name"
    if requested in (None, ""):
        raise ProfileRefused(f"profile: the default profile {what} is not open to you; choose one of: {names}"
                             " (ssh host @project:PROFILE or SBROKER_PROFILE)")
    raise ProfileRefused(f"profile: no profile {what} for you; choose one of: {names}")


# ---------------------------------------------------------------------- pure builders


def sbatch_flags(profile: Profile) -> list[str]:
    """The options a profile adds to ``sbatch`` beyond partition/time/cpus/memory."""
    flags = []
    for option, value in (("--gres", profile.gres), ("--account", profile.account), ("--qos", profile.qos),
                          ("--constraint", profile.constraint)):
        if value:
            flags.append(f"{option}={value}")
    return flags


def container_flags(profile: Profile) -> list[str]:
    """The options a profile adds to ``apptainer instance start``: GPU flags, then binds."""
    flags = list(profile.container_flags)
    for bind in profile.binds:
        flags += ["--bind", f"{bind.host_path}:{bind.container_path}:{bind.mode}"]
    return flags


def with_profile(exec_args: list[str], profile: Profile) -> list[str]:
    """``apptainer exec ...`` argv with the profile's container flags right after ``exec``."""
    if exec_args[:2] != ["apptainer", "exec"]:
        raise ValueError("exec_args: must start with 'apptainer exec'")
    return [*exec_args[:2], *container_flags(profile), *exec_args[2:]]


def gpu_env_snippet() -> str:
    """Bash for the start script, before ``apptainer instance start``: SLURM's GPU variables
    (set by its gres plugin in the batch step) become ``APPTAINERENV_*``, which apptainer
    applies after ``--cleanenv``; the session agent inherits them, so every shell and
    command in the instance sees the job's GPUs."""
    names = " ".join(shlex.quote(v) for v in GPU_VARIABLES)
    return (f"# SLURM's GPU variables survive --cleanenv as APPTAINERENV_* (broker.profiles).\n"
            f"for sbroker_var in {names}; do\n"
            '    if [ -n "${!sbroker_var+x}" ]; then export "APPTAINERENV_${sbroker_var}=${!sbroker_var}"; fi\n'
            "done\n")


def minutes(limit: str) -> int | None:
    """A SLURM time limit in minutes (``90``, ``1:30:00``, ``2-00:00:00``, ``45:00``), None if
    it is not one (``UNLIMITED``). Seconds round up: SLURM counts limits in whole minutes."""
    text = limit.strip()
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
            return None
        h, m, s = ([int(p) for p in parts] + [0, 0])[:3]
        return days * 1440 + h * 60 + m + (1 if s else 0)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    nums = [int(p) for p in parts]
    if len(nums) == 1:
        return nums[0]
    if len(nums) == 2:
        return nums[0] + (1 if nums[1] else 0)
    return nums[0] * 60 + nums[1] + (1 if nums[2] else 0)


def format_minutes(total: int) -> str:
    """Minutes as SLURM prints limits: ``8:00:00`` or ``1-02:00:00``."""
    days, rest = divmod(total, 1440)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours}:{mins:02d}:00"
