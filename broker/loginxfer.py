"""Serve a transfer on the login node, confined to the session's shared trees (standard library only).

``sbroker login`` runs this when the broker's reply says a transfer (sftp, ``scp -t/-f``,
``rsync --server``) touches only shared storage that the session sees at the same path
(:mod:`broker.xferroute`). The login node's own server then does the work with sshd's pipes
as its stdin and stdout, exactly as under plain ssh: no relay, no second hop.

Before it execs, this process moves into a private view of the file system that holds only
those trees, the server's own binary, the libraries the dynamic loader maps for it and the
name-service files (:mod:`broker.mountview`: a user and mount namespace, ``chroot``), and
confines itself there with Landlock (:mod:`broker.landlock`). Every other path, in particular
the login node's ``/tmp``, does not exist for the server: it can neither read nor change it,
not even its mode or times; a symlink out of the home leads nowhere. The trees are the
broker's word; the user chooses nothing here but the command, which the broker parsed.
"""

from __future__ import annotations

import _signal as signal  # the C half of ``signal``: ``signal.py`` builds enums, 5 ms of every transfer
import os
import select
import time

from . import landlock, mountview

#: Read-only files a transfer server needs besides its libraries: the loader's cache and the
#: name service (user and group names in listings).
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/nsswitch.conf", "/etc/passwd", "/etc/group")
#: How long the loader may take to list a binary's libraries (it takes milliseconds).
LIST_TIMEOUT = 10.0


def libraries(binary: str) -> list[str]:
    """The shared objects the loader maps for ``binary`` (``LD_TRACE_LOADED_OBJECTS``, what
    ``ldd`` does for a trusted binary: the loader lists and exits, ``main`` never runs).
    Only when the broker sent no list (:mod:`broker.xferlibs` lists each server once)."""
    return parse_libraries(_output([binary], {"LD_TRACE_LOADED_OBJECTS": "1"}))


def parse_libraries(listing: str) -> list[str]:
    """The paths in the loader's trace, and the NSS modules next to libc."""
    found = []
    for line in listing.splitlines():
        words = line.split()
        path = words[2] if len(words) >= 3 and words[1] == "=>" else (words[0] if words else "")
        if path.startswith("/"):
            found.append(path)
    # NSS modules are loaded later with dlopen: those next to libc (sssd, ldap sites).
    for lib in list(found):
        if os.path.basename(lib).startswith("libc.so"):
            where = os.path.dirname(lib)
            found += [os.path.join(where, n) for n in os.listdir(where) if n.startswith("libnss_")]
    return found


def _output(argv: list[str], env: dict[str, str]) -> str:
    """``argv``'s stdout (fork and exec by hand: ``subprocess`` alone costs the login client
    several milliseconds of imports)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(write, 1)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 2)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + LIST_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)  # a loader that lists and exits takes milliseconds
                raise OSError(f"{argv[0]} did not list its libraries within {LIST_TIMEOUT:.0f} s")
            chunk = os.read(read, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def run(spec: dict[str, object]) -> int | None:
    """Exec the login-side server of ``spec`` (``argv``, ``cwd``, ``trees``, and its
    ``libraries`` when the broker has listed them); returns only on
    failure: None when it is not installed or this kernel cannot confine it (the caller takes
    the allocation's path), else an exit status after one line on stderr."""
    argv = [str(a) for a in spec["argv"]]  # type: ignore[union-attr]
    trees = [(str(path), mode == "rw") for path, mode in spec["trees"]]  # type: ignore[union-attr]
    binary = argv[0]
    if not os.access(binary, os.X_OK):  # not installed on this login node: the allocation serves it
        return None
    try:
        if landlock.abi() < landlock.MIN_ABI:
            return None
        files = [(binary, landlock.EXECUTE | landlock.READ_FILE)]
        listed = spec.get("libraries")
        libs = [str(lib) for lib in listed] if isinstance(listed, list) else libraries(binary)
        files += [(lib, landlock.EXECUTE | landlock.READ_FILE) for lib in libs]
        files += [(path, landlock.READ_FILE) for path in SYSTEM_FILES]
        mountview.enter_namespace()  # the last step that may fail and leave this process as it was
    except (landlock.LandlockError, mountview.ViewError, OSError):
        return None
    try:
        # Past the point of no return (a process in its own user namespace cannot take the
        # session's path: the broker's socket no longer shows as root's): a failure is one line.
        mountview.build(trees, [path for path, _ in files], [os.devnull])
        files.append((os.devnull, landlock.READ_FILE | landlock.WRITE_FILE))
        landlock.confine([(path, landlock.WRITE if writable else landlock.READ) for path, writable in trees], files)
    except (landlock.LandlockError, mountview.ViewError, OSError) as exc:
        os.write(2, f"sbroker: cannot serve this transfer on the login node: {exc}\n".encode())
        return 255
    try:
        os.chdir(str(spec["cwd"]))
        into = spec.get("stdout")
        if isinstance(into, dict):  # ``cat > f``: opened as bash opens a redirection, confined
            mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if into.get("append") else os.O_TRUNC)
            try:
                fd = os.open(str(into["path"]), mode | os.O_CLOEXEC, 0o666)
            except OSError as exc:  # what bash says of a failed redirection, and its status
                os.write(2, f"sbroker: {into['path']}: {exc.strerror}\n".encode())
                return 1
            os.dup2(fd, 1)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; a program expects the default
            signal.signal(sig, signal.SIG_DFL)
        # argv[0] as a shell's PATH search gives it (messages read "cat: f: ...", as in the session)
        os.execv(binary, [os.path.basename(binary), *argv[1:]])
    except OSError as exc:
        os.write(2, f"sbroker: cannot run {os.path.basename(binary)} on the login node: {exc.strerror}\n".encode())
    return 255
