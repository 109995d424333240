"""The threaded coding of a group's snapshots: :class:`GroupCode` encodes every node's parity pieces and decodes
lost nodes' buffers on the placement of ``erasure.RotatingParity`` (the scheme, its tables and its config are in
``erasure.py``).

Coding runs per chunk: byte range ``[c * chunk_bytes, (c + 1) * chunk_bytes)`` of every block of a stripe is one
independent codeword, so chunks of all stripes run on a thread pool (zfec and numpy release the GIL). With p == 1
the parity is the XOR of the k data blocks (numpy, several times faster than zfec's Reed-Solomon); with p >= 2 it
is zfec's. Every chunk of every block has a zlib CRC32, recorded at encode time in the parity pieces (the data CRCs
of a stripe are replicated in each of its p parity pieces), so a corrupt data or parity chunk is skipped before
decoding and the chunk is decoded from other blocks when more than k survive.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zfec

from regrow.checkpoint.node.erasure import (
    Buffer,
    ErasureError,
    Geometry,
    NotRecoverable,
    ParityPiece,
    RotatingParity,
    Stripe,
    as_bytes_view,
)


def _crc(block: np.ndarray) -> int:
    return zlib.crc32(block)


class GroupCode(RotatingParity):
    """Encodes and rebuilds the snapshots of one group of n nodes with p rotating parity blocks per stripe.

    Stateless apart from the config: any node may build one and decode with the pieces it gathered."""

    def _pool_map(self, fn: Callable[[int, int], None], tasks: Iterable[tuple[int, int]]) -> None:
        """Run ``fn(stripe, chunk)`` for every task on the coding threads; re-raises the first failure."""
        threads = self.config.coding_threads
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="regrow-ec") as pool:
            for future in [pool.submit(fn, s, c) for s, c in tasks]:
                future.result()

    # ---- encode ----------------------------------------------------------------------------------------------

    def encode(self, node_buffers: Sequence[Buffer]) -> dict[int, list[ParityPiece]]:
        """The parity pieces each node must store: ``result[i]`` has p pieces, for stripes :meth:`parity_stripes`.

        ``node_buffers[i]`` is node i's snapshot (sizes may differ). Buffers are only read, and must not change
        during the call. Parity arrays are freshly allocated, one per piece, so a node can keep only its own."""
        if len(node_buffers) != self.n:
            raise ErasureError(f"node_buffers has {len(node_buffers)} buffers, expected group_size={self.n}")
        views = [as_bytes_view(buf, name=f"node_buffers[{i}]") for i, buf in enumerate(node_buffers)]
        geo = self.geometry([view.size for view in views])
        parity = [[np.empty(geo.piece_bytes, dtype=np.uint8) for _ in range(self.p)] for _ in range(self.n)]
        parity_crcs = np.zeros((self.n, self.p, geo.chunks), dtype=np.uint32)
        data_crcs = np.zeros((self.n, self.k, geo.chunks), dtype=np.uint32)

        def one(s: int, c: int) -> None:
            blocks = tuple(self._data_chunk(views[slot.node], slot, geo, c) for slot in self._stripes[s].data)
            self._encode_chunk(blocks, c, geo, parity[s], parity_crcs[s], data_crcs[s])

        self._pool_map(one, ((s, c) for s in range(self.n) for c in range(geo.chunks)))
        return self._collect(geo, parity, parity_crcs, data_crcs)

    def encode_stripe(self, stripe: int, data: Sequence[Buffer], geo: Geometry) -> list[ParityPiece]:
        """The p parity pieces of one stripe from its k data pieces (``data[t]`` = block t, i.e. piece
        ``placement()[stripe].data[t]``, each ``geo.piece_bytes`` long, as :meth:`data_piece` cuts them).

        For a parity holder that received the stripe's data pieces from their nodes: the pieces equal those
        :meth:`encode` gives for the same buffers (``holder`` = the stripe's ``parity_nodes[q]``)."""
        if not 0 <= stripe < self.n or len(data) != self.k:
            raise ErasureError(f"encode_stripe needs a stripe in 0..{self.n - 1} and k={self.k} data pieces, got "
                               f"stripe {stripe} and {len(data)} pieces")
        views = [as_bytes_view(block, name=f"data[{t}]") for t, block in enumerate(data)]
        for t, view in enumerate(views):
            if view.size != geo.piece_bytes:
                raise ErasureError(f"data[{t}] of stripe {stripe} has {view.size} bytes, expected piece_bytes="
                                   f"{geo.piece_bytes}")
        parity = [np.empty(geo.piece_bytes, dtype=np.uint8) for _ in range(self.p)]
        parity_crcs = np.zeros((self.p, geo.chunks), dtype=np.uint32)
        data_crcs = np.zeros((self.k, geo.chunks), dtype=np.uint32)

        def one(_: int, c: int) -> None:
            start, stop = geo.chunk_span(c)
            self._encode_chunk(tuple(view[start:stop] for view in views), c, geo, parity, parity_crcs, data_crcs)

        self._pool_map(one, ((stripe, c) for c in range(geo.chunks)))
        stripe_data_crcs = tuple(tuple(int(x) for x in row) for row in data_crcs)
        return [ParityPiece(stripe=stripe, parity_index=q, holder=holder, data=parity[q], sizes=geo.sizes,
                            chunk_bytes=geo.chunk_bytes, parity_crcs=tuple(int(x) for x in parity_crcs[q]),
                            data_crcs=stripe_data_crcs)
                for q, holder in enumerate(self._stripes[stripe].parity_nodes)]

    def node_parity(self, node: int, geo: Geometry, data_piece: Callable[[int, int], Buffer],
                    before_stripe: Callable[[], None] = lambda: None) -> list[ParityPiece]:
        """The parity pieces ``node`` stores for one encoding: each stripe of :meth:`parity_stripes`, encoded from
        that stripe's data pieces (``data_piece(node, piece)``, cut as :meth:`data_piece` cuts them);
        ``before_stripe`` runs before each stripe (a round's supersession check)."""
        parity = []
        for s in self.parity_stripes(node):
            before_stripe()
            data = [data_piece(slot.node, slot.piece) for slot in self._stripes[s].data]
            parity += [piece for piece in self.encode_stripe(s, data, geo) if piece.holder == node]
        return parity

    def _encode_chunk(self, blocks: Sequence[np.ndarray], chunk: int, geo: Geometry,
                      parity: Sequence[np.ndarray], parity_crcs: np.ndarray, data_crcs: np.ndarray) -> None:
        """Fill chunk ``chunk`` of a stripe's parity blocks from its k data ``blocks`` (that chunk of each), and
        the CRCs of all its blocks."""
        start, stop = geo.chunk_span(chunk)
        for t, block in enumerate(blocks):
            data_crcs[t, chunk] = _crc(block)
        out = [block[start:stop] for block in parity]
        if self.p == 1:
            _xor_into(out[0], blocks)
        else:
            # zfec returns fresh bytes objects; one copy into the parity array is cheaper than its coding
            coded = zfec.Encoder(self.k, self.n).encode(blocks, tuple(range(self.k, self.n)))
            for q, block in enumerate(coded):
                out[q][:] = np.frombuffer(block, dtype=np.uint8)
        for q in range(self.p):
            parity_crcs[q, chunk] = _crc(out[q])

    def _collect(self, geo: Geometry, parity: Sequence[Sequence[np.ndarray]], parity_crcs: np.ndarray,
                 data_crcs: np.ndarray) -> dict[int, list[ParityPiece]]:
        pieces: dict[int, list[ParityPiece]] = {node: [] for node in range(self.n)}
        for stripe in self._stripes:
            s = stripe.index
            stripe_data_crcs = tuple(tuple(int(x) for x in row) for row in data_crcs[s])
            for q, holder in enumerate(stripe.parity_nodes):
                pieces[holder].append(ParityPiece(
                    stripe=s, parity_index=q, holder=holder, data=parity[s][q], sizes=geo.sizes,
                    chunk_bytes=geo.chunk_bytes, parity_crcs=tuple(int(x) for x in parity_crcs[s, q]),
                    data_crcs=stripe_data_crcs))
        for node, held in pieces.items():
            order = self.parity_stripes(node)
            held.sort(key=lambda piece: order.index(piece.stripe))
        return pieces

    # ---- decode ----------------------------------------------------------------------------------------------

    def decode(self, lost: Sequence[int], surviving_buffers: Mapping[int, Buffer],
               parity_held: Mapping[int, Sequence[ParityPiece]]) -> dict[int, np.ndarray]:
        """Rebuild the buffers of the ``lost`` nodes from the survivors' buffers and the parity pieces they hold.

        ``surviving_buffers`` and ``parity_held`` are keyed by node and must cover every node not in ``lost``
        (entries for lost nodes are ignored). True sizes come from the parity pieces. Returns, per lost node, a
        uint8 array of exactly its original size. Raises :class:`NotRecoverable` when more than p nodes are lost
        or when corrupt chunks leave fewer than k intact blocks in some chunk of some stripe."""
        lost_set = self._check_lost(lost)
        if not lost_set:
            return {}
        pieces = self._index_parity(lost_set, parity_held)
        geo = self._geometry_from(pieces)
        views = self._survivor_views(lost_set, surviving_buffers, geo)
        out = {node: np.zeros(self.k * geo.piece_bytes, dtype=np.uint8) for node in sorted(lost_set)}
        touched = [s for s in self._stripes if any(slot.node in lost_set for slot in s.data)]

        def one(s: int, c: int) -> None:
            self._decode_chunk(self._stripes[s], c, lost_set, views, pieces, geo, out)

        self._pool_map(one, ((s.index, c) for s in touched for c in range(geo.chunks)))
        return {node: buf[: geo.sizes[node]] for node, buf in out.items()}

    def _check_lost(self, lost: Sequence[int]) -> frozenset[int]:
        lost_set = frozenset(int(node) for node in lost)
        bad = sorted(node for node in lost_set if not 0 <= node < self.n)
        if bad:
            raise ErasureError(f"lost names nodes {bad} outside the group 0..{self.n - 1}")
        if len(lost_set) > self.p:
            raise NotRecoverable(
                f"{len(lost_set)} nodes lost ({sorted(lost_set)}) but the group (group_size={self.n}, "
                f"parity={self.p}) tolerates {self.p}: recovery needs the disk checkpoint")
        return lost_set

    def _index_parity(self, lost_set: frozenset[int],
                      parity_held: Mapping[int, Sequence[ParityPiece]]) -> dict[tuple[int, int], ParityPiece]:
        """Parity pieces of surviving holders keyed by (stripe, parity index)."""
        pieces: dict[tuple[int, int], ParityPiece] = {}
        for node, held in parity_held.items():
            if node in lost_set:
                continue
            for piece in held:
                if piece.holder != node:
                    raise ErasureError(f"parity_held[{node}] contains a piece held by node {piece.holder}")
                pieces[(piece.stripe, piece.parity_index)] = piece
        if not pieces:
            raise NotRecoverable("no parity pieces from surviving nodes were given: recovery needs the disk "
                                 "checkpoint")
        return pieces

    def _geometry_from(self, pieces: Mapping[tuple[int, int], ParityPiece]) -> Geometry:
        first = next(iter(pieces.values()))
        for piece in pieces.values():
            if piece.sizes != first.sizes or piece.chunk_bytes != first.chunk_bytes:
                raise ErasureError(f"parity pieces disagree on sizes/chunk_bytes (stripe {piece.stripe} held by "
                                   f"node {piece.holder}): they come from different encodings")
        geo = self.geometry(first.sizes)
        geo = Geometry(sizes=geo.sizes, piece_bytes=geo.piece_bytes, chunk_bytes=first.chunk_bytes)
        for piece in pieces.values():
            if piece.data.size != geo.piece_bytes:
                raise ErasureError(f"parity piece of stripe {piece.stripe} held by node {piece.holder} has "
                                   f"{piece.data.size} bytes, expected {geo.piece_bytes}")
        return geo

    def _survivor_views(self, lost_set: frozenset[int], surviving_buffers: Mapping[int, Buffer],
                        geo: Geometry) -> dict[int, np.ndarray]:
        views: dict[int, np.ndarray] = {}
        for node in range(self.n):
            if node in lost_set:
                continue
            if node not in surviving_buffers:
                raise ErasureError(f"surviving_buffers lacks node {node}, which is not in lost")
            view = as_bytes_view(surviving_buffers[node], name=f"surviving_buffers[{node}]")
            if view.size != geo.sizes[node]:
                raise ErasureError(f"surviving_buffers[{node}] has {view.size} bytes, the encoding recorded "
                                   f"{geo.sizes[node]}")
            views[node] = view
        return views

    def _intact_blocks(self, stripe: Stripe, chunk: int, lost_set: frozenset[int], views: Mapping[int, np.ndarray],
                       pieces: Mapping[tuple[int, int], ParityPiece],
                       geo: Geometry) -> tuple[list[int], list[np.ndarray]]:
        """Up to k CRC-verified blocks of one chunk, surviving data blocks first (they need no decoding)."""
        held = [pieces[(stripe.index, q)] for q in range(self.p) if (stripe.index, q) in pieces]
        reference = held[0].data_crcs
        start, stop = geo.chunk_span(chunk)
        numbers: list[int] = []
        blocks: list[np.ndarray] = []
        for t, slot in enumerate(stripe.data):
            if slot.node in lost_set:
                continue
            block = self._data_chunk(views[slot.node], slot, geo, chunk)
            if _crc(block) == reference[t][chunk]:
                numbers.append(t)
                blocks.append(block)
        for piece in held:
            if len(blocks) == self.k:
                break
            block = piece.data[start:stop]
            if _crc(block) == piece.parity_crcs[chunk]:
                numbers.append(self.k + piece.parity_index)
                blocks.append(block)
        if len(blocks) < self.k:
            raise NotRecoverable(
                f"stripe {stripe.index} chunk {chunk}: only {len(blocks)} of the k={self.k} blocks needed are "
                f"present and pass their CRC32 (lost nodes {sorted(lost_set)}): recovery needs the disk checkpoint")
        return numbers, blocks

    def _decode_chunk(self, stripe: Stripe, chunk: int, lost_set: frozenset[int], views: Mapping[int, np.ndarray],
                      pieces: Mapping[tuple[int, int], ParityPiece], geo: Geometry,
                      out: Mapping[int, np.ndarray]) -> None:
        """Rebuild chunk ``chunk`` of every lost data block of ``stripe`` into ``out``."""
        numbers, blocks = self._intact_blocks(stripe, chunk, lost_set, views, pieces, geo)
        start, stop = geo.chunk_span(chunk)
        missing = [t for t in range(self.k) if t not in numbers]
        if self.p == 1:
            # one block is missing and the other k (all intact) XOR to it
            slot = stripe.data[missing[0]]
            target = out[slot.node][slot.piece * geo.piece_bytes + start: slot.piece * geo.piece_bytes + stop]
            _xor_into(target, blocks)
            return
        # fresh tuples: zfec's decode reorders the sequences it is given in place
        primaries = zfec.Decoder(self.k, self.n).decode(tuple(blocks), tuple(numbers))
        for t in missing:
            slot = stripe.data[t]
            if slot.node not in lost_set:
                continue  # a corrupt chunk of a survivor: not ours to rewrite
            begin = slot.piece * geo.piece_bytes
            out[slot.node][begin + start: begin + stop] = np.frombuffer(primaries[t], dtype=np.uint8)


def _xor_into(out: np.ndarray, blocks: Sequence[np.ndarray]) -> None:
    """``out = blocks[0] ^ blocks[1] ^ ...`` without temporaries."""
    if len(blocks) == 1:
        np.copyto(out, blocks[0])
        return
    np.bitwise_xor(blocks[0], blocks[1], out=out)
    for block in blocks[2:]:
        np.bitwise_xor(out, block, out=out)
