"""Property tests: no generated value changes argv structure or the start script's meaning.

Either a builder raises ValueError, or every value lands, verbatim, in exactly the token(s)
where it belongs and the script stays bash-syntax clean with its values quoted.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.container._validate import NAME_PATTERN
from broker.container.apptainer import (
    build_exec_args,
    build_instance_start_script,
    build_sbatch_command,
    build_shell_in_allocation_command,
)

NASTY = st.text(
    alphabet=st.sampled_from(list("aZ09._-/:,; \n\t\r\0$`'\"\\|&<>(){}*?!#~=%@") + ["é", "\u2028"]),
    max_size=12,
)
names = st.one_of(NASTY, st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"))
paths = st.one_of(NASTY.map(lambda s: "/" + s), st.from_regex(r"\A(/[A-Za-z0-9._-]{1,8}){1,3}\Z"))
_NAME = re.compile(NAME_PATTERN)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _call(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return None


@SETTINGS
@given(user=names, slug=names, home=paths, project=paths, image=st.one_of(paths, NASTY))
def test_exec_args_structure_is_fixed(user: str, slug: str, home: str, project: str, image: str) -> None:
    args = _call(build_exec_args, image, user, home, project, slug)
    if args is None:
        return
    assert len(args) == 30
    assert args[:2] == ["apptainer", "exec"] and args[-1] == image
    assert args[args.index("--home") + 1] == f"{home}:/home/{user}"
    assert args.count("--bind") == 1 and args[args.index("--bind") + 1] == f"{project}:/home/{user}/proj/{slug}:rw"
    for value in (home, project):
        assert ":" not in value and "," not in value and "\n" not in value
    assert _NAME.fullmatch(slug) and not image.startswith("-")


VALID_NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
VALID_PATH = st.from_regex(r"\A(/[A-Za-z0-9._ '\"$`;&|()*-]{1,8}){1,3}\Z")  # shell-hostile but bind-safe


@SETTINGS
@given(
    name=VALID_NAME,
    user=VALID_NAME,
    slug=VALID_NAME,
    image=st.one_of(VALID_PATH, NASTY.map(lambda s: "/" + s)),
    home=VALID_PATH,
    fuzz=st.sampled_from(["none", "name", "user", "slug", "home"]),
    nasty=st.one_of(NASTY, NASTY.map(lambda s: "/" + s)),
)
def test_start_script_is_bash_clean_and_quoted(
    name: str, user: str, slug: str, image: str, home: str, fuzz: str, nasty: str
) -> None:
    values = {"name": name, "user": user, "slug": slug, "home": home}
    if fuzz != "none":
        values[fuzz] = nasty
    name, user, slug, home = values["name"], values["user"], values["slug"], values["home"]
    script = _call(build_instance_start_script, image, user, home, "/p/x", slug, name)
    if script is None:
        if fuzz == "none":  # only the fuzzed field or the nasty image may be the reason
            assert any(c in image for c in "\n\r\0")
        return
    assert _NAME.fullmatch(name) and _NAME.fullmatch(slug)
    lines = script.split("\n")  # bash lines; U+2028 etc. are not line breaks for bash
    assert f"INSTANCE={shlex.quote(name)}" in lines and f"CONTAINER={shlex.quote(image)}" in lines
    start = next(line for line in lines if line.startswith("apptainer instance start "))
    tokens = shlex.split(start)
    assert tokens[:3] == ["apptainer", "instance", "start"]
    assert tokens[-4:] == ["$CONTAINER", "$INSTANCE", ">&2", "2>$err_file"]
    assert f"{home}:/home/{user}" in tokens and len(tokens) == 3 + 25 + 4
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@SETTINGS
@given(name=names, script=st.one_of(paths, NASTY), user=st.one_of(st.just(""), names), slug=names)
def test_sbatch_structure(name: str, script: str, user: str, slug: str) -> None:
    cmd = _call(build_sbatch_command, name, script, username=user, project_slug=slug)
    if cmd is None:
        return
    assert len(cmd) == 9 and cmd[0] == "sbatch" and cmd[-1] == script
    assert cmd[7].startswith("--output=") and cmd[7].endswith(".log") and "%" not in cmd[7]
    assert cmd[6] == (f"--job-name=scitex_{user}_{slug}" if user else f"--job-name={name}")


@SETTINGS
@given(job=st.one_of(NASTY, st.integers(min_value=0, max_value=10**9).map(str)), name=names, user=names)
def test_shell_in_allocation_structure(job: str, name: str, user: str) -> None:
    cmd = _call(build_shell_in_allocation_command, job, name, user)
    if cmd is None:
        return
    assert re.fullmatch(r"[0-9]+", job)
    assert cmd[3] == f"--jobid={job}" and cmd[-3:-1] == ["/bin/bash", "-c"]
    if user:
        assert len(cmd) == 19 and cmd[15] == f"instance://{name}" and cmd[10] == f"USER={user}"
    else:
        assert len(cmd) == 10 and cmd[6] == f"instance://{name}"
