"""Rebuilding a lost node's snapshots from its erasure-coding group, and rolling a rank back to a coded step.

Rebuild (``ec_rebuild``, sent to a replacement process with empty memory): ask every peer (``ec_status``) which
steps it holds complete, take the newest step s held by at least n - p nodes, fetch those nodes' buffers and parity
(``ec_fetch``), decode, and install this node's ranks' segments, sealed and committed, so ``restore_from_node``
restores them unchanged; the node also recomputes its own parity pieces of s and keeps s complete, so the group
tolerates p losses again at once, not only after its next round. Fewer than n - p holders: :class:`NotRecoverable`
naming the disk checkpoint.

Rollback (``ec_rollback``): a rank's snapshot of a step this node holds complete is written back into the rank's
slot from the node's own coded buffer, when the job must restore a step its slots no longer hold.
"""

from __future__ import annotations

import zlib

import numpy as np

from regrow.checkpoint.node import coded_buffer as ecbuf
from regrow.checkpoint.node.complete_steps import CompleteSteps, piece_from
from regrow.checkpoint.node.erasure import NotRecoverable
from regrow.checkpoint.node.group_code import GroupCode
from regrow.checkpoint.node.log import ec_log as log
from regrow.checkpoint.node.peer_links import PeerLinks
from regrow.checkpoint.snapshot.protocol import ProtocolError


class NodeRebuild:
    """The ``ec_rebuild`` and ``ec_rollback`` ops of one snapshot process, on the group's ``code``, the peer
    ``links``, this node's ``complete`` steps and its ``segments`` (where rebuilt snapshots are installed).

    Both run on the connection thread of their request, beside the coding thread."""

    def __init__(self, code: GroupCode, links: PeerLinks, complete: CompleteSteps,
                 segments: ecbuf.NodeSegments) -> None:
        self._code = code
        self._links = links
        self._complete = complete
        self._segments = segments

    def rebuild(self) -> dict:
        """Rebuilds this node's segments from its peers (see the module docstring); returns ``{"ok", "step",
        "ranks", "lost"}``. Raises :class:`NotRecoverable` when fewer than n - p nodes hold a common step."""
        me, n, p = self._links.node, self._code.n, self._code.p
        if me is None:
            raise ValueError("ec_rebuild before ec_group: this process does not know its node id and peers")
        holders: dict[int, set[int]] = {}
        unreachable: list[str] = []
        for peer in range(n):
            if peer == me:
                continue
            try:
                reply, _ = self._links.call(peer, {"op": "ec_status"})
            except ProtocolError as error:
                unreachable.append(str(error))
                continue
            for step in reply["complete"]:
                holders.setdefault(int(step), set()).add(peer)
        # A step every reachable survivor holds comes first: the ranks of the whole job must restore one common
        # step, and a survivor can roll its own ranks back only to a step it holds complete (``rollback``).
        reachable = max((len(h) for h in holders.values()), default=0)
        usable = sorted((step for step in holders if len(holders[step]) >= n - p),
                        key=lambda step: (len(holders[step]) == reachable, step), reverse=True)
        if not usable:
            raise NotRecoverable(
                f"node {me}: no step is held complete by the {n - p} nodes a rebuild needs (group of {n}, parity "
                f"{p}; holders per step {dict((s, sorted(h)) for s, h in holders.items())}; unreachable: "
                f"{unreachable or 'none'}): more than {p} nodes of the group are lost, recovery needs the disk "
                f"checkpoint (recovery.from_checkpoint.restore_trainer)")
        step = usable[0]
        survivors = sorted(holders[step])
        lost = sorted(set(range(n)) - set(survivors))
        buffers, parity = {}, {}
        for peer in survivors:
            buffers[peer] = self._links.call(peer, {"op": "ec_fetch", "step": step, "what": "buffer"})[1]
            parity[peer] = []
            for q in range(p):
                header, data = self._links.call(peer, {"op": "ec_fetch", "step": step, "what": "parity",
                                                       "index": q})
                parity[peer].append(piece_from(header["piece"], data))
        decoded = self._code.decode(lost, buffers, parity)
        rebuilt = decoded[me]
        got_step, segments = ecbuf.unpack(rebuilt)
        if got_step != step:
            raise ecbuf.BufferError(f"decoded buffer is of step {got_step}, expected {step}")
        for segment in segments:
            self._segments.install(segment, step)
        self._keep_rebuilt(me, step, {**buffers, **decoded})
        ranks = [segment.rank for segment in segments]
        log(f"node {me}: rebuilt step {step} (ranks {ranks}) from nodes {survivors}; lost nodes {lost}; crc "
            f"{zlib.crc32(rebuilt):08x}")
        return {"ok": True, "step": step, "ranks": ranks, "lost": lost}

    def _keep_rebuilt(self, me: int, step: int, buffers: dict[int, bytearray | np.ndarray]) -> None:
        """Computes node ``me``'s parity pieces of ``step`` from every node's buffer (``buffers``: the survivors'
        and the decoded ones) and keeps the step complete here, as a round would have. Without it the rebuilt
        node held no complete step until the next round completed, so a further loss in that window could leave
        fewer than n - p holders of any step, and the job fell back to the disk checkpoint."""
        code = self._code
        geo = code.geometry([len(buffers[node]) for node in range(code.n)])
        parity = code.node_parity(me, geo, lambda node, piece: code.data_piece(buffers[node], piece, geo))
        self._complete.keep(step, buffers[me], parity)

    def rollback(self, rank: int, step: int) -> dict:
        """Writes local rank ``rank``'s snapshot of ``step``, from this node's own erasure-coding buffer of that
        step, back into the rank's segment slot (overwriting what the slot holds), committed; returns ``{"ok",
        "rank", "step", "slot"}``. Used when the job must restore a step that the rank's segments no longer hold
        (a lost node was rebuilt at an older step) or that they hold corrupt. Call only while the rank is not
        snapshotting (during its restore)."""
        held = self._complete.get(step)
        if held is None:
            raise KeyError(f"step {step} is not complete in this node's erasure-coding buffers (complete: "
                           f"{self._complete.steps()})")
        _, segments = ecbuf.unpack(held.buffer, rank=rank)
        if not segments:
            raise KeyError(f"rank {rank} is not in this node's buffer of step {step}")
        self._segments.install(segments[0], step, replace=True)
        log(f"node {self._links.node}: rank {rank} rolled back to step {step} from the node's own coded buffer")
        return {"ok": True, "rank": rank, "step": step, "slot": segments[0].slot}
