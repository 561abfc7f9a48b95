"""Image switch under 100 concurrent readers: ``current.sif`` is never missing or partial.

The switcher is the toolkit's own ``switch_version`` (symlink under a unique temporary
name + rename over ``current.sif``). 100 readers (4 processes x 25 threads) resolve the
link the way the broker does (``images.resolve``) and also open ``current.sif``
directly, read the whole file and check it is one complete version (header, size and
trailer). No cluster needed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

from broker import images
from broker.container.apptainer._versioning import CURRENT_LINK, get_active_version, switch_version

VERSIONS = [f"1.{i}" for i in range(6)]
SIZE = 64 * 1024
PROCESSES, THREADS = 4, 25
FLIPS = 3000


def content(version: str) -> bytes:
    head = f"SIF {version}\n".encode()
    tail = f"\nEND {version}\n".encode()
    return head + bytes([ord(version[-1])]) * (SIZE - len(head) - len(tail)) + tail


def check(data: bytes) -> str | None:
    for version in VERSIONS:
        if data.startswith(f"SIF {version}\n".encode()):
            return None if data == content(version) else f"partial or mixed content of {version}"
    return f"unknown content {data[:20]!r}"


def reader_process(directory: str, stop, out, reading) -> None:
    errors: list[str] = []
    reads = [0]
    link = Path(directory) / CURRENT_LINK

    def loop() -> None:
        n = 0
        while not stop.is_set():
            try:
                real = images.resolve(link)
                with open(real, "rb") as fh:
                    problem = check(fh.read())
                with open(link, "rb") as fh:
                    problem = problem or check(fh.read())
                if not real.name.startswith("scitex-v"):
                    problem = f"resolved to {real.name}"
            except OSError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            if problem:
                errors.append(problem)
            if n == 0:
                reading.release()   # this reader has read once: it runs
            n += 1
        reads[0] += n

    threads = [threading.Thread(target=loop) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((reads[0], errors[:20], len(errors)))


def test_no_reader_sees_a_missing_or_partial_current(tmp_path):
    for version in VERSIONS:
        (tmp_path / f"scitex-v{version}.sif").write_bytes(content(version))
    switch_version(VERSIONS[0], tmp_path)
    ctx = mp.get_context("fork")
    stop, out, reading = ctx.Event(), ctx.Queue(), ctx.Semaphore(0)
    procs = [ctx.Process(target=reader_process, args=(str(tmp_path), stop, out, reading), daemon=True)
             for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    for _ in range(PROCESSES * THREADS):   # all 100 readers running before the first flip
        assert reading.acquire(timeout=30), "a reader did not start within 30 s"
    started = time.monotonic()
    try:
        for i in range(FLIPS):
            switch_version(VERSIONS[(i + 1) % len(VERSIONS)], tmp_path)
            if i % 50 == 0:
                time.sleep(0.001)  # let readers interleave with flips
    finally:
        flip_seconds = time.monotonic() - started
        stop.set()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    reads = sum(r[0] for r in results)
    errors = [e for r in results for e in r[1]]
    assert sum(r[2] for r in results) == 0, errors
    assert reads > 1000, f"only {reads} reads during {flip_seconds:.2f}s of flips"
    # nothing left behind: only the versions and the link
    assert sorted(os.listdir(tmp_path)) == sorted([CURRENT_LINK, *(f"scitex-v{v}.sif" for v in VERSIONS)])
    assert get_active_version(tmp_path) == VERSIONS[FLIPS % len(VERSIONS)]
