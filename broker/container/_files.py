"""Small filesystem helpers shared by the versioning, build and integrity modules.

Why one module: hashing, human sizes, dates, atomic writes and "newest first" ordering
must behave identically everywhere (``list_versions`` and ``rollback`` must agree on
what "previous" means), so they are defined once.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

__all__ = [
    "sha256_file",
    "sha256_bytes",
    "human_size",
    "format_date",
    "temp_sibling",
    "atomic_write_text",
    "newest_first",
    "natural_key",
]

_BUFFER = 1 << 20  # 1 MiB: large enough that hashing runs at sha256sum speed
T = TypeVar("T")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Streaming SHA-256 of a file (constant memory, one reusable 1 MiB buffer)."""
    digest = hashlib.sha256()
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def human_size(size: float) -> str:
    """``1536`` → ``'1.5 KB'``; always one decimal, units B…PB (upstream format)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PB"


def format_date(timestamp: float) -> str:
    """Local time as ``%Y-%m-%d %H:%M`` (the format every listing uses)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name in ``path``'s directory (same filesystem → rename is atomic)."""
    return path.parent / f".{path.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}"


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` to a temp sibling and rename it over ``path``."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key treating digit runs as numbers, so ``2.10`` > ``2.9``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def newest_first(items: Iterable[T], mtime: Callable[[T], float], label: Callable[[T], str]) -> list[T]:
    """Order by mtime, newest first; equal mtimes fall back to the label, highest first.

    The reference mandates mtime order; the tie-break makes the order deterministic
    (directory listing order is not) — see B23.
    """
    return sorted(items, key=lambda item: (mtime(item), natural_key(label(item))), reverse=True)
