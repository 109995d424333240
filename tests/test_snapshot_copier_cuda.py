"""GPU tests of the snapshot copier process (``checkpoint/snapshot/copier.py``): over CUDA IPC it copies the rank's
shard after the rank's "ready" event, and the rank's next update waits for its "done" event on the GPU.

Skipped where CUDA or triton is missing (the CPU development machine runs the same protocol in
``tests/test_snapshot_copier.py``).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import warnings

import pytest
import torch

from regrow.checkpoint.snapshot.cuda_ipc import export_tensor
from regrow.checkpoint.snapshot.protocol import SnapshotClient
from regrow.checkpoint.snapshot.read import read_slot
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.tests.test_snapshot import node, token  # noqa: F401 (fixtures)
from regrow.tests.test_snapshot_copier import slot_states
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton"
)


def test_export_describes_the_allocation_that_holds_the_tensor() -> None:
    whole = torch.arange(1000, dtype=torch.float32, device="cuda")
    described = export_tensor(whole[100:])
    assert described["offset"] >= 400 and described["allocation_bytes"] >= described["offset"] + 900 * 4
    assert (described["dtype"], described["shape"], described["device"]) == ("float32", [900], whole.device.index)
    assert len(base64.b64decode(described["handle"])) == 64


@pytest.mark.timeout(120)
def test_copier_on_cuda_never_lets_the_next_update_overwrite_a_copy_in_flight(node, token) -> None:  # noqa: F811
    base = Trainer(tiny_config(steps=1)).shard_state()
    tensors = {name: t.cuda() for name, t in base.tensors.items()}
    # 512 MiB: a copy of several milliseconds, far longer than the fill that follows it on the compute stream.
    tensors["big/master"] = torch.zeros(128 << 20, dtype=torch.float32, device="cuda")
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1, log=False, copier="process"),
                        rank=0)
    for step in range(1, 5):
        for tensor in tensors.values():
            tensor.fill_(step)
        sink.after_step(dataclasses.replace(base, step=step, tensors=tensors))
        sink.before_optimizer_step()
        for tensor in tensors.values():  # the "optimizer step": must run after the copy of step's state
            tensor.fill_(100 + step)
    sink.flush()
    assert list(sink.stats.sealed_steps) == [1, 2, 3, 4] and sink.segments == []
    torch.cuda.synchronize()
    sink.flush()  # reads the timing events of the last waits, now complete
    # Each fill waited for a copy of 512 MiB queued just before it: the stats see that wait, and the copies' time.
    assert len(sink.stats.copy_ms) == 4 and min(sink.stats.copy_ms) > 0.5
    assert len(sink.stats.wait_ms) == 4 and max(sink.stats.wait_ms) > 0.5
    held = slot_states(node, token)
    assert sorted(held) == [3, 4]
    for step, state in held.items():
        for name, tensor in state.tensors.items():
            assert torch.equal(tensor, torch.full_like(tensor, step)), (step, name)
    sink.close()


@pytest.mark.timeout(120)
def test_copier_snapshot_reads_back_on_the_gpu(node, token) -> None:  # noqa: F811
    base = Trainer(tiny_config(steps=1)).shard_state()
    state = dataclasses.replace(base, step=7, tensors={name: t.cuda() + 7 for name, t in base.tensors.items()})
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1, log=False, copier="process"),
                        rank=0)
    sink.after_step(state)
    sink.flush()
    reasons: list[str] = []
    assert list(slot_states(node, token)) == [7]
    client = SnapshotClient(node.address, token=token)
    path = next(s["path"] for s in client.request({"op": "latest", "rank": 0})["slots"] if s["step"] == 7)
    client.close()
    on_gpu = read_slot(path, 0, reasons, torch.device("cuda"))
    assert on_gpu is not None and not reasons
    for name, tensor in state.tensors.items():
        assert torch.equal(on_gpu.tensors[name], tensor), name
    sink.close()


def test_a_read_only_slot_mapping_registers_for_the_restore_copy(tmp_path) -> None:
    """A restore registers the slot's read-only mapping with CUDA for its copy (``host_register.registered``); the
    restore's 2.4 GB pageable copy took 1.2 s on an H100 host."""
    import mmap

    from regrow.checkpoint.host_register import registered

    path = tmp_path / "slot"
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            host = torch.frombuffer(mapping, dtype=torch.uint8)
        device = torch.empty_like(host, device="cuda")
        with registered(host, read_only=True) as pinned:
            device.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize()
        assert pinned, "cudaHostRegister(read-only) refused the mapping"
        assert torch.equal(device.cpu(), data)
        del host
    finally:
        mapping.close()
