"""Full SSH inside the session (issue 18), through the real login sshd with an ordinary client.

The client's config is what ``ssh login sbroker ssh-config`` prints: a ``ProxyCommand`` into
``sbroker login``, which joins it to the image's ``sshd -i`` run by the session agent in the
allocation, and the endpoint's host key pinned under its ``HostKeyAlias`` with strict
checking. Every test goes through that config: port forwarding to a server in the session, a
server outliving the connection that started it, agent forwarding, sftp both ways.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import jobs_of, sbroker_json
from tests.waiting import wait_for

from .conftest import ALICE, ssh

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ALIAS = "session"
#: The editor flow: start a server once in the background, print its port, exit; a second run
#: finds it running and prints the same port (what VS Code's remote server install script does).
EDITOR_SCRIPT = r"""
d=$HOME/.sbroker-e2e-editor; mkdir -p "$d"
if [ -s "$d/port" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then echo "reused $(cat "$d/port")"; exit 0; fi
echo served-by-the-session > "$d/index.txt"
setsid nohup python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$d" > "$d/log" 2>&1 < /dev/null &
echo $! > "$d/pid"
for i in $(seq 1 100); do
  port=$(sed -n 's/.* port \([0-9]*\) .*/\1/p' "$d/log"); [ -n "$port" ] && break; sleep 0.1
done
echo "$port" > "$d/port"; echo "started $port"
"""


@pytest.fixture(scope="module")
def client(broker, tmp_path_factory):
    """A client config and known_hosts as ``sbroker ssh-config`` gives them (strict checking)."""
    r = ssh(ALICE, "sbroker", "ssh-config", "--host", ALIAS, "--login", "cluster.test")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    known = re.search(r"^#    (sbroker\.sbalice\.cluster\.test ssh-ed25519 \S+)$", text, re.M)
    assert known, text
    assert f"ProxyCommand ssh -T -l {ALICE} cluster.test sbroker ssh-proxy" in text
    d = tmp_path_factory.mktemp("sshcfg")
    (d / "known_hosts").write_text(known.group(1) + "\n")
    proxy = shlex.join(["ssh", "-T", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}", "sbroker", "ssh-proxy"])
    identity = [o for o in tb.SSH_OPTS if o.startswith("IdentityFile=")][0].split("=", 1)[1]
    (d / "config").write_text(f"""\
Host {ALIAS}
    HostName cluster.test
    User {ALICE}
    ProxyCommand {proxy}
    HostKeyAlias sbroker.sbalice.cluster.test
    UserKnownHostsFile {d / 'known_hosts'}
    StrictHostKeyChecking yes
    IdentityFile {identity}
    IdentitiesOnly yes
    BatchMode yes
    LogLevel ERROR
""")
    return d / "config"


def endpoint(config: Path, *args: str, input: bytes = b"", timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh", "-F", str(config), *args], input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_the_endpoint_is_sshd_inside_the_container_of_the_users_job(client):
    r = endpoint(client, ALIAS, 'echo "$SLURM_JOB_ID|$(id -un)|$(cat /.standin-build)|$SSH_CONNECTION"')
    assert r.returncode == 0, r.stderr
    job, user, image, connection = r.stdout.decode().strip().split("|")
    assert [j["job_id"] for j in jobs_of(ALICE, states="RUNNING")] == [job]
    assert user == ALICE
    assert image.strip() != ""  # the file exists only in the test image
    assert connection != ""  # an sshd session, not a direct command


def test_a_server_started_over_one_connection_is_forwarded_to_from_the_next(client):
    fresh = endpoint(client, ALIAS, 'd=$HOME/.sbroker-e2e-editor; [ -s "$d/pid" ] && kill "$(cat "$d/pid")"; '
                                    'rm -rf "$d"; echo clean')
    assert fresh.stdout == b"clean\n", fresh.stderr
    first = endpoint(client, ALIAS, EDITOR_SCRIPT)
    assert first.returncode == 0, first.stderr
    word, port = first.stdout.decode().split()[-2:]
    assert word == "started" and port.isdigit(), first.stdout
    # The connection that started it is closed; a second run of the script finds it alive.
    again = endpoint(client, ALIAS, EDITOR_SCRIPT)
    assert again.stdout.decode().split()[-2:] == ["reused", port], again.stderr
    # -L from this machine ends inside the allocation (the server listens on its 127.0.0.1).
    local = _free_port()
    forward = subprocess.Popen(["ssh", "-F", str(client), "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{port}",
                                "-o", "ExitOnForwardFailure=yes", ALIAS], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = wait_for(lambda: _fetch(f"http://127.0.0.1:{local}/index.txt"), 60, "the -L forward to answer")
        assert body == b"served-by-the-session\n"
        # The open connection is activity for idle culling: the session reports it in use.
        session = [s for s in sbroker_json(ALICE, "ls", "--json") if s["project"] == "default"][0]
        wait_for(lambda: sbroker_json(ALICE, "show", session["id"])["commands"] >= 1, 30,
                 "the session to count the open endpoint connection")
    finally:
        forward.terminate()
        forward.wait(timeout=30)


def test_agent_forwarding_reaches_inside_the_container(client):
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True, timeout=30)
    env = dict(re.findall(r"(SSH_AUTH_SOCK|SSH_AGENT_PID)=([^;]+);", agent.stdout))
    try:
        identity = Path([o for o in tb.SSH_OPTS if o.startswith("IdentityFile=")][0].split("=", 1)[1])
        subprocess.run(["ssh-add", str(identity)], env={**os.environ, **env}, check=True, capture_output=True,
                       timeout=30)
        listed = subprocess.run(["ssh-add", "-l"], env={**os.environ, **env}, capture_output=True, text=True,
                                timeout=30).stdout.split()[1]
        r = endpoint(client, "-A", ALIAS, 'test -S "$SSH_AUTH_SOCK" && ssh-add -l', env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split()[1] == listed
    finally:
        subprocess.run(["ssh-agent", "-k"], env={**os.environ, **env}, capture_output=True, timeout=30)


def test_sftp_put_and_get_are_byte_identical(client, tmp_path):
    data = os.urandom(3 << 20)
    src, back = tmp_path / "up.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    batch = f"put {src} .sbroker-e2e-sftp.bin\nget .sbroker-e2e-sftp.bin {back}\nrm .sbroker-e2e-sftp.bin\n"
    r = subprocess.run(["sftp", "-F", str(client), "-b", "-", ALIAS], input=batch.encode(), capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_listener_with_another_host_key_is_refused_by_the_client(client, tmp_path):
    """The pinned key is what defeats a fake endpoint: with another key known, no login."""
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=30)
    known = tmp_path / "known_hosts"
    known.write_text(f"sbroker.sbalice.cluster.test {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    r = endpoint(client, "-o", f"UserKnownHostsFile={known}", "-o", "LogLevel=ERROR", ALIAS, "echo reached")
    assert r.returncode == 255
    assert b"reached" not in r.stdout
    assert b"Host key verification failed." in r.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None
