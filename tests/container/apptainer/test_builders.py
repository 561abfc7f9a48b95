"""Token-by-token tests of the pure argv builders (worked examples from the notes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.container.apptainer import (
    build_dev_pythonpath,
    build_exec_args,
    build_host_mount_binds,
    build_sbatch_command,
    build_shell_in_allocation_command,
    build_srun_command,
)
from broker.container.apptainer._builders import SHELL_ENTRY_SNIPPET, instance_flags

TEX = ["pdflatex", "bibtex", "latexmk", "latexdiff", "kpsewhich", "makeindex"]
ENV_TOKENS = [
    "--env", "TERM=xterm-256color",
    "--env", "SCITEX_CLOUD=true",
    "--env", "SCITEX_PROJECT=proj1",
    "--env", "SCITEX_USER=alice",
    "--env", "USER=alice",
    "--env", "LOGNAME=alice",
    "--env", "SHELL=/bin/bash",
    "--env", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
]  # fmt: skip
HEAD = ["apptainer", "exec", "--containall", "--cleanenv", "--writable-tmpfs", "--hostname", "scitex-cloud"]


def test_exec_args_worked_example_52_tokens() -> None:
    args = build_exec_args(
        "/c/img.sif",
        "alice",
        Path("/h/alice"),
        Path("/p/proj1"),
        "proj1",
        dev_repos=[{"name": "lib", "host_path": "/src/lib"}],
        host_mounts=[{"host_path": "/data", "container_path": "/mnt/data", "mode": "ro"}],
        texlive_prefix="/usr/",
    )
    expected = (
        HEAD
        + ENV_TOKENS
        + ["--env", "PYTHONPATH=/opt/dev/lib/src"]
        + ["--home", "/h/alice:/home/alice"]
        + ["--bind", "/p/proj1:/home/alice/proj/proj1:rw"]
        + ["--bind", "/src/lib:/opt/dev/lib:ro"]
        + ["--bind", "/data:/mnt/data:ro"]
        + ["--bind", "/usr/share/texlive:/usr/share/texlive:ro"]
        + ["--bind", "/usr/share/texmf-dist:/usr/share/texmf-dist:ro"]
        + [tok for b in TEX for tok in ("--bind", f"/usr/bin/{b}:/usr/bin/{b}:ro")]
        + ["--pwd", "/home/alice/proj/proj1", "/c/img.sif"]
    )
    assert len(args) == 52
    assert args == expected


def test_exec_args_minimal_30_tokens_sandbox_also_containall() -> None:
    args = build_exec_args("/c/sandbox-dir", "alice", "/h/alice", "/p/proj1", "proj1")
    assert args == HEAD + ENV_TOKENS + [
        "--home", "/h/alice:/home/alice",
        "--bind", "/p/proj1:/home/alice/proj/proj1:rw",
        "--pwd", "/home/alice/proj/proj1",
        "/c/sandbox-dir",
    ]  # fmt: skip
    assert len(args) == 30


def test_instance_flags_drop_command_image_and_pwd() -> None:
    args = build_exec_args("/c/img.sif", "alice", "/h/alice", "/p/proj1", "proj1")
    assert instance_flags(args) == args[2:-3]


def test_dev_pythonpath() -> None:
    assert build_dev_pythonpath(None) == ""
    assert build_dev_pythonpath([]) == ""
    assert build_dev_pythonpath([{"name": "a"}, {"name": "b", "host_path": "/x"}]) == "/opt/dev/a/src:/opt/dev/b/src"
    with pytest.raises(ValueError, match=r"dev_repos\[0\]\.name: must match"):
        build_dev_pythonpath([{"name": "../etc"}])


def test_host_mount_binds_order_and_prefix_normalisation() -> None:
    assert build_host_mount_binds() == []
    binds = build_host_mount_binds([{"host_path": "/a", "container_path": "/b", "mode": "rw"}], "/opt/tl")
    assert binds[:2] == ["--bind", "/a:/b:rw"]
    assert binds[2:6] == [
        "--bind", "/opt/tl/share/texlive:/opt/tl/share/texlive:ro",
        "--bind", "/opt/tl/share/texmf-dist:/opt/tl/share/texmf-dist:ro",
    ]  # fmt: skip
    assert binds[7::2] == [f"/opt/tl/bin/{b}:/opt/tl/bin/{b}:ro" for b in TEX]
    assert build_host_mount_binds(None, "/usr/") == build_host_mount_binds(None, "/usr")


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ({"host_path": "/a,b", "container_path": "/b", "mode": "ro"}, r"host_mounts\[0\]\.host_path: must not contain ','"),
        ({"host_path": "/a", "container_path": "/b:c", "mode": "ro"}, r"container_path: must not contain ':'"),
        ({"host_path": "/a", "container_path": "/b", "mode": "rwx"}, r"mode: must be 'ro' or 'rw'"),
        ({"host_path": "/a/../etc", "container_path": "/b", "mode": "ro"}, r"must not contain '\.\.'"),
        ({"host_path": "/a", "mode": "ro"}, r"container_path: is required"),
        ({"host_path": "rel", "container_path": "/b", "mode": "ro"}, r"must be an absolute path"),
    ],
)
def test_host_mount_binds_reject_bad_mounts(mount: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_host_mount_binds([mount])


def test_srun_command_tokens() -> None:
    cmd = build_srun_command("/c/sb", "bob", "/h/bob", "/p/x", "x", screen_session="ignored")
    assert cmd[:8] == [
        "srun", "--pty", "--chdir=/tmp", "--partition=compute", "--time=8:00:00",
        "--cpus-per-task=4", "--mem=16G", "--job-name=terminal_bob",
    ]  # fmt: skip
    assert cmd[8:-3] == build_exec_args("/c/sb", "bob", "/h/bob", "/p/x", "x")
    assert cmd[-3:] == ["/bin/bash", "-c", SHELL_ENTRY_SNIPPET]
    assert cmd == build_srun_command("/c/sb", "bob", "/h/bob", "/p/x", "x")
    custom = build_srun_command("/c/sb", "bob", "/h/bob", "/p/x", "x", None, None, "", "gpu", "1-00:00:00", 8, 64)
    assert custom[3:7] == ["--partition=gpu", "--time=1-00:00:00", "--cpus-per-task=8", "--mem=64G"]


def test_sbatch_command_tokens_and_log_path() -> None:
    assert build_sbatch_command("inst", "/srv/s.sh") == [
        "sbatch", "--parsable", "--partition=compute", "--time=8:00:00", "--cpus-per-task=4",
        "--mem=16G", "--job-name=inst", "--output=/srv/s.log", "/srv/s.sh",
    ]  # fmt: skip
    cmd = build_sbatch_command("inst", "/var/lib/sbroker/jobs/alice/x.sh", username="bob", project_slug="x")
    assert cmd[6:] == ["--job-name=scitex_bob_x", "--output=/var/lib/sbroker/jobs/alice/x.log", "/var/lib/sbroker/jobs/alice/x.sh"]
    assert build_sbatch_command("inst", "/srv/script")[7] == "--output=/srv/script.log"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"instance_name": "a b"}, r"instance_name: must match"),
        ({"script_path": "/srv/%j.sh"}, r"script_path: must not contain '%'"),
        ({"script_path": "/srv/a\n.sh"}, r"script_path: must not contain newline"),
        ({"slurm_partition": "a b"}, r"slurm_partition"),
        ({"slurm_time_limit": "8h; rm"}, r"slurm_time_limit"),
        ({"slurm_cpus": 0}, r"slurm_cpus: must be a positive integer"),
        ({"slurm_memory_gb": "16"}, r"slurm_memory_gb: must be a positive integer"),
        ({"username": "bob;x"}, r"username: must match"),
    ],
)
def test_sbatch_command_rejects(kwargs: dict, message: str) -> None:
    base = {"instance_name": "inst", "script_path": "/srv/s.sh"}
    with pytest.raises(ValueError, match=message):
        build_sbatch_command(**{**base, **kwargs})


def test_shell_in_allocation_upstream_tokens_without_username() -> None:
    assert build_shell_in_allocation_command("12345", "inst-1") == [
        "srun", "--pty", "--overlap", "--jobid=12345", "apptainer", "exec",
        "instance://inst-1", "/bin/bash", "-c", SHELL_ENTRY_SNIPPET,
    ]  # fmt: skip
    assert build_shell_in_allocation_command(12345, "inst-1")[3] == "--jobid=12345"


def test_shell_in_allocation_passes_identity_explicitly() -> None:
    cmd = build_shell_in_allocation_command("7", "inst-1", username="alice")
    assert cmd[:6] == ["srun", "--pty", "--overlap", "--jobid=7", "apptainer", "exec"]
    assert cmd[6:15] == [
        "--cleanenv",
        "--env", "TERM=xterm-256color",
        "--env", "USER=alice",
        "--env", "LOGNAME=alice",
        "--env", "SCITEX_USER=alice",
    ]  # fmt: skip
    assert cmd[15:] == ["instance://inst-1", "/bin/bash", "-c", SHELL_ENTRY_SNIPPET]


@pytest.mark.parametrize(("job_id", "name"), [("12a", "i"), ("", "i"), ("1;2", "i"), ("1", "-i"), ("1", "i/j")])
def test_shell_in_allocation_rejects(job_id: str, name: str) -> None:
    with pytest.raises(ValueError):
        build_shell_in_allocation_command(job_id, name)


def test_exec_args_reject_option_like_image_and_bad_names() -> None:
    with pytest.raises(ValueError, match="container_path: must not start with '-'"):
        build_exec_args("--bind=/:/x", "alice", "/h", "/p", "s")
    with pytest.raises(ValueError, match=r"project_slug: must match \^\[A-Za-z0-9\]\[A-Za-z0-9\._-\]\*\$ \(got 'a;b'\)"):
        build_exec_args("/c.sif", "alice", "/h", "/p", "a;b")
    with pytest.raises(ValueError, match="host_user_dir: must not contain ','"):
        build_exec_args("/c.sif", "alice", "/h,/etc", "/p", "s")


def test_shell_entry_snippet_is_valid_bash() -> None:
    import subprocess

    assert subprocess.run(["bash", "-n", "-c", SHELL_ENTRY_SNIPPET]).returncode == 0
