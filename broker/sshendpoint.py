"""The SSH endpoint, login side: the user's host key and ``sbroker ssh-config`` (standard library).

An unmodified OpenSSH client (VS Code Remote-SSH, scp, ``ssh -L``) reaches a full sshd
*inside* the user's container session through a ``ProxyCommand``::

    ssh -T login.cluster @project sbroker ssh-proxy

sshd's ForceCommand runs ``sbroker login``, which sees the reserved command ``sbroker
ssh-proxy``, asks the broker for the session's SSH endpoint and joins its stdin/stdout to
the session agent's direct stream, where the agent runs the image's ``sshd -i`` as the user
(:func:`broker.shells.instance_sshd_argv`). ProxyJump cannot do this: it opens a
``direct-tcpip`` channel, which the login sshd refuses (``AllowTcpForwarding no``) and
which never reaches the ForceCommand.

The endpoint's host key is the user's own file, created here as the user on first use and
kept for every later session: a client that trusted it once is never alarmed again, and a
listener without that file (another user's, or anything left on a port after a session
ended) cannot pass as the user's session. Root never reads or writes it.
"""

from __future__ import annotations

import os

#: Under the home: the same path on the login node and in the container (the home is bound).
HOST_KEY = ".sbroker/ssh/ssh_host_ed25519_key"
KEYGEN_TIMEOUT = 30.0

CONFIG_USAGE = """\
usage: ssh LOGIN sbroker ssh-config [--host ALIAS] [--login NAME]

Prints the ~/.ssh/config entry (and the known_hosts line) that reaches an SSH server
inside your session of the project (`@project` before `sbroker` chooses it).
"""


class EndpointError(Exception):
    """One line for the user: why the endpoint's host key is not there."""


def host_key_path(home: str) -> str:
    return os.path.join(home, HOST_KEY)


def ensure_host_key(home: str) -> str:
    """The user's endpoint host key, created on first use; returns its public line.

    Runs as the user (``sbroker login`` does), so a home the user owns is the only thing it
    touches. ``ssh-keygen`` writes the key 0600; the directory is made 0700.
    """
    key = host_key_path(home)
    if not os.path.exists(key):
        import subprocess  # first use only: ``subprocess`` costs every ``ssh session`` ~10 ms of imports

        try:
            os.makedirs(os.path.dirname(key), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise EndpointError(f"cannot create {os.path.dirname(key)}: {exc.strerror}") from None
        try:
            made = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sbroker session endpoint",
                                   "-f", key], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=KEYGEN_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EndpointError(f"ssh-keygen: {exc}") from None
        if made.returncode != 0:
            raise EndpointError(f"ssh-keygen could not create {key}: "
                                f"{made.stderr.decode(errors='replace').strip()[:200]}")
    try:
        with open(key + ".pub") as fh:
            line = fh.readline(4096).strip()
    except OSError as exc:
        raise EndpointError(f"cannot read {key}.pub: {exc.strerror}") from None
    words = line.split()
    if len(words) < 2 or not words[0].startswith("ssh-"):
        raise EndpointError(f"{key}.pub: not an OpenSSH public key; remove {key}* and try again")
    return f"{words[0]} {words[1]}"


def key_alias(user: str, login: str) -> str:
    """The name the client checks the endpoint's host key under (``HostKeyAlias``)."""
    return f"sbroker.{user}.{login}"


def config_text(user: str, project: str, login: str, alias: str, public_key: str, profile: str = "") -> str:
    project_word = f"@{project}{':' + profile if profile else ''} " if project or profile else ""
    known = key_alias(user, login)
    return f"""\
# sbroker: an SSH server inside your container session{f' (project {project})' if project else ''}{f' (profile {profile})' if profile else ''}.
# 1. Add this entry to ~/.ssh/config on your computer:
Host {alias}
    HostName {login}
    User {user}
    ProxyCommand ssh -T -l {user} {login} {project_word}sbroker ssh-proxy
    HostKeyAlias {known}
    ServerAliveInterval 30
# 2. Add this line to ~/.ssh/known_hosts on your computer (the endpoint's host key, the same
#    for all your sessions; it lives in ~/{HOST_KEY} on the cluster):
#    {known} {public_key}
# Then: ssh {alias}, scp file {alias}:, ssh -L 8888:localhost:8888 {alias}, or VS Code
# "Remote-SSH: Connect to Host" {alias}. Your session starts if it is not running. The
# server reads ~/.ssh/authorized_keys: the key you log in with must be listed there.
"""


def ssh_config(home: str, user: str, project: str | None, args: list[str], out, profile: str | None = None) -> int:
    """``sbroker ssh-config``: print the client entry (``@project:profile`` as it was asked for,
    so the endpoint starts the session the same way); create the host key if needed."""
    import socket  # ``ssh-config`` only, not the ProxyCommand's path

    alias, login, i = "", socket.getfqdn(), 0
    while i < len(args):
        if args[i] in ("-h", "--help"):
            out.write(CONFIG_USAGE)
            return 0
        if args[i] in ("--host", "--login") and i + 1 < len(args) and _word_ok(args[i + 1]):
            if args[i] == "--host":
                alias = args[i + 1]
            else:
                login = args[i + 1]
            i += 2
            continue
        raise EndpointError(f"ssh-config: unknown or bad argument {args[i][:60]!r} (see sbroker ssh-config --help)")
    public_key = ensure_host_key(home)
    alias = alias or f"{login.split('.')[0]}-{project or 'session'}"
    if profile is not None and not _word_ok(profile):
        raise EndpointError("profile: must be letters, digits, '.', '_' or '-'")
    out.write(config_text(user, project or "", login, alias, public_key, profile or ""))
    return 0


def _word_ok(word: str) -> bool:
    """Host names and aliases go into a config file: no spaces, quotes or control characters."""
    return 0 < len(word) <= 253 and all(c.isalnum() or c in "._-" for c in word)
