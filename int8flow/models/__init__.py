"""GPT-2 and Llama models in every precision mode, model presets and `build_model`.

Presets are data: name -> model config. The non-tiny Llama shapes follow common small-Llama
pretraining setups (60M/350M: dim 512/1024, SwiGLU width ~2.7x; 1B: TinyLlama-1.1B's shape with 4
KV heads); their vocab_size (32000) is a Llama tokenizer's, so pass ``vocab_size=`` for another
tokenizer. ``gpt-tiny``/``llama-tiny`` use a 256-token (byte-level) vocabulary and train in minutes
on a CPU.
"""
from __future__ import annotations

import dataclasses
from typing import Union

from torch import nn

from .gpt2 import GPT, GPTConfig, hf_to_nanogpt_state_dict, nanogpt_to_hf_state_dict
from .llama import Llama, LlamaConfig

MODEL_PRESETS: dict[str, Union[GPTConfig, LlamaConfig]] = {
    "gpt-tiny": GPTConfig(block_size=128, vocab_size=256, n_layer=4, n_head=4, n_embd=96),
    "gpt2-124m": GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": GPTConfig(block_size=1024, vocab_size=50304, n_layer=24, n_head=16, n_embd=1024),
    "llama-tiny": LlamaConfig(vocab_size=256, dim=96, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=128),
    "llama-60m": LlamaConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376),
    "llama-350m": LlamaConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=2816),
    "llama-1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                            max_seq_len=2048),
}

_MODEL_CLASS = {GPTConfig: GPT, LlamaConfig: Llama}


def build_model(name_or_config, precision="bf16", **overrides) -> nn.Module:
    """A fresh model from a preset name (or a GPTConfig/LlamaConfig), with config fields overridden.

    precision: ``bf16 | int8-linear | int8 | int8+fallback``, a recipe name such as ``jetfire``, or an
    Int8TrainingConfig. Example: ``build_model('gpt-tiny', 'int8', vocab_size=50304)``.
    """
    if isinstance(name_or_config, str):
        if name_or_config not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name_or_config!r}; presets: {sorted(MODEL_PRESETS)}")
        config = MODEL_PRESETS[name_or_config]
    elif type(name_or_config) in _MODEL_CLASS:
        config = name_or_config
    else:
        raise TypeError(f"build_model takes a preset name or a GPTConfig/LlamaConfig, got {type(name_or_config).__name__}")
    known = {f.name for f in dataclasses.fields(config)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    config = dataclasses.replace(config, **overrides)
    return _MODEL_CLASS[type(config)](config, precision)


__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "MODEL_PRESETS", "build_model", "hf_to_nanogpt_state_dict",
           "nanogpt_to_hf_state_dict"]
