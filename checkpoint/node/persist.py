"""Persisting in-memory snapshots as universal checkpoints from the node's snapshot process.

The ranks seal a snapshot of their shard every step into the node's shared memory
(``checkpoint/snapshot/sink.py``); every ``persist_every`` steps the snapshot process turns the snapshots of that
step into the node's ranks' parts of a universal checkpoint (docs/checkpoint-format.md), so persistence costs the
ranks nothing: no host copy, no thread, no collective on their side. The writing is ``writer.PartWriter`` /
``writer.commit_save``, the very code of the asynchronous ``CheckpointWriter``, so the files are the ones that
writer would write at the same step.

**Which step.** A step s is eligible when every rank attached to this process has COMMITted s and
``s % persist_every == 0``, or s is the run's last step (``run_config["steps"]``) (the snapshot process checks at
each COMMIT). Every node's process sees the same steps become eligible, so all persist the same s without talking
to each other. At most one persist runs at a time; an eligible step that arrives while one runs is skipped and
logged (a node without rank 0 also writes error markers for its ranks, so that the holder of rank 0, which may be
persisting that step, gives it up at once), except the run's last step: it waits for the running persist (the
``CheckpointWriter``'s rule), so a finished run always ends with a checkpoint of its final state, and shutting
down waits for it.

**The race with the ranks.** A rank overwrites the slot holding step s when it snapshots step s + 2 (two slots,
alternating), possibly while this process still reads s. The snapshot process holds every rank's slot of s from
the first COMMIT of s until the copy is done (``persister.PersistFeed``), so normally no rank writes it;
a rank already past s at that first COMMIT cannot be held, and for that case ``slot_copy.copy_sealed`` copies the whole
slot into private memory first (several threads: the window is about two training steps) and accepts the copy only
if the slot's header is unchanged and still sealed afterwards, seqlock style: the rank's ``begin`` clears ``complete``
before it writes any byte, so a header that still says "sealed, step s" after the copy means no write started in
between, and the copy's own checksums (``seg.verify`` on the copy) catch a torn copy even if a writer sealed an
identical header in between. A slot found overwritten abandons that step (logged; nothing torn is ever written) and
the next eligible step is persisted instead.

**Coordination between nodes** uses files only, like the writer: every node writes its ranks' parts and markers
into ``.tmp_step_<s>.<session>``; the process holding rank 0 waits (``commit_timeout_s``) for every rank's marker,
writes the manifest, renames, flips ``latest`` and purges. The session is derived from the step and the job's token
(an HMAC, so it names the job without revealing the token): every node computes the same one without talking, and
another job's leftovers never match. Markers also carry the step's data cursor and tokens seen, which every rank
shares, so a marker left by an earlier attempt at another point of training is never taken for this one, and the
state's lineage (``Trainer.lineage``, new at every restore), so that a step re-run after a rollback is never
committed with another node's part of the abandoned run's same step (a node that persisted that step before the
failure leaves its marker behind; the holder of rank 0 waits for the re-run's). A node removes its own ranks' old
markers before writing, and after a commit the holder of rank 0 removes this job's temporaries of older steps
(attempts that failed or were skipped on some node).

The modules: this one (the config, the session, the outcomes), ``persister.py`` (the persist thread and what
feeds it steps), ``slot_copy.py`` (reading a slot its rank may reuse) and ``persist_write.py`` (writing and
committing). None imports torch until persistence is on: the snapshot process starts fast otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from regrow.checkpoint.universal import KEEP_LAST
from regrow.trainer.checks import require_ints

PERSIST_HOLDER = "persist"
"""The name under which the persister holds the slots it copies (``SlotTable.hold``)."""


@dataclass(kw_only=True)
class PersistConfig:
    """Persistence of snapshots as universal checkpoints by the snapshot process (off when ``persist_every`` is 0).
    Validated on construction; errors name the field."""

    persist_every: int = 0
    """Persist every step s with ``s % persist_every == 0`` that every local rank has committed; 0: off. Make it a
    multiple of the ranks' snapshot interval (other steps are never snapshotted)."""
    persist_dir: str = ""
    """Checkpoint root (``step_*`` directories and ``latest``); every node's snapshot process must see the same
    directory (a shared filesystem), and no other job may write to it."""
    keep_last: int = KEEP_LAST
    """Committed checkpoints to keep (>= 2, as ``WriterConfig.keep_last``)."""
    commit_timeout_s: float = 600.0
    """Seconds the process holding rank 0 waits for every rank's part before giving the step up."""
    copy_threads: int = 4
    """Threads copying a slot into private memory (the copy must finish before the rank reuses the slot)."""
    chunk_bytes: int = 1 << 20
    """Largest byte range covered by one checksum (``WriterConfig.chunk_bytes``)."""
    fsync: bool = True
    """fsync files and directories before committing."""

    def __post_init__(self) -> None:
        require_ints(self, {"persist_every": 0, "keep_last": KEEP_LAST, "copy_threads": 1, "chunk_bytes": 1})
        if not isinstance(self.persist_dir, str):
            raise TypeError(f"PersistConfig.persist_dir={self.persist_dir!r} must be a path (str)")
        if self.persist_every and not self.persist_dir:
            raise ValueError(f"PersistConfig.persist_dir is empty but persist_every={self.persist_every} turns "
                             f"persistence on: give the checkpoint root every node's snapshot process sees")
        if self.persist_dir and Path(self.persist_dir).exists() and not Path(self.persist_dir).is_dir():
            raise ValueError(f"PersistConfig.persist_dir={self.persist_dir!r} exists and is not a directory")
        if not (isinstance(self.commit_timeout_s, int | float) and self.commit_timeout_s > 0):
            raise ValueError(f"PersistConfig.commit_timeout_s={self.commit_timeout_s!r} must be > 0")

    @property
    def enabled(self) -> bool:
        return self.persist_every > 0


def persist_session(token: str, step: int) -> str:
    """The session id of the persist of ``step`` (16 hex digits): the same on every node of the job, different
    for another job (another token); the token itself cannot be recovered from it."""
    return hmac.new(token.encode(), f"regrow persist step {step}".encode(), hashlib.sha256).hexdigest()[:16]


@dataclass
class PersistResult:
    """What became of one eligible step on this node.

    ``status``: "committed" (this node holds rank 0: the checkpoint is in place and ``latest`` names it),
    "written" (this node's parts are on disk; the node holding rank 0 commits), "skipped" (a persist was still
    running), "overwritten" (a rank reused its slot before the copy finished: nothing written), "already" (this
    job had already committed this step) or "failed" (``error`` says why; ``latest`` is unchanged)."""

    step: int
    status: str
    path: str | None = None
    seconds: float = 0.0
    error: str | None = None
