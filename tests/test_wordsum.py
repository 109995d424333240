"""WordSum-128 (checkpoint/snapshot/wordsum.py) on the host, the segment format that stores it, and the sink's assembly of
per-tensor digests (the GPU path, driven here by a host stand-in for the kernel)."""

from __future__ import annotations

import dataclasses
import mmap
import operator
import os
import random
import struct

import numpy as np
import pytest
import torch

from regrow.checkpoint.hostcopy import HostCopier
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot import sink as sink_module
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig, state_from_snapshot
from regrow.checkpoint.snapshot.wordsum import EMPTY, MASK, Digest, assemble, combine, digest
from regrow.recovery.from_snapshots import restore_from_node
from regrow.tests.test_snapshot import node, token  # noqa: F401 (fixtures)
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer
from regrow.trainer.state import ShardState


def as_int64(value: Digest) -> torch.Tensor:
    """``value`` as the int64 pair the GPU kernel returns (the same bit patterns)."""
    return torch.tensor([v - (1 << 64) if v >> 63 else v for v in value], dtype=torch.int64)


def reference(data: bytes) -> Digest:
    """The definition, word by word in Python integers."""
    padded = data + bytes(-len(data) % 4)
    words = [int.from_bytes(padded[i : i + 4], "little") for i in range(0, len(padded), 4)]
    return Digest(sum(words) & MASK, sum(map(operator.mul, range(1, len(words) + 1), words)) & MASK)


# ------------------------------------------------------------------------ the definition
def test_known_vectors() -> None:
    assert digest(b"") == EMPTY
    assert digest(b"\x01") == Digest(1, 1)
    assert digest(b"\x01\x00\x00\x00\x02") == Digest(3, 1 + 2 * 2)
    assert digest(b"\x00\x00\x00\x80" * 3) == Digest(3 * 2**31, 6 * 2**31)
    # Both sums wrap mod 2^64: n words of 0xFFFFFFFF.
    n = 100_000
    expected = Digest(n * (2**32 - 1) & MASK, n * (n + 1) // 2 * (2**32 - 1) & MASK)
    assert expected.b != n * (n + 1) // 2 * (2**32 - 1)
    assert digest(b"\xff" * (4 * n)) == expected
    assert Digest(1, 255).hex() == "0000000000000001" + "00000000000000ff"
    assert Digest.from_int64(-1, 5) == Digest(MASK, 5)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 4095, 4096, 4097, 65536 + 13])
def test_equals_the_definition(size: int) -> None:
    data = os.urandom(size)
    assert digest(data, threads=1) == reference(data)


def test_trailing_zeros_do_not_change_it_which_is_why_sizes_are_stored() -> None:
    data = os.urandom(37)
    assert digest(data) == digest(data + bytes(11)) == digest(data + bytes(3))


# ------------------------------------------------------------------------ combination, chunks, threads
def test_combine_law() -> None:
    for first_words, second_size in [(0, 0), (0, 9), (1, 0), (250, 1), (250, 777), (1000, 4096)]:
        x, y = os.urandom(4 * first_words), os.urandom(second_size)
        assert combine(digest(x), digest(y), first_bytes=len(x)) == digest(x + y)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        combine(EMPTY, EMPTY, first_bytes=6)


def test_assemble_places_parts_in_zeros() -> None:
    buffer = bytearray(10_000)
    parts = []
    for offset, size in [(0, 13), (64, 100), (256, 3), (4096, 5000)]:
        part = os.urandom(size)
        buffer[offset : offset + size] = part
        parts.append((offset, digest(part)))
    random.Random(1).shuffle(parts)  # order does not matter
    assert assemble(parts) == digest(bytes(buffer))
    with pytest.raises(ValueError, match="offset 2 is not a multiple of 4"):
        assemble([(2, EMPTY)])


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("chunk_bytes", [4, 12, 4096, 1 << 20])
def test_independent_of_chunks_and_threads(threads: int, chunk_bytes: int) -> None:
    data = os.urandom(3 * 4096 + 7 if chunk_bytes < 4096 else (2 << 20) + 4096 * 3 + 2)
    assert digest(data, threads=threads, chunk_bytes=chunk_bytes) == digest(data, threads=1, chunk_bytes=1 << 30)


def test_blocks_inside_a_chunk_match_the_definition() -> None:
    """More than one internal block of 2^18 words, and a partial one, on one thread."""
    words = np.random.default_rng(0).integers(0, 2**32, (1 << 19) + 12345, dtype=np.uint64)
    data = words.astype("<u4").tobytes() + b"\x07\x08"
    values = words.tolist() + [0x0807]
    expected = Digest(sum(values) & MASK, sum(map(operator.mul, range(1, len(values) + 1), values)) & MASK)
    assert digest(data, threads=1, chunk_bytes=1 << 30) == expected
    assert digest(data, threads=4, chunk_bytes=4 * 100_003) == expected


def test_bad_chunk_size_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_bytes=6 must be a positive multiple of 4"):
        digest(b"abc", chunk_bytes=6)


def test_views_mmaps_and_odd_offsets(tmp_path) -> None:
    data = bytearray(os.urandom(100_001))
    assert digest(memoryview(data)[3:99_998], threads=2, chunk_bytes=4096) == reference(bytes(data[3:99_998]))
    path = tmp_path / "blob"
    path.write_bytes(data)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)[1:]
        assert digest(view, threads=2, chunk_bytes=8192) == reference(bytes(data[1:]))
        view.release()  # no export left behind: the mapping closes


# ------------------------------------------------------------------------ what it detects
def test_every_single_byte_corruption_is_detected() -> None:
    data = bytearray(os.urandom(203))
    good = digest(data)
    for position in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            data[position] ^= mask
            assert digest(data) != good, (position, mask)
            data[position] ^= mask


def test_word_swaps_and_two_word_corruptions_are_detected() -> None:
    rng = random.Random(7)
    words = [rng.getrandbits(32) for _ in range(512)]
    data = b"".join(w.to_bytes(4, "little") for w in words)
    good = digest(data)
    for _ in range(500):
        i, j = rng.sample(range(len(words)), 2)
        if words[i] == words[j]:
            continue
        swapped = list(words)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        assert digest(b"".join(w.to_bytes(4, "little") for w in swapped)) != good
    # The hardest two-word case: A unchanged (d and -d), so only B can tell.
    changed = list(words)
    d = 12345
    changed[3] = (changed[3] + d) % 2**32 if changed[3] + d < 2**32 else changed[3] - d
    changed[400] = changed[400] - (changed[3] - words[3])
    if 0 <= changed[400] < 2**32:
        other = digest(b"".join(w.to_bytes(4, "little") for w in changed))
        assert other.a == good.a and other.b != good.b


def test_zeroing_and_truncation_are_detected() -> None:
    data = bytes(range(1, 256)) * 4
    good = digest(data)
    for cut in range(0, len(data), 7):
        zeroed = data[:cut] + bytes(len(data) - cut)  # what a truncated copy into a zeroed segment leaves
        assert digest(zeroed) != good, cut
        assert digest(data[:cut]) != good, cut


# ------------------------------------------------------------------------ the segment format (version 2)
TABLE = [{"name": "a", "dtype": "float32", "shape": [5]}, {"name": "b", "dtype": "uint8", "shape": [7]},
         {"name": "c", "dtype": "int16", "shape": [3]}]


def _segment(tmp_path, name: str = "segment") -> tuple[mmap.mmap, list[seg.TensorEntry], int]:
    entries, payload = seg.plan_tensors(TABLE)
    path = tmp_path / name
    path.write_bytes(bytes(seg.segment_bytes(1024, payload)))
    buffer = seg.open_segment(str(path), writable=True)
    seg.format_empty(buffer, rank=0, slot=0, meta_capacity=1024)
    seg.begin(buffer, {"step": 3, "tensors": [e.to_dict() for e in entries]})
    return buffer, entries, payload


def test_header_layout() -> None:
    assert seg.HEADER_BYTES == 128 and seg.FORMAT_VERSION == 3
    assert seg.payload_offset(1024) % seg.PAGE == 0


def test_seal_with_assembled_tensor_digests_verifies(tmp_path) -> None:
    buffer, entries, payload = _segment(tmp_path)
    start = seg.payload_offset(1024)
    parts = []
    for entry in entries:
        data = os.urandom(entry.nbytes)
        buffer[start + entry.offset : start + entry.offset + entry.nbytes] = data
        parts.append((entry.offset, digest(data)))
    seg.seal(buffer, step=3, payload_bytes=payload, payload_digest=assemble(parts))
    header = seg.read_header(buffer)
    assert header.payload_digest == digest(buffer[start : start + payload])
    assert struct.unpack_from("<I", buffer, 64) == (seg.COMPLETE,)
    snapshot = seg.verify(buffer, rank=0)
    assert snapshot.step == 3
    snapshot.payload.release()
    buffer[start + entries[1].offset] ^= 0x10
    with pytest.raises(seg.SegmentError, match="step 3: payload checksum mismatch .WordSum-128"):
        seg.verify(buffer)
    buffer.close()


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_segment_version_is_reported_unsupported(tmp_path, version: int) -> None:
    buffer, _, payload = _segment(tmp_path)
    seg.seal(buffer, step=3, payload_bytes=payload)
    struct.pack_into("<I", buffer, 8, version)
    with pytest.raises(seg.SegmentError, match=f"unsupported snapshot segment format version {version}: this regrow "
                                               "reads only version 3.*restore from the disk checkpoint"):
        seg.verify(buffer)
    buffer.close()
    assert f"unsupported snapshot segment format version {version}" in seg.inspect(str(tmp_path / "segment"))["status"]


# ------------------------------------------------------------------------ HostCopier's summarize hook
def test_hostcopier_brings_summaries_with_the_copy() -> None:
    sources = {"x": torch.arange(10, dtype=torch.float32), "y": torch.ones(3, dtype=torch.int16)}
    seen = []

    def summarize(name: str, source: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return as_int64(digest(source.numpy().tobytes()))

    copier = HostCopier()
    copy = copier.start(sources, summarize=summarize)
    copy.wait_host()
    assert seen == ["x", "y"]
    for name, source in sources.items():
        assert Digest.from_int64(*copy.summaries[name].tolist()) == digest(source.numpy().tobytes())
        assert torch.equal(copy.buffers[name], source)
    copy.release()
    plain = copier.start(sources)
    plain.wait_host()
    assert plain.summaries == {}
    plain.release()


# ------------------------------------------------------------------------ the sink's per-tensor digest path
def _host_stand_in(name: str, source: torch.Tensor) -> torch.Tensor:
    """What ``wordsum_triton.digest_cuda`` returns, computed on the host (CPU sources)."""
    data = source.detach().contiguous().view(torch.uint8).numpy().tobytes() if source.numel() else b""
    return as_int64(digest(data))


def test_sink_seals_from_per_tensor_digests_and_restores(node, token, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(sink_module, "gpu_summarize", lambda state, rank, log: _host_stand_in)
    config = tiny_config(steps=3)
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1, log=False), rank=0)
    trainer = Trainer(config, sinks=[sink])
    for _ in range(3):
        trainer.train_step()
    sink.close()
    assert list(sink.stats.sealed_steps) == [1, 2, 3]
    fresh = Trainer(config)
    assert restore_from_node(fresh, node.address, token=token, log=False).step == 3
    for a, b in zip(trainer.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sink_clears_dirty_gaps_between_odd_sized_tensors(node, token, monkeypatch) -> None:  # noqa: F811
    """Tensors of odd byte sizes leave alignment gaps; stray bytes there must not break the assembled digest
    (which covers the tensors only), and odd sizes must digest with their zero padding."""
    monkeypatch.setattr(sink_module, "gpu_summarize", lambda state, rank, log: _host_stand_in)
    base = Trainer(tiny_config(steps=1)).shard_state()

    def state(step: int) -> ShardState:
        odd = {"odd/bytes": torch.arange(7, dtype=torch.uint8) + step, "odd/half": torch.randn(5).half(),
               "odd/empty": torch.empty(0), "odd/last": torch.tensor([step, 1, 2], dtype=torch.uint8)}
        return dataclasses.replace(base, step=step, tensors={**odd, **base.tensors})

    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1, log=False), rank=0)
    sink.after_step(state(1))
    sink.before_optimizer_step()
    in_flight = sink._pending.segment
    idle = next(s for s in sink.segments if s is not in_flight)
    assert idle._gaps, "odd-sized tensors leave gaps"
    for begin, end in idle._gaps:
        idle.buffer[begin:end] = b"\xab" * (end - begin)
    sink.after_step(state(2))  # into the dirty segment
    sink.close()
    assert list(sink.stats.sealed_steps) == [1, 2]
    for segment, step in ((in_flight, 1), (idle, 2)):
        snapshot = seg.verify(segment.buffer, rank=0)
        restored = state_from_snapshot(snapshot)
        snapshot.payload.release()
        assert restored.step == step
        for name, tensor in state(step).tensors.items():
            if name != "odd/half":  # random per call
                assert torch.equal(restored.tensors[name], tensor), name
