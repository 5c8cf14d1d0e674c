"""LayerNorm and RMSNorm, forward and backward, INT8 or float in and out.

Row-wise operators need whole rows, and a 32x32 output block needs 32 rows: each program owns a
band of ``ROWS`` rows (a multiple of the output block's rows) and walks the features in chunks of
``BLOCK_D`` columns (a multiple of the block's columns).

Forward: pass 1 reads the band to get each row's statistics (chunked Welford merge for LayerNorm,
sum of squares for RMSNorm); pass 2 reads it again, normalizes and writes each chunk's blocks once.
The band (32 rows x D) was just read, so pass 2 is served from L2 and x is read from HBM once. When
the statistics are already known (``mean=``/``rstd=``, computed by the fused residual add, as Jetfire
does) pass 1 is skipped.

Backward (``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``g = dy * w``, means over the full
width D): pass 1 accumulates the two row sums over every chunk, pass 2 writes dx. ``dweight``/``dbias``
are column sums over all rows: a persistent grid of programs each adds its bands into its own row of
a float32 partial buffer, and one small ``sum(0)`` over the programs finishes them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch
from ._blockquant import emit_tile, load_operand, row_stats_update
from ._launch import (
    Output, band_launch, check_eps, check_same_shape, check_stats, check_vector, interpreting, num_sms, operand,
    stream_seed,
)

@triton.jit
def _norm_fwd_kernel(x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                     w_ptr, b_ptr, mean_ptr, rstd_ptr,
                     y_ptr, y_scale, Y_Q: tl.constexpr, Y_QR: tl.constexpr, Y_QC: tl.constexpr,
                     STOCHASTIC: tl.constexpr,
                     M, N, eps, seed,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATS_GIVEN: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = (x - mean) * rstd * w + b (RMS: x * rstd * w) for rows [pid*ROWS, +ROWS); stores mean/rstd (M,)."""
    row0 = tl.program_id(0) * ROWS
    rows = row0 + tl.arange(0, ROWS)
    row_ok = rows < M
    if STATS_GIVEN:
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        mean = tl.zeros((ROWS,), tl.float32)
        if not RMS:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    else:
        mean = tl.zeros((ROWS,), tl.float32)
        m2 = tl.zeros((ROWS,), tl.float32)  # sum of squared deviations (RMS: sum of squares)
        for c0 in range(0, N, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            x = load_operand(x_ptr, x_scale, rows, cols, M, N, X_Q, X_QR, X_QC)
            mean, m2 = row_stats_update(mean, m2, x, c0, N, BLOCK_D, RMS)
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        if not RMS:
            tl.store(mean_ptr + rows, mean, mask=row_ok)
    for c0 in range(0, N, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        x = load_operand(x_ptr, x_scale, rows, cols, M, N, X_Q, X_QR, X_QC)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        emit_tile(y, y_ptr, y_scale, row0, c0, M, N, seed, ROWS, BLOCK_D, Y_Q, Y_QR, Y_QC, STOCHASTIC)


@triton.jit
def _bwd_chunk(dy_ptr, dy_scale, x_ptr, x_scale, w_ptr, mean, rstd, rows, cols, M, N,
               DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
               X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr, HAS_W: tl.constexpr):
    """(dy, xhat, g = dy * w) of one chunk; both backward passes recompute them instead of keeping the band."""
    dy = load_operand(dy_ptr, dy_scale, rows, cols, M, N, DY_Q, DY_QR, DY_QC)
    x = load_operand(x_ptr, x_scale, rows, cols, M, N, X_Q, X_QR, X_QC)
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = dy
    if HAS_W:
        g = dy * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return dy, xhat, g


@triton.jit
def _norm_bwd_kernel(dy_ptr, dy_scale, DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
                     x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                     w_ptr, mean_ptr, rstd_ptr,
                     dx_ptr, dx_scale, DX_Q: tl.constexpr, DX_QR: tl.constexpr, DX_QC: tl.constexpr,
                     STOCHASTIC: tl.constexpr,
                     dw_part_ptr, db_part_ptr,
                     M, N, seed,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx for bands pid, pid + P, ...; adds column sums of dy * xhat and dy into partial row pid (P, N)."""
    pid = tl.program_id(0)
    part_row = pid.to(tl.int64) * N
    for band in range(pid, tl.cdiv(M, ROWS), tl.num_programs(0)):
        row0 = band * ROWS
        rows = row0 + tl.arange(0, ROWS)
        row_ok = rows < M
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        mean = tl.zeros((ROWS,), tl.float32)
        if not RMS:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        sum_g = tl.zeros((ROWS,), tl.float32)
        sum_gx = tl.zeros((ROWS,), tl.float32)
        for c0 in range(0, N, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            dy, xhat, g = _bwd_chunk(dy_ptr, dy_scale, x_ptr, x_scale, w_ptr, mean, rstd, rows, cols, M, N,
                                     DY_Q, DY_QR, DY_QC, X_Q, X_QR, X_QC, HAS_W)
            sum_g += tl.sum(g, axis=1)
            sum_gx += tl.sum(g * xhat, axis=1)
        mean_g = sum_g / N
        mean_gx = sum_gx / N
        for c0 in range(0, N, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < N
            dy, xhat, g = _bwd_chunk(dy_ptr, dy_scale, x_ptr, x_scale, w_ptr, mean, rstd, rows, cols, M, N,
                                     DY_Q, DY_QR, DY_QC, X_Q, X_QR, X_QC, HAS_W)
            if HAS_W:
                dw = tl.load(dw_part_ptr + part_row + cols, mask=col_ok, other=0.0)
                tl.store(dw_part_ptr + part_row + cols, dw + tl.sum(dy * xhat, axis=0), mask=col_ok)
            if RMS:
                dx = rstd[:, None] * (g - xhat * mean_gx[:, None])
            else:
                dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
                db = tl.load(db_part_ptr + part_row + cols, mask=col_ok, other=0.0)
                tl.store(db_part_ptr + part_row + cols, db + tl.sum(dy, axis=0), mask=col_ok)
            emit_tile(dx, dx_ptr, dx_scale, row0, c0, M, N, seed, ROWS, BLOCK_D, DX_Q, DX_QR, DX_QC, STOCHASTIC)


def _persistent_programs(n_bands: int, device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return min(n_bands, 4)  # small, so the CPU tests walk the multi-band loop
    return min(n_bands, 4 * num_sms(device.index if device.index is not None else torch.cuda.current_device()))


def _norm_forward(x, weight, bias, eps, rms, mean, rstd, out_dtype, out_block, rounding, seed):
    x_op = operand(x, "x")
    (m, n), device = x_op.shape, x_op.data.device
    check_vector(weight, "weight", n, device)
    check_vector(bias, "bias", n, device)
    check_eps(eps)
    stats_given = rstd is not None
    if stats_given:
        check_stats(rstd, "rstd", m, device)
        if not rms:
            if mean is None:
                raise ValueError("LayerNorm with precomputed statistics needs both mean= and rstd=")
            check_stats(mean, "mean", m, device)
    else:
        if mean is not None:
            raise ValueError("mean= was given without rstd=; pass both (from residual_add_forward) or neither")
        rstd = _launch.alloc(m, torch.float32, device)
        mean = None if rms else _launch.alloc(m, torch.float32, device)
    out = Output((m, n), device, out_dtype, out_block, rounding)
    meta = band_launch(n, out.qr, out.qc)
    _norm_fwd_kernel[(triton.cdiv(m, meta["ROWS"]),)](
        *x_op.args, weight, bias, mean, rstd, *out.args, m, n, float(eps), stream_seed(seed, 0),
        RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, STATS_GIVEN=stats_given, **meta)
    return out.result(), mean, rstd


def _norm_backward(dy, x, weight, mean, rstd, rms, out_dtype, out_block, rounding, seed):
    dy_op, x_op = operand(dy, "dy"), operand(x, "x")
    (m, n) = check_same_shape(("dy", dy_op), ("x", x_op))
    device = x_op.data.device
    check_vector(weight, "weight", n, device)
    check_stats(rstd, "rstd", m, device)
    if not rms:
        check_stats(mean, "mean", m, device)
    out = Output((m, n), device, out_dtype, out_block, rounding)
    meta = band_launch(n, out.qr, out.qc)
    programs = _persistent_programs(triton.cdiv(m, meta["ROWS"]), device)
    dw_part = torch.zeros((programs, n), dtype=torch.float32, device=device) if weight is not None else None
    db_part = torch.zeros((programs, n), dtype=torch.float32, device=device) if not rms else None
    _norm_bwd_kernel[(programs,)](
        *dy_op.args, *x_op.args, weight, mean, rstd, *out.args, dw_part, db_part, m, n, stream_seed(seed, 0),
        RMS=rms, HAS_W=weight is not None, **meta)
    dweight = dw_part.sum(dim=0) if weight is not None else None
    dbias = db_part.sum(dim=0) if not rms else None
    return out.result(), dweight, dbias


def layer_norm_forward(x, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                       eps: float = 1e-5, out_dtype: torch.dtype = torch.float32, out_block=None,
                       rounding: str = "nearest", seed: int = 0, *, mean: Optional[torch.Tensor] = None,
                       rstd: Optional[torch.Tensor] = None):
    """Returns (y, mean, rstd). Given ``mean``/``rstd`` (from the fused residual add) x is read once and they are returned as is."""
    return _norm_forward(x, weight, bias, eps, False, mean, rstd, out_dtype, out_block, rounding, seed)


def layer_norm_backward(dy, x, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                        out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                        seed: int = 0):
    """Returns (dx, dweight, dbias); dweight/dbias float32 (dweight None without weight)."""
    return _norm_backward(dy, x, weight, mean, rstd, False, out_dtype, out_block, rounding, seed)


def rms_norm_forward(x, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                     out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                     seed: int = 0, *, rstd: Optional[torch.Tensor] = None):
    """Returns (y, rstd). Given ``rstd`` (from the fused residual add) x is read once."""
    y, _, rstd = _norm_forward(x, weight, None, eps, True, None, rstd, out_dtype, out_block, rounding, seed)
    return y, rstd


def rms_norm_backward(dy, x, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                      out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                      seed: int = 0):
    """Returns (dx, dweight); dweight float32 (None without weight)."""
    dx, dweight, _ = _norm_backward(dy, x, weight, None, rstd, True, out_dtype, out_block, rounding, seed)
    return dx, dweight


__all__ = ["layer_norm_backward", "layer_norm_forward", "rms_norm_backward", "rms_norm_forward"]
