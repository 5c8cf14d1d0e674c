"""Fallback quantization: outlier activation blocks get a second INT8 term (~16-bit precision).

Our design (only the abstract of arXiv 2503.08040 is public): per tensor and per step, a block is
flagged when its absmax exceeds ``threshold`` times the median block absmax of the tensor; at most
``budget`` of the blocks (the largest ratios) are flagged. A flagged block is stored as
``x ~ s1*q1 + s2*q2`` where ``q2`` quantizes the residual ``x - s1*q1`` of the first quantization
(``s2 <= s1/254``), so its error is about 2^-15 of the block absmax instead of 2^-8. The GEMM adds
the second product for the flagged blocks only (here: a second operand whose other blocks are zero).
"""
from __future__ import annotations

import math

import torch

from ..format import QTensor, block_absmax, expand_scale
from ..format.blocks import BlockShape


def fallback_mask(x: torch.Tensor, block: BlockShape, threshold: float, budget: float) -> torch.Tensor:
    """Boolean grid of blocks to compute at 16-bit: absmax > threshold * median block absmax, capped by budget."""
    amax = block_absmax(x, block)
    ratio = amax / amax.median().clamp_min(torch.finfo(torch.float32).tiny)
    flagged = ratio > threshold
    k = math.floor(budget * ratio.numel())
    if k == 0:
        return torch.zeros_like(flagged)
    if k < ratio.numel():  # keep the k largest ratios (exactly k, ties broken by position)
        top = torch.topk(torch.where(flagged, ratio, -1.0).flatten(), k).indices
        keep = torch.zeros(ratio.numel(), dtype=torch.bool, device=ratio.device)
        keep[top] = True
        flagged &= keep.view_as(flagged)
    return flagged


def residual_term(x: torch.Tensor, x_q: QTensor, mask: torch.Tensor) -> torch.Tensor:
    """x - dequant(x_q) on the flagged blocks, zero elsewhere (float32): what the second INT8 term holds."""
    keep = expand_scale(mask.float(), x_q.block, tuple(x.shape))
    return (x.float() - x_q.dequantize(torch.float32)) * keep


def fallback_sqnr_sweep(x: torch.Tensor, w: torch.Tensor, thresholds, block: BlockShape, budget: float = 1.0):
    """Accuracy of ``x @ w.T`` vs float64 for each threshold (``inf`` = plain INT8).

    Returns rows (threshold, SQNR dB of the whole output, median per-row SQNR dB, fraction of blocks
    that fell back). The per-row median shows what ordinary tokens lose when they share a block with
    an outlier; the whole-output SQNR is dominated by the outlier rows themselves.
    """
    from ..format import quantize

    ref = x.double() @ w.double().t()
    w_hat = quantize(w, block).dequantize(torch.float64)
    x_q = quantize(x, block)
    rows = []
    for thr in thresholds:
        if math.isfinite(thr):
            mask = fallback_mask(x, block, thr, budget)
        else:
            mask = torch.zeros(block.grid(tuple(x.shape)), dtype=torch.bool)
        x_hat = x_q.dequantize(torch.float64)
        if bool(mask.any()):
            x_hat = x_hat + quantize(residual_term(x, x_q, mask), block).dequantize(torch.float64)
        err = (ref - x_hat @ w_hat.t()).pow(2)
        total = 10 * torch.log10(ref.pow(2).sum() / err.sum().clamp_min(1e-300))
        per_row = 10 * torch.log10(ref.pow(2).sum(1) / err.sum(1).clamp_min(1e-300))
        rows.append((thr, float(total), float(per_row.median()), float(mask.float().mean())))
    return rows
