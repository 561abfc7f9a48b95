"""sbroker: personal container shells inside SLURM allocations, by plain ``ssh``.

The package root stays import-free on purpose: ``sbroker login`` runs on every SSH
login's critical path and must import only the standard library and
:mod:`broker.protocol`.
"""

__version__ = "0.1.0"
