"""``build()``: turn a ``.def`` recipe into ``<out>/<name>/<name>.sif`` (or ``.sandbox``).

Why the care: the output may be the image live sessions run from.  The build writes to a
temporary name in the same directory and is renamed into place only on success (B20);
the recipe snapshot, ``.def-hash`` and lock files are written only after success, next
to the image so ``verify``/``status`` find them (B15, B16); the top-level convenience
link ``<out>/<name>.sif`` only ever replaces a symlink, never a real file (B21).
As root, the recipe and the output directories must be admin-owned (:mod:`.._trust`),
and the build log is created fresh, never through a link (``O_EXCL | O_NOFOLLOW``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from .._files import atomic_write_text, sha256_file, temp_sibling
from .._proc import run, sudo_prefix
from .._trust import require_admin_owned
from .._validate import validate_name
from ._integrity import DEF_HASH_FILE, freeze, read_stored_hash
from ._links import replace_symlink
from ._runtime import detect_container_cmd, find_containers_dir

__all__ = ["build", "build_argv", "SANDBOX_HASH_FILE"]

log = logging.getLogger("broker.container")

SANDBOX_HASH_FILE = ".sandbox-hash"


def build_argv(
    cmd: str, output: Path, recipe: Path, *, sandbox: bool, fakeroot: bool, sudo: list[str]
) -> list[str]:
    """``[sudo] <cmd> build [--sandbox] [--fakeroot] --force <output> <recipe>``."""
    argv = [*sudo, cmd, "build"]
    argv += ["--sandbox"] if sandbox else []
    argv += ["--fakeroot"] if fakeroot else []
    return [*argv, "--force", str(output), str(recipe)]


def _resolve_recipe(def_name: str, def_path: str | os.PathLike[str] | None) -> Path:
    if def_path is not None:
        recipe = Path(def_path)
        recipe = recipe if recipe.is_absolute() else Path.cwd() / recipe
    else:
        recipe = find_containers_dir() / f"{validate_name(def_name, 'def_name')}.def"
    if not recipe.is_file():
        raise FileNotFoundError(f"Definition file not found: {recipe}")
    return require_admin_owned(recipe, "recipe")


def _open_log(image_dir: Path, name: str) -> tuple[int, Path]:
    """Create ``<name>.build-<ts>.log`` afresh: never opened through a planted link or file."""
    stamp = time.strftime('%Y-%m%d-%H%M%S')
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(100):
        path = image_dir / f"{name}.build-{stamp}{f'-{attempt}' if attempt else ''}.log"
        try:
            return os.open(path, flags, 0o644), path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a build log in {image_dir}: {name}.build-{stamp}*.log all exist")


def _remove(path: Path, sudo: list[str]) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        if not sudo:
            raise
        run([*sudo, "rm", "-rf", str(path)])


def _install(tmp: Path, final: Path, sudo: list[str]) -> None:
    """Rename the fresh build over ``final``; a directory is swapped via a side name."""
    if final.is_dir() and not final.is_symlink():
        old = temp_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old, sudo)
    else:
        os.replace(tmp, final)


def _snapshot_recipe(recipe: Path, snapshot: Path) -> None:
    if snapshot.exists() and os.path.samefile(recipe, snapshot):
        return
    tmp = temp_sibling(snapshot)
    shutil.copy2(recipe, tmp)
    os.replace(tmp, snapshot)


def _refresh_top_link(out: Path, name: str) -> None:
    link = out / f"{name}.sif"
    if link.exists() and not link.is_symlink():
        log.warning("not replacing %s: it is a real file, not the convenience symlink", link)
        return
    replace_symlink(link, f"{name}/{name}.sif")


def build(
    def_name: str = "scitex-cloud-shared-v0.1.0",
    output_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    sandbox: bool = False,
    *,
    def_path: str | os.PathLike[str] | None = None,
    image_name: str | None = None,
    use_sudo: bool = False,
    fakeroot: bool | None = None,
) -> Path:
    """Build ``<out>/<name>/<name>.sif`` (or ``<name>.sandbox``) from a recipe; return its path.

    Skips the build when the output exists and its stored hash equals the recipe's SHA-256
    (unless ``force``).  ``fakeroot`` defaults to ``sandbox``.  Runs with cwd = ``out`` so
    recipes can say ``From: ./base.sif``; output goes to ``<name>.build-<ts>.log``.
    SIF builds also refresh ``<out>/<name>.sif`` and freeze lock files next to the image.
    Raises :class:`FileNotFoundError` (runtime or recipe missing) or :class:`RuntimeError`.
    """
    cmd = detect_container_cmd()
    recipe = _resolve_recipe(def_name, def_path)
    name = validate_name(image_name or (def_name if def_path is None else recipe.stem), "image_name")
    out = require_admin_owned(Path(output_dir) if output_dir else recipe.parent, "output dir")
    image_dir = out / name
    image_dir.mkdir(parents=True, exist_ok=True)
    require_admin_owned(image_dir, "image dir")
    output = image_dir / (f"{name}.sandbox" if sandbox else f"{name}.sif")
    hash_file = image_dir / (SANDBOX_HASH_FILE if sandbox else DEF_HASH_FILE)
    recipe_hash = sha256_file(recipe)
    if not force and output.exists() and read_stored_hash(hash_file) == recipe_hash:
        log.info("%s is up to date with %s; skipping build", output, recipe)
        return output

    sudo = sudo_prefix(use_sudo)
    tmp = image_dir / f".{name}.build-{os.getpid()}-{time.time_ns()}{output.suffix}"
    log_fd, log_path = _open_log(image_dir, name)
    argv = build_argv(cmd, tmp, recipe, sandbox=sandbox, fakeroot=sandbox if fakeroot is None else fakeroot, sudo=sudo)
    log.info("building %s (log: %s)", output, log_path)
    try:
        proc = run(argv, capture=False, check=False, cwd=out, stdout=log_fd, stderr=log_fd)
    finally:
        os.close(log_fd)
    if proc.returncode != 0:
        _remove(tmp, sudo)
        raise RuntimeError(f"Build failed with exit code {proc.returncode}; see {log_path}")
    _install(tmp, output, sudo)
    _snapshot_recipe(recipe, image_dir / f"{name}.def")
    atomic_write_text(hash_file, recipe_hash + "\n")
    if not sandbox:
        _refresh_top_link(out, name)
        try:
            freeze(output, output_dir=image_dir)
        except Exception as exc:  # freezing is best effort; the image itself is fine
            log.warning("auto-freeze of %s failed: %s", output, exc)
    return output
