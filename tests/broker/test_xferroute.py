"""Where a transfer runs (broker.xferroute) and the login side's confinement (broker.landlock,
broker.loginxfer), without the bed: the route is pure; Landlock is this kernel's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import landlock, loginxfer
from broker.config import ConfigError, parse
from broker.jobspec import container_args, shared_dirs
from broker.profiles import Bind
from broker.xferroute import Tree, binds_of, login_argv, login_command, login_spec, login_trees

HOME = "/home/u"
SFTP = "/usr/lib/openssh/sftp-server"
TREES = (Tree(HOME, True),)
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- trees

def test_the_default_config_binds_home_and_project_at_the_same_paths():
    config = parse({"container": {"image": "/images/base.sif"}, "transfer": {"login_paths": ["/home"]}})
    binds = binds_of(container_args(config, "u", "p", "/images/base.sif", config.profiles[0]))
    assert Bind("/home/u", "/home/u", "rw") in binds
    assert Bind("/home/u/proj/p", "/home/u/proj/p", "rw") in binds
    assert login_trees(binds, config.login_paths, HOME) == (Tree("/home/u", True), Tree("/home/u/proj/p", True))


def test_by_default_the_home_and_project_dir_are_served_on_the_login_node():
    config = parse({"container": {"image": "/images/base.sif"}})
    assert config.login_side is True and config.login_paths == ()
    shared = shared_dirs(config, "u", "p")
    assert shared == ["/home/u", "/home/u/proj/p"]
    binds = binds_of(container_args(config, "u", "p", "/images/base.sif", config.profiles[0]))
    assert login_trees(binds, shared, HOME) == (Tree("/home/u", True), Tree("/home/u/proj/p", True))


def test_login_side_off_and_no_login_paths_means_no_trees():
    config = parse({"container": {"image": "/images/base.sif"}, "transfer": {"login_side": False}})
    assert shared_dirs(config, "u", "p") == []


def test_a_project_dir_elsewhere_is_shared_but_mounted_inside_the_home_so_nothing_is_served():
    config = parse({"container": {"image": "/images/base.sif", "project_dir": "/data/{project}"}})
    binds = binds_of(container_args(config, "u", "p", "/images/base.sif", config.profiles[0]))
    assert login_trees(binds, shared_dirs(config, "u", "p"), HOME) == ()


def test_no_shared_storage_declared_means_no_trees():
    assert login_trees([Bind(HOME, HOME, "rw")], (), HOME) == ()


def test_a_bind_mounted_elsewhere_inside_the_home_takes_every_tree_away():
    binds = [Bind(HOME, HOME, "rw"), Bind("/data/p", f"{HOME}/proj/p", "rw")]
    assert login_trees(binds, ["/home", "/data"], HOME) == ()


def test_a_node_local_identity_bind_inside_the_home_takes_every_tree_away():
    binds = [Bind(HOME, HOME, "rw"), Bind(f"{HOME}/scratch", f"{HOME}/scratch", "rw")]
    assert login_trees(binds, ["/home/u/proj"], HOME) == ()  # home not shared, scratch neither
    assert login_trees(binds, ["/home"], HOME) == (Tree(HOME, True), Tree(f"{HOME}/scratch", True))


def test_a_read_only_bind_inside_a_writable_tree_takes_every_tree_away():
    binds = [Bind(HOME, HOME, "rw"), Bind(f"{HOME}/ref", f"{HOME}/ref", "ro")]
    assert login_trees(binds, ["/home"], HOME) == ()


def test_binds_outside_the_trees_do_not_matter():
    binds = [Bind(HOME, HOME, "rw"), Bind("/opt/repo", "/opt/dev/repo", "ro")]
    assert login_trees(binds, ["/home"], HOME) == (Tree(HOME, True),)


def test_the_home_must_be_a_tree():
    assert login_trees([Bind("/data/x", "/data/x", "rw")], ["/data"], HOME) == ()


@pytest.mark.parametrize("value", [["relative"], ["/"], ["/a/../b"], "/home", [7]])
def test_login_paths_must_be_absolute_directories(value):
    with pytest.raises(ConfigError, match="transfer.login_paths"):
        parse({"container": {"image": "/images/base.sif"}, "transfer": {"login_paths": value}})


# ----------------------------------------------------------------------------- commands

@pytest.mark.parametrize("command,argv", [
    ("internal-sftp", [SFTP]),
    ("/usr/lib/openssh/sftp-server -l DEBUG3", [SFTP]),
    ("scp -t -- x", ["/usr/bin/scp", "-t", "--", "x"]),
    ("scp -r -p -d -t -- .", ["/usr/bin/scp", "-r", "-p", "-d", "-t", "--", "."]),
    ("scp -f '/home/u/my file'", ["/usr/bin/scp", "-f", "--", "/home/u/my file"]),
    ("rsync --server -vlogDtpre.iLsfxCIvu . dest/", ["/usr/bin/rsync", "--server", "-vlogDtpre.iLsfxCIvu", ".", "dest/"]),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . /home/u/a", ["/usr/bin/rsync", "--server", "--sender",
                                                                 "-logDtpre.iLsfxCIvu", ".", "/home/u/a"]),
    ("cat f", ["/bin/cat", "--", "f"]),
    ("cat > f", ["/bin/cat"]),
])
def test_transfers_in_the_trees_run_on_the_login_node(command, argv):
    assert login_argv(command, HOME, TREES, SFTP) == argv


@pytest.mark.parametrize("command", [
    "true", "ls", "tar xf -", "cat f | sh", "cat -n f", "cat > /tmp/x", "cat > a b", "cat f; rm f",
    "scp -f /tmp/x", "scp -f '*.txt'", "scp -f ~/x", "scp -f $HOME/x", "scp -t a b", "scp -x -t a",
    "scp -f ../../tmp/x", "scp -t -- /home/u/../../tmp", "rsync --server . /tmp/x",
    "rsync --server --sender . /home/u/a /etc/passwd", "rsync --server dest", "rsync -av . x",
    "cat > ../../tmp/x", "scp -t -- 'a\nb'", "scp -f 'unterminated",
    "rsync --server --daemon .", "rsync --server --daemon --config=/home/u/r.conf . x",
])
def test_everything_else_runs_in_the_allocation(command):
    assert login_argv(command, HOME, TREES, SFTP) is None


def test_an_upload_needs_a_writable_tree_and_a_download_any():
    trees = (Tree(HOME, True), Tree("/ref", False))
    assert login_argv("scp -f /ref/a", HOME, trees, SFTP) is not None
    assert login_argv("scp -t /ref/a", HOME, trees, SFTP) is None
    assert login_argv("rsync --server . /ref/a", HOME, trees, SFTP) is None
    assert login_argv("cat > /ref/a", HOME, trees, SFTP) is None


def test_cat_into_a_file_says_where_its_stdout_goes():
    assert login_command("cat >> log", HOME, TREES, SFTP) == (["/bin/cat"], {"path": "log", "append": True})


def test_the_spec_carries_cwd_and_trees():
    spec = login_spec("internal-sftp", [Bind(HOME, HOME, "rw"), Bind("/p/r", "/p/r", "ro")], ["/home", "/p"], HOME, SFTP)
    assert spec == {"argv": [SFTP], "cwd": HOME, "trees": [[HOME, "rw"], ["/p/r", "ro"]]}


# ----------------------------------------------------------------------------- confinement

needs_landlock = pytest.mark.skipif(landlock.abi() < landlock.MIN_ABI, reason="this kernel has no Landlock ABI 2")


def _in_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})


@needs_landlock
def test_confinement_refuses_everything_outside_the_trees_and_symlinks_out(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    (inside / "mine").write_text("m")
    (inside / "link").symlink_to(outside)
    code = f"""
import os
from broker import landlock
landlock.confine([({str(inside)!r}, landlock.WRITE)], [])
def tryit(what, f):
    try:
        f(); print(what, "ok")
    except OSError as e:
        print(what, e.errno)
tryit("read-in", lambda: open({str(inside / 'mine')!r}).read())
tryit("write-in", lambda: open({str(inside / 'new')!r}, "w").write("n"))
tryit("rename-in", lambda: os.rename({str(inside / 'new')!r}, {str(inside / 'new2')!r}))
tryit("read-out", lambda: open({str(outside / 'secret')!r}).read())
tryit("via-link", lambda: open({str(inside / 'link' / 'secret')!r}).read())
tryit("write-out", lambda: open({str(outside / 'x')!r}, "w"))
tryit("list-etc", lambda: os.listdir("/etc"))
"""
    out = _in_child(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:7] == ["read-in ok", "write-in ok", "rename-in ok", "read-out 13", "via-link 13",
                                          "write-out 13", "list-etc 13"]
    assert not (outside / "x").exists()


@needs_landlock
def test_a_tree_reached_through_a_symlink_is_left_out(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_text("f")
    (tmp_path / "alias").symlink_to(real)
    code = f"""
from broker import landlock
landlock.confine([({str(tmp_path / 'alias')!r}, landlock.READ)], [])
try:
    open({str(real / 'f')!r}).read(); print("read")
except OSError as e:
    print(e.errno)
"""
    out = _in_child(code)
    assert out.stdout.strip() == "13", out.stderr


def test_without_landlock_the_login_side_declines_and_nothing_is_confined(monkeypatch):
    monkeypatch.setattr(landlock, "abi", lambda: 1)
    spec = {"argv": ["/bin/cat", "--", "/dev/null"], "cwd": "/", "trees": [["/tmp", "rw"]]}
    assert loginxfer.run(spec) is None  # the caller takes the allocation's path
    assert open("/etc/hostname").read() is not None  # this process was not confined


@needs_landlock
def test_the_login_side_execs_the_server_confined_with_its_libraries(tmp_path):
    (tmp_path / "data").write_bytes(b"payload")
    code = f"""
import sys
from broker import loginxfer
sys.exit(loginxfer.run({{"argv": ["/bin/cat", "--", "data", "/etc/hostname"], "cwd": {str(tmp_path)!r},
                        "trees": [[{str(tmp_path)!r}, "ro"]]}}))
"""
    out = _in_child(code)
    assert out.stdout == "payload"
    assert out.stderr == "cat: /etc/hostname: No such file or directory\n"  # not in its view at all
    assert out.returncode == 1


def test_the_login_client_stays_standard_library_only_with_login_side_transfers():
    code = ("import sys; import broker.login, broker.loginxfer, broker.landlock; "
            "bad = [m for m in ('anyio', 'structlog', 'asyncssh', 'subprocess') if m in sys.modules]; print(bad)")
    out = _in_child(code)
    assert out.stdout.strip() == "[]", out.stderr


@needs_landlock
def test_in_the_view_nothing_outside_the_trees_exists_not_even_to_chmod_or_stat(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "f").write_text("x")
    (outside / "f").chmod(0o600)
    (inside / "ref").mkdir()
    (inside / "link").symlink_to(outside / "f")
    code = f"""
import os
from broker import mountview
mountview.enter_namespace()
mountview.build([({str(inside)!r}, True)], ["/etc/passwd"])
def tryit(what, f):
    try:
        f(); print(what, "ok")
    except OSError as e:
        print(what, e.errno)
tryit("chmod-out", lambda: os.chmod({str(outside / 'f')!r}, 0o777))
tryit("stat-out", lambda: os.stat({str(outside / 'f')!r}))
tryit("chmod-via-link", lambda: os.chmod({str(inside / 'link')!r}, 0o777))
tryit("write-in", lambda: open({str(inside / 'new')!r}, "w").write("n"))
tryit("etc-passwd-write", lambda: open("/etc/passwd", "a"))
print(sorted(os.listdir("/")))
"""
    out = _in_child(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:5] == ["chmod-out 2", "stat-out 2", "chmod-via-link 2", "write-in ok", "etc-passwd-write 30"]
    assert lines[5] == "['etc', 'tmp']"  # the trees' own path (under the pytest tmp dir) and /etc
    assert (outside / "f").stat().st_mode & 0o777 == 0o600
    assert (inside / "new").read_text() == "n"


@needs_landlock
def test_a_read_only_tree_cannot_be_written_in_the_view(tmp_path):
    (tmp_path / "f").write_text("x")
    code = f"""
from broker import mountview
mountview.enter_namespace()
mountview.build([({str(tmp_path)!r}, False)], [])
try:
    open({str(tmp_path / 'f')!r}, "a"); print("written")
except OSError as e:
    print(e.errno)
"""
    out = _in_child(code)
    assert out.stdout.strip() == "30", out.stderr  # EROFS
