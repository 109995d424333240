"""Erasure coding between snapshot processes: encode after each snapshot, rebuild a lost node, restore its ranks."""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from regrow.checkpoint.node import coded_buffer as ecbuf
from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.peers import PeerCoding
from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, ProtocolError, SnapshotClient
from regrow.launch.local.spawn import run_local
from regrow.tests import snapshot_workers as w
from regrow.tests.test_trainer import tiny_config


class Group:
    """n snapshot processes forming one erasure-coding group (one per simulated node), torn down by :meth:`close`
    even when a test fails; every node has its own job id, so a replacement (same job) removes only its node's
    orphaned segments, as a fresh machine would have none."""

    def __init__(self, n: int, p: int, token: str, peer_timeout_s: float = 10.0) -> None:
        self.token = token
        self.base = secrets.token_hex(3)
        self.config = ErasureCodingConfig(ec_group_size=n, ec_parity=p, peer_timeout_s=peer_timeout_s,
                                          chunk_bytes=4096)
        self.nodes: list[SnapshotProcess] = []
        for i in range(n):
            self.nodes.append(self._start(i))
        self.announce()

    def _start(self, i: int) -> SnapshotProcess:
        return start_snapshot_process(SnapshotProcessConfig(job=f"{self.base}-n{i}", erasure=self.config),
                                      token=self.token)

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def request(self, i: int, message: dict) -> dict:
        client = SnapshotClient(self.nodes[i].address, token=self.token, timeout_s=60)
        try:
            return client.request(message)
        finally:
            client.close()

    def announce(self) -> None:
        """Tells every node its id and the group's addresses (again after a replacement)."""
        for i in range(len(self.nodes)):
            self.request(i, {"op": "ec_group", "node": i, "peers": self.addresses})

    def wait_encoded(self, step: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(step in self.request(i, {"op": "ec_status"})["complete"] for i in range(len(self.nodes))):
                return
            time.sleep(0.05)
        raise TimeoutError(f"step {step} not encoded on every node within {timeout_s} s")

    def wait_round(self, i: int, step: int, timeout_s: float = 30.0) -> None:
        """Waits until node ``i`` runs a round of ``step``."""
        deadline = time.monotonic() + timeout_s
        while self.request(i, {"op": "ec_status"})["round"] != step:
            assert time.monotonic() < deadline, f"node {i} never started the round of step {step}"
            time.sleep(0.02)

    def kill(self, i: int) -> None:
        self.nodes[i].process.send_signal(signal.SIGKILL)
        self.nodes[i].process.wait(10)

    def replace(self, i: int) -> None:
        self.nodes[i] = self._start(i)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        for leftover in Path("/dev/shm").glob(f"regrow-snap-{self.base}-*"):
            leftover.unlink()


@pytest.fixture
def token() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def make_group(token: str) -> Iterator:
    groups: list[Group] = []

    def make(n: int, p: int, peer_timeout_s: float = 10.0) -> Group:
        groups.append(Group(n, p, token, peer_timeout_s))
        return groups[-1]

    yield make
    for group in groups:
        group.close()


def table_of(node: int) -> list[dict]:
    """Shard-like tensors whose sizes differ per node (so buffer padding is exercised)."""
    return [{"name": "g/master", "dtype": "float32", "shape": [1000 + 337 * node]},
            {"name": "g/codes", "dtype": "uint8", "shape": [5 + node, 3]}]


def write_step(group: Group, node: int, step: int) -> bytes:
    """Rank ``node`` of node ``node`` seals a snapshot of ``step`` (random payload) in slot step % 2, COMMITs it,
    and returns the payload."""
    client = SnapshotClient(group.nodes[node].address, token=group.token)
    try:
        paths = client.request({"op": "attach", "rank": node, "tensors": table_of(node),
                                "meta_capacity": 4096})["paths"]
        entries, size = seg.plan_tensors(table_of(node))
        payload = os.urandom(size)
        buffer = seg.open_segment(paths[step % 2], writable=True)
        seg.begin(buffer, {"step": step, "tensors": [e.to_dict() for e in entries]})
        start = seg.payload_offset(seg.read_header(buffer).meta_capacity)
        buffer[start: start + size] = payload
        seg.seal(buffer, step=step, payload_bytes=size)
        buffer.close()
        client.request({"op": "commit", "rank": node, "slot": step % 2, "step": step})
    finally:
        client.close()
    return payload


def latest_payload(group: Group, node: int) -> tuple[int, bytes]:
    client = SnapshotClient(group.nodes[node].address, token=group.token)
    try:
        latest = client.request({"op": "latest", "rank": node})["latest"]
    finally:
        client.close()
    buffer = seg.open_segment(latest["path"], writable=False)
    snapshot = seg.verify(buffer, rank=node)
    data = bytes(snapshot.payload)
    snapshot.payload.release()
    buffer.close()
    return snapshot.step, data


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="ec_group_size=1"):
        ErasureCodingConfig(ec_group_size=1)
    with pytest.raises(ValueError, match="ec_parity=4"):
        ErasureCodingConfig(ec_group_size=4, ec_parity=4)


@pytest.mark.timeout(150)
def test_every_pair_of_lost_nodes_is_rebuilt_and_three_lost_is_a_clear_error(make_group) -> None:
    """n=5, p=2: for each of the 10 pairs, SIGKILL both snapshot processes, start replacements, rebuild both, check
    the bytes, then snapshot and encode a new step with the replacements in the group. Then lose 3: the error."""
    group = make_group(5, 2)
    step = 1
    payloads = {node: write_step(group, node, step) for node in range(5)}
    group.wait_encoded(step)
    for pair in itertools.combinations(range(5), 2):
        for node in pair:
            group.kill(node)
            group.replace(node)
        group.announce()
        for order, node in enumerate(pair):
            reply = group.request(node, {"op": "ec_rebuild"})
            # The pair's first rebuilt node holds the step complete again (its parity recomputed): the second
            # is rebuilt with it, as one lost node.
            lost = list(pair) if order == 0 else [node]
            assert (reply["step"], reply["ranks"], sorted(reply["lost"])) == (step, [node], lost)
            assert latest_payload(group, node) == (step, payloads[node]), pair
        step += 1
        payloads = {node: write_step(group, node, step) for node in range(5)}
        group.wait_encoded(step)
    for node in (0, 2, 4):
        group.kill(node)
    group.replace(0)
    group.request(0, {"op": "ec_group", "node": 0, "peers": group.addresses})
    with pytest.raises(ProtocolError, match="NotRecoverable.*more than 2 nodes of the group are lost, recovery "
                                            "needs the disk checkpoint"):
        group.request(0, {"op": "ec_rebuild"})


def test_a_peer_with_a_wrong_token_is_refused(make_group) -> None:
    group = make_group(2, 1)
    with pytest.raises(ProtocolError, match="wrong token"):
        SnapshotClient(group.nodes[0].address, token="not-" + group.token)
    write_step(group, 0, 1)
    write_step(group, 1, 1)
    group.wait_encoded(1)
    assert group.request(0, {"op": "ec_status"})["complete"] == [1]


@pytest.mark.timeout(240)
def test_lost_node_is_rebuilt_and_training_resumes_bit_identically(make_group, token) -> None:
    """4 nodes (one rank each, tiny GPT, gloo), p=1: train 3 steps with snapshots, wait for step 3's encoding,
    SIGKILL node 3's snapshot process (its rank is gone too: all ranks ended), start a replacement with empty
    memory, rebuild it from the 3 survivors, then 4 new ranks restore and finish: the same losses and parameters
    as an uninterrupted run."""
    group = make_group(4, 1)
    config = tiny_config(steps=6)
    env = {TOKEN_ENV: token}
    run_local(w.train_on_node, 4, config, group.addresses, 3, backend="gloo", timeout_s=120, env=env)
    group.wait_encoded(3)
    group.kill(3)
    group.replace(3)
    assert not list(Path("/dev/shm").glob(f"regrow-snap-{group.base}-n3-*")), "a fresh node holds nothing"
    group.announce()
    assert group.request(3, {"op": "ec_rebuild"})["step"] == 3
    results = run_local(w.straight_and_restored_on_nodes, 4, config, group.addresses, backend="gloo",
                        timeout_s=180, env=env)
    for result in results:
        assert result["restored_step"] == 3
        assert result["resumed"] == result["straight"][3:]
        for name, value in result["straight_params"].items():
            assert torch.equal(value, result["resumed_params"][name]), name


def test_a_newer_snapshot_supersedes_an_encode_still_running(make_group) -> None:
    """Node 0's round of step 1 waits for node 1, which never snapshots step 1; node 0's step 2 supersedes it, and
    step 2 completes on both once node 1 has it."""
    group = make_group(2, 1)
    write_step(group, 0, 1)
    deadline = time.monotonic() + 30  # a condition, not a sleep: node 0's round of step 1 has started
    while group.request(0, {"op": "ec_status"})["round"] != 1:
        assert time.monotonic() < deadline, "node 0 never started its round of step 1"
        time.sleep(0.01)
    write_step(group, 0, 2)
    write_step(group, 1, 2)
    group.wait_encoded(2)
    assert group.request(0, {"op": "ec_status"})["complete"] == [2]


@pytest.mark.timeout(60)
def test_a_round_waiting_for_a_replaced_node_ends_at_once(make_group) -> None:
    """Node 0's round of step 2 waits for node 1, which dies before it snapshots step 2. Once its replacement is
    announced, node 0 gives that round up at once (not after the 60 s peer timeout: a second loss in that window
    would find nothing to rebuild from), and the next step is encoded on both within seconds."""
    group = make_group(2, 1, peer_timeout_s=60.0)
    for node in range(2):
        write_step(group, node, 1)
    group.wait_encoded(1)
    write_step(group, 0, 2)
    group.wait_round(0, 2)  # it then waits for node 1's size
    group.kill(1)
    group.replace(1)
    group.announce()
    assert group.request(1, {"op": "ec_rebuild"})["step"] == 1
    payloads = {node: write_step(group, node, 3) for node in range(2)}
    group.wait_encoded(3, timeout_s=10.0)
    assert latest_payload(group, 1) == (3, payloads[1])


@pytest.mark.timeout(90)
def test_a_second_loss_right_after_a_rebuild_is_rebuilt_too(make_group) -> None:
    """n=3, p=1: node 2 is lost and rebuilt at step 1; before any new round, node 0 is lost. The rebuilt node 2
    recomputed its parity of step 1 and holds the step complete, so node 0 is rebuilt from nodes 1 and 2 with
    its own bytes (before, node 2 held nothing complete until the next round, and node 0 was not recoverable)."""
    group = make_group(3, 1)
    payloads = {node: write_step(group, node, 1) for node in range(3)}
    group.wait_encoded(1)
    for lost in (2, 0):
        group.kill(lost)
        group.replace(lost)
        group.announce()
        reply = group.request(lost, {"op": "ec_rebuild"})
        assert (reply["step"], reply["lost"]) == (1, [lost])
        assert latest_payload(group, lost) == (1, payloads[lost])
        assert group.request(lost, {"op": "ec_status"})["complete"] == [1]


def reattach_at(group: Group, node: int, step: int) -> None:
    """Rank ``node`` of node ``node`` re-attaches after going back to ``step``, restored from its slot of it (the
    slot ``write_step`` wrote: step % 2), as a restored sink does."""
    client = SnapshotClient(group.nodes[node].address, token=group.token)
    try:
        paths = client.request({"op": "attach", "rank": node, "tensors": table_of(node), "meta_capacity": 4096})
        client.request({"op": "attach", "rank": node, "tensors": table_of(node), "meta_capacity": 4096,
                        "step": step, "restored_from": paths["paths"][step % 2]})
    finally:
        client.close()


@pytest.mark.timeout(90)
def test_a_rollback_ends_the_round_of_a_step_the_job_left(make_group) -> None:
    """Node 0 packs its step 2 and waits for node 1's; then the job goes back to step 1 (both ranks re-attach,
    restored from their slots of step 1). The round ends at once, and when both ranks re-run step 2, node 0's
    complete buffer of step 2 holds its re-run snapshot, not the abandoned one (before, the round could complete
    with node 0's abandoned step 2 next to node 1's re-run one)."""
    group = make_group(2, 1, peer_timeout_s=60.0)
    for node in range(2):
        write_step(group, node, 1)
    group.wait_encoded(1)
    abandoned = write_step(group, 0, 2)
    group.wait_round(0, 2)
    for node in range(2):
        reattach_at(group, node, 1)
    deadline = time.monotonic() + 10
    while any(group.request(node, {"op": "ec_status"})["round"] == 2 for node in range(2)):
        assert time.monotonic() < deadline, "a round of the abandoned step 2 still runs"
        time.sleep(0.02)
    rerun = {node: write_step(group, node, 2) for node in range(2)}
    assert rerun[0] != abandoned
    group.wait_encoded(2, timeout_s=20.0)
    client = SnapshotClient(group.nodes[0].address, token=group.token)
    try:
        _, buffer = client.exchange({"op": "ec_fetch", "step": 2, "what": "buffer"})
    finally:
        client.close()
    _, segments = ecbuf.unpack(buffer)
    snapshot = seg.verify(memoryview(segments[0].data), rank=0)
    assert (snapshot.step, bytes(snapshot.payload)) == (2, rerun[0])
    snapshot.payload.release()


def test_ending_an_abandoned_round_keeps_the_messages_of_a_re_run_round() -> None:
    """White-box, the rule that prunes round inboxes. A follower still ending its abandoned round of step 5 (the
    job went back to step 3 meanwhile) may already hold its peers' sizes of the re-run round of step 4: that inbox
    stays (every inbox of a step <= 5 was pruned before, and the re-run round waited out peer_timeout_s for
    sizes it had been sent). The ended round's inbox and those of older rounds are pruned."""
    coding = PeerCoding(ErasureCodingConfig(ec_group_size=2, ec_parity=1), "token", node_segments=None)
    try:
        coding.handle("ec_size", {"step": 3, "round": "older", "node": 1, "size": 8}, None)
        coding.handle("ec_size", {"step": 5, "round": "abandoned", "node": 1, "size": 8}, None)
        started = time.monotonic()
        coding.handle("ec_size", {"step": 4, "round": "re-run", "node": 1, "size": 8}, None)
        coding._finish_round(5, "abandoned", started)
        assert list(coding._inbox) == [(4, "re-run")]
        assert coding._inbox[(4, "re-run")].sizes == {1: 8}
    finally:
        coding.close()
