"""Fixtures for operations tests on the real test bed: a broker with per-module overrides,
metrics scrapes over the unix socket, attached terminals under pexpect, audit reads."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tests.integration.daemon as d
from tests.cluster import config as tb
from tests.integration.daemon import SOCKET, STATE_DIR, BrokerProcess, reset_state
from tests.waiting import wait_for  # noqa: F401  (the ops tests import it from here)

METRICS_SOCKET = Path("/run/sbroker-test/metrics.sock")


class OpsBroker(BrokerProcess):
    """A test broker whose config may also carry sections the base helper does not know (``[reaper]``)."""

    def __init__(self, extra: str = "", **overrides: object) -> None:
        super().__init__(**overrides)
        self.extra = extra

    def start(self, timeout: float = 20.0) -> None:
        real = d.config_text
        d.config_text = lambda **o: real(**o) + self.extra
        try:
            super().start(timeout)
        finally:
            d.config_text = real


@pytest.fixture(scope="module")
def start_broker(cluster) -> Iterator[Callable[..., OpsBroker]]:
    """``start_broker(extra_toml, **overrides)``: a fresh daemon (empty state, no jobs), stopped at the end."""
    started: list[OpsBroker] = []

    def start(extra: str = "[reaper]\ninterval = 0\n", **overrides: object) -> OpsBroker:
        reset_state()
        overrides.setdefault("broker_metrics_socket", str(METRICS_SOCKET))
        proc = OpsBroker(extra, **overrides)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    reset_state()


def scrape(path: Path = METRICS_SOCKET, request: bytes = b"GET /metrics HTTP/1.0\r\n\r\n") -> tuple[bytes, bytes]:
    """(status line, body) of one HTTP request over the metrics unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def metric_samples() -> dict[tuple[str, tuple], float]:
    """Every sample of a real scrape, parsed by prometheus-client's text parser."""
    status, body = scrape()
    assert status.startswith(b"HTTP/1.1 200"), status
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def audit_entries(path: Path = STATE_DIR / "audit.jsonl") -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def attach(user: str, session_id: str) -> pexpect.spawn:
    """``sbroker attach`` as ``user`` in a real pty; returns once the shell answered.

    ``child.logfile_read`` keeps everything the terminal showed since the start
    (``child.logfile_read.getvalue()``), for tests about what was shown exactly once.
    """
    child = pexpect.spawn("runuser", ["-u", user, "--", "env", f"SBROKER_SOCKET={SOCKET}", "TERM=xterm",
                                      str(tb.SBROKER_BIN), "attach", session_id],
                          timeout=30, cwd="/", dimensions=(40, 120))
    child.logfile_read = io.BytesIO()
    child.sendline("echo at''tached-$((6*7))")
    child.expect("attached-42")
    return child


def instances_of(user: str) -> list[str]:
    """What apptainer (or the stand-in) itself lists for ``user`` on every compute node (not what
    the broker says; each node's list is its own)."""
    from tests.fault.conftest import instances_of as on_nodes

    return sorted(on_nodes(user))