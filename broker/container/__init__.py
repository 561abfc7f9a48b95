"""Image toolkit: Apptainer/Docker image management and the commands the broker runs.

Implements the seed API (``../shared/seed``) with the upstream bugs fixed.  The
top-level names below are resolved lazily on first access, so ``import broker.container``
costs almost nothing and runs no process.  Submodules: :mod:`.apptainer`,
:mod:`.docker`, :mod:`.host`, :mod:`.snapshot`, validators in :mod:`._validate`, and
the ``image``/``host`` CLI in :mod:`.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name → (submodule, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "build": ("apptainer", "build"),
    "cleanup": ("apptainer", "cleanup"),
    "deploy": ("apptainer", "deploy"),
    "list_versions": ("apptainer", "list_versions"),
    "rollback": ("apptainer", "rollback"),
    "sandbox_create": ("apptainer", "sandbox_create"),
    "status": ("apptainer", "status"),
    "switch": ("apptainer", "switch_version"),
    "verify": ("apptainer", "verify"),
    "docker_rebuild": ("docker", "rebuild"),
    "docker_restart": ("docker", "restart"),
    "host_check": ("host", "check_packages"),
    "host_install": ("host", "install_packages"),
    "env_snapshot": ("snapshot", "env_snapshot"),
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .apptainer import build, cleanup, deploy, list_versions, rollback, sandbox_create, status, verify
    from .apptainer import switch_version as switch
    from .docker import rebuild as docker_rebuild
    from .docker import restart as docker_restart
    from .host import check_packages as host_check
    from .host import install_packages as host_install
    from .snapshot import env_snapshot


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
