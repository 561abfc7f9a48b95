"""``image`` and ``host`` command groups (argparse, stdlib only).

Why a ``register`` function: the ``sbroker`` CLI owns the top-level parser; this module
only adds its two groups.  Every command's parser sets ``func`` and ``handler`` (the
same callable) to a function taking the parsed namespace and returning an exit code, so
the caller dispatches with ``return args.handler(args)``.  Standalone: ``python -m broker.container.cli image --help``.

Errors (bad input, missing tools, failed operations) print one ``error: …`` line to
stderr and exit 1; ``image verify`` also exits 1 when verification fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["register", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def _emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        out = text(data)
        if out:
            print(out)


def _table(rows: list[dict[str, Any]], columns: Sequence[str], empty: str) -> str:
    if not rows:
        return empty
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _dir(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        from ._trust import require_admin_owned

        return require_admin_owned(args.dir, "--dir")
    from .apptainer import find_containers_dir

    return find_containers_dir()


def _mark_active(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**row, "active": "*" if row["active"] else ""} for row in rows]


# -- image handlers ---------------------------------------------------------------------


def _image_build(args: argparse.Namespace) -> int:
    from .apptainer import build

    path = build(
        args.def_name,
        args.output_dir,
        args.force,
        args.sandbox,
        def_path=args.def_path,
        image_name=args.image_name,
        use_sudo=args.sudo,
        fakeroot=args.fakeroot,
    )
    _emit(args, {"path": str(path)}, lambda d: d["path"])
    return 0


def _lister(func_name: str, columns: Sequence[str], empty: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from . import apptainer

        rows = getattr(apptainer, func_name)(_dir(args))
        _emit(args, rows, lambda r: _table(_mark_active(r), columns, empty))
        return 0

    return handler


def _switcher(func_name: str, label: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from . import apptainer

        getattr(apptainer, func_name)(args.version, _dir(args), use_sudo=args.sudo)
        _emit(args, {"active": args.version}, lambda d: f"active {label}: {d['active']}")
        return 0

    return handler


def _roller(func_name: str, label: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from . import apptainer

        version = getattr(apptainer, func_name)(_dir(args), use_sudo=args.sudo)
        _emit(args, {"active": version}, lambda d: f"rolled back to {label} {d['active']}")
        return 0

    return handler


def _cleaner(func_name: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from . import apptainer

        removed = [str(p) for p in getattr(apptainer, func_name)(_dir(args), keep=args.keep)]
        _emit(args, {"removed": removed}, lambda d: "\n".join(f"removed {p}" for p in d["removed"]) or "nothing to remove")
        return 0

    return handler


_image_list = _lister("list_versions", ("active", "version", "size", "date", "path"), "no versioned images")
_image_switch = _switcher("switch_version", "version")
_image_rollback = _roller("rollback", "version")
_image_cleanup = _cleaner("cleanup")
_sandbox_list = _lister("list_sandboxes", ("active", "version", "date", "path"), "no sandboxes")
_sandbox_switch = _switcher("switch_sandbox", "sandbox")
_sandbox_rollback = _roller("rollback_sandbox", "sandbox")
_sandbox_cleanup = _cleaner("cleanup_sandboxes")


def _verify_text(report: dict[str, Any]) -> str:
    lines = [f"sif        {report['sif']['path']}  sha256={report['sif']['sha256']}"]
    for key in ("def_origin", "pip_lock", "dpkg_lock"):
        lines.append(f"{key:<10} {report[key]['status']:<4}  {report[key]['detail']}")
    lines.append(f"overall    {report['overall']}")
    return "\n".join(lines)


def _image_verify(args: argparse.Namespace) -> int:
    from .apptainer import verify

    report = verify(args.sif, def_path=args.def_path, lock_dir=args.lock_dir)
    _emit(args, report, _verify_text)
    return 0 if report["overall"] == "pass" else 1


def _image_freeze(args: argparse.Namespace) -> int:
    from .apptainer import freeze

    locks = {key: str(path) for key, path in freeze(args.sif, output_dir=args.output_dir).items()}
    _emit(args, locks, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()) or "no lock captured")
    return 0


def _image_status(args: argparse.Namespace) -> int:
    from .apptainer import status

    rows = status(args.dir)
    view = [{**r, "needs_rebuild": "yes" if r["needs_rebuild"] else "no", "sif_path": r["sif_path"] or "-"} for r in rows]
    _emit(args, rows, lambda _: _table(view, ("name", "needs_rebuild", "sif_size", "sif_date", "sif_path"), "no recipes"))
    return 0


def _sandbox_create(args: argparse.Namespace) -> int:
    from .apptainer import sandbox_create

    path = sandbox_create(args.source, args.dir, output_dir=args.output_dir)
    _emit(args, {"path": str(path)}, lambda d: d["path"])
    return 0


# -- host handlers ----------------------------------------------------------------------


def _host_check(args: argparse.Namespace) -> int:
    from .host import check_packages

    report = check_packages()

    def text(data: dict[str, Any]) -> str:
        return "\n".join(
            f"{group:<12} {'installed' if info['installed'] else 'missing':<10} {info['version'] or '-'}\n"
            f"{'':<12} binaries: {', '.join(info['binaries']) or 'none'}"
            for group, info in data.items()
        )

    _emit(args, report, text)
    return 0


def _host_install(args: argparse.Namespace) -> int:
    from .host import install_packages

    result = install_packages(args.texlive, args.imagemagick, args.all, args.check)
    _emit(args, result, lambda d: json.dumps(d, indent=2))
    if args.check:
        return 0 if result["check"]["returncode"] == 0 else 1
    return 0 if all(v.get("status") != "failed" for v in result.values() if isinstance(v, dict)) else 1


# -- parser -----------------------------------------------------------------------------


def _command(group: Any, name: str, handler: Handler, help_text: str, description: str = "") -> argparse.ArgumentParser:
    parser = group.add_parser(
        name,
        help=help_text,
        description=description or help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    guarded = _guarded(handler)
    parser.set_defaults(func=guarded, handler=guarded)
    return parser


def _guarded(handler: Handler) -> Handler:
    """Turn expected errors into one ``error: …`` line on stderr and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except (ValueError, OSError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _help_only(parser: argparse.ArgumentParser) -> None:
    """A group called without a command prints its help and exits 2."""

    def show(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show, handler=show)


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_dir(parser: argparse.ArgumentParser, what: str = "versioned images and current.sif") -> None:
    parser.add_argument(
        "-d", "--dir", metavar="DIR", help=f"directory holding the {what} (default: the discovered containers dir)"
    )


def _add_sudo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sudo", action="store_true", help="switch the link with sudo (for root-owned dirs)")


def _register_image(subparsers: Any) -> None:
    image = subparsers.add_parser(
        "image",
        help="build, version and verify apptainer images",
        description=(
            "Manage apptainer images.\n\n"
            "Versioned images are scitex-v<version>.sif files next to a current.sif symlink;\n"
            "'list' orders them newest first (by mtime), 'switch'/'rollback' move the link\n"
            "atomically, 'cleanup' never removes the active or a base image."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _help_only(image)
    group = image.add_subparsers(title="commands", metavar="COMMAND")

    p = _command(
        group,
        "build",
        _image_build,
        "build a SIF (or sandbox) from a .def recipe",
        "Build <out>/<name>/<name>.sif from a recipe. The build goes to a temp name and is\n"
        "renamed into place on success; unchanged recipes (same sha256 as .def-hash) are\n"
        "skipped unless --force. Lock files are frozen next to the image.",
    )
    p.add_argument("def_name", nargs="?", default="scitex-cloud-shared-v0.1.0", help="recipe name in the containers dir (without .def)")
    p.add_argument("--def-path", metavar="FILE", help="explicit .def file (overrides DEF_NAME)")
    p.add_argument("--image-name", metavar="NAME", help="artifact name (default: recipe name)")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="output root (default: the recipe's directory)")
    p.add_argument("-f", "--force", action="store_true", help="rebuild even if the recipe is unchanged")
    p.add_argument("--sandbox", action="store_true", help="build a writable sandbox directory instead of a SIF")
    p.add_argument("--sudo", action="store_true", help="run apptainer build with sudo")
    fake = p.add_mutually_exclusive_group()
    fake.add_argument("--fakeroot", dest="fakeroot", action="store_true", default=None, help="build with --fakeroot (default for sandboxes)")
    fake.add_argument("--no-fakeroot", dest="fakeroot", action="store_false", help="build without --fakeroot")
    _add_json(p)

    p = _command(group, "list", _image_list, "list versioned images (newest first, * = active)")
    _add_dir(p)
    _add_json(p)

    p = _command(group, "switch", _image_switch, "make scitex-v<VERSION>.sif the active image")
    p.add_argument("version", metavar="VERSION", help="version string, e.g. 2.19.5")
    _add_dir(p)
    _add_sudo(p)
    _add_json(p)

    p = _command(group, "rollback", _image_rollback, "activate the image before the current one (by mtime)")
    _add_dir(p)
    _add_sudo(p)
    _add_json(p)

    p = _command(group, "cleanup", _image_cleanup, "delete old versioned images, keeping the newest N and the active one")
    p.add_argument("-k", "--keep", type=int, default=3, metavar="N", help="non-active versions to keep (default: 3)")
    _add_dir(p)
    _add_json(p)

    p = _command(
        group,
        "verify",
        _image_verify,
        "check an image's sha256, recipe origin and lock files (exit 1 on failure)",
    )
    p.add_argument("sif", metavar="SIF", help="image to verify")
    p.add_argument("--def", dest="def_path", metavar="FILE", help="recipe that should have produced it")
    p.add_argument("--lock-dir", metavar="DIR", help="where the lock files are (default: next to the SIF)")
    _add_json(p)

    p = _command(group, "freeze", _image_freeze, "write pip/dpkg/node lock files for an image")
    p.add_argument("sif", metavar="SIF", help="image to inspect")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="where to write the locks (default: next to the SIF)")
    _add_json(p)

    p = _command(group, "status", _image_status, "show each recipe, its image and whether it needs a rebuild")
    p.add_argument("-d", "--dir", metavar="DIR", help="directory with .def recipes (default: discovered)")
    _add_json(p)

    sandbox = group.add_parser(
        "sandbox",
        help="writable sandbox directories (create, list, switch, rollback, cleanup)",
        description="Manage sandbox-YYYYMMDD_HHMMSS/ directories and the current-sandbox link.",
    )
    _help_only(sandbox)
    sgroup = sandbox.add_subparsers(title="commands", metavar="COMMAND")
    p = _command(sgroup, "create", _sandbox_create, "build a timestamped sandbox from a SIF or .def and activate it")
    p.add_argument("source", metavar="SOURCE", help=".sif or .def to build from")
    p.add_argument("-d", "--dir", metavar="DIR", help="parent for the sandbox and link (default: SOURCE's directory)")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="explicit sandbox path instead of a timestamped name")
    _add_json(p)
    p = _command(sgroup, "list", _sandbox_list, "list sandboxes (newest first, * = active)")
    _add_dir(p, "sandboxes and current-sandbox")
    _add_json(p)
    p = _command(sgroup, "switch", _sandbox_switch, "make sandbox-<VERSION> the active sandbox")
    p.add_argument("version", metavar="VERSION", help="timestamp, e.g. 20260225_173700")
    _add_dir(p, "sandboxes and current-sandbox")
    _add_sudo(p)
    _add_json(p)
    p = _command(sgroup, "rollback", _sandbox_rollback, "activate the sandbox before the current one")
    _add_dir(p, "sandboxes and current-sandbox")
    _add_sudo(p)
    _add_json(p)
    p = _command(sgroup, "cleanup", _sandbox_cleanup, "delete old sandboxes, keeping the newest N and the active one")
    p.add_argument("-k", "--keep", type=int, default=5, metavar="N", help="non-active sandboxes to keep (default: 5)")
    _add_dir(p, "sandboxes and current-sandbox")
    _add_json(p)


def _register_host(subparsers: Any) -> None:
    host = subparsers.add_parser(
        "host",
        help="host packages containers borrow read-only (TeX Live, ImageMagick)",
        description="Check or install host packages that session containers mount read-only.",
    )
    _help_only(host)
    group = host.add_subparsers(title="commands", metavar="COMMAND")
    p = _command(group, "check", _host_check, "report which host packages are installed")
    _add_json(p)
    p = _command(
        group,
        "install",
        _host_install,
        "install host packages with apt-get (via sudo)",
        "Install host packages with the bundled install-host-packages.sh (sudo apt-get).\n"
        "With no package flag, everything is installed (TeX Live and ImageMagick).\n"
        "--check only reports, without sudo.",
    )
    p.add_argument("--texlive", action="store_true", help="install TeX Live")
    p.add_argument("--imagemagick", action="store_true", help="install ImageMagick")
    p.add_argument("--all", action="store_true", help="install everything (the default when no flag is given)")
    p.add_argument("--check", action="store_true", help="only report what is installed; never uses sudo")
    _add_json(p)


def register(subparsers: Any) -> None:
    """Add the ``image`` and ``host`` groups to an ``argparse`` subparsers object."""
    _register_image(subparsers)
    _register_host(subparsers)


def build_parser(prog: str = "sbroker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Image toolkit of slurm-session-broker.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being run")
    register(parser.add_subparsers(title="command groups", metavar="GROUP"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m broker.container.cli")
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
