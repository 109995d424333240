"""Erasure coding across a node group: placement invariants, exact rebuild after any p losses, corruption."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from regrow.checkpoint.node import erasure
from regrow.checkpoint.node.erasure import ErasureCodingConfig, NotRecoverable, ParityPiece
from regrow.checkpoint.node.group_code import GroupCode

CHUNK = 4096


def _buffers(n: int, seed: int, base: int = 50_000) -> list[np.ndarray]:
    """Random node buffers of unequal sizes (one empty-ish tail case: sizes not multiples of anything)."""
    rng = np.random.default_rng(seed)
    sizes = [base + int(rng.integers(0, base)) for _ in range(n)]
    return [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]


def _code(n: int, p: int, chunk: int = CHUNK, threads: int = 2) -> GroupCode:
    return GroupCode(ErasureCodingConfig(ec_group_size=n, ec_parity=p, chunk_bytes=chunk, threads=threads))


def _survivors(buffers: list[np.ndarray], parity: dict[int, list[ParityPiece]], lost: tuple[int, ...]
               ) -> tuple[dict[int, np.ndarray], dict[int, list[ParityPiece]]]:
    alive = [i for i in range(len(buffers)) if i not in lost]
    return {i: buffers[i] for i in alive}, {i: parity[i] for i in alive}


def _assert_rebuilds(code: GroupCode, buffers: list[np.ndarray], parity: dict[int, list[ParityPiece]],
                     lost: tuple[int, ...]) -> None:
    data, held = _survivors(buffers, parity, lost)
    rebuilt = code.decode(lost, data, held)
    assert sorted(rebuilt) == sorted(lost)
    for node in lost:
        assert rebuilt[node].tobytes() == buffers[node].tobytes(), f"node {node} after losing {lost}"


@pytest.mark.parametrize("n,p", [(4, 1), (5, 2), (6, 2), (8, 2), (5, 3), (2, 1)])
def test_placement_invariants(n: int, p: int) -> None:
    code = _code(n, p)
    k = n - p
    seen: set[tuple[int, int]] = set()
    parity_load = [0] * n
    for stripe in code.placement():
        nodes = stripe.nodes()
        assert sorted(nodes) == list(range(n)), "each stripe touches every node exactly once"
        assert len(stripe.data) == k and len(stripe.parity_nodes) == p
        assert not {slot.node for slot in stripe.data} & set(stripe.parity_nodes)
        for slot in stripe.data:
            assert code.stripe_of(slot.node, slot.piece) == stripe.index
            seen.add((slot.node, slot.piece))
        for node in stripe.parity_nodes:
            parity_load[node] += 1
            assert stripe.index in code.parity_stripes(node)
    assert seen == {(i, j) for i in range(n) for j in range(k)}, "every piece of every node is placed once"
    assert parity_load == [p] * n, "parity load is even"
    for lost in itertools.combinations(range(n), p):
        for stripe in code.placement():
            assert sum(node not in lost for node in stripe.nodes()) >= k, f"stripe {stripe.index}, lost {lost}"


@pytest.mark.parametrize("n,p", [(4, 1), (5, 2)])
def test_docstring_tables_match_placement(n: int, p: int) -> None:
    table = _code(n, p).format_placement()
    indented = "\n".join("    " + line for line in table.splitlines())
    assert indented in (erasure.__doc__ or "")


def test_single_losses_n4_p1() -> None:
    code = _code(4, 1)
    buffers = _buffers(4, seed=1)
    parity = code.encode(buffers)
    assert all(len(parity[i]) == 1 for i in range(4))
    for lost in itertools.combinations(range(4), 1):
        _assert_rebuilds(code, buffers, parity, lost)


@pytest.mark.parametrize("n,p", [(5, 2), (6, 2)])
def test_every_pair_of_losses(n: int, p: int) -> None:
    code = _code(n, p)
    buffers = _buffers(n, seed=n)
    parity = code.encode(buffers)
    for lost in itertools.combinations(range(n), 1):
        _assert_rebuilds(code, buffers, parity, lost)
    for lost in itertools.combinations(range(n), 2):
        _assert_rebuilds(code, buffers, parity, lost)


def test_bytes_and_memoryview_inputs_and_empty_node() -> None:
    code = _code(5, 2)
    arrays = _buffers(5, seed=7)
    buffers = [arrays[0].tobytes(), memoryview(arrays[1].tobytes()), bytearray(arrays[2].tobytes()), arrays[3],
               b""]
    parity = code.encode(buffers)
    rebuilt = code.decode([3, 4], {i: buffers[i] for i in range(3)}, {i: parity[i] for i in range(3)})
    assert rebuilt[3].tobytes() == arrays[3].tobytes()
    assert rebuilt[4].size == 0


def test_losing_more_than_p_nodes_is_not_recoverable() -> None:
    code = _code(5, 2)
    buffers = _buffers(5, seed=3)
    parity = code.encode(buffers)
    data, held = _survivors(buffers, parity, (0, 1, 2))
    with pytest.raises(NotRecoverable, match="disk checkpoint"):
        code.decode([0, 1, 2], data, held)


def test_corrupt_parity_detected_without_spare() -> None:
    code = _code(4, 1)
    buffers = _buffers(4, seed=4)
    parity = code.encode(buffers)
    lost = 2
    stripe = code.stripe_of(lost, 0)
    holder = code.placement()[stripe].parity_nodes[0]
    parity[holder][0].data[100] ^= 0xFF
    data, held = _survivors(buffers, parity, (lost,))
    with pytest.raises(NotRecoverable, match=f"stripe {stripe} chunk 0"):
        code.decode([lost], data, held)


def test_corrupt_parity_recovered_from_spare_survivor() -> None:
    code = _code(5, 2)
    buffers = _buffers(5, seed=5)
    parity = code.encode(buffers)
    lost = 3
    for piece in range(code.k):
        stripe = code.placement()[code.stripe_of(lost, piece)]
        holder = stripe.parity_nodes[0]
        target = next(x for x in parity[holder] if x.stripe == stripe.index)
        target.data[CHUNK + 7] ^= 0x01
    _assert_rebuilds(code, buffers, parity, (lost,))


def test_corrupt_survivor_data_skipped_when_spare() -> None:
    code = _code(5, 2)
    buffers = [b.copy() for b in _buffers(5, seed=6)]
    parity = code.encode(buffers)
    original = [b.copy() for b in buffers]
    lost = 0
    stripe = code.placement()[code.stripe_of(lost, 1)]
    victim = next(slot for slot in stripe.data if slot.node != lost)
    buffers[victim.node][victim.piece * code.geometry([b.size for b in buffers]).piece_bytes + 5] ^= 0x10
    data, held = _survivors(buffers, parity, (lost,))
    rebuilt = code.decode([lost], data, held)
    assert rebuilt[lost].tobytes() == original[lost].tobytes()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("what", ["parity", "survivor data"])
def test_a_flipped_byte_in_a_piece_the_rebuild_reads_is_refused_never_rebuilt(what: str, where: str) -> None:
    """The erasure-coded side of the corruption matrix: one byte flipped at the start, middle or end of the parity
    piece or of a surviving node's data piece that rebuilding node 2 needs (n=4, p=1: no spare to fall back on).
    The decode refuses, naming the stripe and chunk; it never hands back wrong bytes as the lost node's."""
    code = _code(4, 1)
    buffers = [b.copy() for b in _buffers(4, seed=11)]
    parity = code.encode(buffers)
    lost = 2
    stripe = code.placement()[code.stripe_of(lost, 0)]
    if what == "parity":
        target = next(x for x in parity[stripe.parity_nodes[0]] if x.stripe == stripe.index).data
        base, size = 0, len(target)
    else:
        victim = next(slot for slot in stripe.data if slot.node != lost)
        target = buffers[victim.node]
        piece_bytes = code.geometry([b.size for b in buffers]).piece_bytes
        base = victim.piece * piece_bytes
        size = min(piece_bytes, target.size - base)
    assert size > 0
    target[base + {"first": 0, "middle": size // 2, "last": size - 1}[where]] ^= 0x40
    data, held = _survivors(buffers, parity, (lost,))
    with pytest.raises(NotRecoverable, match=f"stripe {stripe.index} chunk"):
        code.decode([lost], data, held)


def test_chunking_invariance() -> None:
    buffers = _buffers(5, seed=8)
    results = []
    for chunk in (1000, 4096, 65536, 1 << 20):
        code = _code(5, 2, chunk=chunk)
        parity = code.encode(buffers)
        data, held = _survivors(buffers, parity, (1, 4))
        rebuilt = code.decode([1, 4], data, held)
        results.append((rebuilt[1].tobytes(), rebuilt[4].tobytes(),
                         [piece.data.tobytes() for piece in parity[0]]))
    assert all(result == results[0] for result in results)
    assert results[0][0] == buffers[1].tobytes() and results[0][1] == buffers[4].tobytes()


def test_decode_twice_same_inputs_same_result() -> None:
    """zfec's decode reorders the sequences it is given; the code must hand it fresh ones every time."""
    code = _code(6, 2, threads=1)
    buffers = _buffers(6, seed=9)
    parity = code.encode(buffers)
    data, held = _survivors(buffers, parity, (2, 5))
    first = code.decode((2, 5), data, held)
    second = code.decode((2, 5), data, held)
    for node in (2, 5):
        assert first[node].tobytes() == second[node].tobytes() == buffers[node].tobytes()


def test_single_thread_matches_threaded() -> None:
    buffers = _buffers(4, seed=10)
    one = _code(4, 2, threads=1).encode(buffers)
    many = _code(4, 2, threads=4).encode(buffers)
    for node in range(4):
        assert [x.data.tobytes() for x in one[node]] == [x.data.tobytes() for x in many[node]]
        assert [x.parity_crcs for x in one[node]] == [x.parity_crcs for x in many[node]]


@pytest.mark.parametrize("kwargs,field", [
    ({"ec_group_size": 4, "ec_parity": 0}, "parity"),
    ({"ec_group_size": 4, "ec_parity": 4}, "parity"),
    ({"ec_group_size": 1, "ec_parity": 1}, "group_size"),
    ({"ec_group_size": 4, "ec_parity": 1, "chunk_bytes": 0}, "chunk_bytes"),
    ({"ec_group_size": 4, "ec_parity": 1, "threads": -1}, "threads"),
])
def test_config_validation_names_field(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ErasureCodingConfig(**kwargs)


def test_argument_errors_name_the_argument() -> None:
    code = _code(4, 1)
    buffers = _buffers(4, seed=11)
    with pytest.raises(erasure.ErasureError, match="node_buffers"):
        code.encode(buffers[:3])
    parity = code.encode(buffers)
    with pytest.raises(erasure.ErasureError, match="surviving_buffers"):
        code.decode([0], {1: buffers[1], 2: buffers[2]}, {i: parity[i] for i in (1, 2, 3)})
    with pytest.raises(erasure.ErasureError, match="surviving_buffers\\[1\\]"):
        code.decode([0], {1: buffers[1][:-1], 2: buffers[2], 3: buffers[3]}, {i: parity[i] for i in (1, 2, 3)})
    with pytest.raises(erasure.ErasureError, match="lost"):
        code.decode([7], {}, {})


def test_megabyte_buffers_default_chunks() -> None:
    """Several default-size (2 MiB) chunks per piece, a partial last chunk and unequal sizes."""
    rng = np.random.default_rng(12)
    buffers = [rng.integers(0, 256, size, dtype=np.uint8) for size in (9_000_001, 7_654_321, 8_388_608, 123)]
    for p in (1, 2):
        code = GroupCode(ErasureCodingConfig(ec_group_size=4, ec_parity=p))
        parity = code.encode(buffers)
        _assert_rebuilds(code, buffers, parity, tuple(range(p)))
