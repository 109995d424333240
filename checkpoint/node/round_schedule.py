"""Which step the next encode round of a snapshot process takes, and whether the running round still stands.

Steps are agreed through the group's leader (node 0): it names every round (a random id) and proposes the newest
step all its local ranks have committed; followers run the leader's latest proposal. A round ends early when the
leader proposes another one (:class:`RoundSuperseded`), when a member is replaced or the local ranks go back to an
earlier step (:class:`RoundAbandoned`), and the leader proposes the next step when a member had already snapshotted
past the proposed one (:class:`StepPassed`).
"""

from __future__ import annotations

import secrets


class RoundSuperseded(Exception):
    """The leader proposed another round (or the process stops) while a round ran."""


class RoundAbandoned(Exception):
    """The round's step lost its meaning while it ran (see :meth:`RoundSchedule.abandon`)."""


class StepPassed(Exception):
    """A node had already snapshotted past the proposed step, so its slots of that step could not be held."""


class RoundSchedule:
    """The bookkeeping of one node's encode rounds: what is ready, what was proposed, what ran last.

    Not locked: its owner (``PeerCoding``) calls every method with its condition's lock held, and wakes the coding
    thread when a method reports a change the thread waits for."""

    def __init__(self) -> None:
        self.ready: int | None = None
        """The newest step every local rank has committed."""
        self.step: int | None = None
        """The step of the round running, if any."""
        self.round_id: str | None = None
        """Its id: the leader names every round, messages carry the name."""
        self.proposal: tuple[int, str] | None = None
        """Follower: the leader's latest (step, round id)."""
        self.abandoned_why = ""
        """Why the last round was abandoned (for its log line)."""
        self._retry_from: int | None = None  # leader: a proposal was passed; propose at least this step next
        self._done_step: int | None = None  # leader: the last round's step (the next one encodes a newer step)
        self._resume_from: int | None = None  # a rollback during the running round: its end goes on from here
        self._done_id: str | None = None  # follower: the last round's id (the next one joins another)
        self._generation = 0  # bumped by abandon: a round of an older generation ends
        self._round_generation = 0

    def local_ready(self, step: int) -> bool:
        """All local ranks committed ``step``; returns whether that is newer than what was ready."""
        if self.ready is None or step > self.ready:
            self.ready = step
            return True
        return False

    def proposed(self, step: int, round_id: str) -> None:
        """Follower: the leader proposed round ``round_id`` of ``step``."""
        self.proposal = (step, round_id)

    def next_round(self, node: int | None) -> tuple[int, str] | None:
        """The (step, id) of the next round of node ``node``, or None to keep waiting: the leader's newest
        committed step (or, after a proposal a peer had already passed, the step after it) under a new id; a
        follower's latest proposal, if it has not run it yet."""
        if node is None:
            return None
        if node == 0:
            if self.ready is None:
                return None
            step = max(self.ready, self._retry_from or 0)
            if self._done_step is not None and step <= self._done_step:
                return None
            return step, secrets.token_hex(4)
        if self.proposal is None or self.proposal[1] == self._done_id:
            return None
        return self.proposal

    def start(self, step: int, round_id: str) -> None:
        """The round (``step``, ``round_id``) starts running."""
        self.step, self.round_id = step, round_id
        self._round_generation = self._generation

    def check(self, *, leader: bool) -> None:
        """Raises :class:`RoundSuperseded` when the leader proposed another round (followers only), and
        :class:`RoundAbandoned` when :meth:`abandon` ran since the round started."""
        if not leader and self.proposal is not None and self.proposal[1] != self.round_id:
            raise RoundSuperseded
        if self._generation != self._round_generation:
            raise RoundAbandoned

    def abandon(self, why: str) -> None:
        """Ends the running round at its next check; the next round starts from the newest step."""
        self._generation += 1
        self.abandoned_why = why

    def passed(self, step: int) -> None:
        """Leader: a member was past ``step``; the next proposal is a step after it."""
        self._retry_from = step + 1

    def rolled_back(self, step: int) -> bool:
        """The local ranks went back to ``step`` (see ``PeerCoding.rolled_back``): a round of a later step is
        abandoned (returns True then), steps after ``step`` become encodable again, and a proposal of a later
        step from before the rollback is dropped."""
        abandoned = self.step is not None and self.step > step
        if abandoned:
            self.abandon(f"the local ranks went back to step {step}")
            self._resume_from = step if self._resume_from is None else min(self._resume_from, step)
        if self._done_step is not None and self._done_step > step:
            self._done_step = step
        if self.ready is not None and self.ready > step:
            self.ready = step
        if self.proposal is not None and self.proposal[0] > step:
            self.proposal = None
        self._retry_from = None
        return abandoned

    def finish(self, step: int, round_id: str) -> None:
        """The round (``step``, ``round_id``) ended, however. A round abandoned for a replaced member is not run
        again; after a rollback, steps after the one the ranks went back to are encodable again."""
        self._done_step = step if self._resume_from is None else min(step, self._resume_from)
        self._resume_from = None
        self._done_id = round_id
        self.step = self.round_id = None
