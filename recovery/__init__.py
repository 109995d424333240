"""Failure handling: detect, abort, replace and restore.

Planned modules (see docs/architecture.md): ``coordinator.py`` (Ray actor that starts, watches and heals workers),
``worker.py`` (Ray actor hosting one rank), ``policy.py`` (which source restores what: local snapshot, erasure-coded
rebuild, neighbour averaging, universal checkpoint), ``neighbor.py`` (CheckFree / CheckFree+ stage rebuild).
Nothing here is implemented yet.
"""
