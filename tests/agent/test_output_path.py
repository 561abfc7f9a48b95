"""The session agent's output path in pieces: scrollback kept as chunks, output frames, and the
attach client's frame splitting and vectored writes (broker/agent/sessionagent.py).

The agent as a process is tested in test_sessionagent.py; these pin the exact bytes of the
pieces that carry a flood, where a slip would lose or repeat output.
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "broker" / "agent" / "sessionagent.py"


@pytest.fixture(scope="module")
def agent():
    spec = importlib.util.spec_from_file_location("sessionagent_under_test", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._serve_imports()  # Shell uses asyncio, as under ``serve``
    return module


@pytest.mark.parametrize("limit", [0, 1, 100, 4096, 65536])
def test_scrollback_is_the_last_limit_bytes_and_bounded(agent, limit):
    shell = agent.Shell(1, 0, -1, limit)
    rng = random.Random(limit)
    everything = bytearray()
    for _ in range(300):
        chunk = rng.randbytes(rng.choice([1, 7, 4095, 4096, 20000]))
        shell.record(chunk)
        everything += chunk
        assert shell.recent() == (bytes(everything[-limit:]) if limit else b"")
        # memory: the limit plus at most one chunk (the oldest kept is only partly replayed)
        assert shell.scrollback_size == sum(len(c) for c in shell.scrollback)
        assert shell.scrollback_size < limit + 20000 or not limit


def test_output_frames_are_at_most_max_data_and_carry_every_byte(agent):
    data = os.urandom(3 * agent.MAX_DATA + 123)
    frames, rest = agent._split_frames(agent.encode_output(data))
    assert rest == b""
    assert [len(p) for _, p in frames] == [agent.MAX_DATA] * 3 + [123]
    assert {k for k, _ in frames} == {agent.KIND_OUTPUT}
    assert b"".join(bytes(p) for _, p in frames) == data
    assert agent.encode_output(b"x") == agent.encode(agent.KIND_OUTPUT, b"x")


def test_split_frames_keeps_a_partial_frame_for_the_next_read(agent):
    stream = (agent.encode_output(b"a" * 10) + agent.encode_json({"type": "exit", "status": 3})
              + agent.encode_output(b"b" * 70000))
    got: list[tuple[bytes, bytes]] = []
    rest = b""
    for cut in range(0, len(stream), 997):  # reads that end anywhere, headers split too
        frames, rest = agent._split_frames(rest + stream[cut:cut + 997])
        got += [(k, bytes(p)) for k, p in frames]
    assert rest == b""
    assert got[0] == (agent.KIND_OUTPUT, b"a" * 10)
    assert got[1][0] == agent.KIND_JSON
    assert b"".join(p for k, p in got[2:]) == b"b" * 70000


def test_write_views_finishes_a_partial_vectored_write(agent, monkeypatch):
    r, w = os.pipe()
    try:
        views = [memoryview(b"first-"), memoryview(b"second-"), memoryview(b"third")]
        real_writev = os.writev
        monkeypatch.setattr(agent.os, "writev", lambda fd, bufs: real_writev(fd, [bytes(bufs[0])[:4]]))
        agent._write_views(w, views)
        assert os.read(r, 100) == b"first-second-third"
    finally:
        os.close(r)
        os.close(w)
