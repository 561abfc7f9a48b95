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
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.cluster import harness
from tests.integration.conftest import jobs_of, sbroker, sbroker_json
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


#: A one-shot server on a unix socket in the container's own /tmp (the instance's, private:
#: the login node has no such path), started in the background; prints when it listens.
UNIX_SERVER = r"""
rm -f /tmp/sbroker-e2e.sock
setsid nohup python3 -c '
import socket
s = socket.socket(socket.AF_UNIX)
s.bind("/tmp/sbroker-e2e.sock")
s.listen(1)
c, _ = s.accept()
c.sendall(b"inside-the-container\n")
c.close()
' > /dev/null 2>&1 < /dev/null &
for i in $(seq 1 100); do [ -S /tmp/sbroker-e2e.sock ] && break; sleep 0.1; done
test -S /tmp/sbroker-e2e.sock && echo listening
"""


def test_stream_local_forwarding_ends_inside_the_container(client, tmp_path):
    started = endpoint(client, ALIAS, UNIX_SERVER)
    assert started.stdout == b"listening\n", started.stderr
    assert not Path("/tmp/sbroker-e2e.sock").exists()  # the container's /tmp, not this machine's
    local = tmp_path / "forwarded.sock"
    forward = subprocess.Popen(["ssh", "-F", str(client), "-N", "-o", "ExitOnForwardFailure=yes",
                                "-L", f"{local}:/tmp/sbroker-e2e.sock", ALIAS],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(local.exists, 60, "the stream-local forward to listen")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(local))
            assert s.makefile("rb").read() == b"inside-the-container\n"
    finally:
        forward.terminate()
        forward.wait(timeout=30)


def test_remote_and_dynamic_forwarding_work_through_the_endpoint(client):
    # -R: a connection made inside the session reaches a listener on this machine.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"from-the-client\n")

        threading.Thread(target=answer, daemon=True).start()
        remote = _free_port()
        r = endpoint(client, "-o", "ExitOnForwardFailure=yes", "-R",
                     f"127.0.0.1:{remote}:127.0.0.1:{listener.getsockname()[1]}", ALIAS,
                     f"python3 -c 'import socket; print(socket.create_connection((\"127.0.0.1\", {remote})).makefile().read(), end=\"\")'")
    assert (r.returncode, r.stdout) == (0, b"from-the-client\n"), r.stderr
    # -D: SOCKS through the endpoint to the editor's server of the test above.
    port = endpoint(client, ALIAS, 'cat "$HOME/.sbroker-e2e-editor/port"').stdout.decode().strip()
    assert port.isdigit()
    socks = _free_port()
    proxy = subprocess.Popen(["ssh", "-F", str(client), "-N", "-o", "ExitOnForwardFailure=yes", "-D",
                              f"127.0.0.1:{socks}", ALIAS], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        def fetched() -> bytes | None:
            out = subprocess.run(["curl", "-sf", "--max-time", "5", "--socks5-hostname", f"127.0.0.1:{socks}",
                                  f"http://127.0.0.1:{port}/index.txt"], capture_output=True, timeout=30)
            return out.stdout if out.returncode == 0 else None

        assert wait_for(fetched, 60, "curl through the -D proxy") == b"served-by-the-session\n"
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def test_a_new_session_keeps_the_host_key_and_the_old_ones_servers_are_gone(client):
    """Last in this module: it ends the session. What the client started in the background
    ended with it; the next connection starts a new session, and the pinned host key still
    matches (the key is the user's, not the session's)."""
    session = [s for s in sbroker_json(ALICE, "ls", "--json") if s["project"] == "default"][0]
    node = sbroker_json(ALICE, "show", session["id"])["node"]
    assert any("sbroker-e2e-editor" in p for p in _node_processes(node)), "the editor's server is not running"
    sbroker(ALICE, "kill", session["id"])
    wait_for(lambda: not [j for j in jobs_of(ALICE) if j["job_id"] == session["job_id"]], 60,
             "the session's job to leave squeue")
    wait_for(lambda: not any("sbroker-e2e-editor" in p for p in _node_processes(node)), 30,
             "the editor's server to end with the session")
    r = endpoint(client, ALIAS, 'echo "$SLURM_JOB_ID"', timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() not in ("", session["job_id"])


def _node_processes(node: str) -> list[str]:
    out = subprocess.run(harness.on_node(node, "ps", "-ww", "-u", ALICE, "-o", "pid=,args="), capture_output=True,
                         text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


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
