"""Your own training loop, fault-tolerant: a Hugging Face Llama, regrow's 8-bit ZeRO-2 optimizer, a learning-rate
schedule, an EMA of the weights and a token counter, all restored after a failure by ``regrow.Guard``.

Run it on 2 local ranks, snapshot every step, kill rank 1 after step 6 and recover::

    regrow run --nproc 2 --snapshot-every 1 --max-restarts 1 --fault kill-rank:1@6 examples/own_loop.py --steps 12

The same script runs under torchrun (``python -m regrow.launch.torchrun node -- torchrun --nproc-per-node 2
--max-restarts 1 examples/own_loop.py``, with ``REGROW_GUARD='{"snapshot_every": 1}'`` exported) and under Ray
(``regrow ray --entry examples.own_loop:train``). ``--out DIR`` writes each rank's final state and the window ids of
every step, which the tests compare with a fault-free run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import regrow

try:
    from examples.hf_llama import build
except ImportError:  # run as a script: its folder is on sys.path
    from hf_llama import build


class WarmupCosine:
    """A learning-rate schedule with state: linear warm-up, then cosine decay (a torch LR scheduler needs a torch
    optimizer; this one drives ``ZeroOptimizer.set_lr``)."""

    def __init__(self, optimizer: regrow.ZeroOptimizer, *, peak: float, warmup: int, total: int) -> None:
        self.optimizer, self.peak, self.warmup, self.total = optimizer, peak, warmup, total
        self.last_step = 0

    def lr(self, step: int) -> float:
        if step <= self.warmup:
            return self.peak * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def step(self) -> None:
        self.last_step += 1
        self.optimizer.set_lr(self.lr(self.last_step))

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"]
        self.optimizer.set_lr(self.lr(self.last_step))


def train(steps: int = 12, out: str | None = None, seq_len: int = 32, stop_after: int = 0,
          data: tuple[str, ...] = ()) -> dict:
    """The whole loop (also the Ray entry point). ``data``: token files (``regrow data prepare``; default: the
    embedded corpus). ``stop_after``: leave after this step, as a preempted job would (a later start with the same
    ``steps`` resumes from what was saved). Returns the step, loss and token count."""
    world = regrow.join_world()
    torch.manual_seed(0)
    model = build().to(world.device)
    optimizer = regrow.ZeroOptimizer(model, stage=2, state_bits=8, lr=3e-3, min_8bit_numel=1024)
    sampler = regrow.Sampler(regrow.DataConfig(seq_len=seq_len, micro_batch=2, global_batch=4, files=tuple(data)),
                             dp_rank=world.rank, dp_size=world.world_size, vocab_size=model.config.vocab_size)
    schedule = WarmupCosine(optimizer, peak=3e-3, warmup=3, total=steps)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    counters = {"tokens": 0, "loss": 0.0}
    guard = regrow.Guard(model, optimizer, sampler=sampler, state={"schedule": schedule, "ema": ema,
                                                                    "counters": counters})
    seen: dict[int, list[int]] = {}
    for step in guard.steps(steps):
        schedule.step()
        seen[step] = []
        for _ in range(sampler.grad_accum):
            x, y = sampler.next_micro_batch()
            seen[step] += sampler.last_window_ids.tolist()
            logits = model(input_ids=x.to(world.device)).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(world.device).flatten()) / sampler.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for name, p in model.named_parameters():
                ema[name].lerp_(p.float(), 0.1)
        counters["tokens"] += sampler.config.global_batch * seq_len
        counters["loss"] = float(loss.item() * sampler.grad_accum)
        if out:
            _record(Path(out), world.rank, step, seen[step])
        if step == stop_after:
            break
    guard.close()
    if out:
        final = {f"shard/{k}": v for k, v in optimizer.shard_tensors().items()}
        final.update({f"ema/{k}": v for k, v in ema.items()})
        torch.save({"tensors": final, "schedule": schedule.state_dict(), "counters": counters,
                    "cursor": sampler.state().to_dict(), "step": guard.step},
                   Path(out) / f"final_rank{world.rank}.pt")
    return {"step": guard.step, "tokens": counters["tokens"], "loss": counters["loss"]}


def _record(out: Path, rank: int, step: int, ids: list[int]) -> None:
    """Appends this step's window ids: a step re-run after a restore appends again, and the last record wins."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"windows_rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "ids": ids}) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None, help="write each rank's final state and window ids here")
    parser.add_argument("--stop-after", type=int, default=0, help="leave after this step (a later run resumes)")
    parser.add_argument("--data", nargs="*", default=[], help="token files (regrow data prepare); default: the "
                                                               "embedded corpus")
    args = parser.parse_args()
    print(json.dumps(train(steps=args.steps, out=args.out, stop_after=args.stop_after, data=tuple(args.data))))
