"""LayerNorm and RMSNorm, forward and backward, INT8 or float in and out.

Tiles are [R, G, C] (``_blockquant.load3`` / ``emit3``): R rows, G groups of C contiguous columns,
C the output block's width (128 for float outputs), so loads and stores are 16-byte vectors and block
scales are per-(row, group) values.

Whole rows (``ONE``; every D of the data flow up to 16384 with 1xK output blocks): a program holds R
complete rows (padded to a power of two) in registers, so the input is read once and the output written
once; the row statistics are register reductions. The backward kernel is persistent (a few programs per
SM walk the bands) and keeps the column sums for dweight/dbias in registers across its bands: each
program writes one partial row and a tiny ``sum(0)`` over the programs finishes them (no second pass).

Chunks (2-D output blocks such as 32x32, or the transposed copy ``with_t``, whose 1x128 blocks along M
need 128 rows): a band of R rows is walked in column chunks twice, statistics first, the band re-read
from L2 for the output. Given the statistics (``mean=``/``rstd=`` from the fused residual add, as Jetfire
does) the forward pass skips the first walk.

``with_t=True`` (1xK output blocks) also writes the transposed output quantized in 1xK blocks along M
(``quantize_transposed`` semantics, the K-major operand of the weight-gradient GEMM) from the same
registers; the output is then the pair (y_q, y_t_q).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..format import QTensor
from . import _launch, nonfinite
from ._blockquant import emit3, emit3_t, load3, row_stats3
from ._launch import (
    Output, check_eps, check_int32_addressable, check_same_shape, check_stats, check_vector, interpreting, num_sms,
    operand, row_launch, seed_args,
)


@triton.jit
def _vec(ptr, gcol, N, C: tl.constexpr):
    cols = gcol[:, None] + tl.arange(0, C)[None, :]
    return tl.load(ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :, :]


@triton.jit
def _normalize(x, mean, rstd, w_ptr, b_ptr, gcol, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr, C: tl.constexpr):
    y = (x - mean[:, None, None]) * rstd[:, None, None]
    if HAS_W:
        y = y * _vec(w_ptr, gcol, N, C)
    if HAS_B:
        y = y + _vec(b_ptr, gcol, N, C)
    return y


@triton.jit(do_not_specialize=['salt', 'salt_t'])
def _norm_fwd_kernel(x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                     w_ptr, b_ptr, mean_ptr, rstd_ptr,
                     y_ptr, y_scale, Y_Q: tl.constexpr, Y_QR: tl.constexpr, Y_QC: tl.constexpr,
                     STOCHASTIC: tl.constexpr, yt_ptr, yt_scale, WITH_T: tl.constexpr,
                     M, N, eps, seed_ptr, salt, salt_t, flag_ptr, flag_code,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATS_GIVEN: tl.constexpr,
                     R: tl.constexpr, G: tl.constexpr, C: tl.constexpr, ONE: tl.constexpr,
                     ROW_OUT: tl.constexpr = True):
    """y = (x - mean) * rstd * w + b (RMS: x * rstd * w) for rows [pid*R, +R); stores mean/rstd (M,).
    ROW_OUT=False: only the transposed copy (``with_t='only'``)."""
    BD: tl.constexpr = G * C
    row0 = tl.program_id(0) * R
    rows = row0 + tl.arange(0, R)
    row_ok = rows < M
    gcol0 = tl.arange(0, G) * C
    mean = tl.zeros((R,), tl.float32)
    if STATS_GIVEN:
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if not RMS:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    if ONE:
        x = load3(x_ptr, x_scale, rows, gcol0, M, N, X_Q, X_QR, X_QC, C)
        if not STATS_GIVEN:
            mean, m2 = row_stats3(mean, tl.zeros((R,), tl.float32), x, 0, N, BD, RMS, C)
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
        y = _normalize(x, mean, rstd, w_ptr, b_ptr, gcol0, N, HAS_W, HAS_B, C)
        emit3(y, y_ptr, y_scale, rows, gcol0, M, N, seed_ptr, salt, flag_ptr, flag_code, Y_Q, Y_QR, Y_QC, STOCHASTIC, R, G, C)
    else:
        if not STATS_GIVEN:
            m2 = tl.zeros((R,), tl.float32)
            for c0 in range(0, N, BD):
                x = load3(x_ptr, x_scale, rows, c0 + gcol0, M, N, X_Q, X_QR, X_QC, C)
                mean, m2 = row_stats3(mean, m2, x, c0, N, BD, RMS, C)
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # given the statistics, programs along grid axis 1 split the columns (a [rows, N] band would otherwise be
        # one program's serial walk: 64 programs for 8192 rows in 128-row bands); else axis 1 has one program
        for c0 in range(tl.program_id(1) * BD, N, BD * tl.num_programs(1)):
            gcol = c0 + gcol0
            x = load3(x_ptr, x_scale, rows, gcol, M, N, X_Q, X_QR, X_QC, C)
            y = _normalize(x, mean, rstd, w_ptr, b_ptr, gcol, N, HAS_W, HAS_B, C)
            if ROW_OUT:
                emit3(y, y_ptr, y_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, Y_Q, Y_QR, Y_QC, STOCHASTIC,
                      R, G, C)
            if WITH_T:
                emit3_t(y, yt_ptr, yt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)
    if not STATS_GIVEN:
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        if not RMS:
            tl.store(mean_ptr + rows, mean, mask=row_ok)


@triton.jit
def _bwd_tile(dy_ptr, dy_scale, x_ptr, x_scale, w_ptr, mean, rstd, rows, gcol, M, N,
              DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
              X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr, HAS_W: tl.constexpr, C: tl.constexpr):
    """(dy, xhat, g = dy * w) of one [R, G, C] tile."""
    dy = load3(dy_ptr, dy_scale, rows, gcol, M, N, DY_Q, DY_QR, DY_QC, C)
    x = load3(x_ptr, x_scale, rows, gcol, M, N, X_Q, X_QR, X_QC, C)
    xhat = (x - mean[:, None, None]) * rstd[:, None, None]
    g = dy
    if HAS_W:
        g = dy * _vec(w_ptr, gcol, N, C)
    return dy, xhat, g


@triton.jit
def _row_sums(g, xhat):
    return tl.sum(tl.sum(g, axis=2), axis=1), tl.sum(tl.sum(g * xhat, axis=2), axis=1)


@triton.jit
def _dx(g, xhat, rstd, mean_g, mean_gx, RMS: tl.constexpr):
    if RMS:
        return rstd[:, None, None] * (g - xhat * mean_gx[:, None, None])
    return rstd[:, None, None] * (g - mean_g[:, None, None] - xhat * mean_gx[:, None, None])


@triton.jit
def _finish_dx(dx, dxs_ptr, res_ptr, rows, gcol, M, N, HAS_DXS: tl.constexpr, HAS_RES: tl.constexpr,
               C: tl.constexpr):
    """``dx * dxs[row] + res``: the per-row factor and the residual branch's gradient, in registers."""
    if HAS_DXS:
        dx = dx * tl.load(dxs_ptr + rows, mask=rows < M, other=0.0)[:, None, None]
    if HAS_RES:
        dx = dx + load3(res_ptr, res_ptr, rows, gcol, M, N, False, 1, 1, C)
    return dx


@triton.jit(do_not_specialize=['salt', 'salt_t'])
def _norm_bwd_kernel(dy_ptr, dy_scale, DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
                     x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                     w_ptr, mean_ptr, rstd_ptr,
                     dx_ptr, dx_scale, DX_Q: tl.constexpr, DX_QR: tl.constexpr, DX_QC: tl.constexpr,
                     STOCHASTIC: tl.constexpr, dxt_ptr, dxt_scale, WITH_T: tl.constexpr,
                     dw_part_ptr, db_part_ptr,
                     M, N, seed_ptr, salt, salt_t, flag_ptr, flag_code,
                     RMS: tl.constexpr, HAS_W: tl.constexpr,
                     R: tl.constexpr, G: tl.constexpr, C: tl.constexpr, ONE: tl.constexpr,
                     dxs_ptr=None, res_ptr=None, HAS_DXS: tl.constexpr = False, HAS_RES: tl.constexpr = False):
    """dx for bands pid, pid + P, ...; column sums of dy * xhat and dy into partial row pid of (P, N).
    HAS_DXS / HAS_RES: dx * dxs[row] + res (float or bf16 (M, N)) before dx is written."""
    BD: tl.constexpr = G * C
    pid = tl.program_id(0)
    part_row = pid * N
    gcol0 = tl.arange(0, G) * C
    pcols0 = gcol0[:, None] + tl.arange(0, C)[None, :]  # [G, C] columns of a chunk
    dw_acc = tl.zeros((G, C), tl.float32)
    db_acc = tl.zeros((G, C), tl.float32)
    for band in range(pid, tl.cdiv(M, R), tl.num_programs(0)):
        row0 = band * R
        rows = row0 + tl.arange(0, R)
        row_ok = rows < M
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        mean = tl.zeros((R,), tl.float32)
        if not RMS:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        if ONE:
            dy, xhat, g = _bwd_tile(dy_ptr, dy_scale, x_ptr, x_scale, w_ptr, mean, rstd, rows, gcol0, M, N,
                                    DY_Q, DY_QR, DY_QC, X_Q, X_QR, X_QC, HAS_W, C)
            sum_g, sum_gx = _row_sums(g, xhat)
            dx = _finish_dx(_dx(g, xhat, rstd, sum_g / N, sum_gx / N, RMS), dxs_ptr, res_ptr, rows, gcol0, M, N,
                            HAS_DXS, HAS_RES, C)
            emit3(dx, dx_ptr, dx_scale, rows, gcol0, M, N, seed_ptr, salt, flag_ptr, flag_code, DX_Q, DX_QR, DX_QC,
                  STOCHASTIC, R, G, C)
            if HAS_W:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if not RMS:
                db_acc += tl.sum(dy, axis=0)
        else:
            sum_g = tl.zeros((R,), tl.float32)
            sum_gx = tl.zeros((R,), tl.float32)
            for c0 in range(0, N, BD):
                dy, xhat, g = _bwd_tile(dy_ptr, dy_scale, x_ptr, x_scale, w_ptr, mean, rstd, rows, c0 + gcol0, M, N,
                                        DY_Q, DY_QR, DY_QC, X_Q, X_QR, X_QC, HAS_W, C)
                sg, sgx = _row_sums(g, xhat)
                sum_g += sg
                sum_gx += sgx
            mean_g = sum_g / N
            mean_gx = sum_gx / N
            for c0 in range(0, N, BD):
                gcol = c0 + gcol0
                dy, xhat, g = _bwd_tile(dy_ptr, dy_scale, x_ptr, x_scale, w_ptr, mean, rstd, rows, gcol, M, N,
                                        DY_Q, DY_QR, DY_QC, X_Q, X_QR, X_QC, HAS_W, C)
                dx = _finish_dx(_dx(g, xhat, rstd, mean_g, mean_gx, RMS), dxs_ptr, res_ptr, rows, gcol, M, N,
                                HAS_DXS, HAS_RES, C)
                emit3(dx, dx_ptr, dx_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, DX_Q, DX_QR, DX_QC,
                      STOCHASTIC, R, G, C)
                if WITH_T:
                    emit3_t(dx, dxt_ptr, dxt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code,
                            STOCHASTIC, R, C)
                pcols = c0 + pcols0
                if HAS_W:
                    dw = tl.load(dw_part_ptr + part_row + pcols, mask=pcols < N, other=0.0)
                    tl.store(dw_part_ptr + part_row + pcols, dw + tl.sum(dy * xhat, axis=0), mask=pcols < N)
                if not RMS:
                    db = tl.load(db_part_ptr + part_row + pcols, mask=pcols < N, other=0.0)
                    tl.store(db_part_ptr + part_row + pcols, db + tl.sum(dy, axis=0), mask=pcols < N)
    if ONE:
        if HAS_W:
            tl.store(dw_part_ptr + part_row + pcols0, dw_acc, mask=pcols0 < N)
        if not RMS:
            tl.store(db_part_ptr + part_row + pcols0, db_acc, mask=pcols0 < N)


def _persistent_programs(n_bands: int, device: torch.device, per_sm: int = 4) -> int:
    if interpreting() or device.type != "cuda":
        return min(n_bands, 4)  # small, so the CPU tests walk the multi-band loop
    return min(n_bands, per_sm * num_sms(device.index if device.index is not None else torch.cuda.current_device()))


def _norm_forward(x, weight, bias, eps, rms, mean, rstd, out_dtype, out_block, rounding, seed, with_t, op, salt=0):
    x_op = operand(x, "x")
    (m, n), device = x_op.shape, x_op.data.device
    check_int32_addressable(x_op.data, "x")
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
    out = Output((m, n), device, out_dtype, out_block, rounding, with_t, t_only_ok=True)
    meta = row_launch(n, out, t_only_cols=_launch.t_cols(x_op) if stats_given and not out.row else 0)
    flag, code = nonfinite.flag_args(device, op)
    if m:
        split = stats_given and not meta["ONE"]  # column chunks need no row reduction: one program each
        grid = (triton.cdiv(m, meta["R"]), triton.cdiv(n, meta["G"] * meta["C"]) if split else 1)
        _norm_fwd_kernel[grid](
            *x_op.args, weight, bias, mean, rstd, *out.args, *out.t_args, m, n, float(eps),
            *seed_args(seed, salt, device, out.stochastic, flag), flag, code, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
            STATS_GIVEN=stats_given, ROW_OUT=out.row, **meta)
    return out.result(), mean, rstd


def _norm_backward(dy, x, weight, mean, rstd, rms, out_dtype, out_block, rounding, seed, with_t, op,
                   dx_scale=None, residual=None, salt=0):
    dy_op, x_op = operand(dy, "dy"), operand(x, "x")
    (m, n) = check_same_shape(("dy", dy_op), ("x", x_op))
    device = x_op.data.device
    check_int32_addressable(x_op.data, "x")
    check_vector(weight, "weight", n, device)
    check_stats(rstd, "rstd", m, device)
    if not rms:
        check_stats(mean, "mean", m, device)
    if dx_scale is not None:
        check_stats(dx_scale, "dx_scale", m, device)
    if residual is not None:
        if isinstance(residual, QTensor):
            raise TypeError("residual must be a float tensor (the residual branch's gradient), got a QTensor; "
                            "pass residual.dequantize()")
        check_same_shape(("dy", dy_op), ("residual", operand(residual, "residual")))
    out = Output((m, n), device, out_dtype, out_block, rounding, with_t)
    # Whole rows up to 8192 (dy, xhat, g and two column-sum rows stay in registers); wider rows walk chunks
    # of 8-row bands, one program per SM so that the band re-read in the second walk stays in L2.
    meta = row_launch(n, out, max_row=8192, chunk_rows=8, per_thread=4)
    programs = max(1, _persistent_programs(triton.cdiv(m, meta["R"]), device, 4 if meta["ONE"] else 1))
    # ONE: each program writes its whole partial row once; chunks accumulate into it (needs zeros).
    part = (lambda: _launch.alloc((programs, n), torch.float32, device)) if meta["ONE"] and m >= programs else \
        (lambda: torch.zeros((programs, n), dtype=torch.float32, device=device))
    dw_part = part() if weight is not None else None
    db_part = part() if not rms else None
    flag, code = nonfinite.flag_args(device, op)
    if m:
        _norm_bwd_kernel[(programs,)](
            *dy_op.args, *x_op.args, weight, mean, rstd, *out.args, *out.t_args, dw_part, db_part, m, n,
            *seed_args(seed, salt, device, out.stochastic, flag), flag, code, RMS=rms, HAS_W=weight is not None, **meta,
            dxs_ptr=dx_scale, res_ptr=residual, HAS_DXS=dx_scale is not None, HAS_RES=residual is not None)
        dweight = dw_part.sum(dim=0) if weight is not None else None
        dbias = db_part.sum(dim=0) if not rms else None
    else:
        dweight = torch.zeros(n, dtype=torch.float32, device=device) if weight is not None else None
        dbias = torch.zeros(n, dtype=torch.float32, device=device) if not rms else None
    return out.result(), dweight, dbias


def layer_norm_forward(x, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                       eps: float = 1e-5, out_dtype: torch.dtype = torch.float32, out_block=None,
                       rounding: str = "nearest", seed=0, *, mean: Optional[torch.Tensor] = None,
                       rstd: Optional[torch.Tensor] = None, with_t=False, salt: int = 0):
    """Returns (y, mean, rstd): x (M, D) float or QTensor; y float (out_dtype) or QTensor (out_block), with
    ``with_t`` the pair (y_q, y_t_q) (``with_t='only'``: y_t_q alone); mean/rstd float32 (M,). Given ``mean``/``rstd`` (from the fused
    residual add) x is read once and they are returned as is."""
    return _norm_forward(x, weight, bias, eps, False, mean, rstd, out_dtype, out_block, rounding, seed, with_t,
                         "layer_norm_forward", salt)


def layer_norm_backward(dy, x, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                        out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                        seed=0, *, with_t: bool = False, dx_scale: Optional[torch.Tensor] = None,
                        residual: Optional[torch.Tensor] = None, salt: int = 0):
    """Returns (dx, dweight, dbias); dweight/dbias float32 (D,) (dweight None without weight);
    with ``with_t`` dx is the pair (dx_q, dx_t_q). ``dx_scale`` float32 (M,) / ``residual`` float (M, D),
    contiguous: dx becomes ``dx * dx_scale[:, None] + residual`` in registers before it is written."""
    return _norm_backward(dy, x, weight, mean, rstd, False, out_dtype, out_block, rounding, seed, with_t,
                          "layer_norm_backward", dx_scale, residual, salt)


def rms_norm_forward(x, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                     out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                     seed=0, *, rstd: Optional[torch.Tensor] = None, with_t=False, salt: int = 0):
    """Returns (y, rstd). Given ``rstd`` (from the fused residual add) x is read once."""
    y, _, rstd = _norm_forward(x, weight, None, eps, True, None, rstd, out_dtype, out_block, rounding, seed, with_t,
                               "rms_norm_forward", salt)
    return y, rstd


def rms_norm_backward(dy, x, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                      out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                      seed=0, *, with_t: bool = False, dx_scale: Optional[torch.Tensor] = None,
                      residual: Optional[torch.Tensor] = None, salt: int = 0):
    """Returns (dx, dweight); dweight float32 (None without weight); ``dx_scale`` / ``residual`` as
    `layer_norm_backward`."""
    dx, dweight, _ = _norm_backward(dy, x, weight, None, rstd, True, out_dtype, out_block, rounding, seed, with_t,
                                    "rms_norm_backward", dx_scale, residual, salt)
    return dx, dweight


__all__ = ["layer_norm_backward", "layer_norm_forward", "rms_norm_backward", "rms_norm_forward"]
