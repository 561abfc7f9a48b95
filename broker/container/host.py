"""Host packages (TeX Live, ImageMagick): check, install, and mount into containers.

Why: images stay small by borrowing big toolchains from the host read-only.  Fixes over
upstream: TeX Live counts as installed only when a TeX binary exists, not ghostscript
alone (B26); mounts re-root host paths under ``/usr`` inside the container, so
``<prefix>/share/texlive`` appears at ``/usr/share/texlive`` and binaries at
``/usr/bin`` (B13); the install script ships inside this package and is located with
:mod:`importlib.resources` (B14); ``check_only`` never uses sudo.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

from ._proc import format_cmd, require_tool, run, sudo_prefix
from ._validate import validate_mount_spec, validate_texlive_prefix

__all__ = [
    "TEXLIVE_BINARIES",
    "TEXLIVE_DIRS",
    "check_packages",
    "install_packages",
    "install_script_path",
    "get_texlive_binds",
    "get_mount_config",
]

log = logging.getLogger("broker.container")

TEXLIVE_BINARIES = ["pdflatex", "bibtex", "latexmk", "latexdiff", "kpsewhich", "makeindex", "biber"]
TEXLIVE_DIRS = ["share/texlive", "share/texmf-dist"]
_TEXLIVE_HELPERS = ["gs", "pdfinfo"]  # reported, but not proof that TeX Live is installed
_TEXLIVE_PROOF = {"pdflatex", "kpsewhich"}
_IMAGEMAGICK_BINARIES = ["convert", "identify", "mogrify"]
_CONTAINER_PREFIX = "/usr"


def _first_version_line(binary: str) -> str:
    if shutil.which(binary) is None:
        return ""
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = proc.stdout.strip() or proc.stderr.strip()
    return text.splitlines()[0] if text else ""


def check_packages() -> dict[str, dict[str, Any]]:
    """``{texlive|imagemagick: {installed, version, binaries}}`` from what is on PATH."""
    tex = [b for b in TEXLIVE_BINARIES + _TEXLIVE_HELPERS if shutil.which(b)]
    magick = [b for b in _IMAGEMAGICK_BINARIES if shutil.which(b)]
    return {
        "texlive": {
            "installed": bool(_TEXLIVE_PROOF & set(tex)),
            "version": _first_version_line("pdflatex"),
            "binaries": tex,
        },
        "imagemagick": {
            "installed": bool(magick),
            "version": _first_version_line("convert"),
            "binaries": magick,
        },
    }


def install_script_path() -> Path:
    """The bundled ``install-host-packages.sh``; :class:`FileNotFoundError` if missing."""
    script = Path(str(resources.files("broker.container") / "scripts" / "install-host-packages.sh"))
    if not script.is_file():
        raise FileNotFoundError(f"install script not found: {script}")
    return script


def install_packages(
    texlive: bool = False, imagemagick: bool = False, all: bool = False, check_only: bool = False
) -> dict[str, Any]:
    """Run the bundled install script (``sudo bash <script> <flags>``, no sudo when root).

    No flag at all means ``--all`` (the reference contract) — which for our script is
    TeX Live *and* ImageMagick, nothing else.  ``check_only`` runs ``bash <script>
    --check`` without sudo and returns ``{script, check: {returncode}}``.  The exact command
    is logged before it runs.  Needs ``apt-get`` (Debian/Ubuntu) to install.
    """
    script = install_script_path()
    result: dict[str, Any] = {"script": str(script)}
    if check_only:
        argv = ["bash", str(script), "--check"]
        log.info("running %s", format_cmd(argv))
        result["check"] = {"returncode": run(argv, capture=False, check=False).returncode}
        return result
    require_tool("apt-get", "install host packages (Debian/Ubuntu hosts only)")
    everything = all or not (texlive or imagemagick)
    flags = ["--all"] if everything else ["--texlive"] * texlive + ["--imagemagick"] * imagemagick
    argv = [*sudo_prefix(True), "bash", str(script), *flags]
    log.warning("running %s", format_cmd(argv))
    rc = run(argv, capture=False, check=False).returncode
    for group, wanted in (("texlive", texlive), ("imagemagick", imagemagick)):
        if everything or wanted:
            result[group] = {"status": "installed" if rc == 0 else "failed", "returncode": rc}
        else:
            result[group] = {"status": "skipped", "returncode": None}
    return result


def get_texlive_binds(prefix: str = "/usr") -> list[dict[str, str]]:
    """Read-only mounts for the TeX Live files that exist under ``prefix`` on this host.

    Container paths are the host paths re-rooted at ``/usr``
    (``/opt/tl/share/texlive`` → ``/usr/share/texlive``).  Dirs first, then binaries.
    """
    root = validate_texlive_prefix(prefix, "prefix") or ""
    binds = []
    for rel in TEXLIVE_DIRS + [f"bin/{b}" for b in TEXLIVE_BINARIES]:
        host = f"{root}/{rel}"
        if Path(host).exists():
            binds.append({"host": host, "container": f"{_CONTAINER_PREFIX}/{rel}", "mode": "ro"})
    return binds


def get_mount_config(texlive_prefix: str = "", host_mounts_raw: str = "") -> dict[str, list[Any]]:
    """Parse TeX Live + raw mount config into ``{bind_args, path_additions, mounts}``.

    ``host_mounts_raw`` holds ``host:container[:ro|rw]`` specs separated by commas or
    newlines (mode defaults to ``rw``).  A malformed spec raises :class:`ValueError`
    naming it (upstream silently dropped it).  ``path_additions`` lists container-side
    directories to add to ``PATH`` (``/usr/bin`` when TeX binaries are mounted).
    """
    mounts = get_texlive_binds(texlive_prefix or "/usr")
    has_bins = any(m["container"].startswith(f"{_CONTAINER_PREFIX}/bin/") for m in mounts)
    path_additions = [f"{_CONTAINER_PREFIX}/bin"] if has_bins else []
    specs = [s.strip() for s in host_mounts_raw.replace("\n", ",").split(",")]
    for i, spec in enumerate(s for s in specs if s):
        mounts.append(validate_mount_spec(spec, f"host_mounts_raw[{i}]").as_dict())
    bind_args: list[str] = []
    for mount in mounts:
        bind_args += ["--bind", f"{mount['host']}:{mount['container']}:{mount['mode']}"]
    return {"bind_args": bind_args, "path_additions": path_additions, "mounts": mounts}
