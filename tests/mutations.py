"""Mutation check: does the suite see small, deliberate breakages of the production code?

Each mutation replaces one exact piece of text in one file of a temporary copy of the repository, then runs the
test files that should catch it; a mutation is "caught" when those tests fail. The list holds the breakages a
review found the suite blind to (issue "Tests that can fail") and a few it always caught, as a control::

    python tests/mutations.py                 # every mutation, a report line each; exit 1 if one is missed
    python tests/mutations.py --only rng      # the mutations whose name contains "rng"
    python tests/mutations.py --list

A mutation whose text is no longer found fails the check too (the code moved: update the mutation). It runs
``python -m pytest -x -q`` with this interpreter, in the copy, with the copy first on ``PYTHONPATH`` (the copy
is imported as ``regrow``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    """Test files (or node ids) that must fail."""


MUTATIONS = (
    Mutation("trainer-restore-skips-rng", "trainer/loop.py",
             "        state.rng.restore()\n        self.step = state.step",
             "        self.step = state.step",
             ("tests/test_snapshot_copier.py::test_copier_process_snapshots_equal_the_training_state_and_restore_"
              "bit_identically",)),
    Mutation("trainer-restore-skips-rng-under-the-launcher", "trainer/loop.py",
             "        state.rng.restore()\n        self.step = state.step",
             "        self.step = state.step",
             ("tests/test_chaos.py::test_a_kill_and_a_hang_are_recovered_and_reported",)),
    Mutation("pipeline-restore-skips-rng", "trainer/pipeline/trainer.py",
             "        state.rng.restore()\n        self.step = state.step",
             "        self.step = state.step",
             ("tests/test_ray.py::test_pipeline_stage_lost_with_snapshots_is_restored_from_its_snapshot",)),
    Mutation("trainer-restore-forgets-tokens-seen", "trainer/loop.py",
             "        self.tokens_seen = state.tokens_seen\n",
             "        self.tokens_seen = 0\n",
             ("tests/test_launch_faults.py::test_each_node_lost_in_turn_and_a_rank_killed_continue_bit_identically",)),
    Mutation("verify-skips-rng-crc", "checkpoint/universal/verify.py",
             "    found = (_checksum_problem(ckpt, name, chunks) for name, _, chunks in _listed(manifest))",
             "    found = (_checksum_problem(ckpt, name, chunks) for name, _, chunks in _listed(manifest)\n"
             "             if not name.startswith(\"rng/\"))",
             ("tests/test_checkpoint_errors.py",)),
    Mutation("range-read-skips-overlap-crc", "checkpoint/universal/verified_read.py",
             "                    scratch = memoryview(bytearray(chunk.length))\n"
             "                    self._pread_checked(fd, scratch, chunk.offset, chunk.crc32)",
             "                    scratch = memoryview(bytearray(chunk.length))\n"
             "                    confined.pread_exact(fd, scratch, chunk.offset)",
             ("tests/test_checkpoint_errors.py",)),
    Mutation("goodput-leaves-out-snapshot-cost", "bench/ray_goodput.py",
             "    lost_s = downtime_s + redone_s + cost_s",
             "    lost_s = downtime_s + redone_s",
             ("tests/test_bench_goodput.py",)),
    Mutation("copier-answers-before-copying", "checkpoint/snapshot/copier.py",
             "            for name, source in sources.tensors.items():\n"
             "                if self.delay_s:\n"
             "                    time.sleep(self.delay_s)\n"
             "                targets[name].copy_(source)\n",
             "            def copy_all() -> None:\n"
             "                for name, source in sources.tensors.items():\n"
             "                    if self.delay_s:\n"
             "                        time.sleep(self.delay_s)\n"
             "                    targets[name].copy_(source)\n"
             "            threading.Thread(target=copy_all).start()\n",
             ("tests/test_snapshot_copier.py::test_the_next_update_waits_for_the_copy_and_no_snapshot_mixes_two_"
              "steps",)),
    Mutation("manifest-checksum-unchecked", "checkpoint/universal/manifest_parse.py",
             "    problem = _checksum_problem(data, recorded, version)\n",
             "    problem = None\n",
             ("tests/test_checkpoint_reshard.py::test_one_flipped_byte_anywhere_is_detected_at_any_world_size_and_"
              "nothing_loads",)),
    Mutation("forked-rank-keeps-the-servers-environment", "launch/local/spawn.py",
             "    os.environ.update({**job.launcher_env, ",
             "    os.environ.update({",
             ("tests/test_comm.py::test_a_rank_sees_the_launchers_environment_directory_and_output_as_they_are_when_"
              "it_starts",)),
    Mutation("stage3-keeps-a-block-after-its-forward", "trainer/zero/stage3.py",
             "                                                              mode=\"any\")\n            self._free(unit)\n",
             "                                                              mode=\"any\")\n",
             ("tests/test_zero.py::test_stage3_holds_only_its_shard_between_steps_and_two_blocks_at_a_time",)),
    Mutation("stage3-backward-without-a-second-gather", "trainer/zero/stage3.py",
             "        self._in_backward.add(unit)\n        self._gather(unit)\n",
             "        self._in_backward.add(unit)\n",
             ("tests/test_zero.py::test_stage3_is_bit_identical_to_stage2_with_8bit_state",)),
    Mutation("straggler-busy-time-counts-the-waits", "recovery/stragglers.py",
             "        self._busy += (time.perf_counter() - self._wall) - "
             "(collectives.blocked_seconds() - self._blocked)\n",
             "        self._busy += time.perf_counter() - self._wall\n",
             ("tests/test_chaos.py::test_a_straggler_is_named_within_its_window_and_changes_nothing",)),
    Mutation("bf16-gradient-shard-rounds-the-clipped-gradient", "trainer/zero/optimizer.py",
             "        scale_in_kernel = self.grad_dtype != torch.float32\n",
             "        scale_in_kernel = False\n",
             ("tests/test_zero.py::test_a_bf16_gradient_shard_changes_nothing_on_one_rank_without_accumulation",)),
    Mutation("parity-seals-after-the-corruption", "recovery/parity.py",
             "        shard_ok = self._seal is None or self._shard_digest() == self._seal\n",
             "        shard_ok = True\n",
             ("tests/test_parity.py::test_the_shard_is_verified_at_rest_between_two_steps_on_one_rank",)),
    Mutation("parity-blames-the-owner-of-a-wrong-copy", "recovery/parity.py",
             "            if own_ok[owner]:\n",
             "            if False:\n",
             ("tests/test_chaos.py::test_silent_corruption_is_caught_by_parity_and_rolled_back",)),
    Mutation("zero2-pipeline-forgets-the-tied-copies", "trainer/pipeline/trainer.py",
             "        if self._sums_after_reduction:\n            optimizer.register_reduced_hook(",
             "        if False:\n            optimizer.register_reduced_hook(",
             ("tests/test_pipeline.py::test_pipeline_matches_single_process_model",)),
    Mutation("rebuilt-stage-keeps-the-old-gradient-hooks", "trainer/pipeline/trainer.py",
             "        self.optimizer.detach()  #",
             "        #",
             ("tests/test_neighbor.py::test_checkfree_plus_copies_lost_edge_stages",)),
    Mutation("pipeline-checkpoint-writes-shared-copies", "checkpoint/universal/pieces.py",
             "            if not writing or view.writes(piece.param)]",
             "            if True]",
             ("tests/test_pipeline_checkpoint.py::test_pipeline_checkpoint_loads_at_any_layout_and_back",)),
    Mutation("pipeline-checkpoint-local-names", "checkpoint/universal/pieces.py",
             "    return [replace(piece, param=view.name(piece.param)) for piece",
             "    return [replace(piece, param=piece.param) for piece",
             ("tests/test_pipeline_checkpoint.py::test_pipeline_checkpoint_loads_at_any_layout_and_back",)),
    Mutation("pipeline-load-ignores-stage-values", "checkpoint/universal/reshard.py",
             "    steps, lr_scale = stage_values(ckpt, manifest, layout, view, manifest.step)",
             "    steps, lr_scale = manifest.step, 1.0",
             ("tests/test_pipeline_checkpoint.py",)),
    Mutation("ray-pipeline-without-checkpoint-fallback", "recovery/ray/worker.py",
             "            return restore_job(trainer, address, ckpt_root=self.spec.ckpt_dir, timeout_s=self.spec.timeout_s,",
             "            return restore_job(trainer, address, ckpt_root=None, timeout_s=self.spec.timeout_s,",
             ("tests/test_ray.py::test_pipeline_stage_and_both_neighbours_lost_restore_every_stage_from_the_checkpoint",)),
    Mutation("elastic-never-grows-back", "recovery/ray/coordinator.py",
             "                    self._healer.grow(outcome)",
             "                    pass",
             ("tests/test_ray.py::test_an_elastic_job_grows_back_when_a_node_rejoins",)),
    Mutation("replacement-serves-before-rebuild", "checkpoint/node/server.py",
             "        if not config.await_rebuild:\n            self._rebuilt.set()",
             "        self._rebuilt.set()",
             ("tests/test_torchrun.py::test_a_replacement_holds_the_ranks_requests_until_its_rebuild_ends",)),
    Mutation("torchrun-helper-never-replaces", "launch/node_group.py",
             "            if self.process is not None and self.process.process.poll() is not None:",
             "            if False:",
             ("tests/test_torchrun.py::test_a_node_lost_under_torchrun_is_rebuilt_from_its_erasure_coding_group",)),
    Mutation("sinks-wait-after-the-update", "trainer/sink_calls.py",
             "            optimizer.register_update_pre_hook(lambda: before_update(sinks()))]",
             "            optimizer.register_gather_pre_hook(lambda: before_update(sinks()))]",
             ("tests/test_snapshot_copier.py::test_the_next_update_waits_for_the_copy_and_no_snapshot_mixes_two_"
              "steps",)),
    Mutation("copier-ignores-moved-tensors", "checkpoint/snapshot/sink.py",
             "        elif not self._writer.shares(state.tensors):",
             "        elif False:",
             ("tests/test_snapshot_copier.py::test_tensors_that_move_are_shared_again_then_copied_here",)),
    Mutation("one-rank-gradient-always-added", "trainer/zero/reducer.py",
             "        if name in self._unwritten:\n            place.copy_(flat)",
             "        if False:\n            place.copy_(flat)",
             ("tests/test_zero.py::test_one_rank_writes_gradients_in_place_exactly_as_accumulating_them",)),
    Mutation("one-rank-unused-gradient-not-zeroed", "trainer/zero/reducer.py",
             "        for name in self._unwritten:\n            self._places[name].zero_()",
             "        for name in self._unwritten:\n            pass",
             ("tests/test_zero.py::test_one_rank_writes_gradients_in_place_exactly_as_accumulating_them",)),
    Mutation("8bit-update-skips-clipping", "trainer/zero/shard.py",
             "                grad_scale=grad_scale,\n                param_out=None if",
             "                grad_scale=grad_scale if not eight_bit else 1.0,\n                param_out=None if",
             ("tests/test_zero.py::test_clipping_scales_the_8bit_state_by_the_clipping_factor",)),
    Mutation("stage3-gathers-stale-parameters", "trainer/zero/shard.py",
             "        return self.master_piece(index).to(self.sharded.dtype)",
             "        return torch.zeros_like(self.master_piece(index), dtype=self.sharded.dtype)",
             ("tests/test_zero.py::test_stage3_is_bit_identical_to_stage2_with_8bit_state",)),
)


def run_one(mutation: Mutation, timeout_s: float) -> tuple[str, float]:
    """("caught" | "MISSED" | "not applicable: ...", seconds)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="regrow-mutant-") as scratch:
        copy = Path(scratch) / "regrow"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__",
                                                                   ".whl", "bench-out"))
        target = copy / mutation.file
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return f"not applicable: the text to replace occurs {text.count(mutation.old)} times", 0.0
        target.write_text(text.replace(mutation.old, mutation.new))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (scratch, os.environ.get("PYTHONPATH")) if p))
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     *mutation.tests], cwd=copy, env=env, capture_output=True, text=True,
                                    timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "caught (the tests timed out)", time.monotonic() - started
        if result.returncode == 5:
            return "not applicable: no tests ran", time.monotonic() - started
        return ("caught" if result.returncode != 0 else "MISSED"), time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's tests")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file} -> {' '.join(m.tests)}")
        return 0
    if not chosen:
        parser.error(f"--only={args.only!r} matches no mutation (see --list)")
    missed = 0
    for mutation in chosen:
        outcome, seconds = run_one(mutation, args.timeout)
        missed += not outcome.startswith("caught")
        print(f"{mutation.name:40s} {outcome} ({seconds:.0f} s)", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
