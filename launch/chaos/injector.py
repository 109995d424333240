"""The rank side of a fault plan: :class:`FaultInjector` crashes, hangs, slows or corrupts this rank at the planned
steps, and the acts it uses (killing a process and waiting for it, flipping a byte of a snapshot segment).

The injector is a ``StateSink`` that runs right before the optimizer step of the target step: listed after the
snapshot sink, it fires while the snapshot of the previous step is still being copied and sealed, the hardest
moment for the snapshots (the older buffer must be complete). A kill at another moment of the step (``plan.MOMENTS``)
fires from a hook: the snapshot sink's copy hook (``snapshot-copy``), a forward hook on the model's middle leaf
module (``forward``), a gradient hook on its middle parameter (``backward``), the optimizer's update and gather
pre-hooks (``update``, ``all-gather``, installed by :meth:`FaultInjector.arm`) and the checkpoint writer's
``io_fault`` hook (``persist``); ``ec`` is the snapshot process's own (``node_faults.py``). A corruption
(``corrupt-param``, ``corrupt-shard``) strikes at the start of its step, in :meth:`FaultInjector.after_step` of the
step before (or when armed, for a rank that trains from that step), once the snapshot and the checkpoint copy of
that state are read: it hits the live state only, as a flip in device memory between two steps does. It gets what
it acts through by its constructor (the snapshot sink, whose in-flight snapshot ``corrupt-snapshot`` waits for), by
:meth:`FaultInjector.arm` (the model and optimizer) and by :meth:`FaultInjector.watch_saves` (the checkpoint writer,
whose outcome ``fail-ckpt`` records); the writer in turn is built with :meth:`FaultInjector.checkpoint_fault` as its
``io_fault`` hook. Each fault is recorded as fired before it acts
(``records.py``), so the ranks of a restarted attempt drop it: it happens once although the run replays steps.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import SnapshotClient
from regrow.checkpoint.snapshot.sink import SnapshotSink
from regrow.checkpoint.universal import storage
from regrow.checkpoint.universal.writer import CheckpointWriter
from regrow.launch.chaos import records
from regrow.launch.chaos.plan import CORRUPT_KINDS, Fault, plan_from_env
from regrow.launch.local.attempts import ATTEMPT_ENV
from regrow.launch.local.nodes import ADDRESS_ENV, NODE_ENV, PID_ENV
from regrow.trainer.state import ShardState
from regrow.trainer.zero.optimizer import ZeroOptimizer

TRAINING_MOMENTS = ("forward", "backward", "update", "all-gather")
"""Moments reached through the model's and the optimizer's hooks (:meth:`FaultInjector.arm`)."""


def kill_pid(pid: int) -> None:
    """SIGKILLs ``pid``; a process already gone is fine (several ranks of a node kill its snapshot process)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_pid_and_wait(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILLs ``pid`` and returns once it is dead (gone or a zombie: it is the launcher's child, not ours, so
    we cannot reap it), or after ``timeout_s``. A node dies at once; without the wait, a rank that kills itself
    right after signalling could be seen dead by the launcher while the snapshot process still runs (a signal is
    delivered asynchronously; on a loaded machine the process may keep running for a while), and the launcher
    would keep a snapshot process that dies a moment later under the next attempt."""
    kill_pid(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.005)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (Linux reads /proc; elsewhere a zombie counts as running)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The state follows the command name in parentheses, which may itself hold spaces or parentheses.
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def corrupt_segment(path: str) -> None:
    """Flips one payload byte of the snapshot segment at ``path`` (its checksum then fails)."""
    buffer = seg.open_segment(path, writable=True)
    try:
        buffer[seg.payload_offset(seg.read_header(buffer).meta_capacity) + 100] ^= 0xFF
    finally:
        buffer.close()


def flip_bit(tensor: torch.Tensor, element: int) -> None:
    """Flips one bit of ``tensor``'s element ``element`` in place: in a float, the second-lowest exponent bit (the
    value is scaled by 4 or 1/4: wrong, finite, silent); in a byte, bit 4."""
    raw = tensor.detach().reshape(-1).view(torch.uint8)
    size = tensor.element_size()
    byte = element * size + size - 1  # little-endian: the sign and the exponent's high bits
    raw[byte] ^= 0x01 if size > 1 else 0x10


def corruption_target(kind: str, optimizer: ZeroOptimizer) -> tuple[str, torch.Tensor]:
    """What a corruption of ``kind`` flips a bit of, and its name: the first working-parameter buffer
    (``corrupt-param``) or the Adam second moment of the first group's shard (``corrupt-shard``)."""
    if kind == "corrupt-param":
        buffers = optimizer.working_parameters()
        if not buffers:
            raise ValueError("corrupt-param: this optimizer keeps no full working parameters (ZeRO stage 3); use "
                             "corrupt-shard")
        return "working parameters", buffers[0]
    key, tensor = next((k, t) for k, t in optimizer.shard_tensors().items()
                       if k.endswith(("/exp_avg_sq", "/exp_avg_sq_codes")))
    return key, tensor


def corrupt_newest_snapshot(client: SnapshotClient, rank: int) -> dict | None:
    """Flips one payload byte of ``rank``'s newest sealed snapshot held by the snapshot process behind ``client``;
    returns that slot as the ``latest`` op lists it (``path``, ``step``, ...), or None when it holds none."""
    slots = [s for s in client.request({"op": "latest", "rank": rank})["slots"] if s["status"] == "ok"]
    if not slots:
        return None
    newest = max(slots, key=lambda s: s["step"])
    corrupt_segment(newest["path"])
    return newest


class FaultInjector:
    """The rank side of a fault plan; a ``StateSink`` (list it after the snapshot sink and the checkpoint writer).
    Built from the environment the launcher set by :meth:`from_env` (None when it gave no plan)."""

    def __init__(self, faults: list[Fault], fired_dir: str, *, rank: int, node: int, snapshot_pid: int | None,
                 attempt: int = 0, snapshot_sink: SnapshotSink | None = None, step: int = 0) -> None:
        """``snapshot_pid``: this rank's node snapshot process (what ``kill-node`` kills); ``snapshot_sink``: this
        rank's, whose snapshot in flight ``corrupt-snapshot`` waits for and whose copies ``snapshot-copy`` kills
        interrupt (None: snapshots are off); ``step``: the step the rank trains from (its restored step)."""
        self.fired_dir = Path(fired_dir)
        # Faults fired in an earlier attempt stay fired; within this attempt every rank a fault hits acts on it.
        done = set(records.fired(fired_dir))
        self.faults = {index: fault for index, fault in enumerate(faults) if index not in done}
        self.rank = rank
        self.node = node
        self.snapshot_pid = snapshot_pid
        self.attempt = attempt
        self.last_step = step
        self._snapshot_sink = snapshot_sink
        self._hooks: list[Any] = []  # handles of the hooks arm() installed
        self._optimizer: ZeroOptimizer | None = None  # what a corruption flips (arm())
        self._step_started = time.perf_counter()
        self._step_seconds = 0.0
        self._slept: dict[int, float] = {}
        self._unslowed_s: dict[int, float] = {}
        self._armed = {i: f for i, f in self.faults.items() if self._hits(f) and (
            f.kind == "fail-ckpt" or f.moment == "persist")}
        self._failed_at: dict[int, int] = {}
        self._writer: CheckpointWriter | None = None
        if snapshot_sink is not None and self._moment_faults("snapshot-copy"):
            self._hooks.append(snapshot_sink.register_copy_hook(self._snapshot_copying))

    @classmethod
    def from_env(cls, rank: int, *, snapshot_sink: SnapshotSink | None = None, step: int = 0
                 ) -> FaultInjector | None:
        """The injector of the plan in this process's environment (``plan.plan_env``; the launcher's attempt,
        this rank's node and its snapshot process too), or None when there is no plan. ``step``: the step the rank
        trains from."""
        planned = plan_from_env(dict(os.environ))
        if planned is None:
            return None
        faults, fired_dir = planned
        pid = os.environ.get(PID_ENV)
        return cls(faults, fired_dir, rank=rank, node=int(os.environ.get(NODE_ENV, "0")),
                   snapshot_pid=int(pid) if pid else None, attempt=int(os.environ.get(ATTEMPT_ENV, "0")),
                   snapshot_sink=snapshot_sink, step=step)

    @property
    def fails_checkpoints(self) -> bool:
        """Whether a ``fail-ckpt`` fault or a kill while persisting hits this rank: build its writer with
        :meth:`checkpoint_fault` as the ``io_fault`` hook, then call :meth:`watch_saves`."""
        return bool(self._armed)

    @property
    def needs_training_hooks(self) -> bool:
        """Whether a kill of this rank strikes inside the forward, the backward or the optimizer step, or a
        corruption hits its state: call :meth:`arm` with the model and the optimizer."""
        return any(self._moment_faults(moment) for moment in TRAINING_MOMENTS) or bool(self._corruptions())

    def arm(self, model: torch.nn.Module, optimizer: ZeroOptimizer) -> None:
        """Installs the hooks of the kills that strike inside the step (:data:`TRAINING_MOMENTS`): in the middle of
        the forward (after the middle leaf module, in the order ``modules()`` lists them), of the backward (when
        the middle trainable parameter's gradient is computed), between the reduction and the update, and
        between the update and the parameter all-gather. :meth:`close` removes them. A corruption planned for the
        step this rank trains from strikes now."""
        self._optimizer = optimizer
        self._corrupt(self.last_step + 1)
        if self._moment_faults("forward"):
            leaves = [module for module in model.modules() if next(module.children(), None) is None]
            self._hooks.append(leaves[len(leaves) // 2].register_forward_hook(
                lambda *_: self._at_moment("forward")))
        if self._moment_faults("backward"):
            params = [param for param in model.parameters() if param.requires_grad]
            self._hooks.append(params[len(params) // 2].register_hook(self._in_backward))
        if self._moment_faults("update"):
            self._hooks.append(optimizer.register_update_pre_hook(lambda: self._at_moment("update")))
        if self._moment_faults("all-gather"):
            self._hooks.append(optimizer.register_gather_pre_hook(lambda: self._at_moment("all-gather")))

    def watch_saves(self, writer: CheckpointWriter) -> None:
        """Follows ``writer``'s save results (and its root's ``latest``) to record how each injected write
        failure was reported."""
        self._writer = writer

    # ------------------------------------------------------------------ the StateSink protocol
    def after_step(self, state: ShardState) -> None:
        now = time.perf_counter()
        self._step_seconds = now - self._step_started
        self._step_started = now
        self.last_step = state.step
        self._note_failed_saves()
        self._corrupt(state.step + 1)

    def before_optimizer_step(self) -> None:
        step = self.last_step + 1
        for index, fault in list(self.faults.items()):
            if fault.kind == "slow-rank":
                if fault.step <= step <= fault.last_step and self._hits(fault):
                    self._slow(index, fault, step)
            elif (fault.kind not in ("fail-ckpt", *CORRUPT_KINDS) and fault.moment is None and fault.step == step
                  and self._hits(fault)):
                self._fire(index, fault, step)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._note_failed_saves()

    # ------------------------------------------------------------------
    def _hits(self, fault: Fault) -> bool:
        return fault.target == (self.node if fault.target_kind == "node" else self.rank)

    def _corruptions(self) -> dict[int, Fault]:
        """The corruptions not yet over that hit this rank."""
        return {i: f for i, f in self.faults.items() if f.kind in CORRUPT_KINDS and self._hits(f)}

    def _corrupt(self, step: int) -> None:
        """Flips the bit of every corruption planned for ``step`` (at its start), once the snapshot and the
        checkpoint copy of the state before it are read (they keep the good value, as they would had the bit flipped
        in device memory during the step), and records it as fired."""
        due = {i: f for i, f in self._corruptions().items() if f.step == step}
        if not due or self._optimizer is None:
            return
        if self._snapshot_sink is not None:
            self._snapshot_sink.flush()
        if self._writer is not None:
            self._writer.before_optimizer_step()  # waits for the host copies of a save of that state
        for index, fault in due.items():
            name, tensor = corruption_target(fault.kind, self._optimizer)
            element = tensor.numel() // 3
            self._record(index, fault, step)
            print(f"[rank {self.rank}, step {step}] fault: {fault} flips a bit of element {element} of its {name}",
                  flush=True)
            flip_bit(tensor, element)
            records.write_detail(self.fired_dir, index, {"tensor": name, "element": element})
            del self.faults[index]

    def _moment_faults(self, moment: str) -> dict[int, Fault]:
        """The faults not yet fired that kill this rank at ``moment``."""
        return {i: f for i, f in self.faults.items() if f.moment == moment and self._hits(f)}

    def _at_moment(self, moment: str, step: int | None = None) -> None:
        """Fires the kill planned at ``moment`` of ``step`` (default: the step running now), if any."""
        step = self.last_step + 1 if step is None else step
        for index, fault in self._moment_faults(moment).items():
            if fault.step == step:
                self._fire(index, fault, step)

    def _in_backward(self, grad: torch.Tensor) -> None:
        self._at_moment("backward")

    def _snapshot_copying(self, snapshot_step: int) -> None:
        """The snapshot sink's copy hook: the snapshot of ``snapshot_step`` is being copied during the next step."""
        self._at_moment("snapshot-copy", snapshot_step + 1)

    def _record(self, index: int, fault: Fault, step: int) -> bool:
        """Records ``fault`` as fired (first rank only); returns False when another rank already did."""
        record = {"fault": str(fault), "rank": self.rank, "step": step, "attempt": self.attempt, "time": time.time()}
        return records.record_fired(self.fired_dir, index, record)

    def _fire(self, index: int, fault: Fault, step: int) -> None:
        """Acts on a crash fault (from the training thread, or from the thread of a hook: a kill ends the whole
        process). Each kind is named: a kind without an action here is an error, never a kill (``Fault`` refuses
        unknown kinds, so that error means a kind was added to ``plan.KINDS`` alone)."""
        if fault.kind not in ("hang-rank", "corrupt-snapshot", "kill-node", "kill-rank"):  # corruptions: _corrupt
            raise ValueError(f"fault {fault}: the injector has no action for kind {fault.kind!r}")
        self._record(index, fault, step)
        print(f"[rank {self.rank}, step {step}] fault: {fault} fires", flush=True)
        if fault.kind == "hang-rank":
            while True:  # a hang: alive, holding its resources, never reaching the collectives
                time.sleep(3600)
        if fault.kind == "corrupt-snapshot":
            self._corrupt_newest_snapshot(index, step)
        if fault.kind == "kill-node" and self.snapshot_pid is not None:
            kill_pid_and_wait(self.snapshot_pid)
        kill_pid(os.getpid())

    def _slow(self, index: int, fault: Fault, step: int) -> None:
        """Sleeps ``factor`` times the step time before the slowdown began (the last step's time, taken at the
        first slowed step: a slowed step's own time would compound, x3 becoming x4, x16, ...); the first slowed step
        records the fault as fired (it is not repeated after a restart: the straggler is the plan's, not the
        replay's)."""
        if index not in self._unslowed_s:
            self._unslowed_s[index] = self._step_seconds
        if step == fault.step:
            self._record(index, fault, step)
            print(f"[rank {self.rank}, step {step}] fault: {fault} fires (straggler until step {fault.last_step})",
                  flush=True)
        seconds = fault.slow_factor * self._unslowed_s[index]
        time.sleep(seconds)
        self._slept[index] = self._slept.get(index, 0.0) + seconds
        records.write_detail(self.fired_dir, index, {"slept_s": self._slept[index], "steps": step - fault.step + 1})
        if step == fault.last_step:
            del self.faults[index]

    def _corrupt_newest_snapshot(self, index: int, step: int) -> None:
        """Waits for the snapshot in flight to be sealed, then flips one payload byte of this rank's newest sealed
        segment (read through the node's snapshot process, which lists the slots)."""
        if self._snapshot_sink is not None:
            self._snapshot_sink.flush()
        address = os.environ.get(ADDRESS_ENV)
        detail: dict[str, Any] = {"corrupted": None}
        if address:
            client = SnapshotClient(address)
            try:
                newest = corrupt_newest_snapshot(client, self.rank)
            finally:
                client.close()
            if newest is not None:
                detail = {"corrupted": newest["path"], "snapshot_step": newest["step"]}
                print(f"[rank {self.rank}, step {step}] fault: flipped a byte of the snapshot of step "
                      f"{newest['step']} ({newest['path']})", flush=True)
        records.write_detail(self.fired_dir, index, detail)

    # ------------------------------------------------------------------ fail-ckpt
    def checkpoint_fault(self, step: int) -> None:
        """The writer's ``io_fault`` hook (its persist thread): fails this rank's part of the first save it writes
        at or after a planned step with an I/O error, as a full or failing disk would; a kill planned ``persist``
        kills the rank there instead, as it starts writing its part."""
        for index, fault in list(self._armed.items()):
            if fault.moment == "persist" and fault.step <= step:
                self._fire(index, fault, step)
            if fault.step <= step and index not in self._failed_at:
                self._failed_at[index] = step
                self._record(index, fault, step)
                print(f"[rank {self.rank}, step {step}] fault: {fault} fires (the checkpoint write fails)",
                      flush=True)
                raise OSError(errno.EIO, f"injected I/O error ({fault})")

    def _note_failed_saves(self) -> None:
        """Records, for the report, how the writer reported each injected write failure and what ``latest`` named
        then (the training thread sees the result once the persist thread is done)."""
        if not self._armed or self._writer is None:
            return
        for index, fault in list(self._armed.items()):
            step = self._failed_at.get(index)
            result = next((r for r in self._writer.results if r.step == step), None)
            if step is None or result is None:
                continue
            del self._armed[index]
            records.write_detail(self.fired_dir, index,
                                 {"step": step, "status": result.status, "error": result.error, "time": time.time(),
                                  "latest": storage.read_latest(self._writer.root)})
