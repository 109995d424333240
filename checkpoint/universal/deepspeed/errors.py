"""The errors of DeepSpeed interop: every problem with a DeepSpeed checkpoint is a :class:`DeepSpeedCheckpointError`."""

from __future__ import annotations


class DeepSpeedCheckpointError(ValueError):
    """A DeepSpeed checkpoint that cannot be read or written: a file is missing, malformed or inconsistent."""


class UnsupportedCheckpointError(DeepSpeedCheckpointError, NotImplementedError):
    """A well-formed DeepSpeed checkpoint of a kind this package does not read yet (ZeRO-3, pipeline or tensor
    parallel, ZeRO disabled, a non-Adam optimizer)."""


class UnsafeCheckpointError(DeepSpeedCheckpointError):
    """A file refers to a Python global outside ``unpickling.ALLOWED_GLOBALS``; it was not unpickled."""
