"""The durable universal checkpoint: format, storage, verification, the lazy writer, resharding, DeepSpeed."""
