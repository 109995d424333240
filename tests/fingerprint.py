"""One full-state comparison for the tests that claim "bit-identical": every shard tensor byte for byte (fp32
masters, 8-bit codes and scales or fp32 moments, a user loop's tensors), the step, the data cursor, the tokens
seen and every random generator's state. A restore that loses any of them fails :func:`assert_same_state`; a run
whose final checkpoint differs from the fault-free run's in any file or manifest field fails
:func:`assert_same_checkpoint`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from regrow.launch.chaos.report import checkpoint_contents
from regrow.trainer.state import ShardState


def frozen(state: ShardState) -> ShardState:
    """A copy of ``state`` that later training steps cannot change (a trainer's ``shard_state()`` views its live
    buffers)."""
    return ShardState(step=state.step, tensors={k: v.detach().clone() for k, v in state.tensors.items()},
                      layout=state.layout, rank=state.rank, rng=state.rng, data_cursor=dict(state.data_cursor),
                      tokens_seen=state.tokens_seen, extra=dict(state.extra))


def assert_same_state(a: ShardState, b: ShardState) -> None:
    """``a`` and ``b`` hold the same training state, bit for bit (see the module docstring)."""
    assert (a.step, a.data_cursor, a.tokens_seen) == (b.step, b.data_cursor, b.tokens_seen)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name].detach().cpu(), b.tensors[name].detach().cpu()
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), name
    assert torch.equal(a.rng.torch_cpu, b.rng.torch_cpu), "torch CPU generator"
    assert len(a.rng.torch_cuda) == len(b.rng.torch_cuda)
    assert all(torch.equal(x, y) for x, y in zip(a.rng.torch_cuda, b.rng.torch_cuda)), "torch CUDA generators"
    assert a.rng.python == b.rng.python, "Python's generator"
    _same_numpy(a.rng.numpy, b.rng.numpy)


def _same_numpy(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), "NumPy's generator"
    for key in a:
        if isinstance(a[key], dict):
            _same_numpy(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), f"NumPy's generator ({key})"
        else:
            assert a[key] == b[key], f"NumPy's generator ({key})"


def assert_same_checkpoint(root: Path, reference: Path) -> None:
    """The latest checkpoints under ``root`` and ``reference`` hold the same state (``report.checkpoint_contents``:
    every file, and the manifest but for when and by whom it was written), naming the files or fields that differ."""
    mine, theirs = checkpoint_contents(root), checkpoint_contents(reference)
    assert mine is not None and theirs is not None, "no checkpoint to compare"
    assert mine.keys() == theirs.keys() and len(mine) > 1, sorted(set(mine) ^ set(theirs))
    different = [path for path in mine if path != "manifest.json" and mine[path] != theirs[path]]
    assert not different, f"final state differs from the uninterrupted run in {different[:5]}"
    fields = [k for k in {**mine["manifest.json"], **theirs["manifest.json"]}  # type: ignore[dict-item]
              if mine["manifest.json"].get(k) != theirs["manifest.json"].get(k)]  # type: ignore[union-attr]
    assert not fields, f"final manifests differ in {fields}"
