"""Ray coordination: one job on a Ray cluster, one worker actor per rank, healed after failures.

- ``coordinator.py``: :class:`~regrow.recovery.ray.coordinator.Coordinator`, the entry point (``run``, ``stop``),
  which wires the parts below together; ``config.py``: its settings, ``CoordinatorConfig``, and
  ``CoordinatorError``.
- ``placement.py``: where the actors go (the placement group of ``ranks_per_node``, node affinities, live nodes).
- ``workers.py``: the ranks' worker actors started, replaced (launched as soon as a death is known) and stopped;
  ``standbys.py``: standby workers that take over a rank lost on their node, and the placeholders that hold its
  resources meanwhile.
- ``snapshot_hosts.py``: the snapshot process of each node, its erasure-coding group, its rebuild after a node loss.
- ``generation.py``: a process-group generation formed over the coordinator's store, and the job restored in it.
- ``watch.py``: the training calls watched (actor deaths, failed steps, hung ranks) and the survivors aborted;
  ``heal.py``: the dead ranks replaced and the next generation formed, or the job shrunk in elastic mode.
- ``job.py``: the state those parts share (each rank's worker, the generation, the world size, failures) and the
  run's ``Outcome``; ``events.py``: the event log (text, callback, JSONL); ``stop.py``: ending a run early.
- ``worker.py``: the ``Worker`` actor hosting one rank (train and control threads; its GPU warm-up is
  ``recovery/gpu_warm_up.py``); ``member.py``: what every worker actor does whatever it runs (its
  place, heartbeat and abort, joining and leaving a generation).
- ``entry.py``, ``entry_worker.py``: entry-point mode, a user's function (``module:function``) and the
  ``EntryWorker`` actor that calls it again from the top in every generation.
"""
