"""The one validation layer of the snapshot process's requests: every op's fields, their types and ranges, in one
table (:data:`FIELDS`; docs/snapshot-protocol.md lists the same).

A request is checked whole (:func:`validate`) before any part of the process sees it: an unknown op, an unknown or
missing field, or a value of the wrong type or out of its range is refused with a :class:`RequestError` naming the
op, the field and what is allowed. Ints are JSON integers only (not floats, not booleans). The ranges are static
(what a segment header and the process's tables can hold); what depends on the process's state (this node's group
size, the buffer sizes it accepts from its peers) is checked by the server and its parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from regrow.checkpoint.node.slots import SLOTS
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import MAX_TOKEN, parse_address

MAX_RANK = (1 << 31) - 1
"""Largest rank (a segment header holds it in 32 bits; torch ranks are 32-bit ints)."""
MAX_STEP = (1 << 63) - 1
"""Largest step (a segment header holds it as a signed 64-bit int)."""
MAX_META_CAPACITY = 256 << 20
"""Largest metadata room of a segment (a sink asks for twice its metadata plus 64 KiB: a few MiB at most)."""
MAX_TENSORS = 1 << 16
"""Most tensors in one rank's table."""
MAX_DIMS = 16
MAX_DIM = 1 << 62
"""Largest extent of one dimension (the space check refuses what /dev/shm cannot hold)."""
MAX_NAME = 1024
"""Longest tensor name, path (``restored_from``) or round id, in characters."""
MAX_GROUP = 1024
"""Most nodes in an erasure-coding group."""
MAX_BYTES = 1 << 62
"""Largest byte count a peer may announce before the server's own cap (``limits.peer_buffer_limit``)."""


class RequestError(ValueError):
    """A request that is not one the protocol defines; the message names the op, the field and what is allowed."""


@dataclass(frozen=True)
class Rule:
    """What a field's value must be: ``says`` for the error message, ``holds`` to test it."""

    says: str
    holds: Callable[[object], bool]


def integer(low: int, high: int) -> Rule:
    return Rule(f"an int in [{low}, {high}]", lambda v: type(v) is int and low <= v <= high)


def text(most: int) -> Rule:
    return Rule(f"a string of 1 to {most} characters", lambda v: isinstance(v, str) and 0 < len(v) <= most)


def optional(rule: Rule) -> Rule:
    return Rule(f"{rule.says}, or null", lambda v: v is None or rule.holds(v))


def _is_address(value: object) -> bool:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        return False
    try:
        parse_address(value)
    except ValueError:
        return False
    return True


def _is_tensor(item: object) -> bool:
    return (isinstance(item, dict) and set(item) == {"name", "dtype", "shape"}
            and isinstance(item["name"], str) and 0 < len(item["name"]) <= MAX_NAME
            and isinstance(item["dtype"], str) and item["dtype"] in seg.ITEMSIZE and isinstance(item["shape"], list)
            and len(item["shape"]) <= MAX_DIMS and all(type(d) is int and 0 <= d <= MAX_DIM for d in item["shape"]))


def _is_table(value: object) -> bool:
    return (isinstance(value, list) and len(value) <= MAX_TENSORS and all(_is_tensor(item) for item in value)
            and len({item["name"] for item in value}) == len(value))


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
OBJECT = Rule("a JSON object", lambda v: isinstance(v, dict))
RANK = integer(0, MAX_RANK)
STEP = integer(0, MAX_STEP)
NODE = integer(0, MAX_GROUP - 1)
ROUND = text(MAX_NAME)
TABLE = Rule(f"a list of at most {MAX_TENSORS} tensors with distinct names, each exactly {{\"name\": a string of 1 to "
             f"{MAX_NAME} characters, \"dtype\": one of {sorted(seg.ITEMSIZE)}, \"shape\": a list of at most "
             f"{MAX_DIMS} ints in [0, {MAX_DIM}]}}", _is_table)
PEERS = Rule(f"a list of 1 to {MAX_GROUP} addresses host:port", lambda v: isinstance(v, list)
             and 0 < len(v) <= MAX_GROUP and all(_is_address(a) for a in v))

FIELDS: dict[str, dict[str, tuple[Rule, bool]]] = {
    "hello": {"token": (text(MAX_TOKEN), True)},
    "attach": {"rank": (RANK, True), "tensors": (TABLE, True),
               "meta_capacity": (integer(1, MAX_META_CAPACITY), True), "step": (optional(STEP), False),
               "restored_from": (optional(text(MAX_NAME)), False)},
    "latest": {"rank": (RANK, True), "verify": (BOOL, False)},
    "commit": {"rank": (RANK, True), "slot": (integer(0, SLOTS - 1), True), "step": (STEP, True)},
    "shutdown": {},
    "persisted": {},
    "run_config": {"config": (OBJECT, True)},
    "ec_group": {"node": (NODE, True), "peers": (PEERS, True)},
    "ec_propose": {"step": (STEP, True), "round": (ROUND, True)},
    "ec_size": {"step": (STEP, True), "round": (ROUND, True), "node": (NODE, True),
                "size": (integer(0, MAX_BYTES), True)},
    "ec_piece": {"step": (STEP, True), "round": (ROUND, True), "node": (NODE, True),
                 "piece": (integer(0, MAX_GROUP - 1), True)},
    "ec_status": {},
    "ec_fetch": {"step": (STEP, True), "what": (Rule("'buffer' or 'parity'", lambda v: v in ("buffer", "parity")),
                                                True),
                 "index": (integer(0, MAX_GROUP - 1), False)},
    "ec_rebuild": {},
    "ec_rollback": {"rank": (RANK, True), "step": (STEP, True)},
}
"""op -> field -> (rule, required). The frame's ``raw`` and ``raw_crc`` are the protocol's, allowed on
:data:`RAW_OPS` only (the reader has checked them before the request gets here)."""
RAW_OPS = frozenset({"ec_piece"})
"""The ops that carry a raw payload."""


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:77]}..."


def validate(request: dict) -> dict:
    """Returns ``request`` when it is one the protocol defines, else raises :class:`RequestError` naming the op
    and the first field at fault, and what that field must be."""
    op = request.get("op")
    if not isinstance(op, str) or op not in FIELDS:
        raise RequestError(f"unknown op {_shown(op)}: one of {', '.join(FIELDS)}")
    fields = FIELDS[op]
    allowed = set(fields) | {"op"} | ({"raw", "raw_crc"} if op in RAW_OPS else set())
    for name in request:
        if name not in allowed:
            raise RequestError(f"{op}: unknown field {_shown(name)} (its fields: {', '.join(fields) or 'none'})")
    for name, (rule, required) in fields.items():
        if name not in request:
            if required:
                raise RequestError(f"{op}: field {name!r} is missing: it must be {rule.says}")
            continue
        if not rule.holds(request[name]):
            raise RequestError(f"{op}: field {name!r} must be {rule.says}, not {_shown(request[name])}")
    return request
