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

from ..format import QTensor
from ..reference.nonlinear import ResidualAdd
from . import _launch
from ._blockquant import cast_rne, emit_tile, load_operand, row_stats_update, tile_coords
from ._launch import Output, band_launch, check_eps, check_same_shape, elementwise_launch, operand, stream_seed

NORM_STATS = (None, "layernorm", "rmsnorm")


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
    row0, col0, rows, cols = tile_coords(BM, BN)
    x = load_operand(x_ptr, x_scale, rows, cols, M, N, X_Q, X_QR, X_QC)
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
    if isinstance(residual, QTensor):
        raise TypeError("residual must be a float tensor (the high-precision stream), got a QTensor; "
                        "pass the float residual and the INT8 branch output as delta")
    check_eps(eps)
    r_op, d_op = operand(residual, "residual"), operand(delta, "delta")
    (m, n) = check_same_shape(("residual", r_op), ("delta", d_op))
    device = residual.device
    h = _launch.alloc((m, n), residual.dtype, device)
    h_q = Output((m, n), device, out_block=out_block, rounding=rounding) if out_block is not None else None
    hq_args = h_q.args if h_q is not None else (None, None, False, 1, 1, False)
    rstd = _launch.alloc(m, torch.float32, device) if stats else None
    mean = _launch.alloc(m, torch.float32, device) if stats == "layernorm" else None
    meta = band_launch(n, hq_args[3], hq_args[4])
    _residual_add_kernel[(triton.cdiv(m, meta["ROWS"]),)](
        residual, *d_op.args, h, *hq_args, mean, rstd, m, n, float(eps), stream_seed(seed, 0),
        STATS=NORM_STATS.index(stats), **meta)
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
