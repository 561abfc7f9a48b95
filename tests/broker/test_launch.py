"""The immediate launch mode's pure builders (broker.launch) and its job spec."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from broker import config, jobspec, launch, profiles
from broker.identity import User

USER = User(name="alice", uid=1001, gid=1001, home="/home/alice", shell="/bin/bash", groups=(1001,))


def _config(**slurm: object) -> config.Config:
    text = "[container]\nimage = \"/img/base.sif\"\n[slurm]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                                                         for k, v in slurm.items())
    return config.parse(tomllib.loads(text))


def test_launch_and_holder_are_checked_choices_with_batch_and_auto_by_default():
    cfg = _config()
    assert (cfg.launch, cfg.holder) == ("batch", "auto")
    assert _config(launch="immediate", holder="setsid").launch == "immediate"
    with pytest.raises(config.ConfigError, match="slurm.launch: must be one of batch, immediate"):
        _config(launch="interactive")
    with pytest.raises(config.ConfigError, match="slurm.holder: must be one of auto, setsid, systemd-run"):
        _config(holder="nohup")


def test_the_spec_carries_an_salloc_sized_and_tagged_like_the_batch_job_without_singleton():
    cfg = _config(launch="immediate")
    spec = jobspec.build(cfg, USER, "proj", "/img/base.sif", "sha256:" + "ab" * 32, token="abc123")
    argv = spec.salloc_argv
    assert argv[:3] == ["salloc", "--no-shell", "--immediate"]
    assert not [a for a in argv if a.startswith("--dependency")]  # SLURM refuses it with --immediate
    for flag in ("--partition=", "--time=", "--cpus-per-task=", "--mem=", "--job-name="):
        assert [a for a in argv if a.startswith(flag)] == [a for a in spec.sbatch_argv if a.startswith(flag)]
    [comment] = [a for a in argv if a.startswith("--comment=")]
    assert comment.endswith(" launch=immediate") and "instance=sb-alice-proj-abc123" in comment
    assert "--chdir=/home/alice" in argv


def test_profile_options_reach_salloc():
    profile = profiles.Profile(name="gpu", partition="gpu", time_limit="1:00:00", cpus=2, memory_gb=4,
                               image="/img/base.sif", gres="gpu:1", account="acct", qos="high", constraint="a100")
    argv = launch.salloc_argv(job_name="sbroker-session-p", partition="gpu", time_limit="1:00:00", cpus=2,
                              memory_gb=4, profile=profile, comment="sbroker/v1 user=alice", home="/home/alice")
    assert {"--gres=gpu:1", "--account=acct", "--qos=high", "--constraint=a100"} <= set(argv)


@pytest.mark.parametrize("stderr, job", [
    ("salloc: Granted job allocation 6320\n", "6320"),
    ("salloc: Pending job allocation 7\nsalloc: job 7 queued and waiting for resources\n"
     "salloc: job 7 has been allocated resources\nsalloc: Granted job allocation 7\n", "7"),
])
def test_the_job_id_comes_from_salloc_s_granted_line(stderr, job):
    assert launch.parse_salloc(stderr) == job


@pytest.mark.parametrize("stderr", ["", "salloc: error: Job submit/allocate failed: Job dependency problem",
                                    "salloc: Granted job allocation 12; rm -rf /", "Granted job allocation x1"])
def test_no_granted_line_or_a_forged_id_is_an_error(stderr):
    if "12;" in stderr:  # the id is the digits only, never the rest of the line
        assert launch.parse_salloc(stderr) == "12"
        return
    with pytest.raises(ValueError, match="salloc"):
        launch.parse_salloc(stderr)


def test_the_agent_step_reads_the_script_from_stdin_into_memory_and_runs_it_with_stdin_at_eof():
    argv = launch.step_argv("42", "/home/alice/.sbroker/jobs/x.log")
    assert argv[:9] == ["--overlap", "--jobid=42", "--ntasks=1", "--nodes=1", "--job-name=sbroker-agent",
                        "--output=/home/alice/.sbroker/jobs/x.log", "--open-mode=append", "--quiet", "/bin/bash"]
    # The wrapper, run for real: a command in the script that reads stdin gets nothing of it.
    script = "head -c 100 >/dev/null; echo after-$((1+1))\necho tail-line\n"
    out = subprocess.run(argv[-3:], input=script, capture_output=True, text=True, timeout=10)
    assert out.stdout.splitlines() == ["after-2", "tail-line"], out
    with pytest.raises(ValueError):
        launch.step_argv("42 --uid=0", "/x.log")


def test_holders_setsid_and_systemd_run():
    setsid = launch.holder_argv("setsid", "42", "/j/x.log", uid=1001, gid=1001, stdin_path="/s/x.sh")
    assert setsid[:4] == ["setsid", "--fork", "/bin/sh", "-c"]
    assert 'srun "$@"; exec scancel --quiet "$SBROKER_JOB_ID"' == setsid[4]
    assert setsid[6:8] == ["--overlap", "--jobid=42"]
    unit = launch.holder_argv("systemd-run", "42", "/j/x.log", uid=1001, gid=1001, stdin_path="/s/x.sh")
    assert unit[:5] == ["systemd-run", "--quiet", "--collect", "--unit=sbroker-hold-42", "--uid=1001"]
    assert "--property=StandardInput=file:/s/x.sh" in unit and "--setenv=SBROKER_JOB_ID=42" in unit
    assert unit[unit.index("--") + 1:] == setsid[2:]
    with pytest.raises(ValueError, match="slurm.holder"):
        launch.holder_argv("nohup", "42", "/j/x.log", uid=1, gid=1, stdin_path="/s")
    assert launch.choose_holder("setsid") == "setsid"
    assert launch.choose_holder("auto") in ("setsid", "systemd-run")


def test_only_step_zero_counts_as_the_agent_step():
    lines = ["6320.0", "6320.1", "6321.extern", "6322.1", "junk", "6323.0 ", ""]
    assert launch.steps_with_agent(lines) == {"6320", "6323"}
