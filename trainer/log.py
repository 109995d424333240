"""Structured log lines, ``[rank r, step s] text``: what every tier prints through (it imports nothing of regrow,
so a checkpoint or recovery module never imports the training loop just to log)."""

from __future__ import annotations


def log_line(rank: int, step: int, text: str) -> None:
    """Prints ``[rank r, step s] text`` and flushes (lines from several ranks interleave whole)."""
    print(f"[rank {rank}, step {step}] {text}", flush=True)
