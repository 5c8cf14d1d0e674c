"""Llama-style decoder (RMSNorm, SwiGLU, RoPE, no bias, optional GQA) with Hugging Face parameter names.

Names: model.embed_tokens, model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head - so a HF Llama state dict
loads with `load_state_dict` (see `from_hf_state_dict`). RoPE uses HF's rotate-half layout.

Precision as in gpt2.py: ``bf16``, ``int8-linear`` (Int8Linear layers), ``int8`` / ``int8+fallback``
(fused INT8 data-flow ops; norm -> QKV quantizes the q/k/v weights one by one, never copying them in
BF16, and runs one INT8 GEMM over their INT8 stack when block boundaries allow).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import as_config
from ..nn import convert_to_int8_training
from ..ops.flow import linear_residual, mlp_residual, norm_linear
from .gpt2 import attention_output_is_saved, check_token_ids


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_dim: int = 1376
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rope_tables(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half convention (Hugging Face Llama); cos/sin broadcast to x, e.g. (T, hd) against (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        hd, kv = config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, kv, bias=False)
        self.v_proj = nn.Linear(config.dim, kv, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, config.dim, bias=False)

    def qkv_weights(self) -> list[torch.Tensor]:
        """The q, k, v projection weights, which `norm_linear` stacks by rows (as INT8; no copy here)."""
        return [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]

    def heads_out(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, q|k|v) -> RoPE -> causal SDPA (GQA) -> (B, T, H, hd), a view of SDPA's output.

        q and k after RoPE and v are written into one tensor, whose views SDPA saves: the pre-RoPE qkv
        is then not kept alive by v alone (RoPE itself saves only the cos/sin tables).
        """
        c = self.config
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, c.n_heads + 2 * c.n_kv_heads, c.head_dim)
        qk, v = qkv.split([c.n_heads + c.n_kv_heads, c.n_kv_heads], dim=2)
        qk = apply_rope(qk, cos[:, None], sin[:, None]).to(v.dtype)
        q, k, v = torch.cat([qk, v], dim=2).transpose(1, 2).split([c.n_heads, c.n_kv_heads, c.n_kv_heads], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_kv_heads != c.n_heads)
        return y.transpose(1, 2)

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, q|k|v) -> RoPE -> causal SDPA (GQA) -> (B, T, dim)."""
        return self.heads_out(qkv, cos, sin).flatten(2)

    def forward(self, x, cos, sin):
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return self.o_proj(self.attend(qkv, cos, sin))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)
        # fraction of down_proj-input blocks computed at 16-bit in the last forward (int8+fallback only)
        self.register_buffer("fallback_rate", torch.zeros(()), persistent=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, int8_flow=None):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.int8_flow = int8_flow  # an Int8TrainingConfig when this layer runs the INT8 data flow

    def forward(self, x, cos, sin):
        if self.int8_flow is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))
        cfg, attn, mlp = self.int8_flow, self.self_attn, self.mlp
        qkv = norm_linear(x, self.input_layernorm, attn.qkv_weights(), None, cfg)
        y = attn.heads_out(qkv, cos, sin)
        h = linear_residual(y.flatten(2), attn.o_proj.weight, None, x, cfg, save_input=attention_output_is_saved(y))
        out, rate = mlp_residual(h, self.post_attention_layernorm, mlp.up_proj.weight, None,
                                 mlp.down_proj.weight, None, "swiglu", cfg, w_gate=mlp.gate_proj.weight)
        if cfg.uses_fallback:
            mlp.fallback_rate.copy_(rate)
        return out


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, precision="bf16"):
        super().__init__()
        self.config = config
        self.int8_config = as_config(precision)
        self.precision = self.int8_config.precision
        flow = self.int8_config if self.int8_config.uses_data_flow else None
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.model.layers = nn.ModuleList([DecoderLayer(config, flow) for _ in range(config.n_layers)])
        self.model.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if self.precision == "int8-linear":
            convert_to_int8_training(self.model.layers, self.int8_config)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding and not self.config.tie_embeddings else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None); targets -1 are ignored."""
        if idx.dim() != 2:
            raise ValueError(f"token ids must be 2-D (batch, sequence), got shape {tuple(idx.shape)}; for one sequence "
                             "pass idx[None]")
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}; pass at most "
                             f"{self.config.max_seq_len} tokens, or build the model with max_seq_len={T}")
        check_token_ids(idx, self.config.vocab_size)
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_hf_state_dict(cls, state_dict: dict, config: LlamaConfig, precision="bf16") -> "Llama":
        """Build a model from a Hugging Face LlamaForCausalLM state dict (same names; RoPE caches dropped)."""
        model = cls(config, precision)
        sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
        if config.tie_embeddings:
            sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
        model.load_state_dict(sd)
        return model
