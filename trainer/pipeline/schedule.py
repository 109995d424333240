"""The order in which each pipeline stage runs forwards and backwards of the micro-batches of one step (1F1B).

Every micro-batch follows a *route*: the order in which the stages process it. Normally the route is
``0, 1, ..., S-1``; CheckFree+ swaps the first two and the last two stages on odd micro-batches
(:func:`swapped_route`) so that each edge stage learns to stand in for its neighbour.

:func:`build_schedule` is a pure function: it simulates the pipeline tick by tick (every stage does at most one
forward or backward per tick, only once its input exists) with the 1F1B rule: a stage prefers a backward whenever
one is ready, and keeps at most ``S - position`` micro-batches in flight (forward done, backward not yet), like
PipeDream-Flush / Megatron's 1F1B. Because every action happens after the actions it depends on, executing each
stage's list in order with non-blocking sends and blocking receives cannot deadlock. Every rank computes the same
schedule, so no coordination is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD, BACKWARD = "F", "B"


@dataclass(frozen=True)
class Action:
    """One unit of a stage's work: the forward or the backward of micro-batch ``micro``."""

    kind: str
    micro: int


def swapped_route(n_stages: int) -> tuple[int, ...]:
    """The CheckFree+ route: stages 0 and 1 swapped, and stages S-2 and S-1 (one swap when S == 2).

    S == 3 is refused: the pairs (0, 1) and (1, 2) overlap, so "swap both" has no single meaning.
    """
    if n_stages < 2 or n_stages == 3:
        raise ValueError(
            f"CheckFree+ swaps stages (0, 1) and (S-2, S-1); pipeline.stages={n_stages} has no such disjoint "
            "pairs: use 2 or at least 4 stages, or turn pipeline.checkfree_plus off"
        )
    route = list(range(n_stages))
    for a, b in {(0, 1), (n_stages - 2, n_stages - 1)}:
        route[a], route[b] = route[b], route[a]
    return tuple(route)


def routes(n_stages: int, n_micro: int, *, swap_odd: bool) -> list[tuple[int, ...]]:
    """The route of each micro-batch: in order, or (``swap_odd``) :func:`swapped_route` on odd micro-batches."""
    plain = tuple(range(n_stages))
    swapped = swapped_route(n_stages) if swap_odd else plain
    return [swapped if m % 2 else plain for m in range(n_micro)]


def build_schedule(paths: list[tuple[int, ...]]) -> list[list[Action]]:
    """Each stage's actions for micro-batches following ``paths`` (one route per micro-batch), in execution order."""
    n_micro, n_stages = len(paths), len(paths[0])
    position = [{stage: p for p, stage in enumerate(path)} for path in paths]
    # Warm-up depth: a stage that is ever at position p may need S - p forwards in flight before its first backward.
    limit = [n_stages - min(position[m][s] for m in range(n_micro)) for s in range(n_stages)]
    forward_tick: dict[tuple[int, int], int] = {}
    backward_tick: dict[tuple[int, int], int] = {}
    next_forward = [0] * n_stages
    schedule: list[list[Action]] = [[] for _ in range(n_stages)]
    total, tick = 2 * n_micro * n_stages, 0
    while len(forward_tick) + len(backward_tick) < total:
        acted = False
        for s in range(n_stages):
            action = _next_action(s, tick, paths, position, limit, next_forward, forward_tick, backward_tick)
            if action is None:
                continue
            done = forward_tick if action.kind == FORWARD else backward_tick
            done[(action.micro, s)] = tick
            if action.kind == FORWARD:
                next_forward[s] += 1
            schedule[s].append(action)
            acted = True
        if not acted:  # nothing changed, so nothing ever would: only a bug in the rules can get here
            raise RuntimeError(f"pipeline schedule stalled at tick {tick} (a bug: routes {paths})")
        tick += 1
    return schedule


def _next_action(
    s: int,
    tick: int,
    paths: list[tuple[int, ...]],
    position: list[dict[int, int]],
    limit: list[int],
    next_forward: list[int],
    forward_tick: dict[tuple[int, int], int],
    backward_tick: dict[tuple[int, int], int],
) -> Action | None:
    """What stage ``s`` does at ``tick``: the oldest ready backward, else the next forward if allowed, else nothing.
    Only actions finished at earlier ticks count as inputs (so simultaneous actions never depend on each other)."""
    n_stages = len(paths[0])
    for m in range(next_forward[s]):
        if (m, s) in backward_tick or forward_tick[(m, s)] >= tick:
            continue
        p = position[m][s]
        after = None if p == n_stages - 1 else paths[m][p + 1]
        if after is None or backward_tick.get((m, after), tick) < tick:
            return Action(BACKWARD, m)
    m = next_forward[s]
    in_flight = sum(1 for k in range(m) if (k, s) not in backward_tick)
    if m == len(paths) or in_flight >= limit[s]:
        return None
    p = position[m][s]
    before = None if p == 0 else paths[m][p - 1]
    if before is None or forward_tick.get((m, before), tick) < tick:
        return Action(FORWARD, m)
    return None
