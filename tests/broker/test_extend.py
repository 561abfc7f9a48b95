"""``sbroker extend``'s pure parts: the policy decision, the root command, the agent's word."""

from __future__ import annotations

import pytest

from broker.agentlaunch import walltime_argv
from broker.extend import decide, waiting_in
from broker.slurm.commands import scontrol_time_limit
from broker.slurm.parse import JobInfo, parse_squeue_json


def job(limit: int, partition: str = "compute", state: str = "RUNNING", job_id: str = "7") -> JobInfo:
    return JobInfo(job_id, state, "None", "node1", "", "1:10:00", "alice", "", "", 1001, partition, limit)


def test_a_step_within_the_maximum():
    assert decide(job(120), 30, 180, 0, False) == (150, "")


def test_a_step_past_the_maximum_stops_at_it():
    assert decide(job(170), 30, 180, 0, False) == (180, "")


def test_at_the_maximum_it_is_refused_with_the_limit_and_what_is_left():
    assert decide(job(180), 30, 180, 0, False) == (
        0, "extend: job 7 already has the longest time limit allowed here, 3:00:00 ([extend] max_total);"
           " time left: 1:10:00")


def test_only_if_idle_partition():
    assert decide(job(120), 30, 180, 2, True) == (
        0, "extend: 2 job(s) wait for partition compute; extensions are only granted while nobody waits there"
           " ([extend] only_if_idle_partition)")
    assert decide(job(120), 30, 180, 2, False) == (150, "")


def test_no_limit_is_not_raised():
    assert decide(job(-1), 30, 180, 0, False)[0] == 0


def test_waiting_counts_pending_jobs_of_any_of_the_partitions():
    jobs = {"1": job(60, "compute,gpu", "PENDING", "1"), "2": job(60, "gpu", "PENDING", "2"),
            "3": job(60, "compute", "RUNNING", "3"), "4": job(60, "other", "PENDING", "4")}
    assert waiting_in(jobs, "compute") == 1
    assert waiting_in(jobs, "gpu") == 2


def test_the_root_command_takes_digits_and_minutes_only():
    assert scontrol_time_limit("42", 150) == ["scontrol", "update", "JobId=42", "TimeLimit=150"]
    for bad in (("4 2", 10), ("42", 0), ("42", True), ("42;id", 5), ("42", "10")):
        with pytest.raises(ValueError):
            scontrol_time_limit(*bad)


def test_the_agent_is_told_through_srun_into_the_job():
    assert walltime_argv("42", "/tmp/sbroker-agent.X", "/usr/bin/python3") == [
        "srun", "--overlap", "--quiet", "--jobid=42", "--ntasks=1", "/usr/bin/python3", "-I", "-S",
        "/tmp/sbroker-agent.X/agent.py", "walltime"]
    with pytest.raises(ValueError):
        walltime_argv("42", "relative", "/usr/bin/python3")


def test_squeue_json_gives_partition_limit_and_priority():
    text = ('{"jobs": [{"job_id": 5, "user_id": 1001, "job_state": "RUNNING", "partition": "gpu",'
            ' "time_limit": 120, "priority": 77}, {"job_id": 6, "user_id": 1001, "time_limit": true}]}')
    jobs = parse_squeue_json(text)
    assert (jobs["5"].partition, jobs["5"].time_limit, jobs["5"].priority) == ("gpu", 120, 77)
    assert (jobs["6"].partition, jobs["6"].time_limit) == ("", -1)
