"""GPU tests of checkpoint/snapshot/wordsum_triton.py: the Triton WordSum-128 equals the host digest bit for bit, runs on the
stream it is called on without blocking the CPU, and drives the snapshot sink's seal.

Skipped where CUDA or triton is missing (the CPU development machine).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

import pytest
import torch

from regrow.checkpoint.hostcopy import HostCopier
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.sink import (
    SnapshotSink,
    SnapshotSinkConfig,
    state_from_snapshot,
)
from regrow.checkpoint.snapshot.wordsum import Digest, digest
from regrow.tests.test_snapshot import node, token  # noqa: F401 (fixtures)
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton"
)


def host_digest(tensor: torch.Tensor) -> Digest:
    return digest(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def gpu_digest(tensor: torch.Tensor) -> Digest:
    from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda, to_digest

    return to_digest(digest_cuda(tensor).cpu())


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8, torch.int16, torch.int64, torch.bool]
SIZES = [0, 1, 2, 3, 5, 1023, 4097, 3 * 2048 * 4 + 1, (1 << 22) + 3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_equals_host_on_random_tensors(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(3)
    for size in SIZES:
        if dtype.is_floating_point:
            tensor = torch.randn(size, generator=g, device="cuda").to(dtype)
        elif dtype == torch.bool:
            tensor = torch.rand(size, generator=g, device="cuda") > 0.5
        else:
            info = torch.iinfo(dtype)
            tensor = torch.randint(info.min, info.max, (size,), generator=g, device="cuda", dtype=dtype)
        assert gpu_digest(tensor) == host_digest(tensor), (dtype, size)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 5, 6, 7])
def test_storage_offsets_and_odd_lengths(offset: int) -> None:
    """Views starting at any byte (the unaligned path assembles words from bytes) and ending anywhere."""
    base = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    for length in (0, 1, 3, 4, 7, 4096 + 1, (1 << 20) - 8):
        view = base[offset : offset + length]
        assert gpu_digest(view) == host_digest(view), (offset, length)
    halves = base.view(torch.float16)[offset : offset + 1001]  # 2-byte storage offsets
    assert gpu_digest(halves) == host_digest(halves)


def test_non_contiguous_and_large() -> None:
    matrix = torch.randn(1000, 333, device="cuda")
    assert gpu_digest(matrix.t()) == host_digest(matrix.t())
    big = torch.randint(-(2**31), 2**31 - 1, (64 << 20,), dtype=torch.int32, device="cuda")  # 256 MiB, many programs
    assert gpu_digest(big) == host_digest(big)


@pytest.mark.parametrize("max_programs", [1, 3, 16])
def test_a_capped_grid_gives_the_same_digest(max_programs: int) -> None:
    """``bench_digest.py`` measures capped grids: same bytes, same digest."""
    from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda, to_digest

    tensor = torch.randint(-(2**31), 2**31 - 1, ((8 << 20) + 5,), dtype=torch.int32, device="cuda")
    for view in (tensor, tensor.view(torch.uint8)[3:-2]):
        assert to_digest(digest_cuda(view, max_programs=max_programs).cpu()) == host_digest(view), max_programs
    with pytest.raises(ValueError, match="max_programs=0 must be >= 1"):
        digest_cuda(tensor, max_programs=0)


def test_out_argument_is_checked() -> None:
    from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda

    with pytest.raises(ValueError, match="out must be a zeroed int64 tensor of 2 elements"):
        digest_cuda(torch.ones(4, device="cuda"), out=torch.zeros(3, dtype=torch.int64, device="cuda"))


def test_runs_on_the_given_stream_without_blocking_the_cpu() -> None:
    from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda, to_digest

    tensor = torch.randn(1 << 22, device="cuda")
    expected = host_digest(tensor)
    digest_cuda(tensor)  # compiled before timing
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time on the side stream
        started = time.perf_counter()
        result = digest_cuda(tensor)
        enqueued = time.perf_counter() - started
        done = torch.cuda.Event()
        done.record(side)
    assert enqueued < 0.2, f"digest_cuda blocked the CPU for {enqueued:.3f} s"
    assert not done.query(), "the digest ran before the side stream's earlier work: not on that stream"
    torch.cuda.current_stream().synchronize()  # the compute stream has nothing to wait for
    assert not done.query()
    done.synchronize()
    assert to_digest(result.cpu()) == expected


def test_hostcopier_summaries_on_cuda() -> None:
    from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda, to_digest

    sources = {"a": torch.randn(12345, device="cuda"), "b": torch.randint(0, 255, (7,), dtype=torch.uint8,
                                                                             device="cuda")}
    copy = HostCopier().start(sources, summarize=lambda name, source: digest_cuda(source))
    copy.wait_host()
    for name, source in sources.items():
        assert copy.summaries[name].device.type == "cpu" and copy.summaries[name].is_pinned()
        assert to_digest(copy.summaries[name]) == host_digest(source) == host_digest(copy.buffers[name])
    copy.release()


def test_sink_seals_with_gpu_digests(node, token) -> None:  # noqa: F811
    base = Trainer(tiny_config(steps=1)).shard_state()

    def state(step: int):
        tensors = {name: t.cuda() + step for name, t in base.tensors.items()}
        tensors["odd/bytes"] = torch.arange(7, dtype=torch.uint8, device="cuda") + step
        return dataclasses.replace(base, step=step, tensors=tensors)

    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1, log=False, copier="thread"),
                        rank=0)
    states = [state(1), state(2), state(3)]
    for current in states:
        sink.after_step(current)
        assert sink._pending is None or sink._pending.step < current.step, "on CUDA the copy waits for the forward"
        sink.after_forward()
        assert sink._pending.gpu_digests
        sink.before_optimizer_step()
    sink.flush()
    assert list(sink.stats.sealed_steps) == [1, 2, 3]
    for segment in sink.segments:
        snapshot = seg.verify(segment.buffer, rank=0)
        restored = state_from_snapshot(snapshot)
        snapshot.payload.release()
        for name, tensor in states[restored.step - 1].tensors.items():
            assert torch.equal(restored.tensors[name], tensor.cpu()), name
    sink.close()
    assert sink.segments == [], "closed: unmapped and unregistered from CUDA"


def test_read_slot_verifies_on_the_gpu_and_detects_corruption(node, token) -> None:  # noqa: F811
    """A slot read for a CUDA trainer is verified on the GPU and yields the same tensors, on the GPU; a flipped
    payload byte is caught there as it is on the host."""
    from regrow.checkpoint.snapshot.read import read_slot

    base = Trainer(tiny_config(steps=1)).shard_state()
    state = dataclasses.replace(base, step=4, tensors={name: t.cuda() + 4 for name, t in base.tensors.items()})
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1, log=False, copier="thread"),
                        rank=0)
    sink.after_step(state)
    sink.flush()
    path = next(s.path for s in sink.segments if seg.read_header(s.buffer).step == 4)
    reasons: list[str] = []
    on_gpu = read_slot(path, 0, reasons, torch.device("cuda"))
    on_host = read_slot(path, 0, reasons)
    assert on_gpu is not None and on_host is not None and not reasons
    for name, tensor in state.tensors.items():
        assert on_gpu.tensors[name].is_cuda and torch.equal(on_gpu.tensors[name], tensor), name
        assert torch.equal(on_host.tensors[name], tensor.cpu()), name
    assert (on_gpu.step, on_gpu.data_cursor) == (on_host.step, on_host.data_cursor)
    segment = next(s for s in sink.segments if s.path == path)
    start = seg.payload_offset(seg.read_header(segment.buffer).meta_capacity)
    segment.buffer[start + 5] ^= 0xFF
    assert read_slot(path, 0, reasons, torch.device("cuda")) is None
    assert "payload checksum mismatch" in reasons[-1] and "on the GPU" in reasons[-1]
    sink.close()
