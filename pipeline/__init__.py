"""Orchestration: sources, data, plans, recovery, merge, quality, the build and the `cqil` CLI."""
