"""The ``sbroker`` command.

``sbroker login`` is dispatched before anything else is imported: it is on every
SSH login's critical path. Every other subcommand imports what it needs lazily.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["login"]:
        from .login import main as login_main

        return login_main(args[1:])
    return _full(args)


def _full(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="sbroker", description="Personal container shells inside SLURM allocations, by plain ssh.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("login", help="sshd ForceCommand entry: connect this SSH login to its session")
    serve = sub.add_parser("serve", help="run the broker daemon (root)")
    serve.add_argument("--config", help="config file (default $SBROKER_CONFIG or /etc/sbroker/broker.toml)")
    check = sub.add_parser("check-config", help="validate the config file and this login node's sshd/PAM setup")
    check.add_argument("--config")
    check.add_argument("--config-only", action="store_true",
                       help="skip the login-node report (ForceCommand hardening: PAM, sshd, login shells)")

    ls = sub.add_parser("ls", help="list live sessions (admins: all; users: their own)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = sub.add_parser("show", help="everything known about one session")
    show.add_argument("session", help="session id, user/project, or your own project")
    show.add_argument("--json", action="store_true")
    kill = sub.add_parser("kill", help="end a session: cancel its job and stop its instance")
    kill.add_argument("session")
    kill.add_argument("--reason", default="", help="recorded in the audit log")
    kill.add_argument("--json", action="store_true")
    logs = sub.add_parser("logs", help="the session job's start-script log")
    logs.add_argument("session")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the session ends")
    events = sub.add_parser("events", help="the audit log (admins: all; users: their own)")
    events.add_argument("--since", default="0", help="unix time, or a duration like 10m, 2h, 1d ago")
    events.add_argument("-f", "--follow", action="store_true")
    events.add_argument("--json", action="store_true")
    attach = sub.add_parser("attach", help="attach this terminal to a session's shell")
    attach.add_argument("session")
    attach.add_argument("--observe", action="store_true", help="read-only: watch without typing")
    attach.add_argument("--write", action="store_true",
                        help="admins: type into someone else's shell (default: observe); audited and shown to its owner")
    extend = sub.add_parser("extend", help="raise your session job's time limit by one step (within [extend])")
    extend.add_argument("session", nargs="?", default=None,
                        help="session id or your project (default: the default project)")
    extend.add_argument("--json", action="store_true")
    sshcfg = sub.add_parser("ssh-config", help="print the ~/.ssh/config entry for an SSH server inside your session "
                                               "(also: ssh LOGIN sbroker ssh-config)")
    sshcfg.add_argument("--project", default=None, help="the session's project (default: the broker's default)")
    sshcfg.add_argument("--profile", default=None, help="the profile the endpoint starts the session with")
    sshcfg.add_argument("--host", default=None, help="the alias to connect to (default: LOGIN-PROJECT)")
    sshcfg.add_argument("--login", default=None, help="the login node's name as clients reach it (default: this "
                                                      "host's FQDN)")
    reap = sub.add_parser("reap", help="admins: remove orphan jobs, stale instance state and old job files now")
    reap.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    reap.add_argument("--json", action="store_true")

    from .container.cli import register

    register(sub)

    ns = parser.parse_args(args)
    if ns.command == "login":
        from .login import main as login_main

        return login_main([])
    if ns.command == "ssh-config":
        return _ssh_config(ns)
    if ns.command in ("serve", "check-config"):
        return _serve(ns)
    if ns.command in ("ls", "show", "kill", "logs", "events", "attach", "reap", "extend"):
        from . import admin

        return admin.run(ns)
    handler = getattr(ns, "handler", None)
    if handler is None:
        parser.error(f"{ns.command}: missing subcommand")
    return int(handler(ns) or 0)


#: Directories that are each node's own on a cluster (tmpfs or local disks).
NODE_LOCAL = ("/tmp", "/var/tmp", "/run", "/dev/shm", "/var/lib", "/var/spool", "/var/run")


def node_local(path: str) -> str:
    """The node-local directory ``path`` lies under, or ``""``."""
    return next((d for d in NODE_LOCAL if path == d or path.startswith(d + "/")), "")


def _serve(ns: object) -> int:
    from .config import ConfigError, load

    try:
        config = load(getattr(ns, "config", None))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"sbroker: config: {problem}", file=sys.stderr)
        return 2
    if getattr(ns, "command") == "check-config":
        failed = False
        print("config ok")
        print(f"shared storage: slurm.job_dir = {config.job_dir}: session jobs write their output (the"
              " INSTANCE_READY/INSTANCE_FAILED markers) there on a compute node, as the user, and this"
              " broker reads it here: it must be storage every compute node writes and every login node"
              " reads, such as the home (docs/admin.md, section 16)")
        local = node_local(config.job_dir)
        if local:
            print(f"sbroker: config: slurm.job_dir: {config.job_dir} is under {local}, which is private to"
                  " each node: no session can become ready", file=sys.stderr)
            return 1
        for profile in config.profiles:
            print(f"profile {profile.name}{' (default)' if profile.name == config.default_profile else ''}:"
                  f" {profile.summary()}{' — ' + profile.description if profile.description else ''}")
        if getattr(ns, "config_only", False):
            return 0
        from .clustercheck import problems as cluster_problems
        from .loginnode import inspect

        for problem in cluster_problems(config):
            print(f"sbroker: config: {problem}", file=sys.stderr)
            failed = True
        problems = inspect(config)
        for problem in problems:
            print(f"sbroker: login-node: {problem}", file=sys.stderr)
        return 1 if problems or failed else 0
    import asyncio

    from .daemon import serve
    from .server import StartupError

    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        print(f"sbroker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _ssh_config(ns) -> int:
    """``sbroker ssh-config`` as the caller, on a login node (the same as over ssh)."""
    import os
    import pwd

    from . import sshendpoint

    me = pwd.getpwuid(os.getuid())
    args = [*(["--host", ns.host] if ns.host else []), *(["--login", ns.login] if ns.login else [])]
    try:
        return sshendpoint.ssh_config(me.pw_dir, me.pw_name, ns.project, args, sys.stdout, ns.profile)
    except sshendpoint.EndpointError as exc:
        sys.stderr.write(f"sbroker: {exc}\n")
        return 1
