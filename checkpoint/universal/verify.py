"""Checking a checkpoint before anything is loaded from it, and choosing which checkpoint to load.

Three levels, cheapest first: the manifest (present, parseable, a format version this code reads), the files
(every one present with exactly its recorded size), and the bytes (every chunk's crc32). ``regrow ckpt verify``
runs all three over everything; a distributed load runs the first two on every rank and the third on the chunks
each rank reads (``reshard.py``), then the ranks agree.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from regrow.checkpoint.universal import storage
from regrow.checkpoint.universal.format import (
    KINDS,
    MANIFEST_NAME,
    CheckpointError,
    CorruptCheckpoint,
    Manifest,
    parse_step_dir_name,
)

READ_BLOCK = 8 << 20
"""Bytes read at a time when checksumming a whole file."""


def read_manifest(ckpt: Path) -> Manifest:
    """The parsed manifest of ``ckpt``; raises :class:`CorruptCheckpoint` or ``UnsupportedFormatVersion``."""
    path = ckpt / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CorruptCheckpoint(str(ckpt), [f"{MANIFEST_NAME} is missing (not a committed checkpoint)"]) from None
    return Manifest.from_json(text, str(ckpt))


def file_problems(ckpt: Path, manifest: Manifest) -> list[str]:
    """Every file the manifest lists that is missing or has the wrong size, and inconsistent entries."""
    problems = []
    expected = [(t.file, t.nbytes) for t in manifest.tensors]
    expected += [(f.file, f.nbytes) for r in manifest.rng for f in (r.json, r.bin)]
    for name, nbytes in expected:
        try:
            size = os.stat(ckpt / name).st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != nbytes:
            problems.append(f"{name}: {size} bytes, expected {nbytes} ({'truncated' if size < nbytes else 'too long'})")
    for tensor in manifest.tensors:
        kind = KINDS.get(tensor.kind)
        position = 0
        for chunk in tensor.chunks:
            position = chunk.end if chunk.offset == position else -1
        if kind is None or position != tensor.nbytes:
            problems.append(f"{tensor.file}: manifest entry is inconsistent (kind {tensor.kind!r}, chunks do not "
                            f"tile its {tensor.nbytes} bytes)")
    return problems


def crc32_of_file_range(path: Path, offset: int, length: int) -> tuple[int, int]:
    """(crc32, bytes actually read) of ``length`` bytes of ``path`` from ``offset``."""
    crc, done = 0, 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < length:
            data = f.read(min(READ_BLOCK, length - done))
            if not data:
                break
            crc = zlib.crc32(data, crc)
            done += len(data)
    return crc, done


def checksum_problems(ckpt: Path, manifest: Manifest) -> list[str]:
    """Every chunk (and small file) whose bytes do not match its recorded crc32, naming the file and byte range."""
    problems = []
    for tensor in manifest.tensors:
        for chunk in tensor.chunks:
            try:
                crc, got = crc32_of_file_range(ckpt / tensor.file, chunk.offset, chunk.length)
            except FileNotFoundError:
                problems.append(f"{tensor.file}: missing")
                break
            if got != chunk.length:
                problems.append(f"{tensor.file}: bytes {chunk.offset}-{chunk.end} are truncated ({got} read)")
            elif crc != chunk.crc32:
                problems.append(f"{tensor.file}: bytes {chunk.offset}-{chunk.end} fail their checksum "
                                f"(crc32 {crc:#010x}, recorded {chunk.crc32:#010x})")
    for entry in manifest.rng:
        for small in (entry.json, entry.bin):
            try:
                crc, got = crc32_of_file_range(ckpt / small.file, 0, small.nbytes)
            except FileNotFoundError:
                problems.append(f"{small.file}: missing")
                continue
            if got != small.nbytes or crc != small.crc32:
                problems.append(f"{small.file}: bytes 0-{small.nbytes} fail their checksum")
    return problems


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`: ``problems`` is empty when the checkpoint is good."""

    path: Path
    manifest: Manifest | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(ckpt: Path, *, checksums: bool = True) -> VerifyReport:
    """Checks the manifest, the files and (if ``checksums``) every byte of checkpoint ``ckpt``.

    A manifest of a newer format version raises ``UnsupportedFormatVersion`` (upgrading regrow fixes it; it is not
    damage); every other problem is listed in the report.
    """
    try:
        manifest = read_manifest(ckpt)
    except CorruptCheckpoint as error:
        return VerifyReport(ckpt, None, error.problems)
    problems = file_problems(ckpt, manifest)
    if checksums and not problems:
        problems = checksum_problems(ckpt, manifest)
    return VerifyReport(ckpt, manifest, problems)


def require_structure(ckpt: Path) -> Manifest:
    """The manifest of ``ckpt`` after checking that every file is present with its recorded size (no bytes read);
    raises :class:`CorruptCheckpoint` naming each bad file."""
    manifest = read_manifest(ckpt)
    problems = file_problems(ckpt, manifest)
    if problems:
        raise CorruptCheckpoint(str(ckpt), problems)
    return manifest


def is_root(path: Path) -> bool:
    """True for a checkpoint root (holds ``latest`` or ``step_*`` directories), False for one checkpoint."""
    if (path / MANIFEST_NAME).exists() or parse_step_dir_name(path.name) is not None:
        return False
    return (path / "latest").exists() or bool(storage.committed(path))


def candidates(root: Path) -> list[Path]:
    """The checkpoints to try when loading ``latest`` of ``root``, best first: the one ``latest`` names, then every
    committed one from newest to oldest (the fallbacks when it does not verify)."""
    ordered = []
    latest = storage.read_latest(root)
    if latest:
        ordered.append(root / latest)
    ordered += [path for _, path in reversed(storage.committed(root)) if path not in ordered]
    if not ordered:
        raise CheckpointError(f"no checkpoint under {root}: it has no 'latest' pointer and no step_* directories")
    return ordered
