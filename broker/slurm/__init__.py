"""SLURM access: one runner that alone runs scheduler commands, pure builders and parsers beside it."""

from .errors import CommandFailed, ControllerUnavailable, NotFound, SlurmError
from .parse import JobInfo, format_comment, parse_comment, parse_poll, parse_sbatch, parse_squeue_json
from .runner import Result, Runner, user_env

__all__ = [
    "CommandFailed", "ControllerUnavailable", "JobInfo", "NotFound", "Result", "Runner",
    "SlurmError", "format_comment", "parse_comment", "parse_poll", "parse_sbatch", "parse_squeue_json", "user_env",
]
