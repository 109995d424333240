"""Hostile and broken input to the snapshot process (issue 17): unauthenticated peers, jobs whose names prefix each
other, a job started twice, attach values that do not fit a segment header, and a fuzz of random and mutated frames.

Every test talks to real snapshot processes over real sockets on 127.0.0.1 (port 0), bounds every socket call with
a timeout, and removes exactly the processes and segment files it made, even when it fails.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import ProtocolError, SnapshotClient, parse_address

SHM = Path("/dev/shm")
TABLE = [{"name": "g/master", "dtype": "float32", "shape": [300]}]
MiB = 1 << 20


def job_files(job: str) -> list[Path]:
    """The segment files of exactly ``job`` (no other job whose name it prefixes) and its lock file, if any."""
    exact = re.compile(rf"regrow-snap-{re.escape(job)}(-r-?\d+-s\d+|\.lock)")
    return sorted(path for path in SHM.glob(f"regrow-snap-{job}*") if exact.fullmatch(path.name))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """The process's resident memory (``VmRSS``, or its peak ``VmHWM``) in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def frame(message: dict) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">I", len(data)) + data


def read_reply(sock: socket.socket) -> dict | None:
    """One reply frame, or None when the process closed the connection first."""
    try:
        head = sock.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return None
        (size,) = struct.unpack(">I", head)
        return json.loads(sock.recv(size, socket.MSG_WAITALL))
    except (ConnectionResetError, BrokenPipeError):
        return None


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the process closes ``sock`` within ``seconds`` (the replies it sends first are read and dropped)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


@pytest.fixture
def token() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def start(token: str) -> Iterator[Callable[..., SnapshotProcess]]:
    """Starts snapshot processes of the test's token; all are stopped and their files removed at the end."""
    started: list[SnapshotProcess] = []
    jobs: list[str] = []

    def make(config: SnapshotProcessConfig | None = None) -> SnapshotProcess:
        config = config or SnapshotProcessConfig(job=secrets.token_hex(4))
        jobs.append(config.job)
        process = start_snapshot_process(config, token=token)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()
    for job in jobs:
        for path in job_files(job):
            path.unlink(missing_ok=True)


def write_snapshot(path: str, step: int) -> None:
    buffer = seg.open_segment(path, writable=True)
    try:
        _, payload = seg.plan_tensors(TABLE)
        seg.begin(buffer, {"step": step})
        seg.seal(buffer, step=step, payload_bytes=payload)
    finally:
        buffer.close()


# ------------------------------------------------------------------------ bug 1: memory before authentication
@pytest.mark.timeout(60)
def test_an_unauthenticated_hello_announcing_a_huge_payload_allocates_nothing(start) -> None:
    """A hello with a wrong token that announces a 1 GiB raw payload is refused before anything is allocated (the
    process allocated the whole payload, per connection, and held it while the peer sent a byte now and then)."""
    node = start()
    before = rss_kib(node.process.pid)
    greedy = socket.create_connection(parse_address(node.address), timeout=10)
    try:
        greedy.sendall(frame({"op": "hello", "token": "not-the-token", "raw": 1 << 30, "raw_crc": 0}) + b"x")
        time.sleep(1.5)
        grown = (rss_kib(node.process.pid) - before) // 1024
        assert grown < 32, f"an unauthenticated hello made the snapshot process grow by {grown} MiB"
        assert closed_within(greedy, 5.0), "the refused hello's connection stays open"
    finally:
        greedy.close()


@pytest.mark.timeout(60)
def test_a_peer_trickling_its_hello_is_cut_at_the_handshake_deadline(start, token) -> None:
    """The whole hello must arrive within the handshake deadline (10 s), not each read: a peer sending one byte
    every 0.5 s is cut, and a real client is served meanwhile."""
    node = start()
    trickle = socket.create_connection(parse_address(node.address), timeout=10)
    try:
        trickle.sendall(struct.pack(">I", 64))
        opened = time.monotonic()
        client = SnapshotClient(node.address, token=token, timeout_s=5)
        try:
            client.request({"op": "attach", "rank": 0, "tensors": TABLE, "meta_capacity": 4096})
        finally:
            client.close()
        cut = False
        while not cut and time.monotonic() - opened < 16:
            try:
                trickle.send(b"{")
            except (BrokenPipeError, ConnectionResetError):
                break
            cut = closed_within(trickle, 0.5)
        seconds = time.monotonic() - opened
        assert seconds < 13, f"a peer sending its hello one byte every 0.5 s held its connection {seconds:.1f} s"
    finally:
        trickle.close()


# ------------------------------------------------------------------------ bug 2: one job's segments are its own
@pytest.mark.timeout(60)
def test_a_job_never_removes_the_segments_of_a_job_its_name_prefixes(start, token) -> None:
    """Job ``X`` starting must not take job ``X-r5``'s live segments for its own leftovers."""
    base = secrets.token_hex(3)
    other = start(SnapshotProcessConfig(job=f"{base}-r5"))
    client = SnapshotClient(other.address, token=token, timeout_s=10)
    try:
        paths = client.request({"op": "attach", "rank": 0, "tensors": TABLE, "meta_capacity": 4096})["paths"]
        write_snapshot(paths[0], step=3)
        start(SnapshotProcessConfig(job=base))
        assert all(Path(path).exists() for path in paths), "job X removed the live segments of job X-r5"
        assert client.request({"op": "latest", "rank": 0})["latest"]["step"] == 3
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_a_second_process_of_a_running_job_is_refused_and_names_the_first(start, token) -> None:
    """A snapshot process started with the --job of one that is alive on this node fails at start-up, naming the
    running process, and leaves its segments alone."""
    job = secrets.token_hex(4)
    first = start(SnapshotProcessConfig(job=job))
    client = SnapshotClient(first.address, token=token, timeout_s=10)
    try:
        paths = client.request({"op": "attach", "rank": 0, "tensors": TABLE, "meta_capacity": 4096})["paths"]
        write_snapshot(paths[1], step=4)
        with pytest.raises(RuntimeError, match=rf"job {job} is already running on this node \(pid "
                                               rf"{first.process.pid}"):
            start(SnapshotProcessConfig(job=job))
        assert all(Path(path).exists() for path in paths), "the second process removed the first one's segments"
        assert client.request({"op": "latest", "rank": 0})["latest"]["step"] == 4
    finally:
        client.close()
    assert first.stop() == 0
    start(SnapshotProcessConfig(job=job))  # once the first is gone, the job may start again


# ------------------------------------------------------------------------ bug 9: attach values checked first
@pytest.mark.timeout(60)
def test_bad_attach_values_are_refused_before_any_segment_exists(start, token) -> None:
    """Values that cannot go in a segment header are refused, naming the field, before any file is created; the
    rank can then attach with good values, and SHUTDOWN leaves nothing behind."""
    node = start()

    def attach(**fields) -> dict:
        client = SnapshotClient(node.address, token=token, timeout_s=10)
        try:
            return client.request({"op": "attach", "tensors": TABLE, "meta_capacity": 4096, **fields})
        finally:
            client.close()

    for fields, named in [({"rank": -1}, "rank"), ({"rank": 1 << 32}, "rank"),
                          ({"rank": 3, "meta_capacity": 1 << 32}, "meta_capacity")]:
        with pytest.raises(ProtocolError, match=named):
            attach(**fields)
        assert not [p for p in job_files(node.job) if not p.name.endswith(".lock")], \
            f"a refused attach ({fields}) left segment files"
    reply = attach(rank=3)
    assert not reply["reused"] and all(Path(path).exists() for path in reply["paths"])
    client = SnapshotClient(node.address, token=token, timeout_s=10)
    client.request({"op": "shutdown"})
    client.close()
    assert node.process.wait(10) == 0
    assert job_files(node.job) == []
