"""Issue 16 on the real bed: profiles chosen through real ssh, a GPU profile's fake GPU, two
profiles of one project, ``sbroker extend`` and ``check-config`` against sinfo (the waiting
side, forecast and ^C, is tests/e2e/test_queue_feedback.py).

The broker runs with three profiles: ``cpu`` (default), ``gpu`` (``--gres=gpu:1``, ``--nv``) and
``big`` (only for sbroker-admins, so sbalice may not use it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.conftest import jobs_of, sbroker, sbroker_json
from tests.integration.daemon import BrokerProcess, reset_state
from tests.waiting import wait_for

from .conftest import ALICE, ssh, ssh_argv

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROFILES = f"""
[profiles.cpu]
default = true
description = "the everyday shell"

[profiles.gpu]
gres = "gpu:1"
container_flags = ["--nv"]
description = "one (fake) GPU"

[profiles.big]
cpus = 2
groups = ["{tb.ADMIN_GROUP}"]

[extend]
step = "0:30:00"
max_total = "3:00:00"
"""


@pytest.fixture(scope="module")
def broker(cluster) -> Iterator[BrokerProcess]:
    reset_state()
    proc = BrokerProcess(extra_toml=PROFILES)
    proc.start()
    yield proc
    proc.stop()
    reset_state()


def scontrol_job(job_id: str, *flags: str) -> str:
    return subprocess.run(["scontrol", *flags, "show", "job", job_id], capture_output=True, text=True,
                          env=tb.slurm_env(), timeout=30, check=True).stdout


def events_of(user: str, event: str) -> list[dict]:
    lines = sbroker(user, "events", "--json").stdout.splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == event]


def live_job(user: str, project: str) -> str:
    session = sbroker_json(user, "show", project)
    assert session["state"] == "ready", session
    return session["job_id"]


def test_gpu_profile_session_sees_its_gpu_and_is_accounted_one(broker):
    r = ssh(ALICE, "@gpujob:gpu", 'printf "%s|%s|%s" "$CUDA_VISIBLE_DEVICES" "$SLURM_JOB_GPUS" "$SBROKER_PROJECT"')
    assert r.returncode == 0, r.stderr
    cuda, job_gpus, project = r.stdout.decode().split("|")
    assert re.fullmatch(r"\d", cuda) and re.fullmatch(r"\d", job_gpus) and project == "gpujob", r.stdout
    session = sbroker_json(ALICE, "show", "gpujob")
    assert (session["profile"], session["state"]) == ("gpu", "ready")
    job = scontrol_job(session["job_id"])
    assert "TresPerNode=gres:gpu:1" in job, job
    # the allocation holds one of the node's two GPUs (no slurmdbd here: TRES does not list gres)
    assert re.search(r"GRES=gpu:1\(IDX:\d\)", scontrol_job(session["job_id"], "-d")), job
    # --nv reached `apptainer instance start` (the stand-in says so like apptainer on a GPU-less host)
    log = sbroker(ALICE, "logs", "gpujob").stdout
    assert "WARNING: Could not find any nv files on this host!" in log, log


def test_cpu_profile_session_has_no_gpu(broker):
    r = ssh(ALICE, "@plain", 'printf "%s" "${CUDA_VISIBLE_DEVICES-unset}"')
    assert (r.returncode, r.stdout) == (0, b"unset"), r.stderr
    session = sbroker_json(ALICE, "show", "plain")
    assert session["profile"] == "cpu"
    assert "gres/gpu" not in scontrol_job(session["job_id"])


def test_another_profile_of_a_live_command_session_is_refused_in_one_line(broker):
    job = live_job(ALICE, "gpujob")
    r = ssh(ALICE, "@gpujob:cpu", "echo ran")
    assert (r.returncode, r.stdout) == (1, b"")
    assert r.stderr.decode() == (
        "sbroker: session: project gpujob runs profile gpu, not cpu; to use cpu, end it first with"
        " `sbroker kill gpujob` (or connect without a profile to use it)\n")
    r = ssh(ALICE, "@gpujob", "echo ran", env={"SBROKER_PROFILE": "cpu"}, opts=("-o", "SendEnv=SBROKER_PROFILE"))
    assert r.returncode == 1 and "runs profile gpu, not cpu" in r.stderr.decode()
    # scp is refused the same way (-O: the legacy protocol's remote command shows the line; in
    # SFTP mode scp prints only "Connection closed")
    local = f"/tmp/test-profiles-{job}.txt"
    r = subprocess.run(["scp", "-O", *tb.SSH_OPTS, "-o", "SendEnv=SBROKER_PROJECT SBROKER_PROFILE",
                        f"{ALICE}@{tb.SSH_HOST}:/etc/hostname", local], capture_output=True, timeout=60,
                       env={**os.environ, "SBROKER_PROJECT": "gpujob", "SBROKER_PROFILE": "cpu"})
    assert r.returncode != 0 and not os.path.exists(local)
    assert b"sbroker: session: project gpujob runs profile gpu, not cpu;" in r.stderr, r.stderr
    # naming none, or the live one, joins it
    for remote in ("@gpujob", "@gpujob:gpu"):
        r = ssh(ALICE, remote, "echo ran")
        assert (r.returncode, r.stdout) == (0, b"ran\n"), r.stderr
    assert [j["job_id"] for j in jobs_of(ALICE) if "project=gpujob" in j["comment"]] == [job]


def test_unknown_and_forbidden_profiles_list_the_allowed_ones_and_submit_nothing(broker):
    before = {j["job_id"] for j in jobs_of(ALICE, states="all")}
    for remote in ("@newproj:big", "@newproj:nope"):
        r = ssh(ALICE, remote, "echo ran")
        assert (r.returncode, r.stdout) == (1, b"")
        name = remote.split(":")[1]
        assert r.stderr.decode() == f"sbroker: profile: no profile '{name}' for you; choose one of: cpu, gpu\n"
    assert {j["job_id"] for j in jobs_of(ALICE, states="all")} == before


def test_interactive_login_asks_and_can_replace_the_live_profile(broker):
    old = live_job(ALICE, "plain")
    argv = ssh_argv(ALICE, "@plain:gpu", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=60)
    try:
        child.expect(rb"runs profile cpu, not gpu")
        child.expect(rb"choice \[k/e/c\]: ")
        child.send(b"e\r")
        child.expect([rb"\$ ", rb"# "], timeout=90)
        child.send(b"echo gpus=$CUDA_VISIBLE_DEVICES\r")
        child.expect(rb"gpus=\d\r\n")
        child.send(b"exit 0\r")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close(force=True)
    session = sbroker_json(ALICE, "show", "plain")
    assert session["profile"] == "gpu" and session["job_id"] != old
    wait_for(lambda: old not in {j["job_id"] for j in jobs_of(ALICE)}, 30, f"the cpu job {old} to end")
    kills = [(e["job_id"], e["by"], e["reason"]) for e in events_of(ALICE, "kill")]
    assert kills == [(old, ALICE, "replaced by profile gpu")]


def test_interactive_login_can_keep_the_live_session(broker):
    job = live_job(ALICE, "plain")
    argv = ssh_argv(ALICE, "@plain:cpu", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=60)
    try:
        child.expect(rb"choice \[k/e/c\]: ")
        child.send(b"k\r")
        child.expect([rb"\$ ", rb"# "])
        child.send(b"echo job=$SLURM_JOB_ID\r")
        child.expect(f"job={job}\r\n".encode())
        child.send(b"exit 0\r")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close(force=True)
    assert sbroker_json(ALICE, "show", "plain")["profile"] == "gpu"


def test_ls_shows_the_profile(broker):
    out = sbroker(ALICE, "ls").stdout
    rows = {line.split()[1]: line.split()[5] for line in out.splitlines()[1:]}
    assert rows == {"gpujob": "gpu", "plain": "gpu"}, out


def test_a_broker_restart_keeps_each_sessions_profile(broker):
    before = {s["project"]: (s["profile"], s["job_id"]) for s in sbroker_json(ALICE, "ls")}
    assert before == {"gpujob": ("gpu", before["gpujob"][1]), "plain": ("gpu", before["plain"][1])}
    broker.restart()
    assert {s["project"]: (s["profile"], s["job_id"]) for s in sbroker_json(ALICE, "ls")} == before
    r = ssh(ALICE, "@plain:cpu", "true")  # and the mismatch rule still knows it
    assert r.returncode == 1 and "runs profile gpu, not cpu" in r.stderr.decode()


def time_limit(job_id: str) -> str:
    return re.search(r"TimeLimit=(\S+)", scontrol_job(job_id)).group(1)


def test_extend_moves_the_time_limit_within_policy_tells_terminals_and_refuses_past_it(broker):
    job = live_job(ALICE, "plain")
    assert time_limit(job) == "02:00:00"
    argv = ssh_argv(ALICE, "@plain", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=60)
    try:
        child.expect([rb"\$ ", rb"# "])
        out = sbroker(ALICE, "extend", "plain").stdout
        assert out == f"plain (job {job}): time limit 2:00:00 -> 2:30:00 (at most 3:00:00 here)\n"
        assert time_limit(job) == "02:30:00"
        child.expect(rb"allocation was extended; it now ends at \d\d:\d\d \(in 1(49|50) minutes\)")
        child.send(b"exit 0\r")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close(force=True)
    assert sbroker(ALICE, "extend", "plain").stdout.endswith("2:30:00 -> 3:00:00 (at most 3:00:00 here)\n")
    refused = sbroker(ALICE, "extend", "plain", check=False)
    assert refused.returncode == 1
    assert re.fullmatch(rf"sbroker: extend: job {job} already has the longest time limit allowed here, 3:00:00"
                        r" \(\[extend\] max_total\); time left: \S+\n", refused.stderr), refused.stderr
    assert time_limit(job) == "03:00:00"
    assert [(e["job_id"], e["old"], e["new"], e["by"]) for e in events_of(ALICE, "extend")] == [
        (job, "2:00:00", "2:30:00", ALICE), (job, "2:30:00", "3:00:00", ALICE)]


def test_extend_of_someone_elses_session_is_refused_and_changes_nothing(broker):
    job = live_job(ALICE, "gpujob")
    before = time_limit(job)
    r = sbroker(tb.USERS[1], "extend", f"{ALICE}/gpujob", check=False)
    assert (r.returncode, r.stderr) == (1, f"sbroker: session: no session '{ALICE}/gpujob' visible to you\n")
    r = sbroker(tb.USERS[1], "extend", live_session_id(ALICE, "gpujob"), check=False)
    assert r.returncode == 1 and "visible to you" in r.stderr
    assert time_limit(job) == before


def live_session_id(user: str, project: str) -> str:
    return sbroker_json(user, "show", project)["id"]


def test_check_config_names_a_gres_or_partition_the_bed_lacks(cluster, tmp_path):
    """check-config asks sinfo (the bed's nodes offer gpu:2 in partitions compute, node1, node2)."""
    conf = tmp_path / "broker.toml"
    conf.write_text(f"""
[slurm]
slurm_conf = "{tb.SLURM_CONF}"
[container]
image = "{tb.IMAGES / 'base.sif'}"
[profiles.cpu]
default = true
[profiles.gpu]
gres = "gpu:2"
[profiles.four]
partition = "node1"
gres = "gpu:4"
[profiles.nowhere]
partition = "gpu"
""")
    r = subprocess.run([str(tb.SBROKER_BIN), "check-config", "--config", str(conf)], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 1
    config_lines = [line for line in r.stderr.splitlines() if line.startswith("sbroker: config:")]
    assert config_lines == [
        "sbroker: config: profiles.four.gres: partition node1 has no node with gpu:4 (its nodes offer: gpu:2)",
        "sbroker: config: profiles.nowhere.partition: SLURM has no partition gpu (it has: compute, node1, node2)"]
    assert "profile gpu: compute, 4 cpus, 16G, 8:00:00, gres gpu:2\n" in r.stdout


def test_extend_from_inside_the_session_through_ssh_to_the_login_node(broker, tmp_path):
    """Inside the container there is ssh, not sbroker: `ssh login-node @project sbroker extend`
    is answered by the login path itself (never run in the session), as the SSH user."""
    job = live_job(ALICE, "gpujob")
    keydir = f"/home/{ALICE}/.ssh/test-extend"
    authorized = f"/home/{ALICE}/.ssh/authorized_keys"
    before = open(authorized).read()
    subprocess.run(tb.as_user(ALICE, "sh", "-c", f'mkdir -p {keydir} && ssh-keygen -q -t ed25519 -N "" -f {keydir}/id'
                              f" && cat {keydir}/id.pub >> {authorized}"), check=True, timeout=30)
    try:
        inner = (f"ssh -i {keydir}/id -p {tb.SSH_PORT} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
                 f" -o BatchMode=yes -o LogLevel=ERROR {ALICE}@{tb.SSH_HOST} @gpujob sbroker extend;"
                 ' echo "in=${APPTAINER_CONTAINER:+container}"')
        r = ssh(ALICE, "@gpujob", inner)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        assert lines[-1] == "in=container"
        assert re.fullmatch(rf"gpujob \(job {job}\): time limit (\d+:\d\d:\d\d) -> (\d+:\d\d:\d\d)"
                            r" \(at most 3:00:00 here\)", lines[0]), lines
        assert time_limit(job) == "0" + lines[0].split(" -> ")[1].split()[0]
    finally:
        with open(authorized, "w") as fh:
            fh.write(before)
        subprocess.run(["rm", "-rf", "--", keydir], check=True)


def test_the_ssh_endpoint_starts_the_session_with_the_profile_its_entry_names(broker, tmp_path):
    """`ssh login @proj:gpu sbroker ssh-config` prints a ProxyCommand that keeps `:gpu`; the
    first connection through it makes the session with that profile."""
    printed = ssh(ALICE, "@sshgpu:gpu", "sbroker", "ssh-config", "--login", "cluster.test")
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout.decode()
    assert f"ProxyCommand ssh -T -l {ALICE} cluster.test @sshgpu:gpu sbroker ssh-proxy" in text
    known = re.search(r"^#    (sbroker\.sbalice\.cluster\.test ssh-ed25519 \S+)$", text, re.M)
    assert known, text
    (tmp_path / "known_hosts").write_text(known.group(1) + "\n")
    identity = [o for o in tb.SSH_OPTS if o.startswith("IdentityFile=")][0].split("=", 1)[1]
    proxy = " ".join(["ssh", "-T", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}", "@sshgpu:gpu", "sbroker", "ssh-proxy"])
    (tmp_path / "config").write_text(
        f"Host s\n    User {ALICE}\n    ProxyCommand {proxy}\n    HostKeyAlias sbroker.sbalice.cluster.test\n"
        f"    UserKnownHostsFile {tmp_path / 'known_hosts'}\n    StrictHostKeyChecking yes\n"
        f"    IdentityFile {identity}\n    IdentitiesOnly yes\n    BatchMode yes\n    LogLevel ERROR\n")
    r = subprocess.run(["ssh", "-F", str(tmp_path / "config"), "s", 'echo "$SLURM_JOB_ID"'], capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    session = sbroker_json(ALICE, "show", "sshgpu")
    assert (session["profile"], session["job_id"]) == ("gpu", r.stdout.strip())
    assert "gres:gpu:1" in scontrol_job(session["job_id"])
