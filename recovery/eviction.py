"""A failure that names the ranks to be replaced although every process is alive.

A rank whose state disagrees with its peers' (``parity.StateParityError``) or that keeps the others waiting
(``stragglers.StragglerEvicted``) has to go, but nothing died: every rank raises the same :class:`RankEviction`
(they decided together, from the same gathered values), and the Ray coordinator kills the named ranks' workers and
heals the job as after their death (a standby takes over; the survivors keep their state at the step boundary). The
local launcher restarts every rank on fresh processes, which replaces them too.
"""

from __future__ import annotations


class RankEviction(RuntimeError):
    """Raised on every rank when the job must go on without ``ranks`` (their processes are healthy but their state
    or their speed is not)."""

    def __init__(self, message: str, ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.ranks = tuple(sorted(ranks))


__all__ = ["RankEviction"]
