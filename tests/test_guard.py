"""``regrow.Guard``: a user's own loop (``examples/own_loop.py``: a Hugging Face Llama, 8-bit ZeRO-2, a schedule, an
EMA of the weights, counters) recovers bit-identically under ``regrow run`` and under torchrun with the node helper;
the user state travels through snapshots and universal checkpoints; bad input gets one clear error.

The runs are real subprocesses (the launcher, gloo ranks, snapshot processes, torchrun's agent). Each run writes
every rank's final state and the window ids of every step (``--out``); a step re-run after a restore appends again,
and the last record of each step is the one the final state came from.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import regrow
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.checkpoint.universal import storage, verify
from regrow.checkpoint.universal.format import MANIFEST_NAME, CorruptCheckpoint, sealed_manifest_json
from regrow.launch.chaos import plan as faults
from regrow.launch.guard import GUARD_ENV, GuardConfig
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.trainer.data import load_corpus
from regrow.trainer.user_state import UserState, UserStateError

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_loop.py"
STEPS = 10
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def clean_env(**extra: str) -> dict[str, str]:
    drop = (TOKEN_ENV, ADDRESS_ENV, faults.FAULTS_ENV, faults.FAULTS_DIR_ENV, GUARD_ENV)
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def run(command: list[str], env: dict[str, str], timeout_s: float = 150.0) -> str:
    done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stdout
    return done.stdout


def regrow_run(out: Path, tokens: Path | None = None, *flags: str, script_flags: tuple[str, ...] = ()) -> str:
    """``regrow run`` of the example on 2 ranks, on the token file ``tokens`` (None: the embedded corpus; the Ray
    test's reference, ``tests/test_ray_entry.py``)."""
    data = ("--data", str(tokens)) if tokens is not None else ()
    return run([sys.executable, "-m", "regrow", "run", "--nproc", "2", "--timeout", "140", *flags, str(EXAMPLE),
                "--steps", str(STEPS), "--out", str(out), *data, *script_flags], clean_env())


def final_windows(out: Path, rank: int) -> dict[int, list[int]]:
    """Step -> window ids of the record that counts (the last one of each step)."""
    windows: dict[int, list[int]] = {}
    for line in (out / f"windows_rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        windows[record["step"]] = record["ids"]
    return windows


def assert_same_run(mine: Path, reference: Path) -> None:
    """Every rank's final state is bit-identical to the reference run's: the optimizer shard (fp32 master, 8-bit
    codes and block scales), the EMA, the schedule, the counters, the data cursor, and the window ids of every step."""
    for rank in (0, 1):
        a = torch.load(mine / f"final_rank{rank}.pt")
        b = torch.load(reference / f"final_rank{rank}.pt")
        assert a["tensors"].keys() == b["tensors"].keys()
        assert any(key.endswith("_codes") for key in a["tensors"]), "the run must have 8-bit state"
        different = [key for key in a["tensors"] if not torch.equal(a["tensors"][key], b["tensors"][key])]
        assert not different, f"rank {rank}: differs from the fault-free run in {different}"
        assert (a["schedule"], a["counters"], a["cursor"], a["step"]) == \
            (b["schedule"], b["counters"], b["cursor"], b["step"])
        assert a["step"] == STEPS
        windows, expected = final_windows(mine, rank), final_windows(reference, rank)
        assert sorted(windows) == list(range(1, STEPS + 1))
        assert windows == expected




@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """A token file made by ``regrow data prepare`` from text (byte-level), far more windows than the run reads."""
    folder = tmp_path_factory.mktemp("tokens")
    text = folder / "text.txt"
    text.write_bytes(bytes(load_corpus()[:200_000].tolist()))
    run([sys.executable, "-m", "regrow", "data", "prepare", str(text), "--out", str(folder / "tokens.bin")],
        clean_env())
    return folder / "tokens.bin"


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory) -> Path:
    """The fault-free run, 2 ranks, nothing kept, on the token file."""
    out = tmp_path_factory.mktemp("reference")
    regrow_run(out, tokens)
    return out


@pytest.fixture
def job() -> Iterator[str]:
    name = f"guard-test-{secrets.token_hex(4)}"
    yield name
    for leftover in Path("/dev/shm").glob(f"regrow-snap-{name}-*"):
        leftover.unlink(missing_ok=True)


@pytest.mark.timeout(300)
def test_own_loop_on_a_token_file_killed_mid_epoch_recovers_bit_identically(tokens, reference, tmp_path) -> None:
    """Killed mid-epoch (6 of 10 steps of 4 windows, of the 5,937 training windows of the file): the restored
    run draws exactly the windows of the fault-free run at every step, and ends in its state bit for bit."""
    out = regrow_run(tmp_path / "out", tokens, "--snapshot-every", "1", "--max-restarts", "1", "--fault",
                     "kill-rank:1@6")
    assert "fault: kill-rank:1@6 fires" in out, out
    assert "guard: the job holds a state" in out and "restore: source snapshot" in out, out
    assert "## fault report: recovered, 1 restart(s)" in out, out
    assert_same_run(tmp_path / "out", reference)


@pytest.mark.timeout(300)
def test_own_loop_with_a_corrupted_shard_is_checked_rolled_back_and_recovers(tokens, reference, tmp_path) -> None:
    """The state parity checks run in an own loop too (``regrow run --parity-every``): a bit flipped in rank 1's
    optimizer shard at the start of step 6 is named by the check of step 6, the job restarts from the snapshot of
    step 5, and the run ends in the fault-free run's state bit for bit."""
    out = regrow_run(tmp_path / "out", tokens, "--snapshot-every", "1", "--max-restarts", "1", "--parity-every", "3",
                     "--fault", "corrupt-shard:1@6")
    assert "fault: corrupt-shard:1@6 flips a bit" in out, out
    assert "parity: state parity check at step 6 failed: the optimizer shard of rank(s) 1 changed" in out, out
    assert "parity: the restored state agrees on all 2 rank(s)" in out, out
    assert_same_run(tmp_path / "out", reference)


@pytest.mark.timeout(300)
def test_own_loop_relaunched_resumes_its_user_state_from_a_checkpoint(tokens, reference, tmp_path) -> None:
    """The job stops after step 6 (preempted); a new launch of the same command resumes from the newest checkpoint
    (6, or an earlier one when a save was skipped because the one before was still persisting) and ends as the
    uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    regrow_run(tmp_path / "out", tokens, "--save-every", "2", "--ckpt-dir", str(ckpt),
               script_flags=("--stop-after", "6"))
    assert storage.read_latest(ckpt) in ("step_00000002", "step_00000004", "step_00000006")
    out = regrow_run(tmp_path / "out", tokens, "--save-every", "2", "--ckpt-dir", str(ckpt))
    assert "guard: the job holds a state (checkpoint" in out and "resumed from" in out, out
    assert_same_run(tmp_path / "out", reference)
    newest = ckpt / storage.read_latest(ckpt)
    manifest = verify.read_manifest(newest)
    assert manifest.user is not None and {t.key.split("/")[1] for t in manifest.user.tensors} == {"ema"}
    assert json.loads((newest / "user" / "state.json").read_text())["schedule"] == {"last_step": STEPS}
    assert verify.verify(newest).ok


@pytest.mark.timeout(300)
def test_own_loop_under_torchrun_with_the_node_helper_recovers_bit_identically(tokens, reference, tmp_path,
                                                                               job) -> None:
    fired = tmp_path / "fired"
    fired.mkdir()
    env = clean_env(**faults.plan_env([faults.Fault("kill-rank", 1, 6)], str(fired)),
                    **GuardConfig(snapshot_every=1).to_env())
    out = run([sys.executable, "-m", "regrow.launch.torchrun", "node", "--job", job, "--", *TORCHRUN,
               "--max-restarts", "1", str(EXAMPLE), "--steps", str(STEPS), "--out", str(tmp_path / "out"), "--data",
               str(tokens)], env)
    assert "fault: kill-rank:1@6 fires" in out, out
    assert out.count("restore: source snapshot") == 2, out
    assert_same_run(tmp_path / "out", reference)
    assert not list(Path("/dev/shm").glob(f"regrow-snap-{job}-*"))


# ---------------------------------------------------------------------------------------------------- in-process


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n, "history": (1, 2)}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def tiny() -> tuple[nn.Module, regrow.ZeroOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 16))
    return model, regrow.ZeroOptimizer(model, stage=2, state_bits=8, min_8bit_numel=512)


def train_steps(guard: regrow.Guard, model: nn.Module, optimizer: regrow.ZeroOptimizer, total: int,
                ema: torch.Tensor, counters: dict) -> None:
    for step in guard.steps(total):
        torch.manual_seed(step)
        model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.lerp_(model[0].weight.detach(), 0.5)
        counters["seen"] += 1


def test_user_state_roundtrips_through_a_checkpoint_in_one_process(tmp_path) -> None:
    model, optimizer = tiny()
    ema, counters = model[0].weight.detach().clone(), {"seen": 0, "note": "x"}
    config = GuardConfig(save_every=2, ckpt_dir=str(tmp_path))
    train_steps(regrow.Guard(model, optimizer, state={"ema": ema, "counters": counters}, config=config), model,
                optimizer, 4, ema, counters)
    assert counters["seen"] == 4

    model2, optimizer2 = tiny()
    ema2, counters2 = torch.zeros_like(ema), {"seen": 0}
    guard = regrow.Guard(model2, optimizer2, state={"ema": ema2, "counters": counters2}, config=config)
    assert guard.resume() == 4
    assert torch.equal(ema2, ema) and counters2 == {"seen": 4, "note": "x"}
    assert all(torch.equal(a, b) for a, b in zip(optimizer.shard_tensors().values(),
                                                 optimizer2.shard_tensors().values(), strict=True))
    guard.close()


def test_a_corrupt_user_tensor_fails_verify_and_the_load_falls_back(tmp_path, capsys) -> None:
    model, optimizer = tiny()
    ema, counters = model[0].weight.detach().clone(), {"seen": 0}
    config = GuardConfig(save_every=2, ckpt_dir=str(tmp_path))
    train_steps(regrow.Guard(model, optimizer, state={"ema": ema, "counters": counters}, config=config), model,
                optimizer, 4, ema, counters)
    newest = tmp_path / storage.read_latest(tmp_path)
    victim = newest / "user" / "tensor_00000.bin"
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify.verify(newest)
    assert not report.ok and any("user/tensor_00000.bin: bytes 0-" in p for p in report.problems), report.problems

    model2, optimizer2 = tiny()
    ema2 = torch.zeros_like(ema)
    guard = regrow.Guard(model2, optimizer2, state={"ema": ema2, "counters": {"seen": 0}}, config=config)
    assert guard.resume() == 2  # step 4's checkpoint is damaged: the newest that verifies is loaded
    assert "did not verify; fell back to step_00000002" in capsys.readouterr().out
    guard.close()


@pytest.mark.parametrize("change, problem", [
    (lambda user: user["tensors"][0].update(key="ema"), "user.tensors[0].key='ema' must start with 'user/'"),
    (lambda user: user["tensors"][0].update(file="params/x.bin"), "user.tensors[0].file='params/x.bin' must lie "
                                                                  "under user/"),
    (lambda user: user["tensors"][0].update(file="user/../../x"), "user.tensors[0].file"),
    (lambda user: user["tensors"][0].update(nbytes=3), "user.tensors[0].nbytes=3, but shape"),
    (lambda user: user["tensors"][0].update(dtype="object"), "user.tensors[0].dtype"),
    (lambda user: user["state"].update(nbytes=1 << 40), "user.state.nbytes"),
])
def test_a_hostile_user_entry_is_refused_naming_the_field(tmp_path, change, problem) -> None:
    model, optimizer = tiny()
    ema = model[0].weight.detach().clone()
    config = GuardConfig(save_every=2, ckpt_dir=str(tmp_path))
    train_steps(regrow.Guard(model, optimizer, state={"ema": ema}, config=config), model, optimizer, 2, ema,
                {"seen": 0})
    newest = tmp_path / storage.read_latest(tmp_path)
    data = json.loads((newest / MANIFEST_NAME).read_text())
    change(data["user"])
    (newest / MANIFEST_NAME).write_text(sealed_manifest_json(data))  # the checksum agrees: the fields must not
    with pytest.raises(CorruptCheckpoint, match="manifest.json") as error:
        verify.read_manifest(newest)
    assert problem in str(error.value)


def test_bad_input_gets_one_clear_error(monkeypatch) -> None:
    model, optimizer = tiny()
    with pytest.raises(TypeError, match="pass regrow's ZeroOptimizer"):
        regrow.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"GuardConfig.save_every=2 needs GuardConfig.ckpt_dir"):
        GuardConfig(save_every=2)
    with pytest.raises(ValueError, match=r"GuardConfig.snapshot_every=-1 must be"):
        GuardConfig(snapshot_every=-1)
    monkeypatch.setenv(GUARD_ENV, '{"snapshot_every": 1, "bogus": 2}')
    with pytest.raises(ValueError, match=r"REGROW_GUARD=.*unknown: \['bogus'\]"):
        GuardConfig.from_env()
    monkeypatch.setenv(GUARD_ENV, "{not json")
    with pytest.raises(ValueError, match="REGROW_GUARD is not JSON"):
        GuardConfig.from_env()
    monkeypatch.delenv(GUARD_ENV)
    with pytest.raises(UserStateError, match=r"state\['loader'\] is a str"):
        UserState({"loader": "abc"})
    with pytest.raises(UserStateError, match=r"user/counter/history is a tuple: .* convert it"):
        UserState({"counter": Counter()}).capture()
    guard = regrow.Guard(model, optimizer, config=GuardConfig(snapshot_every=1))
    with pytest.raises(RuntimeError, match="GuardConfig.snapshot_every=1 but no snapshot process"):
        guard.resume()
    guard = regrow.Guard(model, optimizer, config=GuardConfig())
    guard.resume()
    with pytest.raises(RuntimeError, match="ran 0 optimizer steps since the last step"):
        guard.step_done()
    guard.close()


@pytest.mark.timeout(200)
def test_the_readme_own_loop_runs_under_regrow_run(tokens, tmp_path) -> None:
    """The README's "Your model, your data, your loop" code, as printed (only its step count lowered), trains on
    2 ranks with snapshots from a token file."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your model, your data, your loop"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", 10)]
    assert len(code.splitlines()) < 25 and "guard.steps(1000)" in code
    (tmp_path / "train.py").write_text(code.replace("guard.steps(1000)", "guard.steps(3)") +
                                       "print(f'final step {guard.step} {counters}')\n")
    (tmp_path / "tokens.bin").write_bytes(tokens.read_bytes())
    (tmp_path / "tokens.bin.json").write_bytes(tokens.with_name("tokens.bin.json").read_bytes())
    done = subprocess.run([sys.executable, "-m", "regrow", "run", "--nproc", "2", "--snapshot-every", "1",
                           "--timeout", "150", "train.py"], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180)
    assert done.returncode == 0, done.stdout
    assert done.stdout.count("final step 3 {'tokens': 1536}") == 2, done.stdout
