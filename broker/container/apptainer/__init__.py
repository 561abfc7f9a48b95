"""Apptainer image management: build, versioning, sandboxes, integrity, command builders.

Submodules, one job each:

* ``_runtime`` — find the runtime and the containers directory
* ``_builders`` — pure argv builders (``apptainer exec``, ``srun``, ``sbatch``)
* ``_start_script`` — the sbatch instance start script and its marker contract
* ``_versioning`` / ``_sandbox_versioning`` / ``_links`` — ``current`` links and cleanup
* ``_sandbox`` — writable sandbox operations
* ``_build`` / ``_integrity`` — building images, lock files, verification, status

Importing this package runs nothing; only the standard library is used.
"""

from ._build import build
from ._builders import (
    build_dev_pythonpath,
    build_exec_args,
    build_host_mount_binds,
    build_sbatch_command,
    build_shell_in_allocation_command,
    build_srun_command,
)
from ._integrity import freeze, status, verify
from ._runtime import detect_container_cmd, find_containers_dir, is_sandbox
from ._sandbox import sandbox_configure_ps1, sandbox_create, sandbox_maintain, sandbox_to_sif, sandbox_update
from ._sandbox_versioning import (
    cleanup_sandboxes,
    get_active_sandbox,
    list_sandboxes,
    rollback_sandbox,
    switch_sandbox,
)
from ._start_script import build_instance_start_script
from ._versioning import (
    cleanup,
    cleanup_sifs,
    deploy,
    get_active_version,
    list_versions,
    rollback,
    switch_version,
)

__all__ = [
    "build",
    "build_dev_pythonpath",
    "build_exec_args",
    "build_host_mount_binds",
    "build_instance_start_script",
    "build_sbatch_command",
    "build_shell_in_allocation_command",
    "build_srun_command",
    "cleanup",
    "cleanup_sandboxes",
    "cleanup_sifs",
    "deploy",
    "detect_container_cmd",
    "find_containers_dir",
    "freeze",
    "get_active_sandbox",
    "get_active_version",
    "is_sandbox",
    "list_sandboxes",
    "list_versions",
    "rollback",
    "rollback_sandbox",
    "sandbox_configure_ps1",
    "sandbox_create",
    "sandbox_maintain",
    "sandbox_to_sif",
    "sandbox_update",
    "status",
    "switch_sandbox",
    "switch_version",
    "verify",
]
