"""Batches as a pure function of (seed, step): resume is exact and the global batch of a step is the
same whatever the number of processes (each rank takes its own slice of it)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["step_offsets", "eval_offsets", "gather_batch"]


def _generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.blake2b(f"int8flow:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def step_offsets(seed: int, step: int, n_seqs: int, n_tokens: int, seq_len: int) -> torch.Tensor:
    """Start offsets of the ``n_seqs`` training windows of ``step`` (uniform over the token file)."""
    high = n_tokens - seq_len - 1
    if high <= 0:
        raise ValueError(f"token file has {n_tokens} tokens, too few for seq_len={seq_len}; "
                         "lower seq_len or prepare more text")
    return torch.randint(0, high, (n_seqs,), generator=_generator(seed, step))


def eval_offsets(n_seqs: int, n_tokens: int, seq_len: int) -> torch.Tensor:
    """Evenly spaced fixed windows: every evaluation sees the same tokens, so val losses compare."""
    high = n_tokens - seq_len - 1
    if high <= 0:
        raise ValueError(f"val file has {n_tokens} tokens, too few for seq_len={seq_len}; "
                         "lower seq_len or raise val_fraction when preparing")
    return torch.linspace(0, high, n_seqs).long()


def gather_batch(tokens: np.ndarray, offsets: torch.Tensor, seq_len: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 [len(offsets), seq_len]; targets are inputs shifted by one."""
    rows = np.stack([np.asarray(tokens[o:o + seq_len + 1], dtype=np.int64) for o in offsets.tolist()])
    batch = torch.from_numpy(rows)
    x, y = batch[:, :-1], batch[:, 1:]
    if torch.device(device).type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True))
    return x.contiguous(), y.contiguous()
