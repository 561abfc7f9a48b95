"""Pure SLURM parsers and builders."""

from __future__ import annotations

import pytest

from broker.slurm import commands
from broker.slurm.parse import (classify_stderr, format_comment, parse_comment, parse_duration,
                                parse_sbatch, parse_squeue)


def test_parse_squeue_keeps_separator_in_comment():
    text = ("12|RUNNING|None|vm|2026-11-29T10:00:00|1:59:59|alice|sb-a|sbroker/v1 user=alice\n"
            "13|PENDING|Resources||N/A|2:00:00|bob|x|free|text|with|bars\n\n garbage line\n")
    jobs = parse_squeue(text)
    assert set(jobs) == {"12", "13"}
    assert jobs["12"].nodes == "vm" and jobs["12"].active
    assert jobs["13"].reason == "Resources"
    assert jobs["13"].comment == "free|text|with|bars"


@pytest.mark.parametrize("text, job", [("42\n", "42"), ("42;cluster\n", "42")])
def test_parse_sbatch(text, job):
    assert parse_sbatch(text) == job


@pytest.mark.parametrize("text", ["", "Submitted batch job\n", "abc;x"])
def test_parse_sbatch_refuses_garbage(text):
    with pytest.raises(ValueError):
        parse_sbatch(text)


@pytest.mark.parametrize("stderr, kind", [
    ("squeue: error: slurm_load_jobs error: Unable to contact slurm controller (connect failure)", "controller"),
    ("slurm_load_jobs error: Socket timed out on send/recv operation", "controller"),
    ("slurm_load_jobs error: Invalid job id specified", "not_found"),
    ("scancel: error: Kill job error on job id 9: Invalid job id specified", "not_found"),
    ("sbatch: error: Batch job submission failed: Invalid partition name specified", "failed"),
    ("", "failed"),
])
def test_classify_stderr(stderr, kind):
    assert classify_stderr(stderr) == kind


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("3:04", 184),
                                           ("UNLIMITED", None), ("INVALID", None)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_comment_roundtrip_and_refusal():
    comment = format_comment({"user": "alice", "project": "p1", "instance": "sb-alice-p1-abc", "digest": "0f"})
    assert parse_comment(comment) == {"user": "alice", "project": "p1", "instance": "sb-alice-p1-abc",
                                      "digest": "0f"}
    assert parse_comment("someone else's comment") == {}
    with pytest.raises(ValueError):
        format_comment({"user": "a b"})


def test_squeue_is_one_call_for_many_jobs():
    argv = commands.squeue_jobs(["10", "9", "10", "100"])
    assert argv[-1] == "--jobs=9,10,100"
    assert argv.count("--noheader") == 1
    with pytest.raises(ValueError, match="job_id"):
        commands.squeue_jobs(["1;rm"])
    assert commands.scancel("7") == ["scancel", "7"]
    with pytest.raises(ValueError):
        commands.scancel("7 8")
