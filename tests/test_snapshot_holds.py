"""Slot holds: what the snapshot process grants an encode round (or a persist), what COMMIT replies tell the sink,
and the slot the sink then writes."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regrow.checkpoint.node.persist import PersistConfig
from regrow.checkpoint.node.process import SnapshotProcessConfig
from regrow.checkpoint.node.server import SnapshotServer
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.sink import SnapshotSink

TABLE = [{"name": "g/master", "dtype": "float32", "shape": [300]}]


@pytest.fixture
def server() -> Iterator[SnapshotServer]:
    made = SnapshotServer(SnapshotProcessConfig(job=f"holds{secrets.token_hex(3)}"), secrets.token_hex(8))
    yield made
    made._listener.close()
    made._remove_all()


def seal(server: SnapshotServer, rank: int, slot: int, step: int) -> dict:
    """Writes and seals a snapshot of ``step`` in ``rank``'s ``slot``, then COMMITs it; returns the reply."""
    paths = server._attach(rank, TABLE, 4096)["paths"]
    buffer = seg.open_segment(paths[slot], writable=True)
    try:
        seg.begin(buffer, {"step": step})
        seg.seal(buffer, step=step, payload_bytes=1200)
    finally:
        buffer.close()
    return server._commit(rank, slot, step)


def test_holds_are_granted_now_at_commit_or_refused_when_past(server: SnapshotServer) -> None:
    for rank in (0, 1):
        assert seal(server, rank, 0, 1)["held"] == []
    assert server.hold("enc", 1) == "held"
    assert server.holds_ready("enc", 1)
    assert seal(server, 0, 1, 2)["held"] == [0], "the COMMIT reply tells the sink which slot not to write"

    assert server.hold("enc", 1) == "past", "rank 0 is at step 2: its slot of step 1 may be being rewritten"
    assert not server.holds_ready("enc", 1), "a refused hold holds nothing"
    assert server.hold("enc", 3) == "pending", "step 3 is in the future of both ranks: held as they commit it"
    assert not server.holds_ready("enc", 3)
    assert seal(server, 0, 0, 3)["held"] == [0]
    assert not server.holds_ready("enc", 3)
    assert seal(server, 1, 1, 2)["held"] == []
    assert seal(server, 1, 0, 3)["held"] == [0]
    assert server.holds_ready("enc", 3)

    server.release("enc", 2)  # a stale release (another step) keeps the hold
    assert server.holds_ready("enc", 3)
    server.release("enc", 3)
    assert not server.holds_ready("enc", 3)
    assert seal(server, 0, 1, 4)["held"] == []


def test_two_holders_hold_independently(server: SnapshotServer) -> None:
    seal(server, 0, 0, 1)
    assert server.hold("enc", 1) == "held"
    seal(server, 0, 1, 2)
    assert server.hold("persist", 2) == "held"
    assert seal(server, 0, 1, 2)["held"] == [0, 1]
    server.release("enc", 1)
    assert seal(server, 0, 1, 2)["held"] == [1]


def test_the_sink_writes_around_held_slots() -> None:
    sink = SnapshotSink.__new__(SnapshotSink)  # only the slot choice is exercised: no snapshot process needed
    sink._newest, sink._held = 0, frozenset()
    assert sink._target() == 1, "the older slot"
    sink._held = frozenset({1})
    assert sink._target() == 0, "the older slot is held: the newest is rewritten, the held one stays complete"
    sink._held = frozenset({0, 1})
    assert sink._target() is None, "both held: this snapshot is skipped"
    sink._newest, sink._held = None, frozenset({0})
    assert sink._target() == 1


def test_a_persist_step_is_held_from_its_first_commit(tmp_path: Path) -> None:
    """Persist every 2: rank 0 COMMITs step 2 and then step 3 before rank 1's COMMIT of step 2 arrives (what a
    loaded machine does). Step 2's slots are held from rank 0's first COMMIT of it, so rank 0's step-3 reply
    already tells its sink not to write that slot, and step 2 is still handed to the persister once rank 1 has
    it. (Holding only at the last COMMIT found rank 0 past step 2 and skipped the persist.)"""
    persist = PersistConfig(persist_every=2, persist_dir=str(tmp_path), commit_timeout_s=5)
    server = SnapshotServer(SnapshotProcessConfig(job=f"holds{secrets.token_hex(3)}", persist=persist),
                            secrets.token_hex(8))
    # The copy is what is checked: these bare snapshots carry no tensor metadata, so writing the checkpoint then
    # fails (logged), which leaves the holds' release after the copy as it is.
    copied: list[tuple[int, int]] = []
    server.persister.copy_hook = lambda rank, step: copied.append((rank, step))
    try:
        server._attach(1, TABLE, 4096)  # both ranks attach before training, as sinks do
        assert seal(server, 0, 0, 2)["held"] == [0]
        assert seal(server, 0, 1, 3)["held"] == [0], "step 2's slot stays held while rank 0 moves on"
        assert seal(server, 1, 0, 2)["held"] == [0]
        deadline = time.monotonic() + 30
        while server.persister.status()["in_flight"] is not None or not copied:
            assert time.monotonic() < deadline, "step 2 was never persisted"
            time.sleep(0.01)
        assert copied == [(0, 2), (1, 2)], "both ranks' slots of step 2 were copied intact"
        assert seal(server, 0, 0, 4)["held"] == [0], "the copy is done: the hold is released, step 4 is held"
    finally:
        server.persister.close()
        server._listener.close()
        server._remove_all()


def test_a_restored_rank_abandons_its_later_slots(server: SnapshotServer) -> None:
    """Rank 0 committed steps 1 and 2, and an encode round holds step 2; then the job goes back to step 1 (the
    rank restored it from slot 0). Its slot of step 2 belongs to the abandoned history: no longer committed, so
    step 2 is not what the process encodes next and a hold of the re-run step 2 is not "past"; the round's hold
    waits for the rank's new COMMIT of step 2 and then holds the re-run snapshot."""
    paths = server._attach(0, TABLE, 4096)["paths"]
    seal(server, 0, 0, 1)
    seal(server, 0, 1, 2)
    assert server.hold("enc", 2) == "held" and server._ready_step() == 2
    reply = server._attach(0, TABLE, 4096, at_step=1, restored_from=paths[0])
    assert reply["held"] == [], "the slot of the abandoned step 2 may be rewritten"
    assert server._ready_step() == 1
    assert not server.holds_ready("enc", 2)
    assert server.hold("persist", 2) == "pending", "step 2 is the rank's future again, not its past"
    assert seal(server, 0, 1, 2)["held"] == [1], "the re-run step 2 is held for both at its COMMIT"
    assert server.holds_ready("enc", 2) and server.holds_ready("persist", 2)

    # Restored from the checkpoint at step 1 (no slot): both slots are of step >= 1, neither is kept.
    server._attach(0, TABLE, 4096, at_step=1)
    assert server._ready_step() is None
