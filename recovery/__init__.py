"""Failure handling: which source restores lost state, and restoring it through the training object's contract
(``trainer.state.Restorable``).

- ``order.py``: the recovery order, one name per source (``Source``: kept in memory, node snapshot, erasure-coded
  rebuild, neighbour rebuild, universal checkpoint) and :func:`~regrow.recovery.order.plan`, a pure function from
  what may serve (``Availability``) to the sources worth trying, best first, with the reasons;
- ``restore.py``: :func:`~regrow.recovery.restore.restore_job`, the collective restore every launcher and the Ray
  worker call: it plans the sources from the job's settings and walks them;
- ``from_snapshots.py``, ``from_checkpoint.py``, ``stage_heal.py``: the sources' collective attempts (survivors,
  node slots, coded buffers; the universal checkpoint; a pipeline stage rebuilt from its neighbours);
- ``agreement.py``: the small collectives by which the ranks agree during a restore;
- ``neighbor.py``: CheckFree (an intermediate stage averaged from its two neighbours, weighted by their gradient
  norms) and CheckFree+ (an edge stage copied from its neighbour), over point-to-point sends;
- ``ray/``: the Ray coordinator that starts the workers and the snapshot processes, watches them, and heals a
  failure (abort the survivors, replace, re-form the group, restore) or shrinks the job (elastic mode), one module
  per part (listed in ``ray/__init__.py``), among them the Ray actor hosting one rank (``ray/worker.py``);
- ``gpu_warm_up.py``: what a replacement rank's GPU runs ahead of its first step (a Ray worker's, a local
  standby's).

Modules here import the checkpoint tier and the trainer; ``ray/`` builds on the rest of the tier, never the other
way round.
"""
