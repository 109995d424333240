"""The steps a snapshot process holds complete: its coded buffer of the step and its own parity pieces of it.

A step is complete on a node once its encode round finished there (or once a rebuild recomputed its parity). The
newest :data:`KEEP_COMPLETE` are kept, so a round that dies half way leaves the previous step complete on every
node. Peers read them with ``ec_fetch`` (a rebuild), and the node itself rolls a rank back from them
(``ec_rollback``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from regrow.checkpoint.node.erasure import ParityPiece

KEEP_COMPLETE = 2


@dataclass
class CompleteStep:
    buffer: bytearray | np.ndarray
    parity: list[ParityPiece]


def piece_header(piece: ParityPiece) -> dict:
    """The JSON fields of a parity piece in an ``ec_fetch`` reply (its bytes travel as the raw payload)."""
    return {"stripe": piece.stripe, "parity_index": piece.parity_index, "holder": piece.holder,
            "sizes": list(piece.sizes), "chunk_bytes": piece.chunk_bytes, "parity_crcs": list(piece.parity_crcs),
            "data_crcs": [list(row) for row in piece.data_crcs]}


def piece_from(header: dict, data: bytearray) -> ParityPiece:
    """The parity piece of an ``ec_fetch`` reply: :func:`piece_header`'s fields and the raw payload."""
    return ParityPiece(stripe=int(header["stripe"]), parity_index=int(header["parity_index"]),
                       holder=int(header["holder"]), data=np.frombuffer(data, dtype=np.uint8),
                       sizes=tuple(int(x) for x in header["sizes"]), chunk_bytes=int(header["chunk_bytes"]),
                       parity_crcs=tuple(int(x) for x in header["parity_crcs"]),
                       data_crcs=tuple(tuple(int(x) for x in row) for row in header["data_crcs"]))


class CompleteSteps:
    """The newest :data:`KEEP_COMPLETE` complete steps of this node. Thread-safe (rounds keep steps on the coding
    thread, peers fetch them and rebuilds keep them on connection threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[int, CompleteStep] = {}

    def keep(self, step: int, buffer: bytearray | np.ndarray, parity: list[ParityPiece]) -> None:
        """Holds ``step`` complete, with the newest KEEP_COMPLETE steps before it."""
        with self._lock:
            self._steps[step] = CompleteStep(buffer=buffer, parity=parity)
            for old in sorted(self._steps)[:-KEEP_COMPLETE]:
                del self._steps[old]

    def get(self, step: int) -> CompleteStep | None:
        with self._lock:
            return self._steps.get(step)

    def steps(self) -> list[int]:
        """The complete steps, oldest first."""
        with self._lock:
            return sorted(self._steps)

    def fetch(self, step: int, what: str, index: int) -> tuple[dict, bytes | bytearray]:
        """The ``ec_fetch`` reply: this node's buffer of ``step``, or its parity piece ``index`` of it."""
        held = self.get(step)
        if held is None:
            raise KeyError(f"step {step} is not complete here (complete: {self.steps()})")
        if what == "buffer":
            return {"ok": True}, held.buffer
        if what == "parity":
            if not 0 <= index < len(held.parity):
                raise KeyError(f"parity piece {index} of step {step} is not held here (pieces 0..{len(held.parity) - 1})")
            piece = held.parity[index]
            return {"ok": True, "piece": piece_header(piece)}, piece.data
        raise ValueError(f"ec_fetch what={what!r}: 'buffer' or 'parity'")
