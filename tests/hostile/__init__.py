"""Hostile co-tenants (issue 14): one test per attack; see BASE_FAILURES.md for the base-commit runs."""
