"""Failure handling: decide which source restores lost state, and restore it.

- ``policy.py``: :func:`~regrow.recovery.policy.decide`, a pure function from what survived (``Availability``) to
  a source in DESIGN.md's order (local snapshot -> erasure-coded rebuild -> neighbour rebuild of a pipeline stage
  -> universal checkpoint), with the reason; ``recover_stage`` logs it and applies a neighbour rebuild.
- ``neighbor.py``: CheckFree (an intermediate stage averaged from its two neighbours, weighted by their gradient
  norms) and CheckFree+ (an edge stage copied from its neighbour), over point-to-point sends.
- ``ray/``: the Ray coordinator that starts the workers and the snapshot processes, watches them, and heals a
  failure (abort the survivors, replace, re-form the group, restore) or shrinks the job (elastic mode), one module
  per part (listed in ``ray/__init__.py``); the Ray actor hosting one rank (``ray/worker.py``) and what its GPU
  runs ahead of its first step (``ray/gpu_warm_up.py``).
- ``stage_heal.py``: a pipeline's lost stage rebuilt from its neighbours under the coordinator.
"""
