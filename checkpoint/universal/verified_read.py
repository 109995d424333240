"""Reading byte ranges of a checkpoint's chunked files, every byte checked against the crc32 of its chunk."""

from __future__ import annotations

import bisect
import zlib
from pathlib import Path

from regrow.checkpoint.universal import confined
from regrow.checkpoint.universal.format import CorruptCheckpoint, TensorEntry, UserTensorEntry


class VerifiedFile:
    """Reads byte ranges of one tensor file (a parameter's, or a user loop's: ``entry`` needs ``file`` and sorted
    ``chunks``) (opened as ``confined.py`` allows), checking the crc32 of every stored
    chunk it touches and that the chunks cover the whole range."""

    def __init__(self, ckpt: Path, entry: TensorEntry | UserTensorEntry) -> None:
        self.ckpt, self.entry = ckpt, entry
        self.starts = [chunk.offset for chunk in entry.chunks]

    def read(self, first: int, last: int, out: memoryview) -> int:
        """Bytes ``[first, last)`` into ``out`` (``last - first`` bytes); returns the bytes read from the file.
        Chunks inside the range are read in place; a chunk that sticks out is read whole into scratch (its checksum
        covers all of it; its length is at most the file's, which was checked) and the overlap copied, so a rank
        reads at most two chunks more than its range."""
        read, covered = 0, first
        with confined.open_regular(self.ckpt, self.entry.file) as (fd, _):
            index = max(0, bisect.bisect_right(self.starts, first) - 1)
            for chunk in self.entry.chunks[index:]:
                if chunk.offset >= last:
                    break
                if chunk.offset >= first and chunk.end <= last:
                    view = out[chunk.offset - first : chunk.end - first]
                    self._pread_checked(fd, view, chunk.offset, chunk.crc32)
                else:
                    scratch = memoryview(bytearray(chunk.length))
                    self._pread_checked(fd, scratch, chunk.offset, chunk.crc32)
                    low, high = max(first, chunk.offset), min(last, chunk.end)
                    out[low - first : high - first] = scratch[low - chunk.offset : high - chunk.offset]
                covered = chunk.end if chunk.offset <= covered else covered
                read += chunk.length
        if covered < last:  # never hand out bytes no chunk holds (the buffer is uninitialised memory)
            raise CorruptCheckpoint(str(self.ckpt), [f"{self.entry.file}: bytes {covered}-{last} are in no chunk"])
        return read

    def _pread_checked(self, fd: int, view: memoryview, offset: int, crc: int) -> None:
        done = confined.pread_exact(fd, view, offset)
        if done != len(view):
            raise CorruptCheckpoint(str(self.ckpt), [f"{self.entry.file}: bytes {offset}-{offset + len(view)} "
                                                     f"are truncated (the file ends at {offset + done})"])
        if zlib.crc32(view) != crc:
            raise CorruptCheckpoint(str(self.ckpt), [f"{self.entry.file}: bytes {offset}-{offset + len(view)} fail "
                                                     "their checksum"])


__all__ = ["VerifiedFile"]
