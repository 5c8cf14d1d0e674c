"""Shared by the training and reliability tests: a small prepared token folder and a small INT8 run config."""
from pathlib import Path

from int8flow.data import prepare, read_embedded
from int8flow.training import TrainConfig

# gpt-tiny cut to 2 layers on 32-token windows: the real INT8 data flow, a few hundredths of a second a step
TINY_INT8 = dict(model="gpt-tiny", precision="int8", model_args={"n_layer": 2}, seq_len=32, batch_size=4,
                 max_steps=8, warmup_steps=2, eval_interval=4, eval_batches=1, ckpt_interval=2, progress=False,
                 tensorboard=False, device="cpu", threads=1, seed=7)


def prepared_tokens(tmp_path_factory, docs: int, chars: int, vocab_size: int) -> Path:
    """The first ``chars`` characters of the first ``docs`` embedded texts, BPE-tokenized (~0.5 s)."""
    folder = tmp_path_factory.mktemp("tokens")
    texts = folder / "texts"
    texts.mkdir()
    for doc in read_embedded()[:docs]:
        (texts / f"{doc.name}.txt").write_text(doc.text[:chars])
    prepare([str(texts)], folder / "tokens", tokenizer="bpe", vocab_size=vocab_size)
    return folder / "tokens"


def tiny_int8_config(data_dir, out, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_INT8, "data": str(data_dir), "out_dir": str(out), **kw})
