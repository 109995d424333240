"""Failure handling: decide which source restores lost state, and restore it.

- ``policy.py``: :func:`~regrow.recovery.policy.decide`, a pure function from what survived (``Availability``) to
  a source in DESIGN.md's order (local snapshot -> erasure-coded rebuild -> neighbour rebuild of a pipeline stage
  -> universal checkpoint), with the reason; ``recover_stage`` logs it and applies a neighbour rebuild.
- ``neighbor.py``: CheckFree (an intermediate stage averaged from its two neighbours, weighted by their gradient
  norms) and CheckFree+ (an edge stage copied from its neighbour), over point-to-point sends.

Planned (see docs/architecture.md): ``coordinator.py`` (Ray actor that starts, watches and heals workers) and
``worker.py`` (Ray actor hosting one rank).
"""
