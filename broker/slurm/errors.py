"""Typed SLURM failures: never guessed from an empty output.

The poller's truth table depends on telling these apart: a job SLURM no longer
knows (:class:`NotFound`) ends a session after a grace period; a controller that
does not answer (:class:`ControllerUnavailable`) ends nothing.
"""

from __future__ import annotations


class SlurmError(Exception):
    """Base class: a SLURM command did not give a usable answer."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str, reason: str) -> None:
        super().__init__(reason)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.reason = reason


class NotFound(SlurmError):
    """SLURM answered, and the job (or step) does not exist."""


class ControllerUnavailable(SlurmError):
    """slurmctld could not be reached, or the command timed out."""


class CommandFailed(SlurmError):
    """The command ran and failed for another reason (see ``stderr``)."""
