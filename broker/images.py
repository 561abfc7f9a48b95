"""Which image a new session gets, and its digest.

The configured image may be a ``current`` link switched by the toolkit; a session is
pinned to the file the link resolved to when it started, so switching the link
never changes a running session. Digests are sha256 of the file, cached by
``(path, size, mtime)`` because images are large and rarely change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_cache: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


def resolve(image: str | Path) -> Path:
    """The real path behind ``image``; raises ``FileNotFoundError`` if it is missing."""
    path = Path(image).resolve(strict=True)
    return path


def digest(path: Path) -> str:
    """``sha256:<hex>`` for an image file, ``dir:<mtime>`` for a sandbox directory."""
    st = path.stat()
    if path.is_dir():
        return f"dir:{st.st_mtime_ns}"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
        _cache[key] = "sha256:" + h.hexdigest()
    return _cache[key]


def version_of(path: Path) -> str:
    """A human label for the image: the file name without the ``.sif`` suffix."""
    name = path.name
    return name[:-4] if name.endswith(".sif") else name



__all__ = ["digest", "resolve", "version_of"]
