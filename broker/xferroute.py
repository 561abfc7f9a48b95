"""Where a transfer runs: on the login node, or in the allocation (pure; the daemon's side).

Why on the login node at all: a transfer through the allocation crosses one more hop (the
login node relays sshd's bytes to the session agent on the compute node), and small-file
protocols (sftp, scp) pay it on every request. When the files are on shared storage that the
session sees *at the same path* (its home, an identity bind), the login node's own
sftp-server, scp or rsync reads and writes exactly the files the session would, at ssh's
own speed. Everything else (node-local ``/tmp`` and scratch, the image's own files, binds the
container mounts elsewhere) must not be served there.

The rule, in three parts:

* **Trees.** The login-side trees are the session's identity binds (host path == container
  path) that lie on shared storage (``[transfer] login_paths``), with their mode. The home
  must be one (the server starts in it, as in the session). A session with a bind mounted
  elsewhere, or a node-local bind, *inside or around* a tree has none: there the login node
  and the session would see different files under one path.
* **Commands.** Only transfer servers: the sftp subsystem, ``scp -t``/``-f``, ``rsync
  --server``, and the pipe idioms ``cat FILE...`` and ``cat > FILE`` (``>>``), parsed word by word; anything a shell would expand (``*``, ``$``, ``~``, quotes
  of such) goes to the allocation, where bash expands it as it always has.
* **Paths.** scp's and rsync's paths are in the command: all must lie in the trees (and in
  writable ones for an upload), else the whole command goes to the allocation. sftp names
  paths as it goes; it is served on the login node confined (:mod:`broker.landlock`) to the
  trees, so any other path is refused there, never served from the wrong machine.

The login client enforces the trees with Landlock; a kernel without it falls back to the
allocation (the reply carries both).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Sequence

from .profiles import Bind

#: Anything bash would expand or treat specially in a command word, quoted or not: such a
#: command keeps bash's meaning by running in the allocation.
SHELL_SPECIAL = frozenset("$`;&|<>()*?[]{}~!#\n\r\t")
SCP_FLAGS = set("rpdtfvq")
SFTP_NAMES = ("internal-sftp", "/usr/lib/openssh/sftp-server", "sftp-server")


@dataclass(frozen=True)
class Tree:
    """A host directory the session sees at the same path."""

    path: str
    writable: bool


def binds_of(exec_args: Sequence[str]) -> list[Bind]:
    """The binds of an ``apptainer exec``/``instance start`` argv (``--home``, ``--bind``/``-B``)."""
    binds: list[Bind] = []
    args = list(exec_args)
    for i, arg in enumerate(args[:-1]):
        if arg in ("--bind", "-B", "--home"):
            for spec in args[i + 1].split(","):
                parts = spec.split(":")
                host = parts[0]
                container = parts[1] if len(parts) > 1 and parts[1] else host
                mode = parts[2] if len(parts) > 2 and parts[2] else "rw"
                binds.append(Bind(host, container, mode))
    return binds


def _norm(path: str) -> str:
    return posixpath.normpath(path) if path.startswith("/") else path


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def login_trees(binds: Sequence[Bind], shared: Sequence[str], home: str) -> tuple[Tree, ...]:
    """The session's login-side trees (see the module's rule); empty: none, all in the allocation."""
    if not shared:
        return ()
    trees: list[Tree] = []
    others: list[str] = []
    for bind in binds:
        host, container = _norm(bind.host_path), _norm(bind.container_path)
        if host == container and any(_within(host, _norm(s)) for s in shared):
            trees.append(Tree(host, bind.mode != "ro"))
        else:
            others.append(container)
    # Elsewhere-mounted or node-local binds in or around a tree: the views differ there.
    if any(_within(o, t.path) or _within(t.path, o) for o in others for t in trees):
        return ()
    # A tree inside another with another mode: one rule would grant what the session refuses.
    if any(a is not b and _within(a.path, b.path) and a.writable != b.writable for a in trees for b in trees):
        return ()
    if not any(_within(_norm(home), t.path) for t in trees):
        return ()
    return tuple(trees)


def _words(command: str) -> list[str] | None:
    if any(c in SHELL_SPECIAL for c in command):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    return words or None


def _path_ok(path: str, home: str, trees: Sequence[Tree], write: bool) -> bool:
    full = posixpath.normpath(posixpath.join(home, path))
    return any(_within(full, t.path) and (t.writable or not write) for t in trees)


#: ``cat > FILE`` and ``cat >> FILE``: the pipe idiom for an upload (``ssh host 'cat > f' < f``).
_CAT_INTO = re.compile(r"cat[ ]*(>>?)[ ]*([^ ]+)[ ]*")


def login_argv(command: str, home: str, trees: Sequence[Tree], sftp_server: str) -> list[str] | None:
    """The login node's argv for ``command``, or None: it runs in the allocation."""
    spec = login_command(command, home, trees, sftp_server)
    return spec[0] if spec else None


def login_command(command: str, home: str, trees: Sequence[Tree],
                  sftp_server: str) -> tuple[list[str], dict[str, object] | None] | None:
    """The login node's argv for ``command`` and the file its stdout goes to (``cat > f``), or
    None: it runs in the allocation."""
    if not trees:
        return None
    into = _CAT_INTO.fullmatch(command.strip())
    if into:
        target = _words(into.group(2))
        if target is None or len(target) != 1 or not _path_ok(target[0], home, trees, True):
            return None
        return ["/bin/cat"], {"path": target[0], "append": into.group(1) == ">>"}
    words = _words(command)
    if words is None:
        return None
    if words[0] in SFTP_NAMES:
        return [sftp_server], None  # the site's Subsystem arguments are the container's business
    if words[0] == "cat":  # the pipe idiom for a download: ``ssh host cat f > f``
        paths = words[2:] if words[1:2] == ["--"] else words[1:]
        if not paths or any(p.startswith("-") for p in paths) and words[1:2] != ["--"]:
            return None
        if not all(_path_ok(p, home, trees, False) for p in paths):
            return None
        return ["/bin/cat", "--", *paths], None
    if words[0] == "scp":
        flags, rest = [], words[1:]
        while rest and rest[0].startswith("-") and rest[0] != "--":
            if not set(rest[0][1:]) <= SCP_FLAGS or len(rest[0]) < 2:
                return None
            flags.append(rest.pop(0))
        if rest[:1] == ["--"]:
            rest = rest[1:]
        letters = set("".join(f[1:] for f in flags))
        if len(letters & {"t", "f"}) != 1 or not rest or ("t" in letters and len(rest) != 1):
            return None
        if not all(_path_ok(p, home, trees, "t" in letters) for p in rest):
            return None
        return ["/usr/bin/scp", *flags, "--", *rest], None
    if words[:2] == ["rsync", "--server"]:
        try:
            dot = words.index(".", 2)
        except ValueError:
            return None
        options, paths = words[2:dot], words[dot + 1:]
        if not paths or not all(o.startswith("-") for o in options):
            return None
        if any(o.split("=")[0] in ("--daemon", "--config", "--dparam") for o in options):
            return None  # daemon mode reads a config that may name programs to run: not here
        sending = "--sender" in options
        if not all(_path_ok(p, home, trees, not sending) for p in paths):
            return None
        return ["/usr/bin/rsync", *words[1:]], None
    return None


def login_spec(command: str, binds: Sequence[Bind], shared: Sequence[str], home: str,
               sftp_server: str) -> dict[str, object] | None:
    """The reply's ``local`` part: argv, cwd and trees for the login client, or None."""
    trees = login_trees(binds, shared, home)
    found = login_command(command, home, trees, sftp_server)
    if found is None:
        return None
    argv, stdout = found
    spec: dict[str, object] = {"argv": argv, "cwd": home,
                               "trees": [[t.path, "rw" if t.writable else "ro"] for t in trees]}
    if stdout is not None:
        spec["stdout"] = stdout
    return spec

