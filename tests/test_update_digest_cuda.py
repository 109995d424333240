"""GPU tests of the checksum the 8-bit update makes on the way (``adamw_triton`` ``row_digests`` and
``combine_row_digests``, ``GroupShard.track_digests``, ``ZeroOptimizer.shard_digests``), and of the snapshot copier
taking it instead of reading the shard again: each digest equals the host's WordSum-128 of the bytes, and a snapshot
sealed with it verifies and reads back equal.

Skipped where CUDA or triton is missing (the CPU development machine; ``tests/test_wordsum.py`` checks the CPU side
of the contract: no digest without an update, none for a replaced tensor).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from regrow.checkpoint.snapshot import copier_link
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.checkpoint.snapshot.wordsum import Digest, digest
from regrow.tests.test_snapshot import node, token  # noqa: F401 (fixtures)
from regrow.tests.test_snapshot_copier import slot_states
from regrow.trainer.state import RngState, ShardState
from regrow.trainer.zero.adamw import adamw8bit_step
from regrow.trainer.zero.codes import BLOCK_SIZE, new_state_8bit
from regrow.trainer.zero.optimizer import ZeroOptimizer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton"
)

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def host_digest(tensor: torch.Tensor) -> Digest:
    return digest(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def _problem(blocks: int, seed: int) -> list[torch.Tensor]:
    """param, grad (with NaN and Inf) and a non-zero 8-bit state on the GPU, after one update."""
    n = blocks * BLOCK_SIZE
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 2, (n,), generator=g)
    grad[torch.randint(0, n, (max(1, n // 1000),), generator=g)] = float("nan")
    grad[0] = float("inf")
    tensors = [t.cuda() for t in (param, grad, *new_state_8bit(n))]
    adamw8bit_step(tensors[0], tensors[1].neg(), *tensors[2:], step=1, **HYPER)
    return tensors


def _shard(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The five shard tensors, in the order of the combined digests: master, m codes, m scales, v codes, v scales."""
    return [tensors[0], *tensors[2:]]


@pytest.mark.parametrize("blocks", [1, 3, 4097])
def test_update_digests_equal_the_host_digest_and_change_no_result(blocks: int) -> None:
    from regrow.trainer.zero.adamw_triton import combine_row_digests

    digested = _problem(blocks, seed=blocks)
    plain = [t.clone() for t in digested]
    sums = torch.full((blocks, 6), -1, dtype=torch.int64, device="cuda")  # every entry must be written
    adamw8bit_step(digested[0], digested[1], *digested[2:], step=2, row_digests=sums, **HYPER)
    adamw8bit_step(plain[0], plain[1], *plain[2:], step=2, **HYPER)
    for with_digest, without in zip(digested, plain, strict=True):  # bit patterns: the gradient holds NaN
        assert torch.equal(with_digest.view(torch.uint8), without.view(torch.uint8)), "the digest changed the update"
    out = torch.full((5, 2), 7, dtype=torch.int64, device="cuda")  # combine zeroes it first
    combine_row_digests(sums, digested[3], digested[5], out)
    for row, tensor in enumerate(_shard(digested)):
        assert Digest.from_int64(*out[row].tolist()) == host_digest(tensor), row


def test_pieces_digested_apart_combine_to_the_whole_tensors() -> None:
    """The optimizer updates a shard bucket by bucket; each call fills its rows of one sums tensor."""
    from regrow.trainer.zero.adamw_triton import combine_row_digests

    tensors = _problem(3000, seed=5)
    sums = torch.zeros((3000, 6), dtype=torch.int64, device="cuda")
    for start, end in ((0, 1000), (1000, 2999), (2999, 3000)):
        elements = slice(start * BLOCK_SIZE, end * BLOCK_SIZE)
        blocks = slice(start, end)
        adamw8bit_step(tensors[0][elements], tensors[1][elements], tensors[2][elements], tensors[3][blocks],
                       tensors[4][elements], tensors[5][blocks], step=2, row_digests=sums[blocks], **HYPER)
    out = combine_row_digests(sums, tensors[3], tensors[5], torch.empty((5, 2), dtype=torch.int64, device="cuda"))
    for row, tensor in enumerate(_shard(tensors)):
        assert Digest.from_int64(*out[row].tolist()) == host_digest(tensor), row


def test_row_digests_are_checked() -> None:
    tensors = _problem(2, seed=1)
    with pytest.raises(ValueError, match=r"row_digests: must be a contiguous int64 tensor of shape \(2, 6\)"):
        adamw8bit_step(tensors[0], tensors[1], *tensors[2:], step=2,
                       row_digests=torch.zeros((2, 5), dtype=torch.int64, device="cuda"), **HYPER)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 8-bit groups (weights, decayed) and an fp32-state group (biases under min_8bit_numel).
    return nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64)).cuda()


def _train_step(model: nn.Module, optimizer: ZeroOptimizer, step: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(step)
    x = torch.randn(32, 64, device="cuda", generator=g)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_optimizer_serves_digests_of_its_last_update_only() -> None:
    model = _model()
    optimizer = ZeroOptimizer(model, stage=2, state_bits=8, min_8bit_numel=4096)
    assert optimizer.shard_digests() == {}, "turned on by the first call: no update has digested anything yet"
    _train_step(model, optimizer, 1)
    tensors = optimizer.shard_tensors()
    digests = optimizer.shard_digests()
    coded = {key.split("/")[0] for key in tensors if key.endswith("_codes")}
    eight_bit = {key for key in tensors if key.split("/")[0] in coded}
    assert set(digests) == eight_bit and eight_bit, (sorted(digests), sorted(tensors))
    for key, known in digests.items():
        assert known.source is tensors[key]
        assert Digest.from_int64(*known.value.tolist()) == host_digest(tensors[key]), key
    saved = {key: tensor.clone() for key, tensor in tensors.items()}
    _train_step(model, optimizer, 2)
    optimizer.load_shard_tensors(saved, step_count=1)  # a restore writes the shard: its digests are gone
    assert optimizer.shard_digests() == {}
    _train_step(model, optimizer, 2)
    for key, known in optimizer.shard_digests().items():
        assert Digest.from_int64(*known.value.tolist()) == host_digest(tensors[key]), key


@pytest.mark.timeout(180)
def test_copier_seals_with_the_update_digests_and_the_snapshots_verify(node, token, monkeypatch) -> None:  # noqa: F811
    kernel = copier_link.gpu_digest_kernel()
    read: list[int] = []

    def counting():
        def digest_cuda(tensor, out=None, **kwargs):
            read.append(tensor.numel())
            return kernel(tensor, out=out, **kwargs)

        return digest_cuda

    monkeypatch.setattr(copier_link, "gpu_digest_kernel", counting)
    model = _model()
    optimizer = ZeroOptimizer(model, stage=2, state_bits=8, min_8bit_numel=4096)
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1, log=False, copier="process"),
                        rank=0)
    expected: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(1, 5):
        sink.before_optimizer_step()
        _train_step(model, optimizer, step)
        state = ShardState(step=step, tensors=optimizer.shard_tensors(), layout=optimizer.layout.to_dict(), rank=0,
                           rng=RngState.capture(), data_cursor={"epoch": 0, "index": step}, tokens_seen=step,
                           digests=optimizer.shard_digests())
        expected[step] = {key: tensor.clone() for key, tensor in state.tensors.items()}
        read.clear()
        sink.after_step(state)
        digested = {key for key in state.tensors if state.digest_of(key) is not None}
        assert digested or step == 1
        # Only the tensors without an update digest are read again by the digest kernel.
        assert sorted(read) == sorted(state.tensors[key].numel() for key in state.tensors if key not in digested)
    sink.flush()
    held = slot_states(node, token)  # read_slot verifies each payload against the digest it was sealed with
    assert sorted(held) == [3, 4]
    for step, restored in held.items():
        for key, tensor in expected[step].items():
            assert torch.equal(restored.tensors[key], tensor.cpu()), (step, key)
    sink.close()
