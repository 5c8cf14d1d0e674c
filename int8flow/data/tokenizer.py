"""Byte-level BPE tokenizers, all through Hugging Face ``tokenizers`` (no network access ever).

- GPT-2: the official ``encoder.json`` + ``vocab.bpe``, shipped in this package (``int8flow/data/gpt2/``,
  xz-compressed, 433 KB; MIT, see its NOTICE.md), or from a folder given by the user. 50257 ids,
  ``<|endoftext|>`` = 50256.
- Trained: a byte-level BPE trained on the corpus at prepare time (~1 s for 2k ids on 5 MB). The
  small vocabulary keeps the embedding of a tiny CPU model small.
"""
from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["EOT", "Tokenizer", "find_gpt2_files", "load_gpt2", "train_bpe", "resolve_tokenizer"]

EOT = "<|endoftext|>"
GPT2_FILES = ("encoder.json", "vocab.bpe")


class Tokenizer:
    """A byte-level BPE with an end-of-text id; ``kind`` is 'gpt2' or 'bpe'."""

    def __init__(self, hf: HFTokenizer, kind: str):
        eot_id = hf.token_to_id(EOT)
        if eot_id is None:
            raise ValueError(f"tokenizer has no {EOT!r} token; byte-level BPE tokenizers here need it "
                             "to separate documents")
        self.hf, self.kind, self.eot_id = hf, kind, eot_id

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path, kind: str = "bpe") -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizers JSON file ({err})") from None
        return cls(hf, kind)


def _byte_level(hf: HFTokenizer) -> HFTokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


BUNDLED_GPT2 = Path(__file__).parent / "gpt2"


def find_gpt2_files(folder: str | Path | None = None) -> tuple[Path, Path] | None:
    """(encoder.json, vocab.bpe) in ``folder`` (default: the copy shipped in this package, ``.xz``); None if
    absent."""
    if folder is None:
        encoder, merges = (BUNDLED_GPT2 / f"{name}.xz" for name in GPT2_FILES)
    else:
        encoder, merges = (Path(folder) / name for name in GPT2_FILES)
    return (encoder, merges) if encoder.is_file() and merges.is_file() else None


def _read_text(path: Path) -> str:
    return lzma.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".xz" else path.read_text("utf-8")


def load_gpt2(folder: str | Path | None = None) -> Tokenizer:
    """The GPT-2 tokenizer from ``folder`` (encoder.json + vocab.bpe), default the copy shipped in the package."""
    files = find_gpt2_files(folder)
    if files is None:
        where = folder if folder is not None else f"{BUNDLED_GPT2} (the package install is incomplete; reinstall it)"
        raise FileNotFoundError(
            f"GPT-2 tokenizer files {GPT2_FILES} not found in {where}; pass a folder holding them, "
            "or use tokenizer=bpe to train a small one on the corpus")
    encoder, merges = files
    try:
        vocab = json.loads(_read_text(encoder))
        lines = [line for line in _read_text(merges).splitlines()[1:] if line.strip()]  # line 1: "#version"
        bpe = models.BPE(vocab, [tuple(line.split(" ")) for line in lines])
    except Exception as err:  # malformed JSON, merges lines that are not pairs, tokenizers' bare Exception
        raise ValueError(f"GPT-2 tokenizer files {encoder} / {merges} are malformed: {err}") from None
    hf = _byte_level(HFTokenizer(bpe))
    hf.add_special_tokens([EOT])
    return Tokenizer(hf, "gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on ``texts`` (deterministic for the same texts and size)."""
    if not 257 <= vocab_size <= 65535:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs 257..65535 ids "
                         "(256 bytes + end-of-text; tokens are stored as uint16)")
    hf = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, "bpe")


def resolve_tokenizer(spec: str, texts: list[str], vocab_size: int) -> Tokenizer:
    """``spec``: 'bpe' (train), 'gpt2', 'auto' (gpt2 if its files are here, else bpe), a folder
    holding encoder.json + vocab.bpe, or a tokenizers JSON file."""
    if spec == "bpe":
        return train_bpe(texts, vocab_size)
    if spec == "gpt2":
        return load_gpt2()
    if spec == "auto":
        return load_gpt2() if find_gpt2_files() is not None else train_bpe(texts, vocab_size)
    path = Path(spec)
    if path.is_dir():
        return load_gpt2(path)
    if path.is_file():
        return Tokenizer.load(path)
    raise ValueError(f"tokenizer={spec!r}: expected 'bpe', 'gpt2', 'auto', a folder holding "
                     f"{' + '.join(GPT2_FILES)}, or a tokenizers JSON file")
