"""Profiles (issue 16): config parsing, who may use which, and what reaches sbatch/apptainer.

Pure: no SLURM, no daemon. The cluster side is tests/e2e/test_profiles.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import jobspec, profiles
from broker.config import ConfigError, parse
from broker.identity import User
from broker.login import split_profile, split_project
from broker.loginprompt import ask

GOOD = {"container": {"image": "/opt/images/current.sif"}}
TWO = {**GOOD, "profiles": {
    "cpu": {"default": True, "cpus": 2},
    "gpu": {"partition": "gpu", "time_limit": "4:00:00", "gres": "gpu:1", "account": "lab", "qos": "short",
            "constraint": "a100|h100", "container_flags": ["--nv"], "groups": ["gpu-users"],
            "binds": [{"host_path": "/scratch", "container_path": "/scratch", "mode": "rw"}]},
}}
ALICE = User("alice", 1001, 1001, (1001,), "/home/alice", "/bin/bash")


def test_without_profiles_one_default_profile_is_made_of_slurm_and_container():
    cfg = parse({**GOOD, "slurm": {"partition": "interactive", "cpus": 3}})
    assert cfg.default_profile == "default"
    (only,) = cfg.profiles
    assert (only.name, only.partition, only.cpus, only.memory_gb, only.time_limit, only.image) == (
        "default", "interactive", 3, 16, "8:00:00", "/opt/images/current.sif")
    assert profiles.sbatch_flags(only) == [] and profiles.container_flags(only) == []


def test_profiles_inherit_what_they_do_not_set():
    cfg = parse({**TWO, "slurm": {"memory_gb": 8}})
    cpu, gpu = cfg.profile("cpu"), cfg.profile("gpu")
    assert cfg.default_profile == "cpu"
    assert (cpu.partition, cpu.cpus, cpu.memory_gb, cpu.gres) == ("compute", 2, 8, "")
    assert (gpu.partition, gpu.time_limit, gpu.memory_gb, gpu.groups) == ("gpu", "4:00:00", 8, ("gpu-users",))
    assert gpu.gpu and not cpu.gpu


def test_each_bad_profile_field_is_one_line_naming_it():
    with pytest.raises(ConfigError) as err:
        parse({**GOOD, "profiles": {
            "Bad Name": {},
            "a": {"default": True, "gres": "gpu:1;rm -rf", "cpus": 0, "container_flags": ["--bind=/"],
                  "partition": "", "image": "/x/../y", "color": "red"},
            "b": {"default": "yes", "binds": [{"host_path": "rel", "container_path": "/b"}],
                  "groups": ["ok", "no way"], "constraint": "a b", "time_limit": "soon"},
        }})
    assert sorted(err.value.problems) == sorted([
        "profiles.Bad Name: a profile name must match ^[a-z0-9][a-z0-9_-]{0,31}$",
        "profiles.a.color: unknown key (known: partition, time_limit, cpus, memory_gb, gres, account, qos,"
        " constraint, image, container_flags, binds, groups, default, description)",
        "profiles.a.partition: must be a partition name matching ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        "profiles.a.image: must be an absolute path of [A-Za-z0-9._/@+-] without '..'",
        "profiles.a.gres: must be SLURM gres like gpu:1 or gpu:a100:2 (comma-separated)",
        "profiles.a.cpus: must be an integer between 1 and 4096",
        "profiles.a.container_flags: must be a list of distinct flags out of --nv, --rocm",
        "profiles.b.time_limit: must be a SLURM time like 8:00:00 or 1-00:00:00",
        "profiles.b.constraint: must be node features joined by & | ( ) [ ] * (no spaces)",
        "profiles.b.binds: must be a list of {host_path, container_path, mode} tables (absolute paths"
        " without '..', mode ro|rw)",
        "profiles.b.groups: must be a list of group names matching ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        "profiles.b.default: must be true or false",
    ])


@pytest.mark.parametrize("table, problem", [
    ({"a": {}, "b": {}}, "profiles: one profile must say default = true (the one used when a login names none)"),
    ({"a": {"default": True}, "b": {"default": True}}, "profiles: only one profile may say default = true (got a, b)"),
    ({}, "profiles: must hold at least one [profiles.NAME] table"),
])
def test_exactly_one_default(table, problem):
    with pytest.raises(ConfigError) as err:
        parse({**GOOD, "profiles": table})
    assert err.value.problems == [problem]


def test_a_single_profile_is_the_default_without_saying_so():
    assert parse({**GOOD, "profiles": {"small": {"cpus": 1}}}).default_profile == "small"


def test_extend_section_is_validated():
    cfg = parse({**GOOD, "extend": {"step": "30:00", "max_total": "1-00:00:00", "only_if_idle_partition": True}})
    assert (cfg.extend_step, cfg.extend_max_total, cfg.extend_only_if_idle_partition) == (
        "30:00", "1-00:00:00", True)
    assert parse(GOOD).extend_max_total == ""
    with pytest.raises(ConfigError) as err:
        parse({**GOOD, "extend": {"step": "soon", "max_total": "UNLIMITED"}})
    assert [p.split(":", 1)[0] for p in err.value.problems] == ["extend.step", "extend.max_total"]


# ---------------------------------------------------------------- who may use which

def _member(*groups: str):
    return lambda group: group in groups


def test_choose_gives_the_default_or_the_named_allowed_profile():
    cfg = parse(TWO)
    assert profiles.choose(cfg.profiles, cfg.default_profile, None, _member()).name == "cpu"
    assert profiles.choose(cfg.profiles, cfg.default_profile, "gpu", _member("gpu-users")).name == "gpu"


def test_unknown_and_forbidden_profiles_get_the_same_line_listing_the_allowed_ones():
    cfg = parse(TWO)
    with pytest.raises(profiles.ProfileRefused) as forbidden:
        profiles.choose(cfg.profiles, cfg.default_profile, "gpu", _member("others"))
    with pytest.raises(profiles.ProfileRefused) as unknown:
        profiles.choose(cfg.profiles, cfg.default_profile, "nope", _member("others"))
    assert str(forbidden.value) == "profile: no profile 'gpu' for you; choose one of: cpu"
    assert str(unknown.value) == "profile: no profile 'nope' for you; choose one of: cpu"


def test_a_hostile_profile_name_is_never_echoed():
    cfg = parse(TWO)
    with pytest.raises(profiles.ProfileRefused) as err:
        profiles.choose(cfg.profiles, cfg.default_profile, "\x1b]0;pwned\x07\n", _member())
    assert str(err.value) == "profile: no profile that name for you; choose one of: cpu"


# ---------------------------------------------------------------- pure builders

def test_jobspec_passes_the_profile_to_sbatch_and_apptainer(tmp_path: Path):
    cfg = parse({**TWO, "broker": {"state_dir": str(tmp_path)}})
    spec = jobspec.build(cfg, ALICE, "thesis", "/opt/images/current.sif", "sha256:" + "ab" * 32, token="abc123",
                         profile=cfg.profile("gpu"))
    argv = spec.sbatch_argv
    for flag in ("--partition=gpu", "--time=4:00:00", "--gres=gpu:1", "--account=lab", "--qos=short",
                 "--constraint=a100|h100"):
        assert flag in argv
    assert [a for a in argv if a.startswith("--comment=")] == [
        "--comment=sbroker/v1 user=alice project=thesis instance=sb-alice-thesis-abc123 digest=abababababababab"
        " profile=gpu"]
    start = next(line for line in spec.script.splitlines() if line.startswith("apptainer instance start"))
    assert start.startswith("apptainer instance start --nv --bind /scratch:/scratch:rw --containall ")
    # SLURM's GPU variables become APPTAINERENV_* before the instance starts (they survive --cleanenv)
    assert spec.script.index("APPTAINERENV_${sbroker_var}") < spec.script.index("apptainer instance start")


def test_a_cpu_profile_adds_nothing():
    cfg = parse(TWO)
    spec = jobspec.build(cfg, ALICE, "thesis", "/opt/images/current.sif", "sha256:00", token="abc123")
    assert not [a for a in spec.sbatch_argv if a.startswith(("--gres", "--account", "--qos", "--constraint"))]
    assert "--nv" not in spec.script and "APPTAINERENV_" not in spec.script
    assert "--cpus-per-task=2" in spec.sbatch_argv


def test_gpu_snippet_exports_only_variables_that_are_set():
    import subprocess

    script = profiles.gpu_env_snippet() + "env | grep ^APPTAINERENV_ | sort\n"
    out = subprocess.run(["bash", "-c", script], env={"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "$(id)"},
                         capture_output=True, text=True, check=True).stdout
    assert out == "APPTAINERENV_CUDA_VISIBLE_DEVICES=0,1\nAPPTAINERENV_SLURM_JOB_GPUS=$(id)\n"


def test_with_profile_needs_an_exec_argv():
    cfg = parse(TWO)
    with pytest.raises(ValueError, match="exec_args"):
        profiles.with_profile(["srun", "x"], cfg.profile("gpu"))


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("45:00", 45), ("45:30", 46),
                                           ("2-00:00:00", 2880), ("1-02", 1560), ("UNLIMITED", None),
                                           ("", None), ("x-1", None)])
def test_minutes(text, minutes):
    assert profiles.minutes(text) == minutes


def test_format_minutes():
    assert [profiles.format_minutes(m) for m in (90, 2880, 1561)] == ["1:30:00", "2-00:00:00", "1-02:01:00"]


# ---------------------------------------------------------------- the login side

@pytest.mark.parametrize("command, env_project, env_profile, expected", [
    ("@thesis:gpu", None, None, ("thesis", "gpu", None)),
    ("@:gpu make all", None, None, (None, "gpu", "make all")),
    ("@thesis make", None, "gpu", ("thesis", "gpu", "make")),
    (None, "thesis", "gpu", ("thesis", "gpu", None)),
    ("@thesis:big ls", None, "gpu", ("thesis", "big", "ls")),
    (None, None, None, (None, None, None)),
])
def test_project_and_profile_from_the_command_and_environment(command, env_project, env_profile, expected):
    project, rest = split_project(command, env_project)
    project, profile = split_profile(project, env_profile)
    assert (project, profile, rest) == expected


@pytest.mark.parametrize("answers, choice", [(["k\n"], "keep"), (["\n"], "keep"), (["e\n"], "replace"),
                                             (["c\n"], None), (["x\n", "E\n"], "replace"), ([""], None),
                                             (["x\n", "y\n", "z\n"], None)])
def test_the_mismatch_question(answers, choice):
    said: list[str] = []
    feed = iter(answers)
    assert ask("session: project p runs profile cpu, not gpu", lambda: next(feed), said.append) == choice
    assert said[0] == "sbroker: session: project p runs profile cpu, not gpu\r\n"
    assert said.count(said[1]) == min(len(answers), 3)  # the question, once per answer read


# ---------------------------------------------------------------- check-config against SLURM

def test_check_names_a_missing_partition_and_a_missing_gres():
    from broker.clustercheck import check, parse_sinfo

    sinfo = parse_sinfo("compute gpu:2\ncompute (null)\nnode1 gpu:2\nbig gpu:a100:4(S:0-1),mps:100\n")
    cfg = parse({**GOOD, "profiles": {
        "cpu": {"default": True},
        "gpu": {"gres": "gpu:1"},
        "four": {"gres": "gpu:4"},
        "a100": {"partition": "big", "gres": "gpu:a100:2,mps:50"},
        "h100": {"partition": "big", "gres": "gpu:h100:1"},
        "nowhere": {"partition": "gpu", "gres": "gpu:1"},
    }})
    assert check(cfg.profiles, sinfo) == [
        "profiles.four.gres: partition compute has no node with gpu:4 (its nodes offer: gpu:2)",
        "profiles.h100.gres: partition big has no node with gpu:h100:1 (its nodes offer: gpu:a100:4, mps:100)",
        "profiles.nowhere.partition: SLURM has no partition gpu (it has: big, compute, node1)",
    ]


@pytest.mark.parametrize("answers, choice", [(["\n"], "go"), (["g\n"], "go"), (["2\n"], "big"), (["c\n"], "cancel"),
                                             (["9\n", "1\n"], "cpu"), ([""], "go"), (["x\n", "y\n", "z\n"], "go")])
def test_the_busy_partition_question(answers, choice):
    from broker.loginprompt import busy_choice

    said: list[str] = []
    feed = iter(answers)
    question = {"text": "partition gpu is busy (3 job(s) waiting)", "profile": "gpu", "choices": ["cpu", "big"]}
    assert busy_choice(question, lambda: next(feed), said.append) == choice
    assert said[:5] == ["sbroker: partition gpu is busy (3 job(s) waiting)\r\n",
                        "  [g] go on and wait with profile gpu (default)\r\n",
                        "  [1] start with profile cpu instead\r\n", "  [2] start with profile big instead\r\n",
                        "  [c] cancel\r\n"]
