"""Erasure coding of node snapshots across a group of nodes (``ec_group_size`` = n, ``ec_parity`` = p): its one
config (:class:`ErasureCodingConfig`), the placement of data and parity pieces (:class:`RotatingParity`) and the
sizes of one encoding (:class:`Geometry`). The coding itself (zfec, XOR for p = 1, on threads) is
``group_code.GroupCode``; running it between the snapshot processes of a group is ``peers.PeerCoding``.

Each node of a group holds one snapshot buffer (e.g. its ranks' shard snapshots back to back). Sizes may differ:
every buffer is treated as zero-padded to ``k * piece_bytes`` bytes, where ``k = n - p`` and ``piece_bytes`` is the
group maximum divided by k, rounded up to :data:`PIECE_ALIGN`; the true sizes travel with every parity piece so the
padding is cut off again on rebuild. A buffer is cut into k equal pieces ``d0 .. d(k-1)``.

Placement (rotating parity, RAID-5/6 style). There are n stripes. Stripe ``s`` (0 <= s < n) is:

- parity block ``q`` (0 <= q < p, zfec block number ``k + q``) stored on node ``(s + q) mod n``;
- data block ``t`` (0 <= t < k, zfec block number ``t``) = piece ``t`` of node ``(s + p + t) mod n``.

Equivalently piece ``j`` of node ``i`` lives in stripe ``(i - p - j) mod n``, and node ``i`` stores the parity of the
p stripes ``i, i - 1, .., i - p + 1 (mod n)``. Each stripe therefore touches all n nodes exactly once (k data
pieces on k distinct nodes, p parity pieces on the other p nodes), so every node stores parity only of other nodes'
data, every node carries the same parity load (p pieces of ``piece_bytes``), and losing ANY p nodes leaves k blocks
of every stripe, which is enough for an (n, k) MDS code. ``tests/test_erasure.py`` checks all p-subsets and checks
that these tables equal :meth:`GroupCode.format_placement`. Rows are stripes, columns are nodes, ``P<q>`` is parity
block q and ``d<j>`` is data piece j of the node in that column:

n=4, p=1 (k=3)::

    stripe  node0  node1  node2  node3
    0       P0     d0     d1     d2
    1       d2     P0     d0     d1
    2       d1     d2     P0     d0
    3       d0     d1     d2     P0

n=5, p=2 (k=3)::

    stripe  node0  node1  node2  node3  node4
    0       P0     P1     d0     d1     d2
    1       d2     P0     P1     d0     d1
    2       d1     d2     P0     P1     d0
    3       d0     d1     d2     P0     P1
    4       P1     d0     d1     d2     P0
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Buffer = bytes | bytearray | memoryview | np.ndarray
"""A node snapshot: any C-contiguous buffer; it is read as raw bytes, never copied as a whole."""

PIECE_ALIGN = 64
"""Pieces are a multiple of a cache line so XOR and zfec run on aligned, whole-word spans."""


class ErasureError(RuntimeError):
    """Erasure-coded data cannot be encoded or rebuilt as asked; the message names the node, stripe or argument."""


class NotRecoverable(ErasureError):
    """Too few intact blocks remain (more than p nodes lost, or corrupt pieces): use the disk checkpoint."""


@dataclass(kw_only=True)
class ErasureCodingConfig:
    """Erasure coding of the node snapshots across a group of snapshot processes: the code (``GroupCode``) and the
    rounds that run it between the group's peers (``PeerCoding``). Off when ``ec_group_size`` is 0. Validated on
    construction; one error names every invalid field."""

    ec_group_size: int = 0
    """n: snapshot processes (nodes) per group; 0 turns erasure coding off."""
    ec_parity: int = 1
    """p: parity blocks per stripe = nodes of a group that may be lost at once; 1 <= ec_parity < ec_group_size."""
    chunk_bytes: int = 2 * 2**20
    """Bytes per block per coding task; 1-4 MiB keeps a task's blocks in cache and gives the pool enough tasks."""
    threads: int = 0
    """Coding threads; 0: os.cpu_count(), at most 8 (the ranks' own threads share these cores)."""
    pack_threads: int = 4
    """Threads that copy the held slots into the node's buffer at the start of a round."""
    min_interval_s: float = 0.0
    """Pause between the end of a round and the start of the next (trades coding load for freshness)."""
    peer_timeout_s: float = 30.0
    """Limit of every blocking call to a peer (connect, request, waiting for a round's pieces)."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.ec_group_size, int) or self.ec_group_size < 0 or self.ec_group_size == 1:
            problems.append(f"ec_group_size={self.ec_group_size!r} must be 0 (off) or >= 2")
        if self.ec_group_size and not (isinstance(self.ec_parity, int) and 1 <= self.ec_parity < self.ec_group_size):
            problems.append(f"ec_parity={self.ec_parity!r} must satisfy 1 <= ec_parity < ec_group_size="
                            f"{self.ec_group_size}")
        if not 1 <= self.chunk_bytes:
            problems.append(f"chunk_bytes={self.chunk_bytes!r} must be >= 1")
        if not (isinstance(self.threads, int) and self.threads >= 0):
            problems.append(f"threads={self.threads!r} must be an int >= 0 (0: os.cpu_count(), at most 8)")
        if not self.peer_timeout_s > 0:
            problems.append(f"peer_timeout_s={self.peer_timeout_s!r} must be > 0")
        if not (isinstance(self.pack_threads, int) and self.pack_threads >= 1):
            problems.append(f"pack_threads={self.pack_threads!r} must be an int >= 1")
        if not self.min_interval_s >= 0:
            problems.append(f"min_interval_s={self.min_interval_s!r} must be >= 0")
        if problems:
            raise ValueError("invalid ErasureCodingConfig: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.ec_group_size > 0

    @property
    def data_blocks(self) -> int:
        """k = n - p: data pieces per node and data blocks per stripe."""
        return self.ec_group_size - self.ec_parity

    @property
    def coding_threads(self) -> int:
        """The coding threads ``threads`` asks for (0 resolved on this machine)."""
        return self.threads or min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class DataSlot:
    """Data piece ``piece`` of node ``node``."""

    node: int
    piece: int


@dataclass(frozen=True, kw_only=True)
class Stripe:
    """One codeword family: zfec block t < k is ``data[t]``, block k + q is stored on ``parity_nodes[q]``."""

    index: int
    data: tuple[DataSlot, ...]
    parity_nodes: tuple[int, ...]

    def nodes(self) -> tuple[int, ...]:
        """The nodes of every block, in zfec block-number order."""
        return tuple(slot.node for slot in self.data) + self.parity_nodes


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """Sizes shared by every stripe of one encoding."""

    sizes: tuple[int, ...]
    """True byte size of each node's buffer (index = node)."""
    piece_bytes: int
    chunk_bytes: int

    @property
    def chunks(self) -> int:
        """Chunks per block (0 when every buffer is empty)."""
        return -(-self.piece_bytes // self.chunk_bytes)

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        """Byte range ``[start, stop)`` of ``chunk`` within a block."""
        start = chunk * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.piece_bytes)


@dataclass(kw_only=True, eq=False)
class ParityPiece:
    """Parity block ``parity_index`` of stripe ``stripe``, stored by node ``holder``, with the checksums needed to
    verify every block of the stripe before decoding. ``data`` is a uint8 array of ``piece_bytes`` allocated for
    this piece alone (serialize it with the metadata fields to ship or store it)."""

    stripe: int
    parity_index: int
    holder: int
    data: np.ndarray
    sizes: tuple[int, ...]
    chunk_bytes: int
    parity_crcs: tuple[int, ...]
    """CRC32 of each chunk of ``data``."""
    data_crcs: tuple[tuple[int, ...], ...]
    """``data_crcs[t][c]``: CRC32 of chunk c of data block t of the stripe (zero padding included)."""

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def as_bytes_view(buffer: Buffer, *, name: str) -> np.ndarray:
    """A flat uint8 view of ``buffer`` without copying; ``name`` appears in the error if it is not contiguous."""
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise ErasureError(f"{name} must be C-contiguous to be coded without a copy")
        return buffer.reshape(-1).view(np.uint8)
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ErasureError(f"{name} must be C-contiguous to be coded without a copy")
    return np.frombuffer(view.cast("B"), dtype=np.uint8)


class RotatingParity:
    """Where the pieces of a group of n nodes with p rotating parity blocks per stripe live, and where their bytes
    lie in the nodes' buffers: arithmetic only, no coding (that is ``GroupCode``, which extends this class).

    Stateless apart from the config (``ec_group_size`` >= 2)."""

    def __init__(self, config: ErasureCodingConfig) -> None:
        if not config.enabled:
            raise ValueError("ErasureCodingConfig.ec_group_size=0 turns erasure coding off: a group code needs "
                             "ec_group_size >= 2")
        self.config = config
        self.n = config.ec_group_size
        self.p = config.ec_parity
        self.k = config.data_blocks
        self._stripes = tuple(self._make_stripe(s) for s in range(self.n))

    # ---- placement -------------------------------------------------------------------------------------------

    def _make_stripe(self, s: int) -> Stripe:
        data = tuple(DataSlot((s + self.p + t) % self.n, t) for t in range(self.k))
        parity = tuple((s + q) % self.n for q in range(self.p))
        return Stripe(index=s, data=data, parity_nodes=parity)

    def placement(self) -> tuple[Stripe, ...]:
        """The n stripes, ``placement()[s].index == s``; see the module docstring."""
        return self._stripes

    def stripe_of(self, node: int, piece: int) -> int:
        """The stripe that holds data piece ``piece`` of ``node``."""
        return (node - self.p - piece) % self.n

    def parity_stripes(self, node: int) -> tuple[int, ...]:
        """The stripes whose parity ``node`` stores, in parity-index order of that node's blocks."""
        return tuple((node - q) % self.n for q in range(self.p))

    def format_placement(self) -> str:
        """The placement as the text table of the module docstring."""
        grid = [["" for _ in range(self.n)] for _ in range(self.n)]
        for stripe in self._stripes:
            for slot in stripe.data:
                grid[stripe.index][slot.node] = f"d{slot.piece}"
            for q, node in enumerate(stripe.parity_nodes):
                grid[stripe.index][node] = f"P{q}"
        rows = ["stripe  " + "  ".join(f"node{i}" for i in range(self.n))]
        width = len("node0")
        for s, row in enumerate(grid):
            rows.append(f"{s:<8d}" + "  ".join(cell.ljust(width) for cell in row).rstrip())
        return "\n".join(rows)

    # ---- geometry --------------------------------------------------------------------------------------------

    def geometry(self, sizes: Sequence[int]) -> Geometry:
        """Piece and chunk sizes for buffers of ``sizes`` bytes (one per node)."""
        if len(sizes) != self.n:
            raise ErasureError(f"sizes has {len(sizes)} entries, expected group_size={self.n}")
        largest = max(sizes)
        piece = -(-largest // self.k)
        piece = -(-piece // PIECE_ALIGN) * PIECE_ALIGN
        return Geometry(sizes=tuple(int(size) for size in sizes), piece_bytes=piece,
                        chunk_bytes=self.config.chunk_bytes)

    def data_piece(self, buffer: Buffer, piece: int, geo: Geometry) -> np.ndarray:
        """Data piece ``piece`` (0 <= piece < k) of a node's ``buffer``, zero-padded to ``geo.piece_bytes``: a
        view when it lies inside the buffer, a copy otherwise. What a node ships to the parity holders of stripe
        :meth:`stripe_of` (node, piece)."""
        if not 0 <= piece < self.k:
            raise ErasureError(f"piece {piece} is outside 0..{self.k - 1}")
        view = as_bytes_view(buffer, name="buffer")
        begin = piece * geo.piece_bytes
        if begin + geo.piece_bytes <= view.size:
            return view[begin: begin + geo.piece_bytes]
        padded = np.zeros(geo.piece_bytes, dtype=np.uint8)
        if begin < view.size:
            padded[: view.size - begin] = view[begin:]
        return padded

    def _data_chunk(self, buffer: np.ndarray, slot: DataSlot, geo: Geometry, chunk: int) -> np.ndarray:
        """Chunk ``chunk`` of a data block: a view when it lies inside the buffer, a zero-padded copy at its end."""
        start, stop = geo.chunk_span(chunk)
        begin = slot.piece * geo.piece_bytes + start
        end = slot.piece * geo.piece_bytes + stop
        if end <= buffer.size:
            return buffer[begin:end]
        padded = np.zeros(stop - start, dtype=np.uint8)
        if begin < buffer.size:
            padded[: buffer.size - begin] = buffer[begin:]
        return padded
