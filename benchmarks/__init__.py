"""sbroker benchmarks: each one measured against the raw SLURM path in one run.

``python -m benchmarks [names...]`` (``make bench`` runs them all). Results go to
``docs/benchmarks.md`` (a markdown table) and ``benchmarks/results/*.json`` (raw
samples). Benchmarks are not tests: nothing here asserts a timing; goals that are
missed are reported as missed.
"""
