"""apptainer instance start/list/stop and exec instance://NAME (agent, streams, signals, pty)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid

import pytest


def _name(prefix="t"):
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def inst(app, image):
    """A running contained instance; stopped afterwards."""
    name = _name()
    r = app("instance", "start", "--containall", "--writable-tmpfs", "--hostname", "insthost", image, name)
    assert r.returncode == 0, r.stderr
    yield name
    app("instance", "stop", "--force", name)


def _state(app, name):
    with open(app.instance_dir(name) / f"{name}.json") as f:
        return json.load(f)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(pid, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if not _alive(pid):
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def test_start_list_json_exact_stop(app, image):
    name = _name()
    r = app("instance", "start", "--containall", image, name)
    assert r.returncode == 0, r.stderr
    assert b"instance started successfully" in r.stderr
    state = _state(app, name)
    logs = app.instance_dir(name).parents[3] / "logs" / os.uname().nodename / app.pw.pw_name
    r = app("instance", "list", "--json", name)
    assert r.returncode == 0, r.stderr
    expected = {"instances": [{"instance": name, "pid": state["pid"], "img": image, "ip": "",
                               "logErrPath": str(logs / f"{name}.err"),
                               "logOutPath": str(logs / f"{name}.out")}]}
    assert json.loads(r.stdout) == expected
    # byte-exact: Go's json.Encoder with SetIndent("", "\t") and a trailing newline
    assert r.stdout.decode() == json.dumps(expected, indent="\t") + "\n"
    assert list(json.loads(r.stdout)["instances"][0]) == ["instance", "pid", "img", "ip", "logErrPath", "logOutPath"]
    r = app("instance", "list")
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["INSTANCE", "NAME", "PID", "IP", "IMAGE"]
    assert any(l.split() == [name, str(state["pid"]), image] for l in lines[1:])
    # state file fields like apptainer's instance.File
    assert {"pid", "ppid", "name", "user", "image", "config", "userns", "cgroup", "ip", "logErrPath",
            "logOutPath", "checkpoint"} <= set(state)
    assert state["user"] == app.pw.pw_name
    r = app("instance", "stop", name)
    assert r.returncode == 0, r.stderr
    assert f"Stopping {name} instance of {image} (PID={state['pid']})".encode() in r.stderr
    assert not app.instance_dir(name).exists()
    assert _wait_gone(state["ppid"]) and _wait_gone(state["pid"])
    r = app("instance", "list", "--json", name)
    assert json.loads(r.stdout) == {"instances": []}
    r = app("instance", "stop", name)
    assert r.returncode != 0 and b"no instance found" in r.stderr


def test_duplicate_name_rejected(app, image, inst):
    r = app("instance", "start", image, inst)
    assert r.returncode == 255
    assert r.stderr.decode().strip() == f"FATAL:   instance {inst} already exists"


def test_start_failures(app, image):
    r = app("instance", "start", "/nonexistent/image.sif", _name())
    assert r.returncode == 255 and r.stderr.startswith(b"FATAL:")
    name = _name()
    r = app("instance", "start", "-B", "/nonexistent/src:/x", image, name)
    assert r.returncode == 255 and r.stderr.startswith(b"FATAL:")
    assert json.loads(app("instance", "list", "--json", name).stdout) == {"instances": []}
    assert not app.instance_dir(name).exists()
    r = app("instance", "start", image, "bad/name")
    assert r.returncode == 255 and b"is not a valid instance name" in r.stderr


def test_instance_is_daemonized(app, inst):
    st = _state(app, inst)
    with open(f"/proc/{st['ppid']}/stat") as f:
        fields = f.read().split(") ", 1)[1].split()
    sid = int(fields[3])
    assert sid == st["ppid"]                         # setsid: own session, no controlling tty
    with open(f"/proc/{st['ppid']}/cmdline", "rb") as f:
        assert f.read().startswith(f"Apptainer instance: {app.pw.pw_name} [{inst}]".encode())


def test_stale_state_after_sigkill(app, image):
    """SIGKILL of the instance's master leaves its state file behind (a real stale entry);
    like apptainer, `instance list` (and any lookup) detects the dead master and deletes it."""
    name = _name()
    assert app("instance", "start", "--containall", image, name).returncode == 0
    st = _state(app, name)
    os.kill(st["ppid"], signal.SIGKILL)
    assert _wait_gone(st["ppid"])
    assert _wait_gone(st["pid"])                     # the container dies with its master
    statefile = app.instance_dir(name) / f"{name}.json"
    assert statefile.exists()                        # stale: nobody cleaned up
    r = app("instance", "list", "--json")
    assert name not in r.stdout.decode()             # ... list prunes the ghost entry
    assert not statefile.exists()
    r = app("instance", "start", "--containall", image, name)   # and the name is free again
    assert r.returncode == 0, r.stderr
    assert app("exec", f"instance://{name}", "true").returncode == 0
    # killing the container process (not the master): the master cleans up like apptainer's
    st = _state(app, name)
    os.kill(st["pid"], signal.SIGKILL)
    assert _wait_gone(st["ppid"])
    assert not statefile.exists()
    r = app("exec", f"instance://{name}", "true")
    assert r.returncode == 255 and f"no instance found with name {name}".encode() in r.stderr


def test_exec_shares_instance_namespaces(app, inst, standin_only):
    r = app("exec", f"instance://{inst}", "sh", "-c",
            "hostname; echo hello > /tmp/shared; touch /rootfile; sleep 30 >/dev/null 2>&1 & echo started")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["insthost", "started"]
    r = app("exec", f"instance://{inst}", "sh", "-c", "cat /tmp/shared; ls /rootfile; hostname; ps -eo args")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith("hello\n/rootfile\ninsthost\n")
    assert "sleep 30" in out                         # same pid namespace as the earlier exec
    _state(app, inst)
    r = app("exec", f"instance://{inst}", "cat", "/proc/1/cmdline")
    assert b"__agent" in r.stdout                    # pid 1 is the instance's agent
    r = app("exec", f"instance://{inst}", "sh", "-c", "ls -A /root; echo end")
    assert r.stdout == b"end\n"


def test_exec_instance_exit_codes(app, inst):
    assert app("exec", f"instance://{inst}", "sh", "-c", "exit 7").returncode == 7
    assert app("exec", f"instance://{inst}", "sh", "-c", "kill -TERM $$").returncode == 143
    assert app("exec", f"instance://{inst}", "sh", "-c", "kill -KILL $$").returncode == 137
    r = app("exec", f"instance://{inst}", "no-such-command")
    assert r.returncode == 255 and b"executable file not found" in r.stderr
    r = app("exec", "instance://no-such-instance", "true")
    assert r.returncode == 255 and b"no instance found with name no-such-instance" in r.stderr


def test_exec_instance_env_and_pwd(app, inst):
    r = app("exec", "--cleanenv", "--env", "A=1", "--pwd", "/usr", f"instance://{inst}",
            "sh", "-c", 'echo "${SBSTANDIN_X-unset} $A $(pwd)"', env={"SBSTANDIN_X": "host"})
    assert r.stdout == b"unset 1 /usr\n", r.stderr
    r = app("exec", f"instance://{inst}", "sh", "-c", 'echo "${SBSTANDIN_X-unset}"', env={"SBSTANDIN_X": "host"})
    assert r.stdout == b"host\n"


def test_binary_stream_identity(app, inst):
    data = os.urandom(50 * 1024 * 1024)
    r = app("exec", f"instance://{inst}", "cat", input=data, timeout=60)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    # stdin EOF propagates; stdout and stderr stay apart
    r = app("exec", f"instance://{inst}", "sh", "-c", "wc -c; echo err >&2", input=b"abc")
    assert r.stdout.strip() == b"3" and r.stderr == b"err\n"
    # and the other direction, generated inside
    r = app("exec", f"instance://{inst}", "sh", "-c", "head -c 1000000 /dev/zero | sha256sum", timeout=30)
    assert r.stdout.split()[0].decode() == hashlib.sha256(b"\0" * 1000000).hexdigest()


def _start_client(app, *args):
    return subprocess.Popen(app.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _client_pid(p):
    """The stand-in process (runuser's child when running as another user)."""
    if not p.args[0] == "runuser":
        return p.pid
    end = time.time() + 5
    while time.time() < end:
        try:
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError("no client process")


def _pgrep(pattern):
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True)
    return [int(x) for x in r.stdout.split()]


def _wait_for(pred, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signals_forwarded(app, inst, sig, code):
    tag = f"sleep {1000 + sig}"
    p = _start_client(app, "exec", f"instance://{inst}", "sh", "-c", f"exec {tag}")
    assert _wait_for(lambda: _pgrep(f"^{tag}$"))
    os.kill(_client_pid(p), sig)
    p.wait(timeout=10)
    assert p.returncode == code, p.stderr.read()
    assert _wait_for(lambda: not _pgrep(f"^{tag}$"))


def test_client_death_kills_command(app, inst):
    tag = "sleep 1777"
    p = _start_client(app, "exec", f"instance://{inst}", "sh", "-c", f"exec {tag}")
    assert _wait_for(lambda: _pgrep(f"^{tag}$"))
    os.kill(_client_pid(p), signal.SIGKILL)
    p.wait(timeout=10)
    assert _wait_for(lambda: not _pgrep(f"^{tag}$"))


def test_pty(app, inst):
    pexpect = pytest.importorskip("pexpect")
    c = pexpect.spawn(app.argv()[0], app.argv("exec", f"instance://{inst}", "bash", "--norc", "-i")[1:],
                      dimensions=(24, 80), timeout=10, env={"TERM": "xterm", "PATH": os.environ["PATH"]})
    try:
        c.sendline("PS1='PR''OMPT> '")
        c.expect("PROMPT> ")
        c.sendline("stty size; tty")
        c.expect(rb"24 80\r\n/dev/pts/\d+\r\n")
        c.expect("PROMPT> ")
        c.setwinsize(50, 132)
        time.sleep(0.3)
        c.sendline("stty size")
        c.expect(rb"50 132\r\n")
        c.expect("PROMPT> ")
        c.sendline("sleep 100")
        time.sleep(0.5)
        t0 = time.time()
        c.sendcontrol("c")
        c.expect("PROMPT> ")
        assert time.time() - t0 < 3
        c.sendline("exit 5")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 5


def test_stop_all_and_signal(app, image):
    names = [_name("all"), _name("all")]
    for n in names:
        assert app("instance", "start", image, n).returncode == 0
    pids = [_state(app, n)["ppid"] for n in names]
    r = app("instance", "stop", "--signal", "TERM", names[0])
    assert r.returncode == 0 and _wait_gone(pids[0])
    r = app("instance", "stop", "--all")
    assert r.returncode == 0
    assert _wait_gone(pids[1])
    assert json.loads(app("instance", "list", "--json").stdout)["instances"] == []
