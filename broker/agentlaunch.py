"""How a session's agent is started in its job and reached from a login node (pure builders).

The agent (:mod:`broker.agent.sessionagent`) runs as the user in the session job's batch
step, beside the instance: the batch step is the one step that lives as long as the job
without a client on a login node, so a broker restart, an upgrade or a lost login node
does not end it. The one requirement this makes on compute nodes is ``python3`` >= 3.9 on
the job's ``PATH`` (stated in ``docs/admin.md``); the first session on a node without it
fails in one line: ``INSTANCE_FAILED: the session agent needs python3 >= 3.9 ...``.

* :func:`start_snippet` (bash, run by the start script before the instance starts):
  writes the agent into a private ``mktemp -d`` directory on the node and starts ``serve``;
  :func:`await_snippet` (before ``INSTANCE_READY``, after the instance is listed) waits
  (bounded) until it accepts and has written its status file, whose ``dir`` field tells the
  broker where it is.
* :func:`keepalive_snippet`: the job fails (``INSTANCE_FAILED``) when the agent is gone:
  a session whose shells cannot be reached must not keep taking logins.
* :func:`attach_argv`: what ``sbroker login`` runs to reach a shell:
  ``srun --overlap --pty --jobid=J python3 -I -S DIR/agent.py attach -- <shell argv>``.

Everything here is computed from server-side config, validated ids and the status file's
``dir``/``python``, which are the user's word and only ever used in argv the user's own
``srun`` runs in the user's own job.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from .config import Config
from .container._validate import validate_instance_name, validate_job_id

AGENT_FILE = "agent.py"
STATUS_SUFFIX = ".agent.json"
KEY_SUFFIX = ".agent.key"
MIN_PYTHON = (3, 9)
#: How long the start script waits for a started agent to accept (steps of 20 ms: 10 s).
START_WAIT_STEPS = 500
#: A path the status file may name for the agent's directory or python: absolute, plain
#: characters only (it becomes an argv word; it never reaches a shell on the login node).
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+-]{1,255}$")
_HEREDOC_END = "SBROKER_AGENT_SOURCE_END"
MODULE_FILE = "sessionagent.py"
#: ``agent.py`` imports the agent as a module, so its bytecode is cached (``__pycache__`` in the
#: private directory, written by ``serve``) and an attach does not compile 40 KB of source.
_STUB = """import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sessionagent
sys.exit(sessionagent.main())"""


@functools.lru_cache(maxsize=1)
def agent_source() -> str:
    """The agent's source, embedded in every start script (read once per daemon)."""
    text = (Path(__file__).parent / "agent" / "sessionagent.py").read_text()
    if any(line.strip() == _HEREDOC_END for line in text.splitlines()):
        raise RuntimeError(f"broker/agent/sessionagent.py must not contain a line {_HEREDOC_END}")
    return text


def status_path(job_dir: Path, instance: str) -> Path:
    """Where the agent of ``instance`` writes its status (``slurm.job_dir``, shared storage)."""
    return job_dir / f"{validate_instance_name(instance)}{STATUS_SUFFIX}"


def key_path(job_dir: Path, instance: str) -> Path:
    """The session key of the direct streams (written by the agent, mode 0600, the user's)."""
    return job_dir / f"{validate_instance_name(instance)}{KEY_SUFFIX}"


def safe_path(value: object) -> str | None:
    """``value`` if it is a plain absolute path (see :data:`_PATH_RE`), else None."""
    if isinstance(value, str) and _PATH_RE.fullmatch(value) and "/../" not in value + "/":
        return value
    return None


def serve_argv(config: Config, status: Path) -> list[str]:
    """The agent's ``serve`` options from the broker's config (job id added by the script)."""
    streams = (["--listen", config.stream_listen, "--key", str(status.with_name(
        status.name.removesuffix(STATUS_SUFFIX) + KEY_SUFFIX)), "--max-commands", str(config.limit_commands)]
        if config.direct_streams else [])
    return [*streams, "--status", str(status), "--grace", f"{config.detach_grace:g}",
            "--scrollback", str(config.scrollback_bytes), "--max-shells", str(config.limit_shells),
            "--max-detached", str(config.limit_detached),
            "--walltime-warnings", ",".join(str(m) for m in config.walltime_warnings),
            "--spare", "1" if config.spare_shell else "0"]


def start_snippet(config: Config, status: Path, first_shell: tuple[list[str], str] | None = None) -> str:
    """Bash for the start script before the instance starts (its ``before_start``): write the
    agent and launch it in the background, so its start overlaps ``apptainer instance start``
    (it needs the instance only when a login asks for a shell, after ``INSTANCE_READY``);
    :func:`await_snippet` then waits for it. Uses the script's ``fail`` function."""
    q = shlex.quote
    first = ["--first-shell", json.dumps(first_shell[0]), "--first-term", first_shell[1]] if first_shell else []
    first += ["--await-instance", "1"]  # a login may attach while the instance starts: SIGUSR1 says it is up
    options = " ".join(q(a) for a in [*serve_argv(config, status), *first])
    return f"""\
# The session agent holds the shells' ptys in this step (see broker.agentlaunch).
agent_status={q(str(status))}
agent_python=$(command -v python3 2>/dev/null) || {_python_fail()}
agent_dir=$(mktemp -d "${{TMPDIR:-/tmp}}/sbroker-agent.XXXXXXXX") \
    || fail "cannot create the session agent's directory in ${{TMPDIR:-/tmp}} on $(hostname -s 2>/dev/null)"
cat >"$agent_dir/{MODULE_FILE}" <<'{_HEREDOC_END}'
{agent_source().rstrip()}
{_HEREDOC_END}
cat >"$agent_dir/{AGENT_FILE}" <<'{_HEREDOC_END}'
{_STUB}
{_HEREDOC_END}
rm -f "$agent_status"
"$agent_python" -I -S "$agent_dir/{AGENT_FILE}" serve --dir "$agent_dir" {options} --job "${{SLURM_JOB_ID:-}}" \
    </dev/null >/dev/null &
agent_pid=$!
"""


def await_snippet() -> str:
    """Bash for the start script before ``INSTANCE_READY``: wait (bounded, in 20 ms steps) until
    the agent accepts and has written its status file. An agent that exited is explained in one
    line: the python3 it found is too old (checked only then: a process less on every start),
    or its own error, which is in the job's log."""
    return f"""\
agent_waited=0
until [ -S "$agent_dir/agent.sock" ] && [ -s "$agent_status" ]; do
    if ! kill -0 "$agent_pid" 2>/dev/null; then
        "$agent_python" -c 'import sys; sys.exit(sys.version_info < {MIN_PYTHON!r})' </dev/null >/dev/null 2>&1 \
            || {_python_fail()}
        fail "the session agent exited at start (its error is in this job's log)"
    fi
    agent_waited=$((agent_waited + 1))
    if [ "$agent_waited" -ge {START_WAIT_STEPS} ]; then
        fail "the session agent did not start within {START_WAIT_STEPS // 50}s"
    fi
    sleep 0.02
done
kill -USR1 "$agent_pid" 2>/dev/null  # the instance is up: the agent may start the first login's shell
"""


def _python_fail() -> str:
    minimum = ".".join(map(str, MIN_PYTHON))
    return (f'fail "the session agent needs python3 >= {minimum} on the PATH of compute node '
            '$(hostname -s 2>/dev/null) (found: ${agent_python:-no python3} '
            '$("${agent_python:-false}" -V 2>&1 </dev/null))"')


def keepalive_snippet() -> str:
    """Bash for each keep-alive round: a job whose agent died fails (its shells died with it)."""
    return """\
if [ -n "${agent_pid:-}" ] && ! kill -0 "$agent_pid" 2>/dev/null; then
    agent_pid=
    fail "the session agent ended; its shells are gone (see this job's log)"
fi
"""


def exit_snippet() -> str:
    """Bash for the start script's exit trap: let the agent hang up its shells, then clean up."""
    return """\
if [ -n "${agent_pid:-}" ]; then
    kill "$agent_pid" 2>/dev/null
    wait "$agent_pid" 2>/dev/null
fi
if [ -n "${agent_dir:-}" ]; then rm -rf -- "$agent_dir"; fi
if [ -n "${agent_status:-}" ]; then rm -f -- "$agent_status" "${agent_status%.agent.json}.agent.key"; fi
"""


def attach_argv(job_id: str, agent_dir: str, python: str, shell: Sequence[str], *, mode: str = "write",
                tty: bool = True, announce: str = "") -> list[str]:
    """``srun`` into the job, to the agent's ``attach``: a terminal on a shell of the session.

    ``--pty`` when the login has a terminal (the agent's own pty holds the shell either way);
    ``--unbuffered`` otherwise, so keys and output are not held back by line.
    """
    directory, interpreter = safe_path(agent_dir), safe_path(python)
    if directory is None or interpreter is None:
        raise ValueError("agent: the session's status file names no usable agent directory or python")
    if mode not in ("write", "observe"):
        raise ValueError("mode: must be write or observe")
    argv = ["srun", "--overlap", "--pty" if tty else "--unbuffered", f"--jobid={validate_job_id(job_id)}",
            "--ntasks=1", interpreter, "-I", "-S", f"{directory}/{AGENT_FILE}", "attach", "--mode", mode]
    if announce:
        argv += ["--announce", announce]
    return [*argv, "--", *shell]


def walltime_argv(job_id: str, agent_dir: str, python: str) -> list[str]:
    """``srun`` into the job, as its owner, to tell the agent the job's time limit moved
    (``sbroker extend``): it reads the end again and tells the attached terminals."""
    directory, interpreter = safe_path(agent_dir), safe_path(python)
    if directory is None or interpreter is None:
        raise ValueError("agent: the session's status file names no usable agent directory or python")
    return ["srun", "--overlap", "--quiet", f"--jobid={validate_job_id(job_id)}", "--ntasks=1", interpreter,
            "-I", "-S", f"{directory}/{AGENT_FILE}", "walltime"]


__all__ = ["AGENT_FILE", "KEY_SUFFIX", "STATUS_SUFFIX", "key_path", "agent_source", "attach_argv", "exit_snippet", "keepalive_snippet",
           "safe_path", "serve_argv", "start_snippet", "await_snippet", "status_path", "walltime_argv"]
