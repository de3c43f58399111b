"""Benchmarks: scripts that print tables (and write JSON), run from the repository root as
``python -m bench.<name>`` against the installed ``autobits`` package."""
