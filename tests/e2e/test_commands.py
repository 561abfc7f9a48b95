"""``ssh host CMD`` and file transfer through ForceCommand ``sbroker login``, real sshd and SLURM.

Each test can fail on its own: exit codes, exact bytes, exact argv, one clear error line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import jobs_of

from .conftest import ALICE, BOB, ssh

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OPTS_STR = " ".join(tb.SSH_OPTS)


@pytest.fixture(scope="module")
def warm(broker):
    """The default session of both users exists (first login submits; later ones attach)."""
    for user in (ALICE, BOB):
        r = ssh(user, "true")
        assert r.returncode == 0, r.stderr
    return broker


def test_home_and_exit_status(warm):
    r = ssh(ALICE, 'printf "%s" "$HOME"; exit 3')
    assert r.returncode == 3
    assert r.stdout == b"/home/sbalice"


def test_command_runs_in_the_allocation_as_the_user(warm):
    r = ssh(ALICE, 'printf "%s|%s|%s|%s" "$SLURM_JOB_ID" "$(id -un)" "$PWD" "${APPTAINER_CONTAINER:+in}"')
    assert r.returncode == 0, r.stderr
    job, user, cwd, inside = r.stdout.decode().split("|")
    assert [j["job_id"] for j in jobs_of(ALICE, states="RUNNING")] == [job]
    assert (user, cwd, inside) == (ALICE, "/home/sbalice", "in")


def test_warm_command_prints_nothing_extra_on_stderr(warm):
    """No progress lines, no apptainer warnings once the session is ready."""
    r = ssh(ALICE, "echo out; echo err >&2")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"out\n", b"err\n")


def test_nonzero_exit_has_no_srun_noise(warm):
    r = ssh(ALICE, "echo oops >&2; exit 42")
    assert r.returncode == 42
    assert r.stderr == b"oops\n"


def test_command_with_quotes_substitution_and_newlines_runs_exactly(warm):
    command = """printf '%s\\n' "a'b" 'c"d' "$(echo sub)" '$(echo literal)' \\
  "tab	here"
echo second line; echo "  spaced  "
"""
    r = ssh(ALICE, command)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"""a'b\nc"d\nsub\n$(echo literal)\ntab\there\nsecond line\n  spaced  \n"""


def test_binary_stdin_is_byte_exact(warm):
    data = os.urandom(5 * 1024 * 1024)
    r = ssh(ALICE, "sha256sum; exit 5", input=data)
    assert r.returncode == 5
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_binary_stdout_is_byte_exact(warm):
    r = ssh(ALICE, "head -c 3000000 /dev/urandom | tee /tmp/e2e-bin | sha256sum >&2; cat /tmp/e2e-bin")
    assert r.returncode == 0
    assert len(r.stdout) == 3000000
    assert hashlib.sha256(r.stdout).hexdigest() == r.stderr.split()[0].decode()


def test_utf8_split_across_reads_is_intact_on_a_command(warm):
    text = "aé€😀" * 50000  # 1 + 2 + 3 + 4 bytes: every chunk boundary splits something
    r = ssh(ALICE, "python3 -c 'import sys; sys.stdout.write(\"a\\u00e9\\u20ac\\U0001F600\" * 50000)'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode("utf-8") == text


def test_project_from_sendenv(warm):
    r = ssh(ALICE, 'printf "%s %s" "$SBROKER_PROJECT" "$SLURM_JOB_ID"', env={"SBROKER_PROJECT": "envproj"},
            opts=("-o", "SendEnv=SBROKER_PROJECT"))
    assert r.returncode == 0, r.stderr
    project, job = r.stdout.decode().split()
    assert project == "envproj"
    comments = {j["job_id"]: j["comment"] for j in jobs_of(ALICE)}
    assert "envproj" in comments[job]


def test_project_from_at_word(warm):
    r = ssh(ALICE, "@atproj", 'printf "%s %s" "$SBROKER_PROJECT" "$SLURM_JOB_ID"')
    assert r.returncode == 0, r.stderr
    project, job = r.stdout.decode().split()
    assert project == "atproj"
    assert "atproj" in {j["job_id"]: j["comment"] for j in jobs_of(ALICE)}[job]


@pytest.mark.parametrize("how", ["env", "word"])
def test_invalid_project_gives_one_clear_line(warm, how):
    bad = "../etc"
    if how == "env":
        r = ssh(ALICE, "echo ran", env={"SBROKER_PROJECT": bad}, opts=("-o", "SendEnv=SBROKER_PROJECT"))
    else:
        r = ssh(ALICE, f"@{bad} echo ran")
    assert r.returncode != 0
    assert b"ran" not in r.stdout
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("sbroker: project:") and bad in lines[0]


def test_users_are_isolated(warm):
    a = ssh(ALICE, 'printf "%s %s" "$(id -un)" "$SLURM_JOB_ID"').stdout.decode().split()
    b = ssh(BOB, 'printf "%s %s" "$(id -un)" "$SLURM_JOB_ID"').stdout.decode().split()
    assert a[0] == ALICE and b[0] == BOB and a[1] != b[1]


# ---------------------------------------------------------------------------- transfers

@pytest.fixture
def payload(tmp_path: Path) -> Path:
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(1_500_000) + "ünïcødé\n".encode())
    return src


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "legacy-O"])
def test_scp_both_ways(warm, payload, tmp_path, legacy):
    if legacy and shutil.which("scp") is None:
        pytest.skip("no scp")
    flags = ["-O"] if legacy else []
    remote = f"scp-{'O' if legacy else 's'}.bin"
    up = subprocess.run(["scp", *flags, *tb.SSH_OPTS, str(payload), f"{ALICE}@{tb.SSH_HOST}:{remote}"],
                        capture_output=True, timeout=60)
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back.bin"
    down = subprocess.run(["scp", *flags, *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}:{remote}", str(back)],
                          capture_output=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == payload.read_bytes()
    r = ssh(ALICE, f"sha256sum {remote}")
    assert r.stdout.split()[0].decode() == hashlib.sha256(payload.read_bytes()).hexdigest()


def test_scp_missing_file_fails(warm, tmp_path):
    r = subprocess.run(["scp", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}:no-such-file", str(tmp_path / "x")],
                       capture_output=True, timeout=60)
    assert r.returncode != 0
    assert b"no-such-file" in r.stderr
    assert not (tmp_path / "x").exists()


def test_sftp_put_get(warm, payload, tmp_path):
    back = tmp_path / "sftp-back.bin"
    batch = f"put {payload} sftp.bin\nget sftp.bin {back}\n"
    r = subprocess.run(["sftp", "-b", "-", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}"], input=batch.encode(),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == payload.read_bytes()
    r = subprocess.run(["sftp", "-b", "-", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}"],
                       input=b"get no-such-file\n", capture_output=True, timeout=60)
    assert r.returncode != 0


def test_rsync_tree_both_ways(warm, tmp_path):
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "data.bin").write_bytes(os.urandom(700_000))
    (src / "top.txt").write_text("top\n")
    (src / "empty").mkdir()
    (src / "link").symlink_to("top.txt")
    os.chmod(src / "top.txt", 0o640)
    rsh = "ssh " + " ".join(tb.SSH_OPTS)
    up = subprocess.run(["rsync", "-a", "-e", rsh, f"{src}/", f"{ALICE}@{tb.SSH_HOST}:rsync-tree/"],
                        capture_output=True, timeout=60)
    assert up.returncode == 0, up.stderr
    dst = tmp_path / "back"
    down = subprocess.run(["rsync", "-a", "-e", rsh, f"{ALICE}@{tb.SSH_HOST}:rsync-tree/", f"{dst}/"],
                          capture_output=True, timeout=60)
    assert down.returncode == 0, down.stderr
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(dst)], capture_output=True)
    assert diff.returncode == 0, diff.stdout
    assert os.readlink(dst / "link") == "top.txt"
    assert (dst / "top.txt").stat().st_mode & 0o777 == 0o640
    missing = subprocess.run(["rsync", "-a", "-e", rsh, f"{ALICE}@{tb.SSH_HOST}:no-such-dir/", f"{dst}2/"],
                             capture_output=True, timeout=60)
    assert missing.returncode == 23, missing.stderr
