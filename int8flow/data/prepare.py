"""Text -> memory-mapped uint16 token files: train.bin, val.bin, tokenizer.json, meta.json.

Each document is tokenized whole and ended with the end-of-text id; the last ``val_fraction`` of
every document goes to val.bin, so validation covers every document. meta.json is written last and
names a content key (texts + tokenizer settings): a folder whose key matches is reused as a cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .corpus import Document, read_source
from .tokenizer import Tokenizer, resolve_tokenizer

__all__ = ["PreparedData", "prepare", "load_prepared", "ensure_prepared"]

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16


@dataclass
class PreparedData:
    folder: Path
    train: np.memmap
    val: np.memmap
    tokenizer: Tokenizer
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def _content_key(docs: list[Document], tokenizer: str, vocab_size: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{tokenizer}|{vocab_size}|{val_fraction!r}".encode())
    for doc in docs:
        h.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
    return h.hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(source: str | list[str], out_dir: str | Path, tokenizer: str = "bpe", vocab_size: int = 2048,
            val_fraction: float = 0.1, docs: list[Document] | None = None,
            say: Callable[[str], None] | None = None) -> dict:
    """Tokenize ``source`` (embedded corpus name or text paths) into ``out_dir``; returns meta.

    ``say`` (e.g. print) gets one line per stage, so a first run is not silent while it prepares."""
    say = say or (lambda msg: None)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction in (0, 1), e.g. 0.1")
    t0 = time.perf_counter()
    docs = read_source(source) if docs is None else docs
    chars = sum(len(d.text) for d in docs)
    say(f"int8flow: preparing {source if isinstance(source, str) else ', '.join(map(str, source))} "
        f"({len(docs)} documents, {chars / 1e6:.1f}M characters) into {out_dir}; once, later runs reuse it")
    if tokenizer == "bpe":
        say(f"int8flow:   training a {vocab_size}-id byte-level BPE tokenizer on it")
    tok = resolve_tokenizer(tokenizer, [d.text for d in docs], vocab_size)
    if tok.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids; token files are uint16 (at most 65536)")
    say(f"int8flow:   tokenizing with the {tok.kind} tokenizer ({tok.vocab_size} ids)")
    train_parts, val_parts = [], []
    for ids in tok.encode_batch([d.text for d in docs]):
        n_val = int(len(ids) * val_fraction)
        cut = len(ids) - n_val
        train_parts.append(np.asarray(ids[:cut] + [tok.eot_id], dtype=TOKEN_DTYPE))
        val_parts.append(np.asarray(ids[cut:] + [tok.eot_id], dtype=TOKEN_DTYPE))
    train, val = np.concatenate(train_parts), np.concatenate(val_parts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is invalid until meta.json is back
    tok.save(out / "tokenizer.json")
    _write_atomic(out / "train.bin", train.tobytes())
    _write_atomic(out / "val.bin", val.tobytes())
    meta = {
        "format": FORMAT_VERSION,
        "key": _content_key(docs, tokenizer, vocab_size, val_fraction),
        "source": source if isinstance(source, str) else [str(s) for s in source],
        "documents": len(docs),
        "characters": sum(len(d.text) for d in docs),
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "val_fraction": val_fraction,
    }
    _write_atomic(out / "meta.json", json.dumps(meta, indent=1).encode())
    say(f"int8flow:   {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens in "
        f"{time.perf_counter() - t0:.1f} s")
    return meta


def load_prepared(folder: str | Path) -> PreparedData:
    """Open a prepared folder; sizes are checked against meta.json (truncated files -> error)."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {folder} is not a prepared data folder "
                                "(run `int8flow prepare TEXT... --out DIR` first)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: malformed JSON ({err}); re-run `int8flow prepare`") from None
    if meta.get("format") != FORMAT_VERSION or meta.get("dtype") != np.dtype(TOKEN_DTYPE).name:
        raise ValueError(f"{meta_path}: format {meta.get('format')}/{meta.get('dtype')}, expected "
                         f"{FORMAT_VERSION}/{np.dtype(TOKEN_DTYPE).name}; re-run `int8flow prepare`")
    arrays = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * np.dtype(TOKEN_DTYPE).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            got = path.stat().st_size if path.is_file() else "missing"
            raise ValueError(f"{path}: {got} bytes, meta.json says {expected}; the file is truncated or "
                             "from another preparation, re-run `int8flow prepare`")
        arrays[split] = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    tok = Tokenizer.load(folder / "tokenizer.json", kind=meta["tokenizer"])
    if tok.vocab_size != meta["vocab_size"]:
        raise ValueError(f"{folder / 'tokenizer.json'}: {tok.vocab_size} ids, meta.json says {meta['vocab_size']}")
    return PreparedData(folder, arrays["train"], arrays["val"], tok, meta)


def ensure_prepared(source: str | list[str], folder: str | Path, tokenizer: str = "bpe",
                    vocab_size: int = 2048, val_fraction: float = 0.1,
                    say: Callable[[str], None] | None = None) -> PreparedData:
    """Reuse ``folder`` if it holds this exact preparation, else (re)prepare it."""
    docs = read_source(source)
    key = _content_key(docs, tokenizer, vocab_size, val_fraction)
    meta_path = Path(folder) / "meta.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("key") == key:
                return load_prepared(folder)
        except (ValueError, FileNotFoundError):
            pass  # unreadable cache: prepare again below
    prepare(source, folder, tokenizer, vocab_size, val_fraction, docs=docs, say=say)
    return load_prepared(folder)
