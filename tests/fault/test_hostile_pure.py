"""Hostile input against the pure layers: validators, builders, argv, start scripts, frames.

Every generated value embeds shell payloads that would create a canary file
(``;touch C``, ``$(touch C)``, backticks, newlines, ...). A value is either refused
with a ``ValueError`` whose message starts with the field it names, or accepted and
then cannot change the structure of what is built: argv tokens stay where they are,
the command is exactly one argv element after ``-c``, generated scripts pass
``bash -n`` and, when actually run (with a recording stub ``apptainer``), never
create the canary and hand every value to apptainer as the exact token it was.

About 9,000 generated values in all (see ``N`` below); no cluster needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from broker import protocol as p
from broker import shells
from broker.config import Config, ConfigError, Mount, parse as parse_config
from broker.container import _validate as v
from broker.container.apptainer import build_instance_start_script
from broker.identity import User
from broker import jobspec

CANARY_DIR = Path(tempfile.mkdtemp(prefix="sbfault-canary-"))
CANARY = CANARY_DIR / "CANARY"
os.chmod(CANARY_DIR, 0o777)

PAYLOADS = [f";touch {CANARY}", f"$(touch {CANARY})", f"`touch {CANARY}`", f"\ntouch {CANARY}\n",
            f"|touch {CANARY}", f"&& touch {CANARY}", f"' ; touch {CANARY} ; '", f'" ; touch {CANARY} ; "',
            f"${{IFS}}touch${{IFS}}{CANARY}", f"\rtouch {CANARY}", f"%0atouch {CANARY}"]
FRAGMENTS = ["'", '"', "\\", "$", "${", "}", "(", ")", "--", "-", "..", "/", ":", ",", " ", "\t", "\0", "\r",
             "\n", "é", "\u202e", "{user}", "{project}", "{0}", "@FLAGS@", "@INSTANCE@", "*", "?", "~", "!",
             "#", "=", "a", "Z", "0", "_", ".", "proj", "/tmp", "ro", "rw", "<", ">", "&", ";", "%s"]
hostile = st.lists(st.one_of(st.sampled_from(PAYLOADS), st.sampled_from(FRAGMENTS), st.text(max_size=6)),
                   min_size=0, max_size=8).map("".join)
# values close to valid ones, so the "accepted" branch is exercised too
near_valid = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"),
    st.tuples(st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,10}\Z"), st.sampled_from(PAYLOADS + FRAGMENTS))
    .map("".join),
)
values = st.one_of(hostile, near_valid)
abs_paths = st.one_of(
    st.tuples(st.just("/tmp/"), hostile).map("".join),
    st.lists(st.one_of(st.from_regex(r"\A[A-Za-z0-9 ._$`;&|'\"()-]{1,12}\Z"), st.sampled_from(PAYLOADS)),
             min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
N = dict(slug=2000, user=2000, mount=2000, command=2000, frame=1000, script_run=250)
FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


def fast(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def names_field(exc: Exception, *fields: str) -> str:
    match = FIELD_RE.match(str(exc))
    assert match, f"error does not start with a field name: {exc}"
    assert match.group(1).split(".")[0].split("[")[0] in fields, f"{exc} names {match.group(1)}, not {fields}"
    return match.group(1)


@pytest.fixture(autouse=True)
def no_canary():
    yield
    assert not CANARY.exists(), "a generated payload was executed"


def config(**kw) -> Config:
    return Config(image="/images/base.sif", state_dir=Path("/var/lib/sbroker-fuzz"), **kw)


USER = User("sbalice", 1500, 1500, (1500,), "/home/sbalice", "/bin/bash")
SHELL_META = set(";|&$`'\"\\<>(){}*?~!#\n\r\t\0 ")


# ---------------------------------------------------------------- slugs / projects

@fast(N["slug"])
@given(project=values)
def test_project_slugs_refused_by_field_or_safe(project):
    try:
        jobspec.check_project(config(), project)
    except ValueError as exc:
        names_field(exc, "project")
        return
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", project)
    spec = jobspec.build(config(), USER, project, "/images/base.sif", "sha256:" + "0" * 64, token="abc123")
    assert spec.instance == f"sb-sbalice-{project}-abc123"[:64]
    for token in spec.sbatch_argv:
        assert not (SHELL_META - {" "}) & set(token), token
    assert spec.host_project_dir == f"/home/sbalice/proj/{project}"


# ---------------------------------------------------------------- usernames

@fast(N["user"])
@given(name=values)
def test_usernames_refused_by_field_or_safe(name):
    try:
        v.validate_username(name)
    except ValueError as exc:
        names_field(exc, "username")
        with pytest.raises(ValueError) as again:
            jobspec.build(config(), User(name, 1, 1, (), "/home/x", "/bin/sh"), "proj", "/i.sif", "sha256:00")
        names_field(again.value, "username")
        with pytest.raises(ValueError):
            shells.shell_argv("1", "inst", name, "proj", "xterm")
        return
    assert not SHELL_META & set(name) and not name.startswith(("-", "."))
    argv = shells.shell_argv("1", "inst", name, "proj", "xterm")
    assert f"USER={name}" in argv and f"LOGNAME={name}" in argv


# ---------------------------------------------------------------- mount specs

@fast(N["mount"] // 2)
@given(spec=st.one_of(values, st.tuples(abs_paths, st.just(":"), abs_paths,
                                        st.sampled_from(["", ":ro", ":rw", ":rx", ":"])).map("".join)))
def test_mount_spec_strings(spec):
    try:
        mount = v.validate_mount_spec(spec)
    except ValueError as exc:
        names_field(exc, "mount")
        return
    assert mount.spec().count(":") == 2
    for part in (mount.host, mount.container):
        assert part.startswith("/") and not set(":,\n\r\0") & set(part) and ".." not in part.split("/")


@fast(N["mount"] // 2)
@given(host=st.one_of(abs_paths, values), container=st.one_of(abs_paths, values),
       mode=st.sampled_from(["ro", "rw", "RW", "", "ro;x"]))
def test_host_mounts_config_and_builder(host, container, mode):
    # 1. the config loader (what an admin writes) is strict
    data = {"container": {"image": "/images/base.sif",
                          "host_mounts": [{"host_path": host, "container_path": container, "mode": mode}]}}
    try:
        cfg = parse_config(data)
    except ConfigError as exc:
        assert any(problem.startswith("container.host_mounts: ") for problem in exc.problems), exc.problems
    else:
        assert cfg.host_mounts == (Mount(host, container, mode),)
    # 2. the toolkit builder (looser: any absolute path without ':' ',' newline '..')
    mounts = [{"host_path": host, "container_path": container, "mode": mode}]
    try:
        script = build_instance_start_script("/images/base.sif", "sbalice", "/home/sbalice",
                                             "/home/sbalice/proj/p", "p", "sb-sbalice-p-1", host_mounts=mounts)
    except ValueError as exc:
        names_field(exc, "host_mounts")
        return
    bash_n(script)
    assert shlex.quote(f"{host}:{container}:{mode}") in script


def bash_n(script: str) -> None:
    res = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- start scripts, executed

STUB = r"""#!/bin/bash
# records its argv, NUL-separated, one record per call; never starts anything
{ printf '%s\0' "$@"; printf '\n\0'; } >> "$STUB_LOG"
case "$1 $2" in
  "instance list") echo '{"instances":[]}' ;;
  "instance start") echo "stub: refusing to start" >&2; exit 3 ;;
esac
exit 0
"""


@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("stubbin")
    (d / "apptainer").write_text(STUB)
    os.chmod(d / "apptainer", 0o755)
    return d


@fast(N["script_run"])
@given(host=abs_paths, container=abs_paths, home=abs_paths, projdir=abs_paths, image=st.one_of(abs_paths, values),
       texlive=st.one_of(st.just(""), abs_paths))
def test_start_script_runs_without_injection(stub_bin, host, container, home, projdir, image, texlive):
    try:
        script = build_instance_start_script(image, "sbalice", home, projdir, "p", "sb-sbalice-p-1",
                                             host_mounts=[{"host_path": host, "container_path": container,
                                                           "mode": "ro"}],
                                             texlive_prefix=texlive)
    except ValueError as exc:
        names_field(exc, "host_mounts", "host_user_dir", "host_project_dir", "container_path", "texlive_prefix")
        return
    bash_n(script)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "calls"
        env = {"PATH": f"{stub_bin}:/usr/bin:/bin", "STUB_LOG": str(log), "TMPDIR": tmp,
               "SBROKER_INSTANCE_POLL_SECONDS": "1"}
        res = subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True, env=env, timeout=30)
        assert not CANARY.exists(), script
        assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
        assert res.stdout.splitlines()[0].startswith("INSTANCE_FAILED: apptainer instance start exited with "
                                                     "status 3"), res.stdout
        calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c]
    start = next(c for c in calls if c[:2] == ["instance", "start"])
    # every value arrives as the exact token it was: nothing split, joined or expanded
    assert start[-2:] == [image, "sb-sbalice-p-1"]
    assert f"{host}:{container}:ro" in start
    assert start[start.index("--home") + 1] == f"{home}:/home/sbalice"
    assert ["--bind", f"{projdir}:/home/sbalice/proj/p:rw"] in [start[i:i + 2] for i in range(len(start) - 1)]


# ---------------------------------------------------------------- commands

@fast(N["command"])
@given(command=st.one_of(hostile, st.text()), tty=st.booleans(), term=st.one_of(st.none(), values))
def test_command_is_exactly_one_argv_element_after_c(command, tty, term):
    try:
        argv = shells.command_argv("42", "sb-sbalice-p-1", "sbalice", "p", command, tty=tty, term=term)
    except ValueError as exc:
        names_field(exc, "command")
        assert "\0" in command
        return
    words = command.split()
    if words[:1] in (["internal-sftp"], [shells.SFTP_SERVER]):
        assert argv[-len(words):] == [shells.SFTP_SERVER, *words[1:]]
        return
    assert argv[-3:] == ["/bin/bash", "-c", command]
    assert argv.count("-c") == (2 if command == "-c" else 1)
    head = argv[:-3]
    assert head[:2] == ["srun", "--overlap"] and "--jobid=42" in head
    assert head[-1] == "instance://sb-sbalice-p-1"
    term_value = next(a for a in head if a.startswith("TERM="))[5:]
    assert term_value == shells.safe_term(term)
    assert not SHELL_META & set(term_value)


def test_term_with_a_trailing_newline_is_replaced():
    argv = shells.command_argv("42", "sb-sbalice-p-1", "sbalice", "p", "true", tty=True, term="xterm\n")
    assert "TERM=xterm\n" not in argv
    assert shells.safe_term("xterm\n") == "xterm-256color"


# ---------------------------------------------------------------- protocol frames (pure)

@fast(N["frame"])
@given(raw=st.one_of(st.binary(max_size=80),
                     st.tuples(st.sampled_from([b"J", b"O", b"I", b"X", b"\0"]),
                               st.integers(0, 2**32 - 1), st.binary(max_size=40))
                     .map(lambda t: p.HEADER.pack(t[0], t[1]) + t[2]),
                     st.builds(lambda obj: p.HEADER.pack(b"J", len(obj)) + obj,
                               st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                            lambda kids: st.lists(kids, max_size=3)
                                            | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)
                               .map(lambda o: json.dumps(o).encode()))))
def test_frame_parsing_refuses_with_a_field(raw):
    if len(raw) < p.HEADER.size:
        return
    try:
        kind, length = p.parse_header(raw[:p.HEADER.size])
    except p.ProtocolError as exc:
        assert exc.field == "frame" and str(exc).startswith("frame: ")
        return
    assert kind in p.KINDS and length <= p.MAX_JSON
    if kind != p.KIND_JSON:
        return
    try:
        message = p.decode_json(raw[p.HEADER.size:p.HEADER.size + length])
        op = p.check_request(message)
    except p.ProtocolError as exc:
        assert exc.field in ("frame", "v", "op") and str(exc).startswith(exc.field + ": ")
        return
    assert op in p.OPS
