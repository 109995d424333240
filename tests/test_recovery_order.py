"""The recovery order (``recovery/order.py``): the sources worth trying for each availability case, best first, and
the restores that walk it in production (``restore_job``)."""

from __future__ import annotations

import pytest

from regrow.checkpoint.node.process import SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.recovery.order import ORDER, Availability, RecoveryImpossible, Source, plan
from regrow.recovery.restore import job_availability, restore_job
from regrow.tests.test_snapshot import token  # noqa: F401 (fixture)
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer
from regrow.trainer.pipeline.trainer import PipelineTrainer
from regrow.trainer.state import Restorable

K, S, E, N, C = Source.KEPT, Source.SNAPSHOT, Source.ERASURE, Source.NEIGHBORS, Source.CHECKPOINT
PIPELINE = dict(lost_stage=1, pp_size=4, lost_stages=frozenset({1}))
NODE_LOST = dict(snapshot_process_alive=False, erasure_parity=1)

CASES = [
    ("a rank crashed, its node lives", Availability(), [S, C]),
    ("survivors of a data-parallel job", Availability(survivors_keep_state=True), [K, S, C]),
    ("the node may code (a job's restore)", Availability(survivors_keep_state=True, erasure_parity=None), [K, S, E, C]),
    ("the node lives and its group codes", Availability(erasure_parity=1), [S, E, C]),
    ("node lost within parity", Availability(lost_nodes_in_group=1, **NODE_LOST), [E, C]),
    ("node lost beyond parity", Availability(lost_nodes_in_group=2, **NODE_LOST), [C]),
    ("pipeline stage, node lost beyond parity", Availability(lost_nodes_in_group=2, **NODE_LOST, **PIPELINE), [N, C]),
    ("pipeline without snapshots keeps survivors through the rebuild",
     Availability(survivors_keep_state=True, snapshots_enabled=False, checkpoint_available=False, **PIPELINE), [N]),
    ("pipeline with snapshots", Availability(survivors_keep_state=True, erasure_parity=None, **PIPELINE),
     [K, S, E, N, C]),
    ("edge stage without CheckFree+", Availability(snapshots_enabled=False, lost_stage=0, pp_size=4,
                                                   lost_stages=frozenset({0})), [C]),
    ("snapshots off, data parallel", Availability(survivors_keep_state=True, snapshots_enabled=False), [K, C]),
]


@pytest.mark.parametrize("available, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_plan_lists_every_source_that_may_serve_in_the_order(available: Availability, expected: list[Source]) -> None:
    planned = [decision.source for decision in plan(available)]
    assert planned == expected
    assert planned == [source for source in ORDER if source in planned]


def test_plan_names_why_better_sources_were_passed_over() -> None:
    first = plan(Availability(lost_nodes_in_group=2, **NODE_LOST, **PIPELINE))[0]
    assert first.source is N and "more than the erasure code's parity 1" in first.reason
    with pytest.raises(RecoveryImpossible, match="snapshots are disabled.*not a pipeline stage.*no checkpoint"):
        plan(Availability(snapshots_enabled=False, checkpoint_available=False))


def test_a_jobs_restore_walks_the_plan_to_the_snapshot(tmp_path, token) -> None:  # noqa: F811
    """Production reaches the order: ``restore_job`` plans kept -> snapshot -> erasure -> checkpoint for a job with a
    snapshot process and a checkpoint root, and a fresh trainer ends at the snapshot's step."""
    node = start_snapshot_process(SnapshotProcessConfig(), token=token)
    try:
        config = tiny_config(steps=3)
        sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1), rank=0)
        trained = Trainer(config, sinks=[sink])
        for _ in range(3):
            trained.train_step()
        sink.close()
        fresh = Trainer(config)
        restored = restore_job(fresh, node.address, ckpt_root=str(tmp_path), token=token, log=False)
        assert restored.planned == (K, S, E, C)
        assert (restored.source, restored.step, fresh.step) == (S, 3, 3)
    finally:
        node.stop()


def test_a_jobs_restore_without_snapshots_plans_the_checkpoint(tmp_path) -> None:
    config = tiny_config(steps=2)
    writer = CheckpointWriter(WriterConfig(root=str(tmp_path), save_every=2, final_step=2), rank=0, world_size=1,
                              run_config=config.to_dict())
    Trainer(config, sinks=[writer]).run()
    fresh = Trainer(config)
    assert [d.source for d in plan(job_availability(fresh, None, str(tmp_path)))] == [K, C]
    restored = restore_job(fresh, None, ckpt_root=str(tmp_path), log=False)
    assert restored.planned == (K, C)
    assert (restored.source, restored.step) == (C, 2)


def test_both_trainers_satisfy_the_restore_contract() -> None:
    """Recovery restores through ``Restorable`` alone: a ``Trainer`` is one, and ``PipelineTrainer`` offers every
    method and property of it (its attributes are set per rank when it is built in a process group)."""
    assert isinstance(Trainer(tiny_config(steps=1)), Restorable)
    methods = {"layout", "restore", "gather_parameters", "at_initial_state", "reset_to_initial_state",
               "start_lineage", "run_config"}
    assert methods <= {name for name in dir(Restorable) if not name.startswith("_")}
    assert methods <= set(dir(PipelineTrainer))
