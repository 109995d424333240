"""The durable universal checkpoint: format, storage, verification, the lazy writer, resharding, DeepSpeed."""

KEEP_LAST = 2
"""Committed checkpoints a root keeps by default, and the fewest allowed: one good checkpoint must survive while the
next is written (``WriterConfig``, ``PersistConfig``, ``write_whole`` and ``--keep-last`` take their default here).
Defined in the package, which imports nothing: the snapshot process reads it without importing torch."""
