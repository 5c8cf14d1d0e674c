"""Residual add fused with the INT8 copy and the next norm's row statistics (Jetfire's fusion).

``h = residual + delta`` is the high-precision residual stream (stored in the residual's dtype).
While the band of h is in registers the kernel also writes its INT8 copy (the next GEMM's or norm's
input) and accumulates the row statistics the next LayerNorm/RMSNorm needs, so that norm reads its
input once (``layer_norm_forward(..., mean=, rstd=)``). One pass: residual and delta read once, h and
h_q written once. Statistics are those of h as stored (rounded to the residual's dtype), like the
reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.nonlinear import ResidualAdd
from . import _blockquant
from ._blockquant import (
    Output, cast_rne, check_same_shape, elementwise_launch, emit_tile, load_operand, operand, row_stats_update, stream_seed,
)

NORM_STATS = (None, "layernorm", "rmsnorm")
TILE_ELEMENTS = 8192


@triton.jit
def _residual_add_kernel(r_ptr, d_ptr, d_scale, D_Q: tl.constexpr, D_QR: tl.constexpr, D_QC: tl.constexpr,
                         h_ptr, hq_ptr, hq_scale, HQ: tl.constexpr, HQ_QR: tl.constexpr, HQ_QC: tl.constexpr,
                         STOCHASTIC: tl.constexpr, mean_ptr, rstd_ptr, M, N, eps, seed,
                         STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [pid*ROWS, +ROWS): h = r + d, optional INT8 h_q, STATS 0 none / 1 LayerNorm / 2 RMSNorm."""
    row0 = tl.program_id(0) * ROWS
    rows = row0 + tl.arange(0, ROWS)
    row_ok = rows < M
    mean = tl.zeros((ROWS,), tl.float32)
    m2 = tl.zeros((ROWS,), tl.float32)
    for c0 in range(0, N, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < N)[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = load_operand(d_ptr, d_scale, rows, cols, M, N, D_Q, D_QR, D_QC)
        h = cast_rne(r + d, h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        h = h.to(tl.float32)
        if HQ:
            emit_tile(h, hq_ptr, hq_scale, row0, c0, M, N, seed, ROWS, BLOCK_D, True, HQ_QR, HQ_QC, STOCHASTIC)
        if STATS != 0:
            mean, m2 = row_stats_update(mean, m2, h, c0, N, BLOCK_D, STATS == 2)
    if STATS != 0:
        tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(m2 / N + eps), mask=row_ok)
    if STATS == 1:
        tl.store(mean_ptr + rows, mean, mask=row_ok)


@triton.jit
def _convert_kernel(x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                    out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                    STOCHASTIC: tl.constexpr, M, N, seed, BM: tl.constexpr, BN: tl.constexpr):
    """out = x in another format (float <-> per-block INT8, any block shapes)."""
    row0 = tl.program_id(0) * BM
    col0 = tl.program_id(1) * BN
    x = load_operand(x_ptr, x_scale, row0 + tl.arange(0, BM), col0 + tl.arange(0, BN), M, N, X_Q, X_QR, X_QC)
    emit_tile(x, out_ptr, out_scale, row0, col0, M, N, seed, BM, BN, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC)


def convert(x, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest", seed: int = 0):
    """x (float or QTensor) re-emitted as out_dtype or INT8 with out_block blocks, in one pass."""
    x_op = operand(x, "x")
    out = Output(x_op.shape, x_op.data.device, out_dtype, out_block, rounding)
    grid, meta = elementwise_launch(x_op.shape, out)
    _convert_kernel[grid](*x_op.args, *out.args, *x_op.shape, stream_seed(seed, 0), **meta)
    return out.result()


def residual_add_forward(residual: torch.Tensor, delta, stats=None, eps: float = 1e-5, out_block=None,
                         rounding: str = "nearest", seed: int = 0) -> ResidualAdd:
    """h = residual + delta (float (M, D) residual; delta float or QTensor) -> ResidualAdd(h, h_q, mean, rstd)."""
    if stats not in NORM_STATS:
        raise ValueError(f"stats must be one of {NORM_STATS}, got {stats!r}")
    if not isinstance(residual, torch.Tensor) or not residual.is_floating_point():
        raise TypeError(f"residual must be a float tensor (the high-precision stream), got {type(residual).__name__}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    r_op, d_op = operand(residual, "residual"), operand(delta, "delta")
    (m, n) = check_same_shape(("residual", r_op), ("delta", d_op))
    device = residual.device
    h = _blockquant.alloc((m, n), residual.dtype, device)
    h_q = Output((m, n), device, out_block=out_block, rounding=rounding) if out_block is not None else None
    hq_args = h_q.args if h_q is not None else (None, None, False, 1, 1, False)
    rstd = _blockquant.alloc(m, torch.float32, device) if stats else None
    mean = _blockquant.alloc(m, torch.float32, device) if stats == "layernorm" else None
    rows = max(hq_args[3], 4)
    block_d = max(hq_args[4], min(triton.next_power_of_2(n), TILE_ELEMENTS // rows))
    _residual_add_kernel[(triton.cdiv(m, rows),)](
        residual, *d_op.args, h, *hq_args, mean, rstd, m, n, float(eps), stream_seed(seed, 0),
        STATS=NORM_STATS.index(stats), ROWS=rows, BLOCK_D=block_d, num_warps=8 if rows * block_d >= 4096 else 4)
    return ResidualAdd(h, h_q.result() if h_q is not None else None, mean, rstd)


def residual_add_backward(dh, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                          seed: int = 0):
    """Returns (dresidual, ddelta): dh itself (float32 when dh is INT8) and dh in the requested format."""
    dh_op = operand(dh, "dh")
    dres = convert(dh) if dh_op.is_q else dh
    if out_block is None and not dh_op.is_q and dh.dtype == out_dtype:
        return dres, dh
    return dres, convert(dh, out_dtype, out_block, rounding, seed)


__all__ = ["NORM_STATS", "convert", "residual_add_backward", "residual_add_forward"]
