"""apptainer exec: flags, isolation, environment, mounts."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest


def test_version(app):
    r = app("--version")
    assert r.returncode == 0
    assert r.stdout.decode().startswith("apptainer version ")


@pytest.mark.parametrize("flag,msg", [
    ("--no-such-flag", "unknown flag: --no-such-flag"),
    ("--no-such-flag=1", "unknown flag: --no-such-flag"),
    ("-Z", "unknown shorthand flag: 'Z' in -Z"),
])
def test_unknown_flag_rejected(app, image, flag, msg):
    r = app("exec", flag, image, "true")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f'Error for command "exec": {msg}' in err
    assert "Run 'apptainer --help' for more detailed usage information." in err


def test_unknown_flag_for_instance_start(app, image):
    r = app("instance", "start", "--bogus", image, "x")
    assert r.returncode == 1
    assert 'Error for command "start": unknown flag: --bogus' in r.stderr.decode()


def test_flags_after_image_belong_to_the_command(app, image):
    r = app("exec", image, "echo", "--no-such-flag")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"--no-such-flag\n"


def test_runs_as_calling_user_with_passwd_entry(app, image):
    r = app("exec", "--containall", image, "sh", "-c", 'id -u; id -g; id -un; echo "$HOME"; getent passwd "$(id -un)"')
    assert r.returncode == 0, r.stderr
    uid, gid, name, home, entry = r.stdout.decode().splitlines()
    assert (int(uid), int(gid), name) == (app.pw.pw_uid, app.pw.pw_gid, app.pw.pw_name)
    assert home == app.pw.pw_dir
    assert entry.startswith(f"{name}:x:{uid}:{gid}:") and f":{app.pw.pw_dir}:" in entry


def test_containall_hides_host_files(app, image):
    marker = f"/tmp/sbstandin-marker-{uuid.uuid4().hex}"
    open(marker, "w").close()
    os.chmod(marker, 0o644)
    home_marker = os.path.join(app.pw.pw_dir, f"marker-{uuid.uuid4().hex}")
    app.sh(f"touch {home_marker}", check=True)
    try:
        probe = f"test -e {marker} && echo tmp-visible; test -e {home_marker} && echo home-visible; ls -A /root; echo end"
        r = app("exec", "--containall", image, "sh", "-c", probe)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode() == "end\n"          # nothing from the host, /root is the image's (empty)
        r = app("exec", image, "sh", "-c", probe)     # without --containall apptainer shares /tmp and $HOME
        out = r.stdout.decode()
        assert "tmp-visible" in out and "home-visible" in out
    finally:
        os.unlink(marker)
        app.sh(f"rm -f {home_marker}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a file in /root")
def test_root_cannot_see_host_root_home(image):
    """Even the host's root user running the container does not see the host's /root."""
    from tests.standin.conftest import BIN, Runner
    marker = f"/root/sbstandin-secret-{uuid.uuid4().hex}"
    open(marker, "w").close()
    try:
        app_root = Runner(str(BIN / "apptainer") if (BIN / "apptainer").exists() else "apptainer", None)
        r = app_root("exec", "--containall", image, "sh", "-c", f"ls -A /root; test -e {marker} && echo LEAK; echo end")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode() == "end\n"
    finally:
        os.unlink(marker)


def test_cleanenv_drops_host_vars_and_env_sets(app, image):
    env = {"SBSTANDIN_HOST_VAR": "from-host", "TERM": "xterm-test"}
    probe = 'echo "h=${SBSTANDIN_HOST_VAR-unset} e=${E1-unset} f=${F2-unset} term=$TERM path=$PATH"'
    r = app("exec", "--cleanenv", "--env", "E1=one,F2=two", image, "sh", "-c", probe, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == (
        "h=unset e=one f=two term=xterm-test path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    r = app("exec", "--env=E1=x", image, "sh", "-c", probe, env=env)
    assert "h=from-host e=x f=unset" in r.stdout.decode()
    r = app("exec", "-e", "--env", "NOEQUALS", image, "true")
    assert r.returncode == 1 and "must be formatted as key=value" in r.stderr.decode()


def test_apptainerenv_prefix_is_forwarded(app, image):
    r = app("exec", "-e", image, "sh", "-c", 'echo "$FOO"', env={"APPTAINERENV_FOO": "bar"})
    assert r.stdout == b"bar\n"


def test_hostname_and_pwd(app, image):
    r = app("exec", "--containall", "--hostname", "boxy", "--pwd", "/usr/bin", image, "sh", "-c", "hostname; pwd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["boxy", "/usr/bin"]


def test_own_pid_namespace(app, image):
    r = app("exec", "--containall", image, "ps", "-eo", "pid=")
    pids = sorted(int(p) for p in r.stdout.split())
    assert pids[0] == 1 and len(pids) <= 4        # only bwrap's init, the command and ps


def test_bind_ro_rw_and_comma_lists(app, image, tmp_path):
    a = f"/tmp/sbstandin-bind-{uuid.uuid4().hex}"
    b = a + "-b"
    app.sh(f"mkdir -p {a} {b} && echo data > {a}/f", check=True)
    try:
        r = app("exec", "--containall", "-B", f"{a}:/data:ro", image, "sh", "-c", "cat /data/f; echo x > /data/g")
        assert r.stdout == b"data\n"
        assert r.returncode != 0 and b"Read-only file system" in r.stderr
        r = app("exec", "--containall", "--bind", f"{a}:/data,{b}:/srv/deep/b", image,
                "sh", "-c", "echo w > /data/g && echo w2 > /srv/deep/b/h && ls /srv")
        assert r.returncode == 0, r.stderr
        assert b"deep" in r.stdout
        assert open(f"{a}/g").read() == "w\n" and open(f"{b}/h").read() == "w2\n"
        r = app("exec", "--containall", "-B", a, image, "cat", f"{a}/f")     # src only: same path inside
        assert r.stdout == b"data\n"
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)


def test_missing_bind_source_is_fatal(app, image):
    r = app("exec", "-B", "/nonexistent/sbstandin:/x", image, "true")
    assert r.returncode == 255
    assert r.stderr.decode().startswith("FATAL:")


def test_home_flag(app, image):
    h = f"/tmp/sbstandin-home-{uuid.uuid4().hex}"
    app.sh(f"mkdir -p {h} && echo mine > {h}/.marker", check=True)
    try:
        r = app("exec", "--containall", "--home", f"{h}:/home/inside", image,
                "sh", "-c", 'echo "$HOME"; pwd; cat ~/.marker')
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split() == ["/home/inside", "/home/inside", "mine"]
    finally:
        shutil.rmtree(h, ignore_errors=True)


def test_rootfs_read_only_unless_writable_tmpfs(app, image):
    r = app("exec", "--containall", image, "touch", "/newfile")
    assert r.returncode != 0 and b"Read-only file system" in r.stderr
    r = app("exec", "--containall", "--writable-tmpfs", image,
            "sh", "-c", "touch /newfile && mkdir -p /opt/x /var/lib/y && echo ok")
    assert r.stdout == b"ok\n", r.stderr
    r = app("exec", "--containall", "--writable-tmpfs", image, "sh", "-c", "test -e /newfile || echo gone")
    assert r.stdout == b"gone\n"                   # tmpfs: nothing persists


def test_fakeroot_and_writable_sandbox(app, image, standin_only):
    r = app("exec", "--fakeroot", "--containall", image, "sh", "-c", 'id -u; id -g; echo "$HOME"')
    assert r.stdout.decode().split() == ["0", "0", "/root"], r.stderr
    d = f"/tmp/sbstandin-wsb-{uuid.uuid4().hex}"
    app.sh(f"mkdir -p {d}", check=True)
    try:
        assert app("build", "--sandbox", f"{d}/sb", image).returncode == 0
        r = app("exec", "--writable", "--fakeroot", f"{d}/sb", "sh", "-c", "echo x > /etc/written && id -u")
        assert r.returncode == 0 and r.stdout == b"0\n", r.stderr
        assert open(f"{d}/sb/etc/written").read() == "x\n"          # persisted in the sandbox
        r = app("exec", "--writable", image, "true")
        assert r.returncode == 255 and r.stderr.startswith(b"FATAL:")   # image files are read-only
    finally:
        subprocess.run(["rm", "-rf", d])


def test_env_home_is_not_permitted(app, image):
    r = app("exec", "--containall", "--env", "HOME=/elsewhere", "--env", "PATH=/bin", image,
            "sh", "-c", 'echo "$HOME $PATH"')
    assert r.stdout.decode().strip() == f"{app.pw.pw_dir} /bin"
    assert b"Overriding HOME environment variable with APPTAINERENV_HOME is not permitted" in r.stderr


def test_exit_codes(app, image):
    assert app("exec", image, "sh", "-c", "exit 7").returncode == 7
    assert app("exec", image, "sh", "-c", "kill -TERM $$").returncode == 143


def test_bad_image(app):
    r = app("exec", "/nonexistent.sif", "true")
    assert r.returncode == 255 and r.stderr.startswith(b"FATAL:")
    junk = f"/tmp/sbstandin-junk-{uuid.uuid4().hex}.sif"
    with open(junk, "wb") as f:
        f.write(b"not an image")
    os.chmod(junk, 0o644)
    try:
        r = app("exec", junk, "true")
        assert r.returncode == 255 and r.stderr.startswith(b"FATAL:")
    finally:
        os.unlink(junk)


def test_image_contents(app, image):
    tools = ("bash sh ls cat env id hostname stty tty sleep printf true false mkdir rm cp mv head tail wc "
             "sha256sum seq yes dd ps rsync scp python3")
    r = app("exec", image, "sh", "-c",
            f"for t in {tools}; do command -v $t >/dev/null || echo missing $t; done; "
            "test -x /usr/lib/openssh/sftp-server || echo missing sftp-server; "
            "rsync --version >/dev/null || echo broken rsync; python3 -c 'import json, socket, pty' || echo broken py")
    assert r.returncode == 0 and r.stdout == b"", r.stdout + r.stderr


def test_build_roundtrip(app, image, standin_only, tmp_path):
    d = f"/tmp/sbstandin-build-{uuid.uuid4().hex}"
    app.sh(f"mkdir -p {d}", check=True)
    try:
        sandbox = f"{d}/sb"
        assert app("build", "--sandbox", sandbox, image).returncode == 0
        app.sh(f"echo built > {sandbox}/etc/marker", check=True)
        out = f"{d}/new.sif"
        r = app("build", out, sandbox)
        assert r.returncode == 0, r.stderr
        assert open(out, "rb").read(26) == b"APPTAINER-STANDIN-IMAGE 1\n"
        assert app("exec", out, "cat", "/etc/marker").stdout == b"built\n"
        r = app("build", out, sandbox)
        assert r.returncode == 255 and b"already exists" in r.stderr
        assert app("build", "--force", out, sandbox).returncode == 0
        r = app("build", f"{d}/x.sif", f"{d}/recipe.def")
        assert r.returncode == 255 and r.stderr.startswith(b"FATAL:")
        assert app("exec", sandbox, "cat", "/etc/marker").stdout == b"built\n"   # sandbox dirs run too
    finally:
        subprocess.run(["rm", "-rf", d])


@pytest.mark.parametrize("flag", ["nv", "rocm"])
def test_gpu_flags_are_accepted_and_said_to_find_no_vendor_files(app, image, standin_only, flag):
    """Issue 16: a GPU profile's --nv/--rocm reaches the stand-in's command line (apptainer's
    own warning on a host without GPU libraries), and SLURM's GPU variables pass --cleanenv as
    APPTAINERENV_*."""
    r = app("exec", "--containall", f"--{flag}", image, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"',
            env={"APPTAINERENV_CUDA_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "dropped"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"0,1\n"
    assert r.stderr.decode() == f"WARNING: Could not find any {flag} files on this host!\n"
