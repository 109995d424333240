"""What the snapshot process accepts from a connection, and how long it waits for it (docs/snapshot-protocol.md,
"Limits and trust", lists every value).

Before a connection has presented the job's token it may send one frame of at most :data:`HELLO_FRAME` bytes, no
raw payload, whole within ``handshake_timeout_s``; at most ``max_unauthenticated`` connections may be at that stage
at once, and at most ``max_connections`` open in all. So an unauthenticated peer costs the process at most
``max_unauthenticated`` threads and ``HELLO_FRAME`` bytes each, for at most ``handshake_timeout_s`` each. After
the token, each message (frame and raw payload) must arrive whole within ``message_timeout_s`` of its first byte;
frames are at most ``protocol.MAX_FRAME``; raw payloads only come with ``ec_piece`` and are capped from the size of
this node's own segments (:func:`piece_limit`), as are the buffer sizes peers announce (:func:`peer_buffer_limit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from regrow.checkpoint.node.erasure import PIECE_ALIGN
from regrow.checkpoint.snapshot.protocol import MAX_TOKEN
from regrow.trainer.checks import require_ints

HELLO_FRAME = MAX_TOKEN + 1024
"""Largest frame read before authentication: a hello with a token of ``MAX_TOKEN`` characters fits."""
PEER_BUFFER_FACTOR = 2
"""A peer's node buffer may be at most this many times this node's (the nodes of a group run the same number of
ranks of one model, so their buffers differ by the shards' rounding and metadata only)."""
PEER_BUFFER_FLOOR = 64 << 20
"""...and is always allowed this many bytes (small jobs, and a node whose ranks have not attached yet)."""


@dataclass(kw_only=True)
class ConnectionLimits:
    """The snapshot process's limits on its connections. Validated on construction; errors name the field."""

    handshake_timeout_s: float = 10.0
    """Seconds a new connection has for its whole hello (token): a peer trickling bytes is cut then."""
    message_timeout_s: float = 120.0
    """Seconds an authenticated connection has for each whole message (frame and raw payload), from its first
    byte; an authenticated connection may stay silent between messages for as long as it likes."""
    max_connections: int = 64
    """Connections served at once; more are refused. Each local rank holds one, each peer of the erasure-coding
    group one, and the launcher one now and then: keep it well above their sum."""
    max_unauthenticated: int = 8
    """Of these, connections that have not presented the token yet; more are refused at once."""

    def __post_init__(self) -> None:
        for name in ("handshake_timeout_s", "message_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"ConnectionLimits.{name}={value!r} must be a finite number of seconds > 0")
        require_ints(self, {"max_connections": 1, "max_unauthenticated": 1})
        if self.max_unauthenticated > self.max_connections:
            raise ValueError(f"ConnectionLimits.max_unauthenticated={self.max_unauthenticated} must be <= "
                             f"max_connections={self.max_connections}")


def peer_buffer_limit(node_bytes: int) -> int:
    """Largest node buffer a peer may announce (``ec_size``) to a node whose attached ranks' segments take
    ``node_bytes`` (one slot each): :data:`PEER_BUFFER_FACTOR` times that, at least :data:`PEER_BUFFER_FLOOR`."""
    return max(PEER_BUFFER_FLOOR, PEER_BUFFER_FACTOR * node_bytes)


def piece_limit(node_bytes: int, k: int) -> int:
    """Largest data piece (``ec_piece``'s raw payload) such a node accepts in a group of ``k`` data pieces per
    stripe: a piece of the largest buffer a peer may announce (``GroupCode.geometry``'s rounding)."""
    piece = -(-peer_buffer_limit(node_bytes) // k)
    return -(-piece // PIECE_ALIGN) * PIECE_ALIGN
