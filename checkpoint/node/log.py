"""The snapshot process's log lines: ``[rank r, step s] snapshot process: ...`` for a rank's events,
``[snapshot process] ...`` for the process's own (printed and flushed, so the launcher forwards them whole)."""

from __future__ import annotations


def log(text: str, *, rank: int | None = None, step: int | None = None) -> None:
    """``[rank r, step s] snapshot process: ...`` for a rank's events, ``[snapshot process] ...`` otherwise."""
    prefix = f"[rank {rank}, step {step if step is not None else '-'}]" if rank is not None else "[snapshot process]"
    print(f"{prefix} snapshot process: {text}" if rank is not None else f"{prefix} {text}", flush=True)


def ec_log(text: str) -> None:
    """``[snapshot process] erasure coding: ...``: the lines of the coding thread, its ops and rebuilds."""
    log(f"erasure coding: {text}")
