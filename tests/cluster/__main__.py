"""python -m tests.cluster up|down|status|demo"""

from __future__ import annotations

import argparse
import sys

from . import harness


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster",
                                 description="Local SLURM + loopback sshd test bed (root).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="bring the test bed up (idempotent)")
    p_up.add_argument("--no-reinstall", action="store_true",
                      help="do not reinstall the working tree into the product venv")
    sub.add_parser("down", help="stop every daemon that `up` started (by pid)")
    sub.add_parser("status", help="show daemons, pids and the sinfo line")
    sub.add_parser("demo", help="bring the test bed up and show how to get a shell")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            harness.up(reinstall=not args.no_reinstall)
            return harness.status()
        if args.cmd == "down":
            harness.down()
            return 0
        if args.cmd == "status":
            return harness.status()
        if args.cmd == "demo":
            from . import demo
            return demo.main()
    except harness.HarnessError as e:
        print(f"\ntests.cluster {args.cmd}: FAILED: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
