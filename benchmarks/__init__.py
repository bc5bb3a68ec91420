"""embedline's benchmarks: a folder of the repository, not part of the installed package.

Run them from the repository root as modules, e.g. `.venv/bin/python -m benchmarks.suite` (`make bench`).
"""
