"""``regrow data prepare`` (byte-level and with a tiny local Hugging Face tokenizer built here, no download) and
``regrow train --data`` (its errors, and a run whose loss does not depend on the number of ranks)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from regrow.launch import cli, data_cli
from regrow.launch.parser import parse_options
from regrow.trainer.data import DataConfig, Sampler

WORDS = ["[UNK]", "[EOS]", "the", "model", "learns", "from", "tokens", "regrow", "keeps", "state"]


def _tokenizer(directory, extra_words: int = 0) -> str:
    """A word-level tokenizer with an EOS token, saved as Hugging Face saves one (``save_pretrained``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + [f"w{k}" for k in range(extra_words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        str(directory))
    return str(directory)


def _ids(text: str) -> list[int]:
    return [WORDS.index(w) if w in WORDS else 0 for w in text.split()]


def _prepare(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["data", "prepare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_byte_level_prepare_writes_the_files_bytes_and_a_sidecar(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes("héllo\nregrow\n".encode())
    b.write_bytes(b"\x00\xffbinary too")
    out = tmp_path / "tokens.bin"
    code, stdout, _ = _prepare(capsys, str(a), str(b), "--out", str(out))
    assert code == 0
    expected = a.read_bytes() + b.read_bytes()
    assert np.fromfile(out, dtype="<u2").tolist() == list(expected)
    assert json.loads((tmp_path / "tokens.bin.json").read_text()) == {
        "dtype": "uint16", "vocab_size": 256, "tokens": len(expected), "tokenizer": None,
        "files": [str(a.resolve()), str(b.resolve())]}
    assert f"wrote {out}: {len(expected)} uint16 tokens, vocabulary 256 (byte-level)" in stdout
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # like any new file, not a temp file's 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    code, _, _ = _prepare(capsys, str(a), "--out", str(out), "--dtype", "uint32")
    assert code == 0 and np.fromfile(out, dtype="<u4").tolist() == list(a.read_bytes())
    assert json.loads((tmp_path / "tokens.bin.json").read_text())["dtype"] == "uint32"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tokenizer_prepare_puts_eos_between_files_and_the_sampler_reads_it(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(data_cli, "TEXT_PIECE_BYTES", 16)  # many pieces, each cut at a line end
    monkeypatch.setattr(data_cli, "PROGRESS_EVERY_BYTES", 64)
    tokenizer = _tokenizer(tmp_path / "tok")
    first = "the model learns\nfrom tokens and more\n" * 20
    second = "regrow keeps state\nthe state\n" * 20
    (tmp_path / "a.txt").write_text(first)
    (tmp_path / "b.txt").write_text(second)
    out = tmp_path / "tokens.bin"
    code, _, err = _prepare(capsys, str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(out),
                            "--tokenizer", tokenizer)
    assert code == 0, err
    expected = _ids(first) + [WORDS.index("[EOS]")] + _ids(second)
    assert np.fromfile(out, dtype="<u2").tolist() == expected
    sidecar = json.loads((tmp_path / "tokens.bin.json").read_text())
    assert sidecar["dtype"] == "uint16" and sidecar["vocab_size"] == len(WORDS)
    assert sidecar["tokenizer"] == str((tmp_path / "tok").resolve()) and sidecar["tokens"] == len(expected)
    assert "MiB read" in err  # progress lines for (what counts as) a large input
    config = DataConfig(seq_len=8, micro_batch=2, global_batch=4, files=(str(out),), val_fraction=0.2)
    sampler = Sampler(config, 0, 1, vocab_size=len(WORDS))
    x, _ = sampler.next_micro_batch()
    start = int(sampler.last_window_ids[0]) * 8
    assert x[0].tolist() == expected[start : start + 8]


def test_a_vocabulary_over_65536_is_written_as_uint32_and_an_explicit_uint16_is_refused(tmp_path, capsys) -> None:
    tokenizer = _tokenizer(tmp_path / "big", extra_words=65536)
    (tmp_path / "a.txt").write_text("w65535 the w65000\n")
    out = tmp_path / "t.bin"
    code, _, err = _prepare(capsys, str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", tokenizer)
    assert code == 0, err
    assert np.fromfile(out, dtype="<u4").tolist() == [len(WORDS) + 65535, 2, len(WORDS) + 65000]
    assert json.loads((tmp_path / "t.bin.json").read_text())["dtype"] == "uint32"
    out.unlink()
    code, _, err = _prepare(capsys, str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", tokenizer,
                            "--dtype", "uint16")
    assert code == 2 and not out.exists()
    assert err.strip() == (f"regrow data prepare: --dtype uint16 cannot hold the tokenizer's {len(WORDS) + 65536} "
                           "ids (at most 65536); use --dtype uint32 or leave --dtype out")


def test_prepare_errors_name_the_input_and_the_fix(tmp_path, capsys) -> None:
    text = tmp_path / "a.txt"
    text.write_text("the model\n")
    out = tmp_path / "t.bin"
    cases = [
        ([str(tmp_path / "missing.txt"), "--out", str(out)], f"input {tmp_path / 'missing.txt'} does not exist"),
        ([str(text), "--out", str(tmp_path / "t.dat")], f"--out {tmp_path / 't.dat'} must end in .bin"),
        ([str(text), "--out", str(tmp_path / "no" / "t.bin")],
         f"--out {tmp_path / 'no' / 't.bin'}: directory {tmp_path / 'no'} does not exist"),
        ([str(text), "--out", str(out), "--tokenizer", str(tmp_path / "none")],
         f"--tokenizer {tmp_path / 'none'} is not a directory"),
        ([str(text), "--out", str(out), "--tokenizer", str(tmp_path)],
         f"--tokenizer {tmp_path} holds none of tokenizer.json, tokenizer_config.json"),
    ]
    for args, message in cases:
        code, _, err = _prepare(capsys, *args)
        assert code == 2 and err.startswith(f"regrow data prepare: {message}"), err
        assert len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    code, _, err = _prepare(capsys, str(text), "--out", str(out), "--tokenizer", str(broken))
    assert code == 2 and err.startswith(f"regrow data prepare: --tokenizer {broken}: no tokenizer could be loaded "
                                        "from it ("), err
    assert len(err.strip().splitlines()) == 1
    # A failure while tokenizing leaves an earlier --out as it was (the write goes to a temporary file).
    out.write_bytes(b"keep")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    code, _, err = _prepare(capsys, str(tmp_path / "latin1.txt"), "--out", str(out), "--tokenizer",
                            _tokenizer(tmp_path / "tok"))
    assert code == 2 and f"{tmp_path / 'latin1.txt'} is not UTF-8 text" in err
    assert out.read_bytes() == b"keep" and [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    (tmp_path / "empty.txt").write_text("")
    code, _, err = _prepare(capsys, str(tmp_path / "empty.txt"), "--out", str(out))
    assert code == 2 and "the inputs hold no text" in err and out.read_bytes() == b"keep"


# ------------------------------------------------------------------------------------------ regrow train --data


def test_train_data_flags_become_the_data_config_with_absolute_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    options = parse_options(["train", "--data", "a.bin", "sub/b.npy", "--data-dtype", "uint32", "--seq-len", "32"])
    assert options.train.data == ["a.bin", "sub/b.npy"] and options.train.data_dtype == "uint32"
    config = options.train.data_config(None)
    assert config.files == (str(tmp_path / "a.bin"), str(tmp_path / "sub" / "b.npy"))
    assert config.token_dtype == "uint32"
    assert parse_options(["train"]).train.data_config(None).files == ()


def test_train_reports_every_bad_token_file_at_once_and_ids_above_the_model_vocabulary(tmp_path, capsys) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01" * 4001)
    flags = ["--nproc", "1", "--preset", "tiny", "--steps", "2", "--global-batch", "4", "--micro-batch", "4"]
    assert cli.main(["train", *flags, "--data", str(odd), str(tmp_path / "gone.bin")]) == 2
    err = capsys.readouterr().err
    assert f"token file {odd} is 4001 bytes, not a multiple of 2" in err
    assert f"token file {tmp_path / 'gone.bin'} does not exist" in err
    wide = np.arange(4000) % 256
    wide[1234] = 300
    wide.astype("<u2").tofile(tmp_path / "wide.bin")
    assert cli.main(["train", *flags, "--data", str(tmp_path / "wide.bin")]) == 2
    err = capsys.readouterr().err
    assert (f"token file {tmp_path / 'wide.bin'} holds token id 300 at position 1234, but the model's vocabulary "
            "has 256 ids (0..255)") in err


@pytest.mark.timeout(300)
def test_train_on_a_token_file_ends_with_the_same_loss_at_two_ranks_as_at_one(tmp_path, capsys) -> None:
    from regrow.trainer.data import load_corpus

    (tmp_path / "a.txt").write_bytes(load_corpus()[:200_000].numpy().tobytes())
    assert cli.main(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "tokens.bin")]) == 0
    losses = {}
    for nproc in (1, 2):
        metrics = tmp_path / f"m{nproc}.jsonl"
        code = cli.main(["train", "--data", str(tmp_path / "tokens.bin"), "--nproc", str(nproc), "--steps", "4",
                         "--preset", "tiny", "--seq-len", "64", "--global-batch", "8", "--micro-batch", "4",
                         "--log-every", "0", "--metrics", str(metrics), "--timeout", "240"])
        assert code == 0, capsys.readouterr().err[-2000:]
        losses[nproc] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses[1]) == 4
    assert losses[2] == pytest.approx(losses[1], rel=1e-6, abs=0)
