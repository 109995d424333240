"""Checkpoints of the shard state (``regrow.trainer.state.ShardState``).

- ``format.py``: the universal format (manifest, tensor kinds, chunk checksums); see docs/checkpoint-format.md.
- ``pieces.py``: which byte ranges of which parameter file a rank's shard covers.
- ``storage.py``: atomic directory commit, the ``latest`` pointer, retention, clean-up of interrupted saves.
- ``verify.py``: structure and checksum verification; which checkpoint to load when the newest is damaged.
- ``hostcopy.py``: device-to-host copies into reused (pinned) host buffers that overlap the next forward/backward.
- ``writer.py``: the lazy asynchronous checkpoint writer, a ``StateSink`` for the Trainer.
- ``reshard.py``: loading at any world size, ZeRO stage and state bits, each rank reading only its ranges.
- ``whole.py``: whole-model fp32 export/import (for converters and inspection).
- ``deepspeed.py``: DeepSpeed ZeRO-1/2 and universal checkpoints in, DeepSpeed universal out.
- ``crc.py``: CRC32 of large buffers on several threads, equal to ``zlib.crc32`` (snapshot seal and verify).
- ``erasure.py``: rotating-parity erasure coding of node snapshots across a group (zfec, XOR for one parity).
- ``memory.py``: the per-node snapshot process that owns the shared-memory segments (docs/snapshot-protocol.md);
  ``snapshot_segment.py`` (segment layout, seal order, checksums), ``snapshot_protocol.py`` (framed JSON over TCP
  with the job's token), ``snapshot_sink.py`` (the per-step ``SnapshotSink`` and ``restore_from_node``),
  ``snapshot_peers.py`` and ``snapshot_ec_buffer.py`` (parity exchange between the snapshot processes of a group,
  rebuild of a lost node).

Planned: the launcher wiring of erasure coding (group membership at start-up, rebuild on node replacement).
"""
