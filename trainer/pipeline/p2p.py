"""Point-to-point transfers between pipeline stages, with explicit timeouts and classified errors.

Sends are asynchronous (gloo delivers a send only once the receiver has posted the matching receive, so a blocking
send could deadlock two stages that both send first); receives block. Tags tell apart the messages of one step:
``2 * micro`` for activations, ``2 * micro + 1`` for their gradients (a pair of stages may exchange both directions
when CheckFree+ swaps their order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from regrow.comm import collectives


def activation_tag(micro: int) -> int:
    return 2 * micro


def gradient_tag(micro: int) -> int:
    return 2 * micro + 1


class Transfers:
    """The sends of one step in flight. Call :meth:`wait_sends` once per step, after the last action, so that no
    send buffer is reused or freed before its receiver has it."""

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float) -> None:
        self.group, self.timeout_s = group, timeout_s
        self._sends: list[tuple[collectives.Pending, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        """Starts sending ``tensor`` to global rank ``dst``; the tensor is kept alive until :meth:`wait_sends`."""
        tensor = tensor.contiguous()
        try:
            work = dist.isend(tensor, dst=dst, group=self.group, tag=tag)
        except Exception as error:
            raise collectives.classify("send", error) from error
        self._sends.append((collectives.Pending("send", work, self.timeout_s, tensor.device.type == "cpu"), tensor))

    def recv(self, out: torch.Tensor, src: int, tag: int) -> torch.Tensor:
        """Receives into ``out`` from global rank ``src`` and returns it."""
        try:
            work = dist.irecv(out, src=src, group=self.group, tag=tag)
        except Exception as error:
            raise collectives.classify("recv", error) from error
        collectives.Pending("recv", work, self.timeout_s, out.device.type == "cpu").wait()
        return out

    def wait_sends(self) -> None:
        for pending, _ in self._sends:
            pending.wait()
        self._sends.clear()
