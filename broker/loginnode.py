"""Login-node hardening report for ``sbroker check-config``: can a forced user reach a shell?

sshd runs the ForceCommand through the user's login shell, and PAM/sshd can let users set
environment variables for it (docs/admin.md, "ForceCommand hardening"). Nothing in the
daemon can undo that afterwards, so the site's setup is checked here and every unsafe
setting is one line. Parsing is pure (file text in, problems out); :func:`inspect` reads
the host.
"""

from __future__ import annotations

import grp
import pwd
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from .config import Config

PAM_SSHD = Path("/etc/pam.d/sshd")
_READENV_ON = re.compile(r"(?:^|\s)user_readenv=1(?:\s|$)")


def pam_problems(text: str, read_include: Callable[[str], str], depth: int = 0) -> list[str]:
    """``pam_env`` lines that read ``~/.pam_environment`` (``user_readenv=1``), following ``@include``."""
    problems: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("@include") and depth < 4:
            name = line.split()[-1]
            problems += pam_problems(read_include(name), read_include, depth + 1)
        elif "pam_env.so" in line and _READENV_ON.search(line):
            problems.append(f"pam: '{line}' lets users set LD_PRELOAD and any variable from ~/.pam_environment "
                            "for the login shell; remove user_readenv=1 (login nodes)")
    return problems


def sshd_problems(effective: str) -> list[str]:
    """Problems in ``sshd -T`` output (lower-case ``key value`` lines) for a forced user."""
    settings: dict[str, str] = {}
    for line in effective.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), value.strip())
    problems = []
    if settings.get("permituserenvironment", "no") != "no":
        problems.append("sshd: PermitUserEnvironment is not 'no': ~/.ssh/environment sets variables for the "
                        "login shell")
    if settings.get("permituserrc", "no") != "no":
        problems.append("sshd: PermitUserRC is not 'no' for forced users: ~/.ssh/rc runs on the login node")
    if settings.get("forcecommand", "none") in ("none", ""):
        problems.append("sshd: no ForceCommand for forced users (Match Group block of sshd_config.snippet)")
    return problems


def shell_problems(users: Iterable[tuple[str, str]], login_shell: str) -> list[str]:
    """Forced users whose login shell (as this node's NSS says) is not the wrapper."""
    return [f"login shell: {name} has {shell or '/bin/sh'}, which reads their dotfiles before the ForceCommand; "
            f"set {login_shell} on login nodes" for name, shell in users if shell != login_shell]


def inspect(config: Config) -> list[str]:
    """Read this host's PAM, sshd and passwd setup; return one line per unsafe setting."""
    problems: list[str] = []
    try:
        problems += pam_problems(PAM_SSHD.read_text(), _read_pam_include)
    except OSError as exc:
        problems.append(f"pam: cannot read {PAM_SSHD}: {exc.strerror}")
    members: list[tuple[str, str]] = []
    try:
        for name in grp.getgrnam(config.login_group).gr_mem:
            try:
                members.append((name, pwd.getpwnam(name).pw_shell))
            except KeyError:
                continue
    except KeyError:
        problems.append(f"login.group: group {config.login_group} does not exist on this node")
    if config.login_shell:
        problems += shell_problems(members, config.login_shell)
    if members:
        argv = ["sshd", "-T", "-C", f"user={members[0][0]},host=localhost,addr=127.0.0.1"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"sshd: cannot run sshd -T: {exc}")
        else:
            if out.returncode == 0:
                problems += sshd_problems(out.stdout)
            else:
                problems.append(f"sshd: sshd -T failed: {out.stderr.strip()[:200]}")
    return problems


def _read_pam_include(name: str) -> str:
    try:
        return (PAM_SSHD.parent / Path(name).name).read_text()
    except OSError:
        return ""
