"""Pure SLURM parsers and builders."""

from __future__ import annotations

import pytest

from broker.slurm import commands
from broker.slurm.parse import (classify_stderr, format_comment, parse_comment, parse_duration,
                                parse_poll, parse_sbatch, parse_squeue_json, poll_format)

TOKEN = "0123456789abcdef"


def line(*fields: str) -> str:
    return "|".join((TOKEN, *fields, TOKEN))


def test_parse_poll_reads_framed_records_of_asked_jobs_only():
    text = "\n".join([
        line("12", "RUNNING", "None", "node1", "2026-11-29T10:00:00", "1:59:59", "1001", "alice"),
        line("13", "PENDING", "Resources", "", "N/A", "2:00:00", "1002", "bob"),
        line("14", "RUNNING", "None", "node2", "N/A", "1:00", "1003", "carol"),   # not asked
        "12|COMPLETED|None|node1|N/A|0:00|1001|alice",                            # no token
        line("12", "COMPLETED", "None") + "|extra",                               # wrong count
        "", " garbage line"])
    jobs = parse_poll(text, TOKEN, {"12", "13"})
    assert set(jobs) == {"12", "13"}
    assert jobs["12"].state == "RUNNING" and jobs["12"].uid == 1001 and jobs["12"].nodes == "node1"
    assert jobs["13"].reason == "Resources" and jobs["13"].comment == ""


def test_parse_poll_drops_a_job_id_seen_twice():
    text = "\n".join([line("12", "RUNNING", "None", "n", "N/A", "1:00", "1001", "alice"),
                      line("12", "COMPLETED", "None", "n", "N/A", "0:00", "1001", "alice")])
    assert parse_poll(text, TOKEN, {"12"}) == {}


def test_poll_format_has_no_user_text_and_refuses_odd_tokens():
    fmt = poll_format(TOKEN)
    assert fmt.startswith(TOKEN + "|") and fmt.endswith("|" + TOKEN)
    assert "%j" not in fmt and "%k" not in fmt and "%U" in fmt
    with pytest.raises(ValueError):
        poll_format("x|%k")


def test_parse_squeue_json_keeps_fields_whole_and_owner_numeric():
    import json
    text = json.dumps({"jobs": [
        {"job_id": 12, "user_id": 1001, "user_name": "alice", "job_state": "RUNNING", "state_reason": "None",
         "nodes": "node1", "start_time": 0, "name": "x\u2028y", "comment": "a|b\n13|COMPLETED"},
        {"job_id": "13", "user_id": 1002},   # not an int: ignored
        {"job_id": 14, "user_id": True},     # a bool is not a uid
    ]})
    jobs = parse_squeue_json(text)
    assert set(jobs) == {"12"}
    assert jobs["12"].comment == "a|b\n13|COMPLETED" and jobs["12"].uid == 1001 and jobs["12"].active
    with pytest.raises(ValueError):
        parse_squeue_json("[]")


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
    argv = commands.squeue_jobs(["10", "9", "10", "100"], TOKEN)
    assert argv[-1] == "--jobs=9,10,100"
    assert argv.count("--noheader") == 1
    with pytest.raises(ValueError, match="job_id"):
        commands.squeue_jobs(["1;rm"], TOKEN)
    assert commands.scancel("7") == ["scancel", "7"]
    with pytest.raises(ValueError):
        commands.scancel("7 8")
