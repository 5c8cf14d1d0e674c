"""GPT-2 (nanoGPT layout and parameter names) in bf16, int8-linear, int8 and int8+fallback.

Parameter names follow nanoGPT: transformer.wte/wpe/h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj}/ln_f, lm_head (tied to wte). `from_hf_state_dict` loads Hugging Face GPT-2
weights (their Conv1D layers store weights transposed); `nanogpt_to_hf_state_dict` converts back.

Precision (constructor argument): ``bf16`` runs plain PyTorch; ``int8-linear`` swaps the block linear
layers for Int8Linear; ``int8``/``int8+fallback`` run each block through the fused INT8 data-flow ops
(int8flow.ops.flow) with these same parameters. Embeddings, attention (SDPA), the residual stream,
ln_f, lm_head and the loss stay in high precision in every mode, so runs are comparable.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import as_config
from ..nn import convert_to_int8_training
from ..ops.flow import linear_residual, mlp_residual, norm_linear


def attention_output_is_saved(y: torch.Tensor) -> bool:
    """Whether flattening SDPA's (B, T, H, hd)-view output ``y`` is a view of what SDPA saves for backward.

    The flash / memory-efficient / cuDNN kernels (and the CPU flash kernel) lay their output out as
    (B, T, H, hd), so ``y.flatten(2)`` shares its storage: the proj op can keep that reference instead of
    an INT8 copy of the same activation. Otherwise (math backend) the flatten copies and INT8 is smaller.
    """
    return y.is_contiguous()


_HOST_CHECKED = threading.local()


@contextlib.contextmanager
def token_ids_checked_on_host():
    """Forwards in this block skip the range check of `check_token_ids`: the caller checked the ids on the host
    before copying them to the device (the training loop does, once per batch), so the forward needs no
    device->host sync for it. The dtype check still runs."""
    before = getattr(_HOST_CHECKED, "on", False)
    _HOST_CHECKED.on = True
    try:
        yield
    finally:
        _HOST_CHECKED.on = before


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside [0, vocab_size) with the likely cause and fix, where the embedding would
    give a bare IndexError (on CUDA, a device-side assert that ends the process).

    One min/max over idx and, for a device tensor, one device sync per forward. Skipped under torch.compile
    (the check depends on the values, so it would break the graph), for meta tensors (no values) and inside
    `token_ids_checked_on_host` (the caller checked the ids before the host->device copy).
    """
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor (torch.long), got {idx.dtype}; pass token ids "
                        f"(e.g. torch.randint(0, {vocab_size}, (B, T))), not embeddings or activations")
    if torch.compiler.is_compiling() or idx.device.type == "meta" or idx.numel() == 0 \
            or getattr(_HOST_CHECKED, "on", False):
        return
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()
    if hi >= vocab_size:
        padded = -(-(hi + 1) // 64) * 64
        raise ValueError(
            f"the largest token id, {hi}, is out of range for vocab_size={vocab_size} (ids must be < {vocab_size}): the "
            f"tokenizer or data does not match the model; build the model with vocab_size > {hi} (e.g. "
            f"vocab_size={padded}) or encode with the tokenizer the model was built for")
    if lo < 0:
        raise ValueError(f"token id {lo} is negative (ids must be in [0, {vocab_size})); -1 marks ignored "
                         "positions in targets only, not in the input ids")


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def heads_out(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3C) fused q|k|v -> causal SDPA -> (B, T, H, hd), a view of SDPA's output."""
        B, T, _ = qkv.shape
        hd = self.n_embd // self.n_head  # explicit: a -1 cannot be inferred for an empty batch or sequence
        q, k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in qkv.split(self.n_embd, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3C) fused q|k|v -> causal SDPA -> (B, T, C)."""
        return self.heads_out(qkv).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.attend(self.c_attn(x)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        # fraction of fc2-input blocks computed at 16-bit in the last forward (int8+fallback only)
        self.register_buffer("fallback_rate", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, int8_flow=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.int8_flow = int8_flow  # an Int8TrainingConfig when this block runs the INT8 data flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_flow is None:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        cfg, attn, mlp = self.int8_flow, self.attn, self.mlp
        qkv = norm_linear(x, self.ln_1, attn.c_attn.weight, attn.c_attn.bias, cfg)
        y = attn.heads_out(qkv)
        h = linear_residual(y.flatten(2), attn.c_proj.weight, attn.c_proj.bias, x, cfg,
                            save_input=attention_output_is_saved(y))
        out, rate = mlp_residual(h, self.ln_2, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight,
                                 mlp.c_proj.bias, "gelu_tanh", cfg)
        if cfg.uses_fallback:
            mlp.fallback_rate.copy_(rate)
        return out


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, precision="bf16"):
        super().__init__()
        self.config = config
        self.int8_config = as_config(precision)
        self.precision = self.int8_config.precision
        flow = self.int8_config if self.int8_config.uses_data_flow else None
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, flow) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.precision == "int8-linear":
            convert_to_int8_training(self.transformer.h, self.int8_config)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None); targets -1 are ignored."""
        if idx.dim() != 2:
            raise ValueError(f"token ids must be 2-D (batch, sequence), got shape {tuple(idx.shape)}; for one sequence "
                             "pass idx[None]")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; pass at most "
                             f"{self.config.block_size} tokens, or build the model with block_size={T}")
        check_token_ids(idx, self.config.vocab_size)
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_hf_state_dict(cls, state_dict: dict, config: GPTConfig, precision="bf16") -> "GPT":
        """Build a model from a Hugging Face GPT2Model / GPT2LMHeadModel state dict."""
        model = cls(config, precision)
        model.load_state_dict(hf_to_nanogpt_state_dict(state_dict))
        return model


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_nanogpt_state_dict(state_dict: dict) -> dict:
    """Rename/transposes HF GPT-2 keys to ours: adds the ``transformer.`` prefix where missing,
    transposes Conv1D weights, drops the causal-mask buffers, and ties lm_head to wte."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not parameters
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        out[name] = value.t() if name.endswith(_CONV1D) else value
    if "transformer.wte.weight" not in out:
        raise KeyError("state dict has no wte.weight; is this a GPT-2 checkpoint?")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def nanogpt_to_hf_state_dict(state_dict: dict) -> dict:
    """Inverse of `hf_to_nanogpt_state_dict`: our (nanoGPT) names and layout to a Hugging Face
    GPT2LMHeadModel state dict - the same ``transformer.``/``lm_head.`` names, Conv1D weights transposed to
    (in, out) and made contiguous (safetensors stores no strides); lm_head.weight stays (HF ties it to wte)."""
    if "transformer.wte.weight" not in state_dict:
        raise KeyError("state dict has no transformer.wte.weight; is this a GPT (nanoGPT-layout) state dict?")
    return {k: v.t().contiguous() if k.endswith(_CONV1D) else v for k, v in state_dict.items()}
