"""``check-config``'s question to SLURM: do the profiles' partitions and gres exist?

A profile naming a partition or a gres the cluster lacks would fail every session of it
at ``sbatch`` time, in front of a user. ``check-config`` asks ``sinfo`` once (through the
one runner, as root, with ``slurm.slurm_conf``) and names each such field in one line.
Accounts and QOS are slurmdbd's and are not checked here.

The parser and the check are pure; :func:`problems` is the only part that runs anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .profiles import Profile

_ITEM_RE = re.compile(r"^([a-z][a-z0-9_]*)(?::([A-Za-z0-9._-]+))?(?::(\d+))?$")


def parse_sinfo(text: str) -> dict[str, list[str]]:
    """``sinfo --format='%R %G'`` → partition → gres strings of its node groups."""
    parts: dict[str, list[str]] = {}
    for line in text.split("\n"):
        words = line.split()
        if len(words) != 2:
            continue
        parts.setdefault(words[0], []).append(words[1])
    return parts


def _offered(gres: str) -> list[tuple[str, str, int]]:
    """``gpu:a100:2(S:0-1),mps:100`` → ``[("gpu", "a100", 2), ("mps", "", 100)]``."""
    items = []
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        match = _ITEM_RE.fullmatch(item.strip())
        if match:
            name, kind, count = match.groups()
            if kind and kind.isdigit() and count is None:  # gpu:2 (no type)
                kind, count = None, kind
            items.append((name, kind or "", int(count) if count else 1))
    return items


def check(profiles: Iterable[Profile], partitions: dict[str, list[str]]) -> list[str]:
    """One line per profile field naming a partition or gres the cluster lacks."""
    problems = []
    for profile in profiles:
        where = f"profiles.{profile.name}"
        if profile.partition not in partitions:
            problems.append(f"{where}.partition: SLURM has no partition {profile.partition}"
                            f" (it has: {', '.join(sorted(partitions)) or 'none'})")
            continue
        offers = [o for gres in partitions[profile.partition] for o in _offered(gres)]
        for wanted in filter(None, profile.gres.split(",")):
            name, kind, count = _offered(wanted)[0] if _offered(wanted) else (wanted, "", 1)
            fits = [o for o in offers if o[0] == name and (not kind or o[1] == kind) and o[2] >= count]
            if not fits:
                have = sorted({f"{o[0]}:{o[1] + ':' if o[1] else ''}{o[2]}" for o in offers})
                problems.append(f"{where}.gres: partition {profile.partition} has no node with {wanted}"
                                f" (its nodes offer: {', '.join(have) or 'none'})")
    return problems


def problems(config: object) -> list[str]:
    """Ask SLURM (``sinfo``) and check every profile of ``config``; a failure is one line."""
    import anyio

    from . import log as _log
    from .slurm import commands
    from .slurm.errors import SlurmError
    from .slurm.runner import Runner

    _log.configure("warning")  # the runner's debug lines are the daemon's, not check-config's output
    runner = Runner(path=config.path, slurm_conf=config.slurm_conf,  # type: ignore[attr-defined]
                    timeout=config.command_timeout)  # type: ignore[attr-defined]
    try:
        result = anyio.run(lambda: runner.run(commands.sinfo_partitions()))
    except SlurmError as exc:
        return [f"slurm: cannot ask SLURM which partitions and gres exist ({exc.reason});"
                " profiles are unchecked"]
    return check(config.profiles, parse_sinfo(result.stdout))  # type: ignore[attr-defined]
