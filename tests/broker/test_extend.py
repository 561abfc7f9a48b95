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


def test_a_busy_partition_counts_jobs_waiting_for_it_not_for_themselves():
    from broker import queue

    def pending(job_id: str, reason: str, partition: str = "compute", priority: int = 10) -> JobInfo:
        return JobInfo(job_id, "PENDING", reason, "", "", "", "bob", "", "", 1002, partition, 60, priority)

    jobs = {"1": pending("1", "Resources"), "2": pending("2", "Priority", "compute,gpu"),
            "3": pending("3", "Dependency", priority=99), "4": pending("4", "JobHeldUser", priority=99),
            "5": pending("5", "Resources", "gpu", priority=50), "6": job(60, "compute", "RUNNING", "6"),
            "7": pending("7", "Resources", "other", priority=99)}
    assert queue.waiting(jobs, "compute") == 2
    # 1 (same priority, earlier) and 5 (higher, in gpu); the held 3 and 4 and the other partition's 7 are not
    assert queue.ahead(jobs, "2") == 2
    assert queue.ahead(jobs, "6") is None


def test_forecast_start_and_soon():
    import time

    from broker import queue

    line = "sbatch: Job 3320 to start at 2026-12-03T07:10:00 using 1 processors on nodes node1 in partition node1\n"
    assert queue.forecast_start(line) == "2026-12-03T07:10:00"
    assert queue.forecast_start("sbatch: error: Batch job submission failed\n") == ""
    now = time.time()
    assert queue.soon(time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now + 30)), now)
    assert not queue.soon(time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now + 600)), now)
    assert not queue.soon("", now)
