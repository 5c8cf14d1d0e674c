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

Column-structured fallback (1xK activation blocks with weight blocks of the same K width, the default
1x128 / 128x128; ``Int8TrainingConfig.column_fallback``): a block is (row, K group of ``bk`` channels).
Per tensor, the ``G`` K groups (`group_capacity`: a static number from ``fallback_groups``) holding the
largest block ratios are chosen (`select_groups`: a top-G over the per-group maxima of the ratio grid,
read from the first quantization's scales, never from the dense tensor); inside them, the blocks over the
threshold (and within the budget) get the second term, computed on those ``G * bk`` columns only
(`ColumnTerm`). The GEMM then runs once over ``K + G * bk``: ``[x2_g | x_q] @ [w_g | w_q].T`` with ``w_g``
the weight's columns of the chosen groups (`primitives.gemm`), which equals ``x_q @ w.T + x2 @ w.T``
exactly. Flagged blocks outside the chosen groups get no second term: real LLM outliers are channel-wise,
so the flagged blocks of a tensor share a few K groups. No data-dependent shape and no host sync
anywhere. Backward needs no fallback term: the weight gradient reads the activation's transposed copy
(blocks along the tokens, one channel each), quantized from the float values, which an outlier channel
does not crush.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..format import QTensor, block_absmax, expand_scale
from ..format.blocks import BlockShape


def median_all(t: torch.Tensor) -> torch.Tensor:
    """The median of all elements (0-d): the lower of the two middle values for an even count, as ``t.median()``,
    by ``kthvalue`` (a radix select: one kernel on CUDA, where ``median()`` sorts the whole tensor, ~8 launches).
    NaN ranks above every number here (``median()`` would return NaN); the kernels flag NaN/Inf blocks anyway.
    An empty tensor gives NaN, as ``median()`` (``kthvalue`` would raise): `fallback_mask` of an empty activation
    is an empty mask."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return flat.new_full((), math.nan)
    return flat.kthvalue((flat.numel() + 1) // 2).values


def fallback_mask(x: torch.Tensor, block: BlockShape, threshold: float, budget: float) -> torch.Tensor:
    """Boolean grid of blocks to compute at 16-bit: absmax > threshold * median block absmax, capped by budget."""
    amax = block_absmax(x, block)
    ratio = amax / median_all(amax).clamp_min(torch.finfo(torch.float32).tiny)
    flagged = ratio > threshold
    k = math.floor(budget * ratio.numel())
    if k == 0:
        return torch.zeros_like(flagged)
    if k < ratio.numel():  # keep the k largest ratios (exactly k, ties broken by position)
        top = torch.topk(torch.where(flagged, ratio, -1.0).flatten(), k).indices
        keep = torch.zeros(ratio.numel(), dtype=torch.bool, device=ratio.device).index_fill_(0, top, True)
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


# --- column-structured fallback (1xK activation blocks) ---------------------------------------------


def group_capacity(n_groups: int, fraction: float) -> int:
    """G: how many of a tensor's ``n_groups`` K groups may carry a fallback term (static; at least 1)."""
    return min(n_groups, max(1, math.ceil(fraction * n_groups - 1e-9)))


class ColumnTerm(NamedTuple):
    """The second INT8 term of a 1xK-block activation (M, K), on its ``G`` chosen K groups only.

    q: QTensor (M, G * bk), 1 x bk blocks: group ``i`` holds columns ``groups[i] * bk ... + bk`` of the
    activation's residual (zero blocks with scale 0 where a block is not flagged; zeros past K in a tail group).
    groups: int64 (G,), ascending, distinct.
    a: the GEMM's extended A operand ``[q | x_q]`` (M, G * bk + K) when the fused kernel wrote it with the term
    (``kernels.fallback_term``, CUDA: then ``q`` is a view of its first G * bk columns and `primitives.with_term`
    returns it as is), else None (`with_term` concatenates).
    """

    q: QTensor
    groups: torch.Tensor
    a: Optional[QTensor] = None

    def dense(self, k: int) -> QTensor:
        """The same term as a dense (M, k) QTensor, zero outside the chosen groups (the two-term reference)."""
        m, bk = self.q.shape[0], self.q.block.cols
        n_groups = -(-k // bk)
        data = torch.zeros((m, n_groups, bk), dtype=torch.int8, device=self.q.device)
        data[:, self.groups] = self.q.data.reshape(m, -1, bk)
        scale = torch.zeros((self.q.scale.shape[0], n_groups), dtype=torch.float32, device=self.q.device)
        scale[:, self.groups] = self.q.scale
        return QTensor(data.reshape(m, n_groups * bk)[:, :k].contiguous(), scale, self.q.block)


_ARANGES: dict = {}


def _arange_row(bk: int, device: torch.device) -> torch.Tensor:
    """``arange(bk)`` as a (1, bk) int64 row, made once per (device, bk) and reused: it is constant, and the column
    gathers of the fallback path (several per activation, every step) then cost one launch each instead of three.
    Never cached while a CUDA graph is being captured (it would live in the graph's private pool)."""
    key = (device, bk)
    row = _ARANGES.get(key)
    if row is None:
        row = torch.arange(bk, device=device).unsqueeze(0)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ARANGES[key] = row
    return row


def group_columns(groups: torch.Tensor, bk: int, k: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Column indices (G * bk,) of ``groups`` (clamped into [0, k)) and which are inside [0, k) (None: all)."""
    idx = torch.add(_arange_row(bk, groups.device), groups[:, None], alpha=bk).flatten()  # bk * g + j, one launch
    if k % bk == 0:
        return idx, None
    return idx.clamp_max(k - 1), idx < k


def gather_groups(x: torch.Tensor, groups: torch.Tensor, bk: int) -> torch.Tensor:
    """``x[:, columns of groups]`` (R, G * bk): a gather of those columns only; zeros past x's last column."""
    idx, valid = group_columns(groups, bk, x.shape[1])
    out = x.index_select(1, idx)
    return out if valid is None else torch.where(valid, out, 0)  # scalar 0: no separate fill launch


def gather_groups_q(q: QTensor, groups: torch.Tensor) -> QTensor:
    """The columns of K groups ``groups`` of a QTensor with blocks ``bk`` wide along K (any block height):
    INT8 data (R, G * bk) and their scale columns; exact (a block's values and scale move together)."""
    return QTensor(gather_groups(q.data, groups, q.block.cols), q.scale.index_select(1, groups), q.block)


def select_groups(scale: torch.Tensor, threshold: float, budget: float, capacity: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which blocks of a 1xK-block activation get a second term, from its first quantization's scales.

    scale: float32 (M, n_groups), one per block (absmax / 127, so ratios of scales are ratios of block absmax up
    to one rounding). A block's ratio is its scale over the median block scale of the tensor (as
    `fallback_mask`). The ``capacity`` groups with the largest per-group maximum ratio are chosen; a block of
    theirs is flagged when its ratio exceeds ``threshold`` and, when the budget binds (``floor(budget * blocks)
    < M * capacity``), it is among that many largest ratios. Returns (groups int64 (capacity,) ascending,
    flags bool (M, capacity)). All static shapes, no host sync.
    """
    m, n_groups = scale.shape
    if not min(1, n_groups) <= capacity <= n_groups:
        raise ValueError(f"select_groups: capacity must be in [1, {n_groups}] (the K groups), got {capacity}; "
                         "use group_capacity(n_groups, fraction)")
    if m == 0 or n_groups == 0:  # an empty tensor: nothing to flag (and no median)
        return (torch.arange(capacity, device=scale.device),
                torch.zeros((m, capacity), dtype=torch.bool, device=scale.device))
    ratio = scale / median_all(scale).clamp_min(torch.finfo(torch.float32).tiny)
    if capacity == n_groups:
        groups = torch.arange(n_groups, device=scale.device)
    else:
        groups = torch.topk(ratio.amax(dim=0), capacity).indices.sort().values
    ratio = ratio.index_select(1, groups)
    flags = ratio > threshold
    k = math.floor(budget * m * n_groups)
    if k == 0:
        return groups, torch.zeros_like(flags)
    if k < flags.numel():  # the budget binds: the k largest flagged ratios (ties broken by position)
        top = torch.topk(torch.where(flags, ratio, -1.0).flatten(), k).indices
        # index_fill_, not keep[top] = True: the latter copies a CPU scalar, which a CUDA graph capture refuses
        keep = torch.zeros(flags.numel(), dtype=torch.bool, device=flags.device).index_fill_(0, top, True)
        flags &= keep.view_as(flags)
    return groups, flags


def column_residual(values: torch.Tensor, x_q_g: QTensor, flags: torch.Tensor, groups: torch.Tensor,
                    k: int) -> torch.Tensor:
    """float32 (M, G * bk): ``values - dequant(x_q_g)`` on the flagged blocks (flags (M, G)), zero elsewhere and
    past the activation's last column ``k`` (a tail group's padding, where ``values`` may hold anything)."""
    m, g, bk = flags.shape[0], flags.shape[1], x_q_g.block.cols
    r = (values.float() - x_q_g.dequantize(torch.float32)).view(m, g, bk)
    keep = flags[:, :, None]
    if k % bk:  # a tail group: its padding columns are zero too
        keep = keep & group_columns(groups, bk, k)[1].view(1, g, bk)
    return torch.where(keep, r, 0.0).view(m, g * bk)
