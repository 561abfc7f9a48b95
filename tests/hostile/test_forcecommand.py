"""Issue 14 item 5: a forced user never reaches a login-node shell, whatever their dotfiles say.

sshd runs every session as ``<login shell> -c '<ForceCommand>'``; bash sources ``~/.bashrc``
there, and ``~/.pam_environment`` (pam_env ``user_readenv=1`` on Debian) sets any variable
for the wrapper and the client. The fix: the wrapper is the forced users' login shell, reads
nothing the user owns, drops the environment, runs ``python -I``, and ``sbroker login`` takes
its socket from root's files only and talks only to a broker run by root.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from broker import protocol as p
from tests.integration.conftest import broker  # noqa: F401  (the module's real daemon, for the live test)

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "session_scripts" / "sbroker-login"
HOSTILE_ENV = {
    "PATH": "/tmp/hostile-bin:/usr/bin:/bin", "SBROKER_BIN": "/bin/bash", "SBROKER_SOCKET": "/tmp/hostile.sock",
    "PYTHONPATH": "/tmp/hostile-py", "PYTHONINSPECT": "1", "PYTHONSTARTUP": "/tmp/hostile-startup.py",
    "BASH_ENV": "/tmp/hostile-bashenv", "ENV": "/tmp/hostile-bashenv", "LD_LIBRARY_PATH": "/tmp/hostile-lib",
    "SBROKER_CONFIG": "/tmp/hostile.toml", "TERM": "xterm", "SSH_ORIGINAL_COMMAND": "make -j4",
    "SBROKER_PROJECT": "thesis", "HOME": "/home/x",
}
#: ``sbroker login`` from this checkout (``-I`` ignores PYTHONPATH, and the venv may hold another version).
LOGIN_CODE = f"import sys; sys.path.insert(0, {str(REPO)!r}); from broker.cli import main; sys.exit(main(sys.argv[1:]))"
ALLOWED = {"PATH", "HOME", "USER", "LOGNAME", "TERM", "LANG", "LC_ALL", "LC_CTYPE", "SSH_CONNECTION", "SSH_TTY",
           "SSH_ORIGINAL_COMMAND", "SBROKER_PROJECT"}


def _wrapper_with_fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped wrapper with its python replaced by a recorder of argv and environment."""
    dump = tmp_path / "exec.json"
    fake = tmp_path / "python3"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(dump)!r}, 'w'))\n")
    fake.chmod(0o755)
    copy = tmp_path / "sbroker-login"
    copy.write_text(WRAPPER.read_text().replace("/opt/sbroker/venv/bin/python3", str(fake)))
    return copy, dump


def test_wrapper_as_login_shell_ignores_its_argument_and_the_users_environment(tmp_path):
    """sshd's ``$SHELL -c '<anything>'`` with a hostile environment still only runs ``sbroker login``."""
    copy, dump = _wrapper_with_fake_python(tmp_path)
    result = subprocess.run(["/bin/sh", str(copy), "-c", "exec /bin/bash -i"], env=HOSTILE_ENV,
                            capture_output=True, text=True, timeout=30)
    assert dump.exists(), f"the wrapper did not run sbroker's python: rc={result.returncode} {result.stderr!r}"
    seen = json.loads(dump.read_text())
    assert seen["argv"][:2] == ["-I", "-c"]  # not a venv holding sbroker: site.py finds it
    assert seen["argv"][3:] == ["", "login", "--socket", "/run/sbroker/broker.sock"]
    assert set(seen["env"]) - {"PWD", "SHLVL", "_", "LC_CTYPE"} <= ALLOWED
    assert seen["env"]["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert (seen["env"]["SSH_ORIGINAL_COMMAND"], seen["env"]["SBROKER_PROJECT"]) == ("make -j4", "thesis")


def test_wrapper_names_the_venvs_site_packages_and_skips_site_py(tmp_path):
    """In a venv that holds sbroker, Python starts with ``-S`` (site.py's start-up work is a
    quarter of the interpreter's) and the code it runs puts that one directory on its path."""
    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "broker").mkdir(parents=True)
    (venv / "bin").mkdir()
    copy, dump = _wrapper_with_fake_python(tmp_path)
    (tmp_path / "python3").rename(venv / "bin" / "python3")
    copy.write_text(copy.read_text().replace(str(tmp_path / "python3"), str(venv / "bin" / "python3")))
    subprocess.run(["/bin/sh", str(copy), "-c", "x"], env=HOSTILE_ENV, capture_output=True, timeout=30)
    argv = json.loads(dump.read_text())["argv"]
    assert argv[:3] == ["-I", "-S", "-c"]
    assert argv[4:] == [str(site), "login", "--socket", "/run/sbroker/broker.sock"]
    code = argv[3].replace("from broker.cli import main; sys.exit(main(sys.argv[1:]))", "print(sys.argv, sys.path[-1])")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, *argv[4:]], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out == f"['-c', 'login', '--socket', '/run/sbroker/broker.sock'] {site}\n"


class _FakeBroker:
    """A broker that answers any ensure with ``exec`` of a command that leaves a file."""

    def __init__(self, path: Path, canary: Path) -> None:
        self.path, self.canary, self.connections = path, canary, 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            reply = {"type": "result", "session": {"id": "x"},
                     "exec": {"argv": ["/bin/sh", "-c", f"touch {self.canary}"], "env": {"PATH": "/usr/bin:/bin"}}}
            conn.recv(1 << 16)
            conn.sendall(p.encode_json(reply))
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_login_ignores_sbroker_socket_from_the_environment(tmp_path):
    """``SBROKER_SOCKET`` from ~/.pam_environment must not choose the broker (it could hand out a shell)."""
    canary = tmp_path / "PWNED"
    fake = _FakeBroker(tmp_path / "fake.sock", canary)
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-c", LOGIN_CODE,
             "login", "--socket", str(tmp_path / "absent.sock")],
            env={"PATH": "/usr/bin:/bin", "SBROKER_SOCKET": str(fake.path), "SSH_ORIGINAL_COMMAND": "true"},
            cwd=str(REPO), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    finally:
        fake.close()
    assert fake.connections == 0, "sbroker login connected to the socket named by the user's environment"
    assert not canary.exists()
    assert result.returncode == 1
    assert result.stderr.strip() == f"sbroker: broker not reachable at {tmp_path / 'absent.sock'}: No such file or directory"


def test_login_refuses_a_broker_not_run_by_root(tmp_path):
    """Even the socket root names must be served by root: a user's process there is refused."""
    nobody = pwd.getpwnam("nobody")
    sock_dir = Path(tempfile.mkdtemp(prefix="sbhostile-"))
    os.chmod(sock_dir, 0o755)
    os.chown(sock_dir, nobody.pw_uid, nobody.pw_gid)
    path = sock_dir / "b.sock"
    server = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c",
         "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); "
         "print('up', flush=True); c,_=s.accept(); time.sleep(5)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        result = subprocess.run(
            [sys.executable, "-I", "-c", LOGIN_CODE,
             "login", "--socket", str(path)],
            env={"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "true"}, cwd=str(REPO),
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"sbroker: broker at {path} is not run by root (uid {nobody.pw_uid}); "
                                     "refusing to use it")


# ---------------------------------------------------------------------------------- live sshd

MARKER = ".sbhostile-ran"
GUARD = 'if [ -z "$SLURM_JOB_ID" ]; then echo "{name} ran on the login node pid=$$" >> "$HOME/' + MARKER + '"; ' \
        'echo ESCAPED-{name}; exec /bin/bash -c "echo LOGIN-NODE-SHELL-{name}; id"; fi\n'
PYHOSTILE = ("import os\nif not os.environ.get('SLURM_JOB_ID'):\n"
             "    open(os.path.expanduser('~/" + MARKER + "'), 'a').write('sitecustomize ran on the login node\\n')\n")


def _plant(home: Path, uid: int, gid: int) -> list[Path]:
    files = {
        ".bashrc": GUARD.format(name="bashrc"), ".profile": GUARD.format(name="profile"),
        ".bash_profile": GUARD.format(name="bash_profile"), ".bash_login": GUARD.format(name="bash_login"),
        ".sbhostile-bashenv": GUARD.format(name="BASH_ENV"),
        ".sbhostile-py/sitecustomize.py": PYHOSTILE, ".sbhostile-py/usercustomize.py": PYHOSTILE,
        ".pam_environment": (
            f"SBROKER_BIN DEFAULT=/bin/bash\nSBROKER_SOCKET DEFAULT={home}/.sbhostile.sock\n"
            f"BASH_ENV DEFAULT={home}/.sbhostile-bashenv\nENV DEFAULT={home}/.sbhostile-bashenv\n"
            f"PYTHONPATH DEFAULT={home}/.sbhostile-py\nPYTHONINSPECT DEFAULT=1\n"
            f"SBROKER_CONFIG DEFAULT={home}/.sbhostile.toml\n"),
    }
    planted = []
    for rel, text in files.items():
        path = home / rel
        path.parent.mkdir(exist_ok=True)
        os.chown(path.parent, uid, gid)
        path.write_text(text)
        os.chown(path, uid, gid)
        planted.append(path)
    return planted


@pytest.mark.cluster
def test_hostile_dotfiles_never_run_on_the_login_node(broker):
    """Real sshd, sbbob's own dotfiles and ~/.pam_environment: no line of them runs on the login node,
    ``SBROKER_BIN=/bin/bash`` gives no shell, and his command still runs in his allocation."""
    from tests.cluster import config as tb

    bob = pwd.getpwnam(tb.USERS[1])
    home = Path(bob.pw_dir)
    saved = {name: (home / name).read_bytes() for name in (".bashrc", ".profile", ".bash_profile")
             if (home / name).exists()}
    marker = home / MARKER
    marker.unlink(missing_ok=True)
    planted = _plant(home, bob.pw_uid, bob.pw_gid)
    try:
        result = subprocess.run(tb.ssh_command(bob.pw_name, "echo where=${SLURM_JOB_ID:-login-node}"),
                                capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        ran = marker.read_text() if marker.exists() else ""
        assert ran == "", f"dotfiles ran on the login node:\n{ran}"
        assert "LOGIN-NODE-SHELL" not in result.stdout + result.stderr
        assert "ESCAPED" not in result.stdout + result.stderr
        words = result.stdout.split()
        assert len(words) == 1 and words[0].startswith("where=") and words[0][6:].isdigit(), \
            f"rc={result.returncode} stdout={result.stdout!r} stderr={result.stderr!r}"
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
        shutil.rmtree(home / ".sbhostile-py", ignore_errors=True)
        marker.unlink(missing_ok=True)
        for name, data in saved.items():
            (home / name).write_bytes(data)
            os.chown(home / name, bob.pw_uid, bob.pw_gid)
