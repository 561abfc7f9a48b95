"""What is inside a built image, and does it still match: ``freeze``, ``verify``, ``status``.

Why together: all three agree on one naming scheme (B15) — ``requirements-lock.txt``,
``dpkg-lock.txt``, ``node-lock.txt`` and ``.def-hash`` live next to the SIF (in the
per-image directory ``build`` creates) — and on one isolated capture command
(``apptainer exec --cleanenv --no-home``, with a timeout) so the caller's ``~/.local``
packages never leak into a lock (B27).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from .._files import atomic_write_text, format_date, human_size, sha256_file
from .._proc import MissingToolError
from ._runtime import detect_container_cmd, find_containers_dir

__all__ = [
    "LOCK_FILES",
    "DEF_HASH_FILE",
    "CAPTURE_TIMEOUT",
    "capture_argv",
    "freeze",
    "verify",
    "status",
    "read_stored_hash",
]

log = logging.getLogger("broker.container")

DEF_HASH_FILE = ".def-hash"
CAPTURE_TIMEOUT = 120.0
VERIFY_TIMEOUT = 60.0
#: key → (lock file name, command run inside the image)
LOCK_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pip": ("requirements-lock.txt", ("pip", "freeze")),
    "dpkg": ("dpkg-lock.txt", ("dpkg-query", "-W", "-f=${Package}=${Version}\n")),
    "node": ("node-lock.txt", ("npm", "list", "-g", "--depth=0", "--json")),
}


def capture_argv(cmd: str, sif: str | os.PathLike[str], key: str) -> list[str]:
    """Isolated ``<cmd> exec --cleanenv --no-home <sif> <tool…>`` for lock capture/compare."""
    return [cmd, "exec", "--cleanenv", "--no-home", os.fspath(sif), *LOCK_FILES[key][1]]


def _capture(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def freeze(sif_path: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write pip/dpkg/node lock files for a SIF; return ``{key: path}`` for captures that worked.

    Each file is written atomically.  When a capture fails, a lock file of that name left
    from an earlier freeze is deleted (a stale lock would make ``verify`` lie).
    """
    sif = Path(sif_path)
    if not sif.exists():
        raise FileNotFoundError(f"SIF not found: {sif}")
    cmd = detect_container_cmd()
    out = Path(output_dir) if output_dir else sif.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, (filename, _) in LOCK_FILES.items():
        target = out / filename
        try:
            proc = _capture(capture_argv(cmd, sif, key), CAPTURE_TIMEOUT)
            ok = proc.returncode == 0
            problem = f"exit code {proc.returncode}: {proc.stderr.strip()[-200:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, problem = False, str(exc)
        if ok:
            atomic_write_text(target, proc.stdout)
            written[key] = target
        else:
            log.warning("freeze %s: %s capture failed (%s)", sif, key, problem)
            if target.exists():
                log.warning("removing stale lock file %s", target)
                target.unlink()
    return written


def read_stored_hash(path: Path) -> str | None:
    """Stripped content of a ``.def-hash`` file; ``None`` if missing or empty."""
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _entry(status: str, detail: str, diff_count: int = 0, **extra: Any) -> dict[str, Any]:
    return {"status": status, "detail": detail, "diff_count": diff_count, **extra}


def _check_def(def_path: Path, hash_file: Path) -> dict[str, Any]:
    if not def_path.is_file():
        return _entry("fail", f".def not found: {def_path}")
    stored = read_stored_hash(hash_file)
    if stored is None:
        return _entry("fail", f"No stored .def-hash found at {hash_file}")
    current = sha256_file(def_path)
    if current == stored:
        return _entry("pass", f"def hash matches: {current[:16]}...")
    return _entry("fail", f"def hash mismatch: current={current[:16]}... stored={stored[:16]}...")


def _check_lock(cmd: str, sif: Path, key: str, lock_file: Path) -> dict[str, Any]:
    tool = LOCK_FILES[key][1][0]
    try:
        proc = _capture(capture_argv(cmd, sif, key), VERIFY_TIMEOUT)
    except subprocess.TimeoutExpired:
        return _entry("fail", f"{tool} timed out", -1)
    except OSError as exc:
        return _entry("fail", str(exc), -1)
    if proc.returncode != 0:
        return _entry("fail", f"{tool} failed: {proc.stderr.strip()[:200]}", -1)
    expected = set(lock_file.read_text(encoding="utf-8").strip().splitlines())
    actual = set(proc.stdout.strip().splitlines())
    if expected == actual:
        return _entry("pass", f"All {len(actual)} packages match")
    added, removed = sorted(actual - expected), sorted(expected - actual)
    parts = [f"+{len(added)} new"] if added else []
    parts += [f"-{len(removed)} missing"] if removed else []
    return _entry(
        "fail", "Package mismatch: " + ", ".join(parts), len(added) + len(removed), added=added[:10], removed=removed[:10]
    )


def verify(
    sif_path: str | os.PathLike[str],
    def_path: str | os.PathLike[str] | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Check a SIF: SHA-256, ``.def`` origin, and pip/dpkg locks against the image.

    ``sif_path`` is resolved before looking for ``.def-hash`` and locks, so the top-level
    ``<name>.sif`` symlink verifies like the real file (B17).  Every lock entry has
    ``diff_count`` (0 pass/skip, -1 tool failure).  Lock files present but no runtime to
    check them is a ``fail``, never a silent pass.
    """
    given = Path(sif_path)
    result: dict[str, Any] = {
        "sif": {"path": str(given), "sha256": None, "exists": False},
        "def_origin": _entry("skip", "No .def provided"),
        "pip_lock": _entry("skip", "No lock file found"),
        "dpkg_lock": _entry("skip", "No lock file found"),
        "overall": "pass",
    }
    if not given.is_file():
        result["overall"] = "fail"
        return result
    sif = given.resolve()
    result["sif"].update(exists=True, sha256=sha256_file(sif))
    if def_path is not None:
        result["def_origin"] = _check_def(Path(def_path), sif.parent / DEF_HASH_FILE)
    locks = Path(lock_dir) if lock_dir else sif.parent
    try:
        cmd: str | None = detect_container_cmd()
    except MissingToolError:
        cmd = None
    for key, field in (("pip", "pip_lock"), ("dpkg", "dpkg_lock")):
        lock_file = locks / LOCK_FILES[key][0]
        if not lock_file.is_file():
            continue
        if cmd is None:
            result[field] = _entry("fail", f"{lock_file.name} present but no container command found to check it", -1)
        else:
            result[field] = _check_lock(cmd, sif, key, lock_file)
    if any(result[f]["status"] == "fail" for f in ("def_origin", "pip_lock", "dpkg_lock")):
        result["overall"] = "fail"
    return result


def _locate_sif(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.sif", directory / name / f"{name}.sif"):
        if candidate.is_file():
            return candidate
    return None


def status(containers_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One entry per ``*.def``: where its SIF is, and whether the recipe changed since the build.

    The SIF is ``<dir>/<name>.sif`` (the top-level link) or ``<dir>/<name>/<name>.sif``; the
    stored hash is ``<dir>/<name>/.def-hash``, falling back to a legacy ``<dir>/.def-hash``.
    """
    directory = Path(containers_dir) if containers_dir else find_containers_dir()
    entries = []
    for def_file in sorted(directory.glob("*.def")):
        name = def_file.stem
        sif = _locate_sif(directory, name)
        stored = read_stored_hash(directory / name / DEF_HASH_FILE)
        if stored is None:
            stored = read_stored_hash(directory / DEF_HASH_FILE)
        current = sha256_file(def_file)
        stat = sif.stat() if sif else None
        entries.append(
            {
                "name": name,
                "def_path": str(def_file),
                "sif_path": str(sif) if sif else None,
                "sif_size": human_size(stat.st_size) if stat else None,
                "sif_date": format_date(stat.st_mtime) if stat else None,
                "hash_current": current,
                "hash_stored": stored,
                "needs_rebuild": sif is None or current != stored,
            }
        )
    return entries
