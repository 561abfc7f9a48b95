"""The apptainer stand-in (test infrastructure) and the minimal test image.

- ``STANDIN``: path of the stand-in executable in the source tree.
- ``real_apptainer()`` / ``REAL_APPTAINER``: path of a real ``apptainer`` on PATH (or None);
  tests and the demo must prefer it when present.
- ``apptainer_path()``: the real one if present, else the stand-in.
- ``install(bin_dir)``: copy the stand-in to ``bin_dir/apptainer`` (0755), return that path.
- ``build_test_image(images_dir)``: build ``images_dir/base.sandbox`` (a closure copy of this
  machine's bash, coreutils, ps, rsync, scp, sftp-server and python3) and the image file
  ``images_dir/base.sif`` from it; idempotent; returns the .sif path.

See README.md beside this file for the design and the deviations from real apptainer.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "apptainer"
IMAGE_BUILD_VERSION = "4"           # bump when the image recipe changes
SYSTEM_PYTHON = "/usr/bin/python3"

__all__ = ["STANDIN", "REAL_APPTAINER", "real_apptainer", "apptainer_path", "install",
           "build_test_image", "IMAGE_BINARIES"]


def _is_standin(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"apptainer stand-in" in f.read(4096)
    except OSError:
        return False


def real_apptainer() -> str | None:
    """Path of a real apptainer on PATH, ignoring installed copies of this stand-in."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d or ".", "apptainer")
        if os.path.isfile(p) and os.access(p, os.X_OK) and not _is_standin(p):
            return p
    return None


REAL_APPTAINER = real_apptainer()


def apptainer_path() -> str:
    return real_apptainer() or str(STANDIN)


def install(bin_dir: Path) -> Path:
    """Copy the stand-in executable into bin_dir (world-readable/executable)."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(bin_dir, os.stat(bin_dir).st_mode | 0o755)
    dest = bin_dir / "apptainer"
    tmp = bin_dir / ".apptainer.tmp"
    shutil.copyfile(STANDIN, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------- test image
IMAGE_BINARIES = [
    "bash", "sh", "ls", "cat", "env", "id", "hostname", "stty", "tty", "sleep", "printf", "true",
    "false", "mkdir", "rm", "cp", "mv", "head", "tail", "wc", "sha256sum", "seq", "yes", "dd",
    "ps", "rsync", "scp", "grep", "sed", "touch", "readlink", "uname", "whoami", "stat", "chmod",
    "ln", "sort", "tee", "test", "[", "mktemp", "basename", "dirname", "date", "echo", "kill",
    "pwd", "cmp", "od", "nproc", "rmdir", "tr", "cut", "uniq", "md5sum", "find", "xargs", "pgrep",
    "pkill", "timeout", "nohup", "setsid", "getent", "python3",
    # the SSH endpoint (issue 18): the image's own sshd, and a client side for agent forwarding
    "sshd", "ssh", "ssh-add", "ssh-keygen",
]
EXTRA_FILES = ["/usr/lib/openssh/sftp-server"]
PY_EXCLUDE = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
              "config-3.11-x86_64-linux-gnu", "__phello__"}


def _ensure_packages() -> None:
    missing = []
    if not shutil.which("rsync"):
        missing.append("rsync")
    if not os.path.exists("/usr/lib/openssh/sftp-server"):
        missing.append("openssh-sftp-server")
    if not shutil.which("scp"):
        missing.append("openssh-client")
    if not shutil.which("bwrap"):
        missing.append("bubblewrap")
    if not shutil.which("ps"):
        missing.append("procps")
    if missing:
        if os.geteuid() != 0:
            raise RuntimeError("missing packages %s (run as root to install them)" % missing)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", *missing], check=False, env=env,
                       stdout=subprocess.DEVNULL)
        if subprocess.run(["dpkg", "-s", *missing], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", *missing], check=True, env=env,
                           stdout=subprocess.DEVNULL)


def _copy_path(path: str, root: Path, done: set) -> None:
    """Copy host `path` into root at the same place, keeping symlink chains."""
    path = os.path.normpath(path)
    if path in done:
        return
    done.add(path)
    # resolve the directory part through host symlinks (e.g. /lib -> usr/lib)
    d = os.path.realpath(os.path.dirname(path))
    p = os.path.join(d, os.path.basename(path))
    dst = Path(str(root) + p)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(p):
        target = os.readlink(p)
        if not os.path.lexists(dst):
            os.symlink(target, dst)
        _copy_path(os.path.join(d, target) if not target.startswith("/") else target, root, done)
    elif os.path.isdir(p):
        shutil.copytree(p, dst, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*PY_EXCLUDE))
    elif os.path.isfile(p):
        if not dst.exists():
            shutil.copy2(p, dst)
        for lib in _ldd(p):
            _copy_path(lib, root, done)


def _ldd(path: str) -> list:
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            rhs = line.split("=>", 1)[1].strip().split(" (")[0].strip()
            if rhs.startswith("/"):
                libs.append(rhs)
        elif line.startswith("/"):
            libs.append(line.split(" (")[0].strip())
    return libs


def _build_sandbox(sandbox: Path) -> None:
    tmp = sandbox.with_name(sandbox.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # merged-/usr layout like Debian 12
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "usr/local/bin", "etc", "proc", "dev",
              "sys", "tmp", "var/tmp", "var/lib", "var/log", "home", "root", "run", "opt", "srv", "mnt"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        os.symlink(target, tmp / name)
    os.chmod(tmp / "tmp", 0o1777)
    os.chmod(tmp / "var/tmp", 0o1777)
    os.chmod(tmp / "root", 0o700)
    done: set = set()
    for b in IMAGE_BINARIES:
        p = shutil.which(b, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if p:
            _copy_path(p, tmp, done)
    for f in EXTRA_FILES:
        if os.path.exists(f):
            _copy_path(f, tmp, done)
    # python3 stdlib (+ extension modules' libraries) for the instance agent and tests
    pyver = "python%d.%d" % sys.version_info[:2]
    real_py = os.path.realpath(SYSTEM_PYTHON)
    pyver = os.path.basename(real_py) if os.path.basename(real_py).startswith("python3.") else pyver
    stdlib = "/usr/lib/" + pyver
    if os.path.isdir(stdlib):
        _copy_path(stdlib, tmp, done)
        dyn = os.path.join(stdlib, "lib-dynload")
        for so in sorted(os.listdir(dyn)) if os.path.isdir(dyn) else []:
            for lib in _ldd(os.path.join(dyn, so)):
                _copy_path(lib, tmp, done)
    for d in ("/usr/lib/terminfo", "/usr/share/terminfo/x", "/usr/share/terminfo/v",
              "/usr/share/terminfo/d", "/usr/share/terminfo/s", "/usr/share/terminfo/l"):
        if os.path.isdir(d):
            _copy_path(d, tmp, done)
    etc = tmp / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "resolv.conf").write_text("")
    (etc / "localtime").write_text("")
    (etc / "hostname").write_text("container\n")
    (etc / "os-release").write_text('PRETTY_NAME="sbroker test image (Debian 12 closure)"\n'
                                    'ID=sbroker-test\n')
    (tmp / ".standin-build").write_text(IMAGE_BUILD_VERSION + "\n")
    subprocess.run(["chmod", "-R", "u+rwX,go+rX,go-w", str(tmp)], check=True)
    os.chmod(tmp / "tmp", 0o1777)
    os.chmod(tmp / "var/tmp", 0o1777)
    if sandbox.exists():
        shutil.rmtree(sandbox)
    os.rename(tmp, sandbox)


def build_test_image(images_dir: Path) -> Path:
    """Build images_dir/base.sandbox and images_dir/base.sif (idempotent). Returns the .sif."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(images_dir, os.stat(images_dir).st_mode | 0o755)
    sandbox = images_dir / "base.sandbox"
    sif = images_dir / "base.sif"
    stamp = sandbox / ".standin-build"
    fresh = (stamp.exists() and stamp.read_text().strip() == IMAGE_BUILD_VERSION and sif.exists()
             and sif.stat().st_mtime >= stamp.stat().st_mtime
             and sif.stat().st_mtime >= STANDIN.stat().st_mtime)
    if fresh:
        return sif
    _ensure_packages()
    if not (stamp.exists() and stamp.read_text().strip() == IMAGE_BUILD_VERSION):
        _build_sandbox(sandbox)
    real = real_apptainer()
    builder = [real] if real else [SYSTEM_PYTHON, "-I", str(STANDIN)]
    subprocess.run([*builder, "build", "--force", str(sif), str(sandbox)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.chmod(sif, 0o644)
    return sif
