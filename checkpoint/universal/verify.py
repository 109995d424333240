"""Checking a checkpoint before anything is loaded from it, and choosing which checkpoint to load.

Three levels, cheapest first: the manifest (a regular file of at most ``manifest_parse.MAX_MANIFEST_BYTES``, every
field checked by ``manifest_parse``, a format version this code reads), the files (every one a regular file inside
the checkpoint, opened as ``confined.py`` allows, with exactly its recorded size), and the bytes (every chunk's
crc32). ``regrow ckpt verify`` runs all three over everything; a distributed load runs the first two on every rank
and the third on the chunks each rank reads (``reshard.py``), then the ranks agree.

Reports name the file and, for bytes that fail their checksum, the byte range of the first such chunk of the file;
they never show a value computed from the bytes (no checksum, no content), so verifying a hostile checkpoint
reveals pass or fail per file and nothing else.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from regrow.checkpoint.universal import confined, storage
from regrow.checkpoint.universal.format import (
    LATEST_NAME,
    MANIFEST_NAME,
    CheckpointError,
    Chunk,
    CorruptCheckpoint,
    Manifest,
    parse_step_dir_name,
)
from regrow.checkpoint.universal.manifest_parse import MAX_MANIFEST_BYTES, parse_manifest

READ_BLOCK = 8 << 20
"""Bytes read at a time when checksumming a whole file."""


def read_manifest(ckpt: Path) -> Manifest:
    """The checked manifest of ``ckpt``; raises :class:`CorruptCheckpoint` (naming the file or field) or
    ``UnsupportedFormatVersion``."""
    try:
        raw = confined.read_small(ckpt, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except confined.Refused as error:
        if error.missing:
            raise CorruptCheckpoint(str(ckpt), [f"{MANIFEST_NAME} is missing (not a committed checkpoint)"]) from None
        raise
    return parse_manifest(raw, str(ckpt))


def _listed(manifest: Manifest) -> list[tuple[str, int, list[Chunk]]]:
    """Every file the manifest lists: name, recorded size and the chunks that cover it (one for a small file)."""
    files = [(t.file, t.nbytes, t.chunks) for t in manifest.tensors]
    files += [(f.file, f.nbytes, [Chunk(offset=0, length=f.nbytes, crc32=f.crc32)])
              for r in manifest.rng for f in (r.json, r.bin)]
    if manifest.user is not None:
        state = manifest.user.state
        files.append((state.file, state.nbytes, [Chunk(offset=0, length=state.nbytes, crc32=state.crc32)]))
        files += [(t.file, t.nbytes, t.chunks) for t in manifest.user.tensors]
    return files


def file_problems(ckpt: Path, manifest: Manifest) -> list[str]:
    """Every file the manifest lists that is missing, is not a regular file inside ``ckpt``, or has another size
    than recorded (no byte is read)."""
    problems = []
    for name, nbytes, _ in _listed(manifest):
        try:
            with confined.open_regular(ckpt, name) as (_, size):
                pass
        except confined.Refused as error:
            problems += error.problems
            continue
        if size != nbytes:
            problems.append(f"{name}: {size} bytes, expected {nbytes} ({'truncated' if size < nbytes else 'too long'})")
    return problems


def crc32_of_range(fd: int, offset: int, length: int) -> tuple[int, int]:
    """(crc32, bytes actually read) of ``length`` bytes of open file ``fd`` from ``offset``."""
    crc, done = 0, 0
    while done < length:
        data = os.pread(fd, min(READ_BLOCK, length - done), offset + done)
        if not data:
            break
        crc = zlib.crc32(data, crc)
        done += len(data)
    return crc, done


def _checksum_problem(ckpt: Path, name: str, chunks: list[Chunk]) -> str | None:
    """Why file ``name`` fails its checksums (its first bad chunk's byte range), or None when every chunk matches."""
    try:
        with confined.open_regular(ckpt, name) as (fd, _):
            for chunk in chunks:
                crc, got = crc32_of_range(fd, chunk.offset, chunk.length)
                if got != chunk.length:
                    return f"{name}: bytes {chunk.offset}-{chunk.end} are truncated ({got} read)"
                if crc != chunk.crc32:
                    return f"{name}: bytes {chunk.offset}-{chunk.end} fail their checksum"
    except confined.Refused as error:
        return error.problems[0]
    return None


def checksum_problems(ckpt: Path, manifest: Manifest) -> list[str]:
    """Every file whose bytes do not match their recorded crc32s, naming the file and the first failing range."""
    found = (_checksum_problem(ckpt, name, chunks) for name, _, chunks in _listed(manifest))
    return [problem for problem in found if problem is not None]


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
    return os.path.lexists(path / LATEST_NAME) or bool(storage.committed(path))


@dataclass
class Candidates:
    """The checkpoints to try when loading ``latest`` of a root, best first, and what was passed over before
    them (``latest`` itself, with the reason, when it cannot be used)."""

    paths: list[Path]
    passed_over: list[tuple[Path, str]] = field(default_factory=list)


def find_candidates(root: Path) -> Candidates:
    """The one ``latest`` names, then every committed checkpoint from newest to oldest (the fallbacks when it does
    not verify). A ``latest`` that cannot be used (``storage.latest_pointer``) is passed over with its reason.
    Raises :class:`CheckpointError` when there is nothing to try."""
    pointer = storage.latest_pointer(root)
    ordered = [root / pointer.name] if pointer.name else []
    ordered += [path for _, path in reversed(storage.committed(root)) if path not in ordered]
    passed_over = [(root / LATEST_NAME, pointer.problem)] if pointer.problem else []
    if not ordered:
        why = f"'latest' is not usable ({pointer.problem})" if pointer.problem else "it has no 'latest' pointer"
        raise CheckpointError(f"no checkpoint under {root}: {why} and no step_* directories")
    return Candidates(paths=ordered, passed_over=passed_over)


def newest_candidate(root: Path) -> Path | None:
    """The checkpoint a resume from ``latest`` of ``root`` tries first (:func:`find_candidates`: the one ``latest``
    names, else, past a missing or damaged ``latest``, the newest committed one); None when the root holds none."""
    try:
        return find_candidates(root).paths[0]
    except CheckpointError:
        return None


def candidates(root: Path) -> list[Path]:
    """The checkpoints to try when loading ``latest`` of ``root``, best first (:func:`find_candidates`)."""
    return find_candidates(root).paths
