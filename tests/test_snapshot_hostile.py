"""Hostile and broken input to the snapshot process (issue 17): unauthenticated peers, jobs whose names prefix each
other, a job started twice, attach values that do not fit a segment header, and a fuzz of random and mutated frames.

Every test talks to real snapshot processes over real sockets on 127.0.0.1 (port 0), bounds every socket call with
a timeout, and removes exactly the processes and segment files it made, even when it fails.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.limits import ConnectionLimits
from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import ProtocolError, SnapshotClient, parse_address
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.recovery.from_snapshots import restore_from_node
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer

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
        # The close is the process's answer: by then it has read the hello and decided (the old code kept the
        # connection, and the gigabyte it allocated for it, while the peer trickled bytes).
        assert closed_within(greedy, 5.0), "the refused hello's connection stays open"
        grown = (rss_kib(node.process.pid) - before) // 1024
        assert grown < 32, f"an unauthenticated hello made the snapshot process grow by {grown} MiB"
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


@pytest.mark.timeout(60)
def test_a_hello_with_any_json_token_is_refused_as_a_wrong_token(start, token, capsys) -> None:
    """Whatever JSON a hello's token is (a lone surrogate, other scripts, too long, not a string), the peer is told
    why and the connection closed, without an internal error."""
    node = start()
    for bad in ["\ud800", "t\u00f6ken\u4e2d", token[:-1], "x" * 1025, 42, None, ["x"]]:
        with socket.create_connection(parse_address(node.address), timeout=10) as sock:
            sock.sendall(frame({"op": "hello", "token": bad}))
            reply = read_reply(sock)
            assert reply is not None and not reply["ok"], bad
            assert "wrong token" in reply["error"] or "field 'token' must be" in reply["error"], reply
    SnapshotClient(node.address, token=token, timeout_s=10).close()
    assert "internal error" not in capsys.readouterr().out


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


# ------------------------------------------------------------------------ the caps and deadlines around them
@pytest.mark.timeout(60)
def test_connections_beyond_the_caps_are_refused_and_the_process_serves_on(start, token) -> None:
    """Silent unauthenticated connections beyond ``max_unauthenticated`` are answered "too many" and closed at
    once; once they go, a real client is served."""
    node = start(SnapshotProcessConfig(job=secrets.token_hex(4),
                                       limits=ConnectionLimits(max_unauthenticated=2, max_connections=4)))
    silent = [socket.create_connection(parse_address(node.address), timeout=10) for _ in range(2)]
    try:
        # No wait needed: the process accepts from its listener's queue in order, so both silent connections are
        # counted in before this one is looked at.
        extra = socket.create_connection(parse_address(node.address), timeout=10)
        try:
            reply = read_reply(extra)
            assert reply is not None and not reply["ok"] and "too many connections waiting" in reply["error"]
            assert closed_within(extra, 5.0)
        finally:
            extra.close()
    finally:
        for sock in silent:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # their threads end as they see the close
        try:
            SnapshotClient(node.address, token=token, timeout_s=5).close()
            break
        except ProtocolError:
            assert time.monotonic() < deadline, "the refused connections were never counted out"
            time.sleep(0.1)


@pytest.mark.timeout(60)
def test_an_authenticated_message_must_arrive_whole_within_its_deadline(start, token) -> None:
    """After the token, a connection may stay silent between messages as long as it likes, but each message must
    arrive whole within ``message_timeout_s`` of its first byte."""
    node = start(SnapshotProcessConfig(job=secrets.token_hex(4), limits=ConnectionLimits(message_timeout_s=2.0)))
    sock = socket.create_connection(parse_address(node.address), timeout=10)
    try:
        sock.sendall(frame({"op": "hello", "token": token}))
        assert read_reply(sock)["ok"]
        time.sleep(3.0)  # idle: longer than a message may take
        sock.sendall(frame({"op": "latest", "rank": 0}))
        assert read_reply(sock)["ok"], "an idle authenticated connection was dropped"
        sock.sendall(struct.pack(">I", 64) + b"{")
        opened = time.monotonic()
        assert closed_within(sock, 6.0), "a message trickled past its deadline kept the connection"
        assert time.monotonic() - opened < 5.0
    finally:
        sock.close()


@pytest.mark.timeout(60)
def test_what_peers_announce_and_send_is_capped_from_this_nodes_segments(start, token) -> None:
    """A raw payload on an op that takes none, an ec_piece larger than a piece of the largest buffer a peer may
    have, and an ec_size beyond that buffer are refused before anything is allocated, naming the cap."""
    node = start(SnapshotProcessConfig(job=secrets.token_hex(4),
                                       erasure=ErasureCodingConfig(ec_group_size=2, ec_parity=1)))
    before = rss_kib(node.process.pid)
    client = SnapshotClient(node.address, token=token, timeout_s=10)
    try:
        with pytest.raises(ProtocolError, match="exceeds the 67108864 bytes accepted here"):
            client.request({"op": "ec_size", "step": 1, "round": "r", "node": 1, "size": 1 << 40})
    finally:
        client.close()
    for op, fields, refusal in [("latest", {"rank": 0}, "carries no raw payload"),
                                ("ec_piece", {"step": 1, "round": "r", "node": 1, "piece": 0},
                                 "exceeds the 67108864 bytes a data piece may have here")]:
        sock = socket.create_connection(parse_address(node.address), timeout=10)
        try:
            sock.sendall(frame({"op": "hello", "token": token}))
            assert read_reply(sock)["ok"]
            sock.sendall(frame({"op": op, **fields, "raw": 1 << 30, "raw_crc": 0}) + b"x" * 4096)
            reply = read_reply(sock)
            assert reply is not None and not reply["ok"] and refusal in reply["error"], reply
            assert closed_within(sock, 5.0)
        finally:
            sock.close()
    assert (rss_kib(node.process.pid) - before) // 1024 < 32


# ------------------------------------------------------------------------ fuzz
FUZZ_SEED = 17
FUZZ_SECONDS = 25.0
FUZZ_FRAMES = 20000
RSS_GROWTH_MIB = 64
"""The bound the fuzz holds the process to: its peak RSS (VmHWM) stays within this of its RSS before the fuzz."""
FUZZ_RANKS = (1000, 1001, 1002)
"""The ranks the fuzz may attach (never rank 0, which the real client attaches afterwards with its own table)."""

TEMPLATES = [
    {"op": "attach", "rank": 1000, "tensors": TABLE, "meta_capacity": 4096, "step": 0, "restored_from": None},
    {"op": "latest", "rank": 0, "verify": False},
    {"op": "commit", "rank": 1000, "slot": 0, "step": 1},
    {"op": "persisted"},
    {"op": "run_config", "config": {"steps": 3}},
    {"op": "ec_group", "node": 0, "peers": ["127.0.0.1:1", "127.0.0.1:2"]},
    {"op": "ec_propose", "step": 1, "round": "abc"},
    {"op": "ec_size", "step": 1, "round": "abc", "node": 1, "size": 100},
    {"op": "ec_status"},
    {"op": "ec_fetch", "step": 1, "what": "parity", "index": 0},
    {"op": "ec_rebuild"},
    {"op": "ec_rollback", "rank": 0, "step": 1},
    {"op": "hello", "token": "x"},
]
"""Every op but shutdown (a token holder may stop the process: that is no fault)."""


def interesting(rng) -> object:
    """A value of the kind that breaks parsers and range checks."""
    pick = rng.randrange(16)
    if pick == 0:
        return rng.choice([-1, 0, 1, 2, 255, 1 << 31, 1 << 32, 1 << 63, 1 << 64, -(1 << 63), 10 ** 30])
    if pick == 1:
        return rng.choice([1.5, -0.0, 1e308, float("nan"), float("inf")])
    if pick == 2:
        return rng.choice([True, False, None])
    if pick == 3:
        return "".join(chr(rng.randrange(1, 0xE000)) for _ in range(rng.randrange(0, 40)))  # lone surrogates too
    if pick == 4:
        return "x" * rng.choice([0, 1025, 5000, 60000])
    if pick == 5:
        return [interesting(rng) for _ in range(rng.randrange(0, 4))]
    if pick == 6:
        return {str(interesting(rng))[:20]: interesting(rng) for _ in range(rng.randrange(0, 3))}
    if pick == 7:
        return [[{"name": "t", "dtype": rng.choice(["float32", "complex64", 3]), "shape": [interesting(rng)]}]]
    if pick == 8:
        return [{"name": "t", "dtype": "float32", "shape": [rng.choice([-1, 3, 1 << 62, 1 << 63, "3"])]}] * \
            rng.choice([1, 2])
    if pick == 9:
        depth = rng.choice([50, 500])
        return json.loads("[" * depth + "]" * depth)
    return rng.randrange(-5, 5000)


def mutated(rng) -> dict:
    """A request: a template with one to three of its fields dropped, added, or replaced by odd values."""
    request = json.loads(json.dumps(rng.choice(TEMPLATES)))
    for _ in range(rng.randrange(1, 4)):
        action = rng.randrange(6)
        fields = [name for name in request if name != "op"]
        if action == 0 and fields:
            del request[rng.choice(fields)]
        elif action == 1:
            request[rng.choice(["extra", "raw", "raw_crc", "token", "rank", "x" * 300])] = interesting(rng)
        elif action == 2:
            request["op"] = rng.choice(["ATTACH", "", "ec_", "nuke", "latest ", 7, None, ["attach"], "ec_piece"])
        elif fields:
            request[rng.choice(fields)] = interesting(rng)
    if request.get("op") == "attach" and request.get("rank") not in FUZZ_RANKS:
        request["rank"] = rng.choice(FUZZ_RANKS)  # a valid attach of rank 0 would take the real client's rank
    return request


def garbage(rng) -> bytes:
    """Bytes that are not a well-formed frame, or a frame that is not a usable request."""
    pick = rng.randrange(10)
    if pick == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if pick == 8:
        return frame({"op": "hello", "token": interesting(rng)})
    if pick == 1:
        return struct.pack(">I", rng.choice([0xFFFFFFFF, 1 << 30, 17 << 20, 5000])) + b"{" * rng.randrange(0, 9)
    if pick == 2:
        return struct.pack(">I", 100) + b'{"op": "hel'  # truncated, then the write side closes
    if pick == 3:
        body = bytes(rng.randrange(128, 256) for _ in range(20))
        return struct.pack(">I", len(body)) + body  # not UTF-8
    if pick == 4:
        body = rng.choice([b"[1, 2]", b'"x"', b"3", b"null", b"{", b"NaN", b"{}"])
        return struct.pack(">I", len(body)) + body
    if pick == 5:
        body = b"[" * 3000 + b"]" * 3000  # nesting deeper than the JSON decoder recurses
        return struct.pack(">I", len(body)) + body
    if pick == 6:
        body = json.dumps({"op": "hello", "token": "x", "raw": rng.choice([1, 1 << 30, -1, "9"]),
                           "raw_crc": 0}).encode()
        return struct.pack(">I", len(body)) + body + b"\0" * rng.randrange(0, 16)
    if pick == 7:
        data = bytearray(frame(mutated(rng)))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(4, len(data))] = rng.randrange(256)  # flipped bytes in the body, length kept
        return bytes(data)
    return frame(mutated(rng))


class FuzzPeer:
    """The fuzz's side: sends garbage and mutated requests, before and after the token, over real sockets; every
    call has a socket timeout, so a process that stops answering fails the test instead of hanging it."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.token = token
        self.sent = 0
        self.replies = 0
        self._authed: socket.socket | None = None

    def close(self) -> None:
        if self._authed is not None:
            self._authed.close()
            self._authed = None

    def unauthenticated(self, data: bytes) -> None:
        """One connection: ``data``, then the write side closed; whatever comes back is read until the close."""
        with socket.create_connection(parse_address(self.address), timeout=10) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except TimeoutError:
                raise
            except OSError:  # closed by the process already (e.g. it refused a frame from its length alone)
                pass
            assert closed_within(sock, 10.0), "an unauthenticated connection was neither served nor closed"
        self.sent += 1

    def authenticated(self, request: dict | bytes) -> None:
        """One request (or raw bytes) on the authenticated connection; a request must be answered with a reply
        that says ok or not."""
        if self._authed is None:
            self._authed = socket.create_connection(parse_address(self.address), timeout=10)
            self._authed.sendall(frame({"op": "hello", "token": self.token}))
            assert read_reply(self._authed)["ok"]
        data = frame(request) if isinstance(request, dict) else request
        try:
            self._authed.sendall(data)
            if not isinstance(request, dict):
                self._authed.shutdown(socket.SHUT_WR)
                assert closed_within(self._authed, 10.0), "garbage after the token was neither answered nor closed"
                self.close()
            else:
                reply = read_reply(self._authed)
                assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), (request, reply)
                self.replies += 1
                if "raw" in request:  # a refused raw payload closes the connection (its bytes are in the stream)
                    self.close()
        except TimeoutError:
            raise
        except OSError:  # closed by the process (e.g. it refused a frame from its length alone)
            self.close()
        self.sent += 1


@pytest.mark.timeout(180)
def test_thousands_of_random_and_mutated_frames_leave_the_process_serving(start, token, capsys) -> None:
    """A seeded fuzz of random bytes, malformed frames and mutated requests, before and after the token, for at most
    FUZZ_SECONDS; then a real client still attaches, snapshots and restores bit-identically, the process's peak
    RSS stayed within RSS_GROWTH_MIB of its RSS before the fuzz, and no connection thread died."""
    node = start()
    rng = random.Random(FUZZ_SEED)
    before = rss_kib(node.process.pid)
    peer = FuzzPeer(node.address, token)
    started = time.monotonic()
    try:
        while peer.sent < FUZZ_FRAMES and time.monotonic() - started < FUZZ_SECONDS:
            kind = rng.randrange(10)
            if kind < 3:
                peer.unauthenticated(garbage(rng))
            elif kind < 4:
                peer.authenticated(garbage(rng))
            else:
                peer.authenticated(mutated(rng))
    finally:
        peer.close()
    assert peer.sent >= 2000 and peer.replies >= 1000, (peer.sent, peer.replies)
    peak = rss_kib(node.process.pid, "VmHWM")
    assert (peak - before) // 1024 < RSS_GROWTH_MIB, f"peak RSS {peak // 1024} MiB, {before // 1024} MiB before"

    config = tiny_config(steps=3)
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1), rank=0)
    trainer = Trainer(config, sinks=[sink])
    for _ in range(3):
        trainer.train_step()
    sink.close()
    restored = Trainer(config)
    assert restore_from_node(restored, node.address, token=token).step == 3
    for (name, a), b in zip(trainer.model.named_parameters(), restored.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert node.process.poll() is None
    out = capsys.readouterr().out
    for sign in ("Traceback", "Exception in thread", "internal error"):
        assert sign not in out, f"the snapshot process logged {sign!r} during the fuzz"
    print(f"fuzz: {peer.sent} frames ({peer.replies} replies) in {time.monotonic() - started:.1f} s; peak RSS "
          f"{peak // 1024} MiB, {before // 1024} MiB before")
