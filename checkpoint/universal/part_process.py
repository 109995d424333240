"""The checkpoint writer's part process: writes a rank's byte ranges of a save from host buffers it shares with the
rank, so that the training process does none of a persist's file work.

Why a process. The rank's persist thread writes a 350m shard (2.45 GB) as about a thousand files of 1 MiB writes
and checksums; each write and checksum hands Python's lock back and forth with the training thread, and the pages
it dirties are the training process's. Measured on one H100 (``bench/RESULTS.md``): steps ran 1.2-5.3% slower
while it did. Here the training process only waits on a socket while this process writes.

The buffers: :class:`SharedHostBuffers` is the ``HostCopier``'s allocator. Each buffer is a CPU tensor in shared
memory (``Tensor.share_memory_``), page-locked for the device with ``cudaHostRegister`` when the copy comes from a
GPU (the copy then runs at pinned speed), and its descriptor is passed to this process once
(``shared_tensors.describe_shared``), which maps it read-only.

The protocol (``checkpoint/frames.py`` frames over a socket pair; no pickle), one request at a time:

- ``{"op": "share", "tensors": {...}, "fds": n}`` then n descriptors: maps the buffers (replacing earlier ones);
- ``{"op": "write_shard", "temp", "layout", "rank", "view", "chunk_bytes", "fsync"}``: ``PartWriter.write_shard``
  of the shared buffers; the reply's ``chunks`` are ``{file: [[offset, length, crc32], ...]}``.

Every reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}`` (the writer fails that save with it). End
of file on the socket ends the process. Run as ``python -m regrow.checkpoint.universal.part_process FD``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

from regrow.checkpoint import host_register
from regrow.checkpoint.frames import recv_message, send_message
from regrow.checkpoint.shared_tensors import MappedTensors, describe_shared
from regrow.checkpoint.universal.format import Chunk
from regrow.checkpoint.universal.part_writer import PartWriter
from regrow.trainer.checkpoint_view import CheckpointView


class PartProcessLost(RuntimeError):
    """The part process exited or stopped answering; the message has its exit code."""


class SharedHostBuffers:
    """A ``HostCopier`` allocator whose buffers can be shared with a :class:`PartProcess` (see the module
    docstring). ``allocate`` raises ``RuntimeError`` when CUDA refuses to page-lock a buffer: the caller then
    allocates pinned memory of its own instead and writes in its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registered: list[int] = []
        self._addresses: set[int] = set()
        self.refused = False
        """Set when CUDA refused to page-lock a buffer (later allocations are the caller's)."""

    def allocate(self, name: str, shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype).share_memory_()
        nbytes = tensor.numel() * tensor.element_size()
        if pin and nbytes:
            code = host_register.register(tensor.data_ptr(), nbytes)
            if code != 0:
                self.refused = True
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes for {name!r} failed with CUDA error {code}")
            with self._lock:
                self._registered.append(tensor.data_ptr())
        with self._lock:
            self._addresses.add(tensor.data_ptr())
        return tensor

    def holds(self, buffers: dict[str, torch.Tensor]) -> bool:
        """Whether every tensor of ``buffers`` is one this allocator made (so it can be shared)."""
        with self._lock:
            return all(t.data_ptr() in self._addresses or not t.numel() for t in buffers.values())

    def close(self) -> None:
        """Unregisters the page-locked buffers (they stay valid, pageable, for whoever still holds them)."""
        with self._lock:
            registered, self._registered = self._registered, []
        for address in registered:
            host_register.unregister(address)


class PartProcess:
    """A running part process and the socket to it (the rank's persist thread's end). Not thread-safe: one save
    at a time, as the writer persists."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The process imports regrow from wherever this one did, installed or not.
        import regrow

        parent = str(Path(regrow.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (parent, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "regrow.checkpoint.universal.part_process", str(theirs.fileno())]
        try:
            self.process = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock = ours
        self._shared: list[tuple[str, int, torch.dtype, tuple[int, ...]]] | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def _request(self, message: dict, fds: list[int] | None = None) -> dict:
        try:
            send_message(self.sock, dict(message, fds=len(fds)) if fds else message)
            if fds:
                socket.send_fds(self.sock, [b"F"], fds)
            reply, _ = recv_message(self.sock, timeout_s=self.timeout_s)
        except (OSError, EOFError) as error:
            code = self.process.poll()
            state = f"exited with code {code}" if code is not None else "still running"
            raise PartProcessLost(f"checkpoint part process (pid {self.process.pid}, {state}): "
                                  f"{message.get('op')}: {error or type(error).__name__}") from error
        if not reply.get("ok"):
            raise RuntimeError(str(reply.get("error", f"checkpoint part process: {message.get('op')} failed")))
        return reply

    def write_shard(self, temp: Path, layout: dict, rank: int, buffers: dict[str, torch.Tensor],
                    view: CheckpointView, *, chunk_bytes: int, fsync: bool) -> dict[str, list[Chunk]]:
        """``PartWriter.write_shard`` of ``buffers`` (tensors of a :class:`SharedHostBuffers`), done by the part
        process; shares them first when they are not the ones it holds."""
        signature = [(name, t.data_ptr(), t.dtype, tuple(t.shape)) for name, t in buffers.items()]
        if signature != self._shared:
            described, fds = describe_shared(buffers)
            self._request({"op": "share", "tensors": described}, fds)
            self._shared = signature
        reply = self._request({"op": "write_shard", "temp": str(temp), "layout": layout, "rank": rank,
                               "view": view.to_dict(), "chunk_bytes": chunk_bytes, "fsync": fsync})
        return {name: [Chunk(offset=int(o), length=int(n), crc32=int(c)) for o, n, c in chunks]
                for name, chunks in reply["chunks"].items()}

    def close(self) -> None:
        """Closes the socket (the process exits on its end of file) and reaps it."""
        try:
            self.sock.close()
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _write_shard(mapped: MappedTensors | None, message: dict) -> dict:
    if mapped is None:
        raise RuntimeError("write_shard before share")
    temp, rank, chunk_bytes = message.get("temp"), message.get("rank"), message.get("chunk_bytes")
    if not isinstance(temp, str) or not temp:
        raise ValueError(f"write_shard: temp={temp!r} must be a directory path")
    if type(rank) is not int or rank < 0 or type(chunk_bytes) is not int or chunk_bytes < 1:
        raise ValueError(f"write_shard: rank={rank!r} and chunk_bytes={chunk_bytes!r} must be ints >= 0 and >= 1")
    writer = PartWriter(chunk_bytes=chunk_bytes, fsync=bool(message.get("fsync", True)))
    written = writer.write_shard(Path(temp), message["layout"], rank, mapped.tensors,
                                 view=CheckpointView.from_dict(message["view"]))
    return {"chunks": {name: [[c.offset, c.length, c.crc32] for c in chunks] for name, chunks in written.items()}}


def serve(sock: socket.socket) -> None:
    """Answers the rank's requests until it closes the socket."""
    mapped: MappedTensors | None = None
    while True:
        try:
            message, _ = recv_message(sock, timeout_s=None)
        except (ConnectionError, EOFError, OSError):
            return
        op = message.get("op")
        fds: list[int] = []
        if isinstance(message.get("fds"), int) and 0 < message["fds"] <= 1024:
            _, fds, _, _ = socket.recv_fds(sock, 1, message["fds"])
        try:
            if op == "share":
                if mapped is not None:
                    mapped.close()
                mapped = MappedTensors(message["tensors"], fds)
                reply: dict = {}
            else:
                for fd in fds:
                    os.close(fd)
                if op != "write_shard":
                    raise ValueError(f"unknown op {str(op)[:40]!r}")
                reply = _write_shard(mapped, message)
            reply.update(ok=True, re=op)
        except Exception as error:  # noqa: BLE001 (answered: the rank fails that save with it)
            reply = {"ok": False, "re": op, "error": f"checkpoint part process: {type(error).__name__}: {error}"}
        send_message(sock, reply)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m regrow.checkpoint.universal.part_process FD (started by the CheckpointWriter)",
              file=sys.stderr)
        return 2
    serve(socket.socket(fileno=int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
