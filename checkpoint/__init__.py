"""Checkpoints and snapshots of the shard state (``regrow.trainer.state.ShardState``).

Planned modules (see docs/architecture.md): ``format.py`` (universal manifest with per-tensor checksums, atomic
commit), ``writer.py`` (lazy asynchronous multi-level writer), ``reshard.py`` (load at any world size, ZeRO stage or
pipeline layout), ``deepspeed.py`` (DeepSpeed import/export), ``memory.py`` (the per-node snapshot process that owns
shared memory), ``erasure.py`` (zfec parity across the nodes of a group). Nothing here is implemented yet.
"""
