"""Data: embedded corpus integrity, tokenizers, prepare -> uint16 token files, batches of (seed, step)."""
import json

import numpy as np
import pytest
import torch

from int8flow.data import (EOT, Tokenizer, ensure_prepared, eval_offsets, find_gpt2_files, gather_batch,
                           load_gpt2, load_prepared, prepare, read_embedded, read_texts, step_offsets, train_bpe)

TEXT_A = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
TEXT_B = "The quality of mercy is not strain'd,\nIt droppeth as the gentle rain from heaven\n" * 40


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT_A)
    (folder / "sub" / "b.md").write_text(TEXT_B)
    (folder / "ignored.bin").write_bytes(b"\xff\x00")
    return folder


def test_embedded_corpus_is_complete_and_checked():
    docs = read_embedded()
    assert len(docs) == 42
    assert sum(len(d.text) for d in docs) == 5_057_198  # NOTICE.md: raw size of the 42 texts
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert any("HAMLET" in d.text for d in docs)


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts([tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no text files"):
        read_texts([tmp_path / "empty"])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_texts([bad])


def test_trained_bpe_round_trip_and_determinism():
    texts = [TEXT_A, TEXT_B]
    tok = train_bpe(texts, 300)
    again = train_bpe(texts, 300)
    assert tok.hf.to_str() == again.hf.to_str()
    assert tok.vocab_size <= 300 and tok.eot_id == tok.hf.token_to_id(EOT)
    sample = "Whether 'tis nobler, café \u2603\n\n  x"
    assert tok.decode(tok.encode(sample)) == sample  # byte-level: any UTF-8 round-trips
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(texts, 100)


def test_gpt2_tokenizer_ships_with_the_package():
    """Issue 15 item 12: the GPT-2 presets need no extra install (the files ship in int8flow/data/gpt2), and the
    package data is declared so a wheel carries them."""
    import tomllib
    from pathlib import Path

    import int8flow

    assert find_gpt2_files() is not None
    root = Path(int8flow.__file__).parent.parent
    if (root / "pyproject.toml").is_file():
        data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
        assert "gpt2/*" in data["int8flow.data"]


def test_gpt2_tokenizer_known_ids():
    tok = load_gpt2()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("a" + EOT) == [64, 50256]


def test_gpt2_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_gpt2(tmp_path)
    (tmp_path / "encoder.json").write_text("{not json")
    (tmp_path / "vocab.bpe").write_text("#version\na b\n")
    with pytest.raises(ValueError, match="malformed"):
        load_gpt2(tmp_path)


def test_prepare_writes_token_files(text_dir, tmp_path):
    out = tmp_path / "prep"
    meta = prepare([str(text_dir)], out, tokenizer="bpe", vocab_size=320, val_fraction=0.2)
    data = load_prepared(out)
    assert meta["documents"] == 2 and data.meta == meta
    assert data.train.dtype == np.uint16 and data.train.size == meta["train_tokens"]
    # every document ends with EOT in both splits; decoding the splits gives back the texts
    eot = data.tokenizer.eot_id
    assert int((np.asarray(data.train) == eot).sum()) == 2 and int((np.asarray(data.val) == eot).sum()) == 2
    joined = data.tokenizer.decode(np.asarray(data.train).tolist()) + data.tokenizer.decode(np.asarray(data.val).tolist())
    assert sorted(joined.replace(EOT, "")) == sorted(TEXT_A + TEXT_B)
    assert 0.15 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.25


def test_prepare_cache_and_corruption(text_dir, tmp_path):
    out = tmp_path / "prep"
    first = ensure_prepared([str(text_dir)], out, vocab_size=320)
    stamp = (out / "train.bin").stat().st_mtime_ns
    ensure_prepared([str(text_dir)], out, vocab_size=320)
    assert (out / "train.bin").stat().st_mtime_ns == stamp  # cache hit: not rewritten
    second = ensure_prepared([str(text_dir)], out, vocab_size=300)  # other settings: prepared again
    assert second.meta["key"] != first.meta["key"]
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="val.bin.*truncated"):
        load_prepared(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="malformed JSON"):
        load_prepared(out)
    with pytest.raises(FileNotFoundError, match="int8flow prepare"):
        load_prepared(tmp_path)


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a = step_offsets(seed=1, step=5, n_seqs=8, n_tokens=1000, seq_len=17)
    assert torch.equal(a, step_offsets(1, 5, 8, 1000, 17))
    assert not torch.equal(a, step_offsets(1, 6, 8, 1000, 17))
    assert not torch.equal(a, step_offsets(2, 5, 8, 1000, 17))
    x, y = gather_batch(tokens, a, 17)
    assert x.shape == (8, 17) and x.dtype == torch.int64
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
    ev = eval_offsets(5, 1000, 17)
    assert ev[0] == 0 and ev[-1] == 1000 - 17 - 1
    with pytest.raises(ValueError, match="seq_len"):
        step_offsets(0, 0, 1, 10, 17)
