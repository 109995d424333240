"""The per-node snapshot process: it owns the shared-memory segments of its ranks' snapshots, persists them as
universal checkpoints and erasure-codes them with the other nodes of its group (docs/snapshot-protocol.md).

The process:

- ``process.py``: ``SnapshotProcessConfig``, its command line, ``start_snapshot_process`` and ``SnapshotProcess``
  (the launcher's side); ``__main__.py`` runs it (``python -m regrow.checkpoint.node``).
- ``server.py``: ``SnapshotServer``, the process's parts and the request dispatch.
- ``connections.py``: ``Connections``, admission under the caps, the token check, one thread per connection.
- ``limits.py``: ``ConnectionLimits`` and the caps on what a peer may announce or send (trust model in
  docs/snapshot-protocol.md).
- ``requests.py``: the table of every op's fields, types and ranges, and ``validate``.
- ``shm.py``: the segment files under ``shm_dir`` (names parsed per job exactly, creation with reserved space,
  leftover removal).
- ``job_lock.py``: ``JobLock``, one live process per job and node.
- ``slots.py``: ``SlotTable``, the attached ranks' slots: commits, holds, rebuilt segments installed.
- ``log.py``: the process's log lines.

Persistence (on with ``persist_every``):

- ``persist.py``: the design, ``PersistConfig``, the session id, ``PersistResult``.
- ``persister.py``: the persist thread (``Persister``) and ``PersistFeed`` (which step, slots held from its first
  COMMIT).
- ``slot_copy.py``: ``copy_sealed``, a seqlock-checked private copy of a slot its rank may reuse.
- ``persist_write.py``: ``StepWriter``, writing a node's parts and committing on the node that holds rank 0.

Erasure coding (on with ``ec_group_size``):

- ``erasure.py``: the scheme, ``ErasureCodingConfig`` (its one config), the rotating-parity placement and geometry.
- ``group_code.py``: ``GroupCode``, the threaded zfec/XOR encoding and CRC-checked decoding.
- ``coded_buffer.py``: a node's coded buffer (its ranks' sealed segments of one step) and ``NodeSegments``.
- ``peers.py``: ``PeerCoding``, the encode rounds on the coding thread and the ``ec_*`` ops.
- ``round_schedule.py``: ``RoundSchedule``, which step the next round takes (leader-proposed) and when a round
  ends early.
- ``peer_links.py``: the group membership and the TCP connections to the peers.
- ``complete_steps.py``: the steps this node holds complete (buffer and parity) for fetches and rollbacks.
- ``rebuild.py``: ``NodeRebuild``, rebuilding a lost node from its peers and rolling a rank back to a coded step.
"""
