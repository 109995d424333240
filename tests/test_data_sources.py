"""Token files (.bin, .npy, several), map-style Datasets and the sampler's contract over them: the exact window
order (computed here from the contract, independently of the sampler), a cursor continued by a new sampler at
another data-parallel size, and one clear error per kind of bad data."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from regrow.trainer.data import DataConfig, DataCursor, DataError, Sampler
from regrow.trainer.data import token_files as tf

SEQ = 16
STRIDE = 1000003  # the contract's per-epoch seed stride


def _write_bin(path, tokens, dtype="uint16", sidecar: dict | None = None) -> str:
    np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tofile(path)
    if sidecar is not None:
        path.with_name(path.name + ".json").write_text(json.dumps(sidecar))
    return str(path)


def _config(files, **overrides) -> DataConfig:
    base = dict(seq_len=SEQ, micro_batch=2, global_batch=8, seed=5, val_fraction=0.1, files=tuple(files))
    return DataConfig(**{**base, **overrides})


def _split(n: int, val_fraction: float) -> tuple[int, int, int]:
    """(cut, training windows, validation windows) of one array of ``n`` tokens, from the contract."""
    cut = n - int(n * val_fraction)
    return cut, max(0, (cut - 1) // SEQ), max(0, (n - cut - 1) // SEQ)


def _expected_window(arrays: list[np.ndarray], global_id: int, val_fraction: float, validation=False) -> np.ndarray:
    """Window ``global_id`` from the contract: numbered file by file, each file's windows every SEQ tokens."""
    for tokens in arrays:
        cut, n_train, n_val = _split(len(tokens), val_fraction)
        count = n_val if validation else n_train
        if global_id < count:
            start = (cut if validation else 0) + global_id * SEQ
            return tokens[start : start + SEQ + 1].astype(np.int64)
        global_id -= count
    raise AssertionError("window id past the last file")


def _expected_ids(num: int, config: DataConfig, epoch: int, index: int, rank: int, dp: int, micro: int) -> list[int]:
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(config.seed * STRIDE + epoch))
    start = index + rank * (config.global_batch // dp) + micro * config.micro_batch
    return perm[start : start + config.micro_batch].tolist()


def _take_step(sampler: Sampler) -> list[list[int]]:
    """One optimizer step of this rank: the window ids of each micro-batch."""
    taken = []
    for _ in range(sampler.grad_accum):
        sampler.next_micro_batch()
        taken.append(sampler.last_window_ids.tolist())
    return taken


def _files(tmp_path) -> tuple[list[str], list[np.ndarray]]:
    """A uint16 .bin, a uint32 .npy (ids above 65535) and a small uint16 .bin, each with distinct ids."""
    a = np.arange(0, 1000) % 60000
    b = np.arange(70000, 70000 + 700)
    c = np.arange(5000, 5000 + 350)
    np.save(tmp_path / "b.npy", b.astype(np.uint32))
    paths = [_write_bin(tmp_path / "a.bin", a), str(tmp_path / "b.npy"), _write_bin(tmp_path / "c.bin", c)]
    return paths, [a, b, c]


# ------------------------------------------------------------------------------------------ token files


def test_several_token_files_give_the_contracts_windows_in_the_contracts_order(tmp_path) -> None:
    paths, arrays = _files(tmp_path)
    config = _config(paths)
    total = sum(_split(len(a), config.val_fraction)[1] for a in arrays)
    samplers = [Sampler(config, dp_rank=r, dp_size=2) for r in range(2)]
    assert samplers[0].num_windows == total
    for step in range(total // config.global_batch + 2):  # past the end of epoch 0
        epoch, index = divmod(step, total // config.global_batch)
        index *= config.global_batch
        for rank, sampler in enumerate(samplers):
            for micro in range(sampler.grad_accum):
                x, y = sampler.next_micro_batch()
                ids = _expected_ids(total, config, epoch, index, rank, 2, micro)
                assert sampler.last_window_ids.dtype == torch.int64
                assert sampler.last_window_ids.tolist() == ids
                rows = np.stack([_expected_window(arrays, i, config.val_fraction) for i in ids])
                assert torch.equal(x, torch.from_numpy(rows[:, :-1])) and torch.equal(y, torch.from_numpy(rows[:, 1:]))


def test_validation_windows_are_each_files_tail_numbered_file_by_file(tmp_path) -> None:
    paths, arrays = _files(tmp_path)
    config = _config(paths)
    n_val = sum(_split(len(a), config.val_fraction)[2] for a in arrays)
    batches = list(Sampler(config, dp_rank=1, dp_size=2).validation_batches(3, 5))
    xs = torch.cat([x for x, _ in batches])
    for k, row in enumerate(xs):
        expected = _expected_window(arrays, k % n_val, config.val_fraction, validation=True)
        assert torch.equal(row, torch.from_numpy(expected[:-1]))
    # The training windows end before each file's validation tail.
    for tokens in arrays:
        cut, n_train, _ = _split(len(tokens), config.val_fraction)
        assert n_train * SEQ + 1 <= cut


def test_a_single_bin_file_reads_like_the_embedded_corpus(tmp_path) -> None:
    """One token file holding the corpus's bytes gives the corpus's batches exactly."""
    from regrow.trainer.data import load_corpus

    corpus = load_corpus()[:20000]
    path = _write_bin(tmp_path / "corpus.bin", corpus.numpy())
    from_file = Sampler(_config([path]), dp_rank=0, dp_size=1)
    from_corpus = Sampler(_config([]), dp_rank=0, dp_size=1, corpus=corpus)
    for _ in range(6):
        a, b = from_file.next_micro_batch(), from_corpus.next_micro_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(from_file.last_window_ids, from_corpus.last_window_ids)


@pytest.mark.parametrize("dp_after", [1, 2, 4])
def test_a_cursor_saved_mid_epoch_continues_the_exact_window_ids_in_a_new_sampler(tmp_path, dp_after) -> None:
    paths, _ = _files(tmp_path)
    config = _config(paths)
    straight = Sampler(config, 0, 1)
    for _ in range(3):
        _take_step(straight)
    cursor = straight.state()
    assert cursor.epoch == 0 and cursor.index == 3 * config.global_batch
    # Uninterrupted, at one rank: the global order of the next steps (crossing into epoch 1).
    expected = [sum(_take_step(straight), []) for _ in range(12)]
    assert straight.state().epoch == 1
    saved = json.loads(json.dumps(cursor.to_dict()))
    resumed = [Sampler(config, r, dp_after) for r in range(dp_after)]
    for sampler in resumed:
        sampler.load_state(DataCursor.from_dict(saved))
    got = [sum((sum(_take_step(s), []) for s in resumed), []) for _ in range(12)]
    assert got == expected


def test_the_sidecar_names_the_dtype_of_a_bin(tmp_path) -> None:
    ids = np.arange(65530, 65530 + 400)  # above uint16: read as uint16 these would be other ids
    path = _write_bin(tmp_path / "t.bin", ids, "uint32", sidecar={"dtype": "uint32", "vocab_size": 70000,
                                                                  "tokens": 400, "tokenizer": None, "files": []})
    sampler = Sampler(_config([path], val_fraction=0.2), 0, 1)
    x, _ = sampler.next_micro_batch()
    first = int(sampler.last_window_ids[0])
    assert torch.equal(x[0], torch.from_numpy(ids[first * SEQ : first * SEQ + SEQ]))
    # token_dtype agreeing with the sidecar is fine; without a sidecar it decides.
    Sampler(_config([path], val_fraction=0.2, token_dtype="uint32"), 0, 1)


def test_data_config_is_json_able_and_picklable() -> None:
    config = DataConfig(files=("/data/a.bin", "/data/b.npy"), token_dtype="uint32")
    as_json = json.loads(json.dumps(dataclasses.asdict(config)))
    assert as_json["files"] == ["/data/a.bin", "/data/b.npy"] and as_json["token_dtype"] == "uint32"
    assert DataConfig(**as_json) == config  # a list from JSON comes back as the same tuple
    assert pickle.loads(pickle.dumps(config)) == config


# ------------------------------------------------------------------------------------------ datasets


class _Fixed(torch.utils.data.Dataset):
    """Sample i is [i, i+1, ..., i+SEQ] (so its content names it), or a bad one where asked."""

    def __init__(self, n: int, bad: dict[int, object] | None = None) -> None:
        self.n, self.bad = n, bad or {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.bad.get(i, torch.arange(i, i + SEQ + 1))


def test_a_dataset_source_follows_the_same_order_and_cursor_contract() -> None:
    config = _config([], val_fraction=0.1)
    dataset = _Fixed(60)
    n_train = 60 - int(60 * 0.1)
    sampler = Sampler(config, 0, 2, dataset=dataset)
    assert sampler.num_windows == n_train
    for micro in range(sampler.grad_accum):
        x, y = sampler.next_micro_batch()
        ids = _expected_ids(n_train, config, 0, 0, 0, 2, micro)
        assert sampler.last_window_ids.tolist() == ids
        assert x[:, 0].tolist() == ids and torch.equal(y, x + 1)
    one = Sampler(config, 0, 1, dataset=dataset)
    for _ in range(2):
        _take_step(one)
    cursor = one.state()
    expected = [sum(_take_step(one), []) for _ in range(7)]  # crosses into epoch 1
    resumed = [Sampler(config, r, 4, dataset=dataset) for r in range(4)]
    for s in resumed:
        s.load_state(cursor)
    assert [sum((sum(_take_step(s), []) for s in resumed), []) for _ in range(7)] == expected
    val_x, _ = next(Sampler(config, 0, 1, dataset=dataset).validation_batches(1, 6))
    assert val_x[:, 0].tolist() == [n_train + k % 6 for k in range(6)]


@pytest.mark.parametrize("bad, found", [
    (torch.arange(SEQ), f"shape ({SEQ},)"),
    (torch.zeros(2, SEQ + 1, dtype=torch.long), f"shape (2, {SEQ + 1})"),
    (torch.zeros(SEQ + 1), "dtype torch.float32"),
    ("not tokens", "a str"),
])
def test_a_dataset_sample_of_the_wrong_shape_names_its_index_and_the_expected_shape(bad, found) -> None:
    config = _config([], micro_batch=8, global_batch=8)
    sampler = Sampler(config, 0, 1, dataset=_Fixed(20, bad={i: bad for i in range(20)}))
    with pytest.raises(DataError) as error:
        sampler.next_micro_batch()
    first = int(torch.randperm(18, generator=torch.Generator().manual_seed(5 * STRIDE))[0])
    assert str(error.value).startswith(f"dataset sample {first} is {found}; every sample must be a 1-D integer "
                                       f"tensor of exactly seq_len+1={SEQ + 1} token ids, shape ({SEQ + 1},)")


def test_a_dataset_sample_above_the_vocabulary_is_named() -> None:
    sampler = Sampler(_config([], micro_batch=8, global_batch=8), 0, 1, dataset=_Fixed(20), vocab_size=20)
    with pytest.raises(DataError, match=r"dataset sample \d+ holds token id \d+, but the model's vocabulary has 20"):
        for _ in range(3):
            sampler.next_micro_batch()


# ------------------------------------------------------------------------------------------ errors


def _error(config: DataConfig, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        Sampler(config, 0, 1, **kwargs)
    return str(error.value)


def test_one_source_at_a_time(tmp_path) -> None:
    path = _write_bin(tmp_path / "t.bin", np.arange(400))
    assert _error(_config([path]), dataset=_Fixed(40)).startswith("Sampler: give one source")
    assert _error(_config([path]), corpus=torch.arange(400)).startswith("Sampler: give one source")


def test_a_missing_token_file_is_named_with_the_fix(tmp_path) -> None:
    missing = str(tmp_path / "nope.bin")
    assert _error(_config([missing])) == (
        f"token file {missing} does not exist; check the path (DataConfig.files, --data), or make it with "
        f"`regrow data prepare TEXTFILE... --out {missing}`")


def test_a_bin_whose_size_is_not_a_multiple_of_its_dtype_is_named(tmp_path) -> None:
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00" * 500 + b"\x01")
    message = _error(_config([str(path)]))
    assert message.startswith(f"token file {path} is 1001 bytes, not a multiple of 2 (the size of one uint16 id)")
    assert "--data-dtype" in message and "regrow data prepare" in message


def test_an_empty_or_too_short_token_file_is_named(tmp_path) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert _error(_config([str(empty)])).startswith(f"token file {empty} is empty (0 bytes)")
    short = _write_bin(tmp_path / "short.bin", np.arange(SEQ))
    assert _error(_config([short])).startswith(
        f"token file {short} holds {SEQ} tokens, fewer than one window of seq_len+1={SEQ + 1}; lower "
        "DataConfig.seq_len (--seq-len)")
    empty_npy = tmp_path / "empty.npy"
    np.save(empty_npy, np.zeros(0, dtype=np.uint16))
    assert _error(_config([str(empty_npy)])).startswith(f"token file {empty_npy} is empty (0 tokens)")


def test_a_wrong_dtype_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"DataConfig.token_dtype='int32' is invalid: allowed values are uint16, "
                                         r"uint32"):
        DataConfig(files=("a.bin",), token_dtype="int32")
    with pytest.raises(ValueError, match=r"DataConfig.files\[0\]='tokens.txt' must be a path ending in .bin or .npy"):
        DataConfig(files=("tokens.txt",))
    path = _write_bin(tmp_path / "t.bin", np.arange(400), sidecar={
        "dtype": "uint16", "vocab_size": 400, "tokens": 400, "tokenizer": None, "files": []})
    assert _error(_config([path], token_dtype="uint32")).startswith(
        f"token file {path}: DataConfig.token_dtype='uint32' (--data-dtype) but its sidecar {path}.json says "
        "'uint16'; drop --data-dtype")
    stale = _write_bin(tmp_path / "stale.bin", np.arange(400), sidecar={
        "dtype": "uint16", "vocab_size": 400, "tokens": 999, "tokenizer": None, "files": []})
    assert "says 999: one of them is stale" in _error(_config([stale]))


@pytest.mark.parametrize("array, found", [
    (np.arange(400, dtype=np.int64), "<i8 (int64) ids; token files hold uint16 or uint32"),
    (np.arange(400, dtype=np.float32), "<f4 (float32) ids"),
    (np.arange(400, dtype=">u2"), ">u2 (uint16) ids"),
])
def test_an_npy_of_another_dtype_is_named(tmp_path, array, found) -> None:
    path = tmp_path / "t.npy"
    np.save(path, array)
    assert _error(_config([str(path)])).startswith(f"token file {path} holds {found}")


def test_an_npy_of_more_than_one_dimension_or_with_objects_is_named(tmp_path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.zeros((4, 100), dtype=np.uint16))
    assert _error(_config([str(path)])) == (
        f"token file {path} has shape (4, 100); a token file is one flat array of ids: save ids.reshape(-1)")
    np.save(path, np.array([1, "x"], dtype=object), allow_pickle=True)
    assert "is not a readable .npy array" in _error(_config([str(path)]))


def test_fewer_windows_than_one_global_batch_is_named(tmp_path) -> None:
    path = _write_bin(tmp_path / "t.bin", np.arange(200))
    assert _error(_config([path], global_batch=16, micro_batch=16)) == (
        "DataConfig.global_batch=16 exceeds the 11 training windows of seq_len=16 in DataConfig.files (1 file(s)); "
        "lower global_batch or seq_len, or use more data")


def test_an_id_above_the_vocabulary_names_the_file_position_id_and_vocabulary(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tf, "SCAN_CHUNK_TOKENS", 64)  # several chunks: the position is the file's, not the chunk's
    ids = np.arange(1000) % 250
    ids[777], ids[900] = 300, 400
    good = _write_bin(tmp_path / "good.bin", np.arange(1000) % 250)
    bad = _write_bin(tmp_path / "bad.bin", ids)
    Sampler(_config([good]), 0, 1, vocab_size=250)
    assert _error(_config([good, bad]), vocab_size=256) == (
        f"token file {bad} holds token id 300 at position 777, but the model's vocabulary has 256 ids (0..255); "
        "tokenize the text with the model's tokenizer (`regrow data prepare --tokenizer DIR`) or use a model whose "
        "vocab_size covers the file's ids")
    from regrow.trainer.data import load_corpus

    corpus = load_corpus()
    at = int(torch.nonzero(corpus >= 100)[0])
    assert _error(_config([]), vocab_size=100).startswith(  # the embedded corpus is checked the same way
        f"the embedded corpus (pydoc_data.topics) holds token id {int(corpus[at])} at position {at}, but the model's "
        "vocabulary has 100 ids")
