"""The per-node snapshot process: shared-memory segments, persistence, erasure coding between nodes."""
