"""Shared pieces: statistics, the test-bed lock, a pty driver, result rows."""

from __future__ import annotations

import hashlib

import fcntl
import os
import re
import select
import signal
import statistics
import struct
import subprocess
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK_PATH = Path("/run/sbroker-testbed-tests.lock")


# ------------------------------------------------------------------ statistics

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with small n it is an observed value)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": float("nan"), "p95": float("nan"), "n": 0}
    return {"median": statistics.median(values), "p95": pct(values, 95), "n": len(values),
            "min": min(values), "max": max(values)}


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    metric: str
    unit: str
    a: list[float]                    # sbroker samples
    b: list[float] | None = None      # raw SLURM samples (same run, interleaved)
    goal: str = ""
    met: bool | None = None
    ratio: float | None = None        # how the goal is stated: a/b of medians, or a difference
    ratio_label: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    runtime: str = ""                 # the container runtime the row's shells ran in ("" = none ran)

    def to_json(self) -> dict[str, Any]:
        return {"bench": self.bench, "metric": self.metric, "unit": self.unit,
                "sbroker": summary(self.a), "raw": summary(self.b) if self.b is not None else None,
                "ratio": self.ratio, "ratio_label": self.ratio_label, "goal": self.goal, "met": self.met,
                "note": self.note, "runtime": self.runtime, "samples": {"sbroker": self.a, "raw": self.b}, "extra": self.extra}


def time_ratio(a: list[float], b: list[float], limit: float) -> tuple[float, bool]:
    """Median a / median b, and whether it is at most ``limit`` (lower is better)."""
    r = statistics.median(a) / statistics.median(b)
    return r, r <= limit


# ------------------------------------------------------------------ the test bed lock

class TestbedLock:
    """The machine-wide lock pytest's ``cluster`` fixture takes (tests/conftest.py)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.fh = None

    def __enter__(self) -> TestbedLock:
        self.fh = open(LOCK_PATH, "w")
        deadline = time.monotonic() + self.wait
        said = False
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.fh.close()
                    raise SystemExit(f"benchmarks: {LOCK_PATH} held by another run for over {self.wait:g}s")
                if not said:
                    log(f"waiting for {LOCK_PATH} (a test run holds the test bed), up to {self.wait:g}s")
                    said = True
                time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        if self.fh:
            self.fh.close()


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------ a pty driver

def _ctty() -> None:
    # Popen has already called setsid(); make the pty slave (fd 0) our controlling tty.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Timeout(Exception):
    pass


class PtyProc:
    """A process on a fresh pty we own, read with select (what a terminal emulator does)."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 rows: int = 24, cols: int = 80) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     start_new_session=True, preexec_fn=_ctty, close_fds=True)
        os.close(slave)
        self.buf = bytearray()
        self.pos = 0          # expect() searches from here
        self.eof = False

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not r:
            return False
        try:
            data = os.read(self.master, 1 << 16)
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float) -> float:
        """Wait for ``pattern`` in new output; return the monotonic time it was read."""
        rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return time.monotonic()
            if self.eof:
                raise Timeout(f"EOF before {rx.pattern!r}; output tail: {bytes(self.buf[-400:])!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"no {rx.pattern!r} within {timeout:g}s; output tail: {bytes(self.buf[-400:])!r}")
            self._read(left)

    def mark(self) -> None:
        """Forget output read so far (the next expect only looks at newer output)."""
        del self.buf[:]
        self.pos = 0

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def drain(self, quiet: float = 0.2, limit: float = 5.0) -> None:
        """Read until the output has been quiet for ``quiet`` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not self.eof:
            if not self._read(quiet):
                return

    def close(self, exit_bytes: bytes = b"exit\r", timeout: float = 15.0) -> int | None:
        """Ask the shell to exit, wait for EOF and the process; kill our process group if it hangs."""
        try:
            if exit_bytes and not self.eof:
                self.send(exit_bytes)
            deadline = time.monotonic() + timeout
            while not self.eof and time.monotonic() < deadline:
                self._read(deadline - time.monotonic())
                if len(self.buf) > 1 << 20:
                    self.mark()
            try:
                return self.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
                return None
        finally:
            try:
                os.close(self.master)
            except OSError:
                pass


def prompt_re(user: str) -> re.Pattern[bytes]:
    """The user's real bash prompt in the container (``user@host:dir$ ``, as ~/.bashrc sets it)."""
    return re.compile(re.escape(user.encode()) + rb"@[^\r\n\x07]*?\$ ")


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 4 MiB pieces (integrity checks after transfers, untimed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()
