"""Pure argv builders for getting into a ready session's instance.

Both paths are ``srun --overlap --jobid=J apptainer exec ... instance://NAME``; the
interactive one adds ``--pty`` and a login shell that starts in the project dir,
a command runs as ``/bin/bash -c COMMAND`` in the home dir (what sshd does). The
command is one argv element: it reaches a shell only inside the container, never
on the host, so quotes, ``$()`` and newlines mean exactly what the user typed.

``srun`` keeps its default verbosity: in the normal case it prints nothing, and when
SLURM holds step creation (e.g. for a while after a slurmctld restart) its
"step creation temporarily disabled, retrying" line tells the user why they wait.
"""

from __future__ import annotations

import re

from .container._validate import validate_instance_name, validate_job_id, validate_slug, validate_username
from .container.apptainer._builders import SHELL_ENTRY_SNIPPET
from .sshendpoint import HOST_KEY

CONTAINER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
_TERM_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
#: sshd's built-in SFTP server has no binary; run the real one inside the container.
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
#: The SSH endpoint's server: the image's own sshd (docs/admin.md, "SSH inside the session").
SSHD = "/usr/sbin/sshd"


def safe_term(term: str | None) -> str:
    return term if term and _TERM_RE.fullmatch(term) else "xterm-256color"


def _identity(user: str, project: str, term: str) -> list[str]:
    # No HOME here: apptainer sets it from the home bind and refuses ``--env HOME``
    # with a warning on stderr of every command (the shell entry exports it anyway).
    user = validate_username(user)
    project = validate_slug(project, "project")
    pairs = (f"TERM={safe_term(term)}", f"USER={user}", f"LOGNAME={user}",
             "SHELL=/bin/bash", f"PATH={CONTAINER_PATH}", f"SCITEX_USER={user}", f"SCITEX_PROJECT={project}",
             f"SBROKER_PROJECT={project}")
    out: list[str] = []
    for pair in pairs:
        out += ["--env", pair]
    return out


def instance_shell_argv(instance: str, user: str, project: str, term: str | None) -> list[str]:
    """The interactive login shell in the instance, as the session agent spawns it under its pty."""
    return ["apptainer", "exec", *_identity(user, project, term or ""),
            f"instance://{validate_instance_name(instance)}", "/bin/bash", "-c", SHELL_ENTRY_SNIPPET]


def shell_argv(job_id: str, instance: str, user: str, project: str, term: str | None) -> list[str]:
    """The same shell under a bare ``srun --pty``: what a user would type by hand.

    Not a login path (those go through the agent, :func:`broker.agentlaunch.attach_argv`);
    the benchmarks' baseline for what the agent adds.
    """
    return ["srun", "--overlap", "--pty", f"--jobid={validate_job_id(job_id)}",
            *instance_shell_argv(instance, user, project, term)]


def instance_command_argv(instance: str, user: str, project: str, command: str, term: str | None) -> list[str]:
    """``ssh host CMD``: CMD in the instance (what the session agent runs for a direct stream)."""
    if "\0" in command:
        raise ValueError("command: must not contain NUL bytes")
    if len(command) > 128 * 1024:
        raise ValueError("command: must be at most 131072 characters")
    words = command.split()
    if words[:1] in (["internal-sftp"], [SFTP_SERVER]):
        inner = [SFTP_SERVER, *words[1:]]
    else:
        inner = ["/bin/bash", "-c", command]
    return ["apptainer", "exec", *_identity(user, project, term or ""),
            "--pwd", f"/home/{validate_username(user)}",
            f"instance://{validate_instance_name(instance)}", *inner]


def command_argv(job_id: str, instance: str, user: str, project: str, command: str, *,
                 tty: bool, term: str | None) -> list[str]:
    """``ssh host CMD`` through ``srun``: with a terminal, or when direct streams are off."""
    # --unbuffered: without it slurmstepd holds task output until a newline, which
    # stalls every binary protocol (sftp, scp, rsync) waiting for a reply.
    return ["srun", "--overlap", *(["--pty"] if tty else ["--unbuffered"]),
            f"--jobid={validate_job_id(job_id)}",
            *instance_command_argv(instance, user, project, command, term)]


def endpoint_options(user: str, authorized_keys: str, env: dict[str, str] | None = None) -> list[str]:
    """``sshd -o`` settings of the SSH endpoint (an unprivileged ``sshd -i`` in the container).

    It runs as the user, so it can only ever log the user in (``AllowUsers`` says so too), by
    their own keys, and forwarding ends inside the allocation, which is the point: ``-L``,
    ``-R``, ``-D``, stream-local and agent forwarding are on; X11 and tunnels are off. No PAM
    (an unprivileged sshd cannot use it) and no password: the login node already asked for
    whatever the site requires before the stream to this sshd existed.
    """
    user = validate_username(user)
    settings = {
        "PidFile": "none", "UsePAM": "no", "AllowUsers": user, "AuthenticationMethods": "publickey",
        "PubkeyAuthentication": "yes", "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
        "HostbasedAuthentication": "no", "GSSAPIAuthentication": "no", "KerberosAuthentication": "no",
        "AuthorizedKeysFile": authorized_keys, "StrictModes": "yes", "PermitUserEnvironment": "no",
        "AllowTcpForwarding": "yes", "AllowStreamLocalForwarding": "yes", "AllowAgentForwarding": "yes",
        "GatewayPorts": "no", "X11Forwarding": "no", "PermitTunnel": "no", "PermitTTY": "yes",
        "PrintMotd": "no", "PrintLastLog": "no", "Subsystem": "sftp internal-sftp", "LogLevel": "ERROR",
        "ClientAliveInterval": "60", "ClientAliveCountMax": "3",
    }
    if env:  # sshd gives sessions a fresh environment; these say which job and project they are in
        settings["SetEnv"] = " ".join(f"{k}={v}" for k, v in env.items())
    out: list[str] = []
    for name, value in settings.items():
        out += ["-o", f"{name}={value}" if name != "Subsystem" else f"{name} {value}"]
    return out


def instance_sshd_argv(instance: str, user: str, project: str, job_id: str, home: str,
                       authorized_keys: str) -> list[str]:
    """The SSH endpoint: ``sshd -i`` in the instance, its stdin/stdout the direct stream.

    ``-f /dev/null``: nothing in the image's ``/etc/ssh`` applies; every setting is here. The
    host key is the user's own file (:data:`HOST_KEY` in ``home``), read by the user's sshd.
    """
    key = f"{home.rstrip('/')}/{HOST_KEY}"
    if not key.startswith("/") or "\0" in key or "\n" in key:
        raise ValueError("home: must be an absolute path")
    return ["apptainer", "exec", *_identity(user, project, ""), "--pwd", home,
            f"instance://{validate_instance_name(instance)}",
            SSHD, "-i", "-f", "/dev/null", "-h", key,
            *endpoint_options(user, authorized_keys, {"SLURM_JOB_ID": validate_job_id(job_id),
                                                      "SLURM_JOBID": job_id,
                                                      "SBROKER_PROJECT": validate_slug(project, "project")})]
