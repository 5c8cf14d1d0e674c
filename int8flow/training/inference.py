"""Use a checkpoint after training: rebuild its model, sample text, export plain BF16 weights."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import Tokenizer
from .checkpoint import MODEL_FILE, CheckpointError, check_state_dict, load_checkpoint, save_weights

__all__ = ["load_model", "generate", "sample_text", "export_weights", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("nanogpt", "hf")


def load_model(path: str | Path, device: str | torch.device = "cpu", precision: str | None = None):
    """(model in eval mode, tokenizer, checkpoint) from a checkpoint or run folder."""
    from ..models import build_model

    ckpt = load_checkpoint(path, with_trainer=False)
    config = ckpt.state.get("config")
    if not config or "model_kwargs" not in ckpt.state:
        raise CheckpointError(f"{ckpt.path / 'state.json'}: no model config recorded; not an int8flow run checkpoint")
    model = build_model(config["model"], precision=precision or config["precision"], **ckpt.state["model_kwargs"])
    check_state_dict(ckpt.model, model.state_dict(), ckpt.path / MODEL_FILE)
    model.load_state_dict(ckpt.model)
    tok_path = ckpt.path.parent.parent / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path, kind=ckpt.state.get("data", {}).get("tokenizer", "bpe"))
    return model.to(device).eval(), tokenizer, ckpt


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context: int, temperature: float = 0.8,
             top_k: int | None = 200, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled ids to ``idx`` (B, T), feeding at most ``context`` ids back."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: expected > 0 (e.g. 0.8)")
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -context:])
        logits = logits[:, -1, :].float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def sample_text(path: str | Path, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 200, seed: int = 0, device: str = "cpu", precision: str | None = None) -> str:
    model, tokenizer, ckpt = load_model(path, device, precision)
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, ckpt.state["config"]["seq_len"],
                   temperature, top_k, generator)
    return tokenizer.decode(out[0].tolist())


def export_weights(path: str | Path, fmt: str, out: str | Path) -> Path:
    """Plain BF16 state dict (safetensors) with nanoGPT names (GPT) or Hugging Face names (GPT, Llama)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    ckpt = load_checkpoint(path, with_trainer=False)
    state_dict = dict(ckpt.model)
    is_gpt = "transformer.wte.weight" in state_dict
    if not is_gpt and fmt == "nanogpt":
        raise ValueError(f"{ckpt.path}: a Llama checkpoint has no nanoGPT layout; export it with --format hf")
    if is_gpt and fmt == "hf":
        from ..models import nanogpt_to_hf_state_dict

        state_dict = nanogpt_to_hf_state_dict(state_dict)
    # every tensor its own copy: loaders that expect both tied names (nanoGPT, HF) find both
    plain = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).clone() for k, v in state_dict.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = ckpt.state.get("config", {})
    save_weights(plain, out, metadata={"format": fmt, "model": str(config.get("model")),
                                       "trained_precision": str(config.get("precision")), "step": str(ckpt.step)})
    return out
