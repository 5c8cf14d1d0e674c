"""Data: the embedded corpus, tokenizers, preparation into uint16 token files, batch sampling."""
from .corpus import EMBEDDED_CORPORA, Document, read_embedded, read_source, read_texts
from .loader import eval_offsets, gather_batch, step_offsets
from .prepare import PreparedData, ensure_prepared, load_prepared, prepare
from .tokenizer import EOT, Tokenizer, find_gpt2_files, load_gpt2, resolve_tokenizer, train_bpe

__all__ = [
    "EMBEDDED_CORPORA", "Document", "read_embedded", "read_source", "read_texts",
    "eval_offsets", "gather_batch", "step_offsets",
    "PreparedData", "ensure_prepared", "load_prepared", "prepare",
    "EOT", "Tokenizer", "find_gpt2_files", "load_gpt2", "resolve_tokenizer", "train_bpe",
]
