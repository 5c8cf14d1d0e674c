"""Fallback quantization: outlier activation blocks get a second INT8 term (~16-bit precision).

Our design (only the abstract of arXiv 2503.08040 is public): per tensor and per step, a block is
flagged when its absmax exceeds ``threshold`` times the median block absmax of the tensor; at most
``budget`` of the blocks (the largest ratios) are flagged. A flagged block is stored as
``x ~ s1*q1 + s2*q2`` where ``q2`` quantizes the residual ``x - s1*q1`` of the first quantization
(``s2 <= s1/254``), so its error is about 2^-15 of the block absmax instead of 2^-8. The GEMM adds
the second product for the flagged blocks only (here: a second operand whose other blocks are zero).

Where the term must be kept for backward it is stored compactly (`compact_term`: flagged block indices,
their INT8 blocks and scales) and expanded to the dense operand only transiently for the GEMM
(`expand_term`). The fused data-flow ops never store it: they recompute it from saved INT8 inputs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

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


def _blocked(data: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """(R, C) -> (GR, br, GC, bc) view of ``data`` zero-padded to whole blocks (a copy only when padding)."""
    (gr, gc), (br, bc) = block.grid(tuple(data.shape)), (block.rows, block.cols)
    pad_r, pad_c = gr * br - data.shape[0], gc * bc - data.shape[1]
    if pad_r or pad_c:
        data = F.pad(data, (0, pad_c, 0, pad_r))
    return data.reshape(gr, br, gc, bc)


def compact_term(x2_q: QTensor, capacity: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero blocks of a fallback term: (flat block indices int32 (k,), INT8 blocks (k, br, bc),
    scales float32 (k,)) - about 1 byte per element of the flagged blocks only, instead of a dense INT8
    tensor. A block whose scale is 0 holds only zeros, so it needs no storage.

    capacity: store exactly this many blocks (a static size, e.g. under torch.compile, where a
    data-dependent size would break the graph): the non-zero ones first, then zero blocks as padding
    (expanding those writes zeros where zeros are). It must be at least the number of non-zero blocks:
    the fallback budget bounds that number.
    """
    zero = (x2_q.scale.flatten() == 0).to(torch.int8)
    k = int(zero.numel() - zero.sum()) if capacity is None else capacity
    index = torch.argsort(zero, stable=True)[:k]
    gc = x2_q.scale.shape[1]
    blocks = _blocked(x2_q.data, x2_q.block)[index // gc, :, index % gc, :]
    return index.to(torch.int32), blocks, x2_q.scale.flatten()[index]


def expand_term(index: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, shape, block: BlockShape) -> QTensor:
    """Inverse of `compact_term`: the dense fallback operand of ``shape`` (zero outside the stored blocks)."""
    gr, gc = block.grid(tuple(shape))
    index = index.long()
    data = torch.zeros((gr, block.rows, gc, block.cols), dtype=torch.int8, device=blocks.device)
    data[index // gc, :, index % gc, :] = blocks
    dense_scale = torch.zeros(gr * gc, dtype=torch.float32, device=scale.device)
    dense_scale[index] = scale
    data = data.reshape(gr * block.rows, gc * block.cols)[: shape[0], : shape[1]]
    return QTensor(data.contiguous(), dense_scale.view(gr, gc), block)


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
