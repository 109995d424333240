"""The snapshot process's connections: admission under the caps, the token check, and the read loop of each
authenticated connection, one thread per connection so a slow or silent client blocks only itself. What a request
means is the :class:`Handler`'s (``server.SnapshotServer``).

The token is checked before anything is allocated for a peer: the hello is read with ``limits.HELLO_FRAME`` as its
largest frame, no raw payload, and ``handshake_timeout_s`` for the whole of it (``limits.py`` sums up what an
unauthenticated peer can cost). Every failure on a connection is answered ``{"ok": false, "error": ...}`` when the
stream still allows a reply, and logged (refusals of unauthenticated peers at most once a second); a connection
thread never dies of an exception without closing its connection and saying why.
"""

from __future__ import annotations

import hmac
import selectors
import socket
import threading
import traceback
from typing import Protocol

from regrow.checkpoint.node.limits import HELLO_FRAME, ConnectionLimits
from regrow.checkpoint.node.log import Throttled, log
from regrow.checkpoint.node.requests import RequestError, validate
from regrow.checkpoint.snapshot.protocol import FrameRefused, ProtocolError, recv_message, send_message

REPLY_TIMEOUT_S = 1.0
"""How long a reply to a refused peer may take to send (it is a courtesy: the connection closes anyway)."""
KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))
"""TCP keepalive of every connection: a peer that vanished without closing (its machine lost) is noticed within
about two minutes, so its silent authenticated connection does not hold one of ``max_connections`` for good."""


class Handler(Protocol):
    """What the connections hand authenticated requests to."""

    job: str

    def handle(self, request: dict, payload: bytearray | None) -> tuple[dict, bytes | bytearray | None]:
        """The reply to one request and its raw payload, if any; never raises (a failure is an ``ok: false``
        reply)."""

    def check_raw(self, message: dict, size: int) -> None:
        """Raises ``FrameRefused`` unless ``message`` may carry a raw payload of ``size`` bytes."""


class ConnectionGate:
    """Counts the open connections, and those not authenticated yet; admits a new one only under both caps.
    Thread-safe."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self.open = 0
        self.unauthenticated = 0

    def admit(self) -> str | None:
        """Counts a new (unauthenticated) connection in, or returns why it is refused."""
        with self._lock:
            if self.open >= self._limits.max_connections:
                return f"too many connections ({self._limits.max_connections} open): try again later"
            if self.unauthenticated >= self._limits.max_unauthenticated:
                return (f"too many connections waiting to present the token ({self._limits.max_unauthenticated}): "
                        f"try again later")
            self.open += 1
            self.unauthenticated += 1
            return None

    def authenticated(self) -> None:
        with self._lock:
            self.unauthenticated -= 1

    def closed(self, *, authenticated: bool) -> None:
        with self._lock:
            self.open -= 1
            if not authenticated:
                self.unauthenticated -= 1


class Connections:
    """Accepts connections on ``listener`` and serves each on a thread of its own, until ``stop`` is set."""

    def __init__(self, listener: socket.socket, *, limits: ConnectionLimits, token: str, handler: Handler,
                 stop: threading.Event) -> None:
        self._listener = listener
        self._limits = limits
        self._token = token.encode()
        self._handler = handler
        self._stop = stop
        self.gate = ConnectionGate(limits)
        self._refusals = Throttled()

    def serve(self) -> None:
        """Accepts until ``stop`` is set (checked every 0.2 s); returns with the listener still open."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(timeout=0.2):
                    continue
                try:
                    conn, peer = self._listener.accept()
                except OSError:
                    continue
                self._start(conn, peer)

    def _start(self, conn: socket.socket, peer: tuple) -> None:
        refused = self.gate.admit()
        if refused is not None:
            self._refusals.log(f"refused a connection from {_name(peer)}: {refused}")
            _refuse(conn, refused)
            return
        try:
            _keep_alive(conn)
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                             name=f"regrow-snapshot-conn-{peer[1]}").start()
        except (RuntimeError, OSError) as error:  # no thread to be had: refuse this one, serve the others
            self.gate.closed(authenticated=False)
            log(f"refused a connection from {_name(peer)}: cannot start its thread ({error})")
            _refuse(conn, "the snapshot process cannot serve another connection now: try again later")

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        authenticated = False
        try:
            authenticated = self._hello(conn, peer)
            if authenticated:
                self.gate.authenticated()
                self._requests(conn, peer)
        except Exception as error:  # noqa: BLE001 (a bug: logged whole, the connection closed, the process serves on)
            log(f"connection from {_name(peer)} ended by an internal error: {type(error).__name__}: {error}\n"
                f"{traceback.format_exc()}")
        finally:
            self.gate.closed(authenticated=authenticated)
            conn.close()

    def _hello(self, conn: socket.socket, peer: tuple) -> bool:
        """Reads and checks the hello; True when the token is the job's (answered with the job's id)."""
        try:
            hello, _ = recv_message(conn, max_frame=HELLO_FRAME, check_raw=_no_raw_before_hello,
                                    timeout_s=self._limits.handshake_timeout_s)
            validate(hello)
            if hello["op"] != "hello":
                raise RequestError(f"the first request must be hello, not {hello['op']!r}")
        except (OSError, ProtocolError, RequestError) as error:
            self._refusals.log(f"refused connection from {_name(peer)}: no valid hello ({error})")
            _refuse(conn, f"no valid hello: {error}")
            return False
        # surrogatepass: JSON may carry a lone surrogate, which a strict encode would raise on (a wrong token, not
        # an error)
        if not hmac.compare_digest(hello["token"].encode("utf-8", "surrogatepass"), self._token):
            self._refusals.log(f"refused connection from {_name(peer)}: wrong token")
            _refuse(conn, "wrong token: connection refused")
            return False
        conn.settimeout(self._limits.message_timeout_s)
        _reply(conn, {"ok": True, "job": self._handler.job})
        return True

    def _requests(self, conn: socket.socket, peer: tuple) -> None:
        """Serves an authenticated connection's requests until it closes, breaks a limit, or the process stops."""
        while not self._stop.is_set():
            conn.settimeout(None)  # an attached rank may stay silent for a long time between requests
            try:
                if not conn.recv(1, socket.MSG_PEEK):
                    return  # closed by the client
                request, payload = recv_message(conn, check_raw=self._handler.check_raw,
                                                timeout_s=self._limits.message_timeout_s)
            except FrameRefused as error:  # the refused bytes are still in the stream: answer, then close
                log(f"closed the connection from {_name(peer)}: {error}")
                _refuse(conn, str(error))
                return
            except ProtocolError as error:  # a frame read whole but unusable: the stream is still in step
                log(f"refused a frame from {_name(peer)}: {error}")
                conn.settimeout(self._limits.message_timeout_s)
                _reply(conn, {"ok": False, "error": f"ProtocolError: {error}"})
                continue
            except OSError as error:  # reset, or a message not whole within message_timeout_s
                if not isinstance(error, ConnectionResetError):
                    log(f"closed the connection from {_name(peer)}: {type(error).__name__}: {error}")
                return
            conn.settimeout(self._limits.message_timeout_s)
            _reply(conn, *self._handler.handle(request, payload))


def _keep_alive(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        if hasattr(socket, option):  # Linux names; elsewhere the system's keepalive defaults apply
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _no_raw_before_hello(message: dict, size: int) -> None:
    raise FrameRefused(f"a raw payload ({size} bytes announced) is not accepted before the token is presented")


def _name(peer: tuple) -> str:
    return f"{peer[0]}:{peer[1]}"


def _reply(conn: socket.socket, message: dict, payload: bytes | bytearray | None = None) -> None:
    try:
        send_message(conn, message, payload)
    except ProtocolError as error:  # a reply larger than a frame: the client learns that instead of waiting
        log(f"a reply did not fit a frame: {error}")
        _reply(conn, {"ok": False, "error": f"the reply does not fit a frame: {error}"})
    except OSError:
        pass  # the client went away (or does not read): its thread ends at the next read


def _refuse(conn: socket.socket, error: str) -> None:
    """Answers ``ok: false`` with ``error`` if that can be sent within :data:`REPLY_TIMEOUT_S`, then closes."""
    conn.settimeout(REPLY_TIMEOUT_S)
    _reply(conn, {"ok": False, "error": error})
    conn.close()
