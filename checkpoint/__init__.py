"""Checkpoints of the shard state (``regrow.trainer.state.ShardState``): on disk, and in memory on every node.

- ``hostcopy.py``: device-to-host copies into reused (pinned) host buffers that overlap the next forward/backward,
  for both kinds below.
- ``rng.py``: every random generator's state as JSON plus one blob, as snapshots and checkpoints store it.
- ``universal/``: the durable universal checkpoint (docs/checkpoint-format.md): format, storage, verification, the
  lazy asynchronous writer, loading at any world size, whole-model views, DeepSpeed in and out.
- ``snapshot/``: the rank side of in-memory snapshots (docs/snapshot-protocol.md): segment format, the protocol
  client, the per-step ``SnapshotSink`` and ``restore_from_node``, the checksums.
- ``node/``: the per-node snapshot process that owns the shared-memory segments, persists them as universal
  checkpoints and erasure-codes them across a group of nodes (the launchers wire it up: ``launch/local/nodes.py``,
  ``launch/torchrun.py``, ``recovery/ray/``).
"""
