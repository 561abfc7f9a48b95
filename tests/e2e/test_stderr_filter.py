"""``broker.srunexec.StderrFilter``: only srun's own exit report is dropped from stderr."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.srunexec import StderrFilter

REPORT = b"srun: error: vm: task 0: Exited with exit code 3\n"


def run(chunks: list[bytes]) -> bytes:
    f = StderrFilter()
    out = b"".join(f.feed(c) for c in chunks)
    return out + f.flush()


@pytest.mark.parametrize("chunks, expected", [
    ([REPORT], b""),
    ([b"oops\n" + REPORT], b"oops\n"),
    ([b"oops", REPORT], b"oops"),                      # separate write: still srun's
    ([b"srun: err", b"or: vm: task 0: Exited with exit code 3\n"], b""),
    ([b"srun: error: vm: tasks 0-3: Exited with exit code 1\n"], b""),
    ([b"srun: error: node1: task 0: Exited with exit code 1\r\n"], b""),  # --pty: the terminal is raw
    ([b"srun: error: Unable to create step for job 7: Invalid job id specified\n"],
     b"srun: error: Unable to create step for job 7: Invalid job id specified\n"),
    ([b"x " + REPORT], b"x " + REPORT),                 # mid-line: the user's text
    ([REPORT[:-1]], REPORT[:-1]),                       # no newline: not srun's line
    ([b"srun", b"fish\n"], b"srunfish\n"),
])
def test_filter(chunks, expected):
    assert run(chunks) == expected


def test_partial_prefix_is_held_only_until_flush():
    f = StderrFilter()
    assert f.feed(b"srun: e") == b""
    assert f.flush() == b"srun: e"
    assert f.feed(b"plain text") == b"plain text"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=1, max_value=512), max_size=20))
def test_arbitrary_bytes_pass_unchanged(data, cuts):
    if b"Exited with exit code" in data:
        return
    chunks, pos = [], 0
    for n in cuts:
        chunks.append(data[pos:pos + n])
        pos += n
    chunks.append(data[pos:])
    assert run(chunks) == data


def test_random_binary_with_report_removed():
    data = os.urandom(100_000).replace(b"\n", b"")
    assert run([data[:5000], b"\n", REPORT, data[5000:]]) == data[:5000] + b"\n" + data[5000:]
