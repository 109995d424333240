"""The rank side of in-memory snapshots: segment format, protocol client, the per-step sink, checksums."""
