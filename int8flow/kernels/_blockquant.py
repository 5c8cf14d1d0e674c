"""Device-side building blocks of every INT8 kernel: quantize-on-store, dequantize-on-load, bf16 casts.

Numerics equal ``int8flow.format.quantize`` bit for bit under nearest rounding: the absmax is exact,
``scale = absmax / 127`` and ``x / scale`` are IEEE round-to-nearest divisions (``tl.div_rn``, the
correctly rounded float32 division torch does), finite scales are clamped to the format's largest
(absmax = FLT_MAX would otherwise dequantize to Inf), zero-scale blocks give 0, and round half to even
is written with exact float32 operations (the Triton interpreter, the CPU test path, has no libdevice).
Stochastic rounding is ``floor(v + u)``, ``u ~ U[0, 1)`` from ``tl.rand(seed, element_index)``: a
counter-based RNG keyed by position, so a seed gives the same bits on any launch geometry.

The host side (validation, allocation, seeds, launch geometry) lives in ``_launch``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..format.blocks import _SCALE_MAX, QMAX
from ._launch import interpreting

_QMAX_F = tl.constexpr(float(QMAX))
_SCALE_MAX_F = tl.constexpr(_SCALE_MAX)
# Triton itself picks the interpreter when a kernel is decorated, so reading the switch at import agrees with it.
_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def round_half_even(v):
    """Round float32 to the nearest integer, ties to even, for |v| < 2**22 (v + 0.5 is exact there).

    (The 1.5 * 2**23 add/subtract trick is shorter but costs the GEMM epilogue extra spills on sm_90.)
    """
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def scale_from_absmax(absmax):
    """absmax / 127 correctly rounded, finite scales clamped like ``int8flow.format`` (NaN/Inf stay visible)."""
    scale = tl.div_rn(absmax, _QMAX_F)
    return tl.where((scale > _SCALE_MAX_F) & (scale < float("inf")), _SCALE_MAX_F, scale)


@triton.jit
def quantize_values(x, scale, seed, offsets, STOCHASTIC: tl.constexpr):
    """int8 codes of float32 ``x`` under a broadcastable per-block ``scale`` (0 where the scale is 0)."""
    nonzero = scale > 0.0
    v = tl.where(nonzero, tl.div_rn(x, tl.where(nonzero, scale, 1.0)), 0.0)
    if STOCHASTIC:
        q = tl.floor(v + tl.rand(seed, offsets))
    else:
        q = round_half_even(v)
    return tl.minimum(tl.maximum(q, -_QMAX_F), _QMAX_F).to(tl.int8)


@triton.jit
def quantize_tile(y, offsets, seed, BM: tl.constexpr, BN: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr,
                  STOCHASTIC: tl.constexpr):
    """Quantize a float32 [BM, BN] tile of whole QR x QC blocks; returns (int8 [BM, BN], scales [BM//QR, BN//QC]).

    Elements outside the tensor must be 0 in ``y`` (they take part in their block's absmax).
    """
    y4 = tl.reshape(y, (BM // QR, QR, BN // QC, QC))
    scale4 = scale_from_absmax(tl.max(tl.max(tl.abs(y4), axis=3, keep_dims=True), axis=1, keep_dims=True))
    offs4 = tl.reshape(offsets, (BM // QR, QR, BN // QC, QC))
    q4 = quantize_values(y4, scale4, seed, offs4, STOCHASTIC)
    return tl.reshape(q4, (BM, BN)), tl.reshape(scale4, (BM // QR, BN // QC))


@triton.jit
def cast_rne(y, dtype: tl.constexpr):
    """float32 -> dtype, round half to even: the GPU's conversion; the interpreter would truncate to bfloat16."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = tl.where(y == y, bits.to(tl.float32, bitcast=True), y)  # NaN stays NaN
    return y.to(dtype)


@triton.jit
def tile_coords(BM: tl.constexpr, BN: tl.constexpr):
    """(row0, col0, rows, cols) of this program's [BM, BN] tile on a 2-D grid of tiles."""
    row0 = tl.program_id(0) * BM
    col0 = tl.program_id(1) * BN
    return row0, col0, row0 + tl.arange(0, BM), col0 + tl.arange(0, BN)


@triton.jit
def load_tile(ptr, scale_ptr, rows, cols, M, N, stride_r, stride_c, stride_sr, stride_sc,
              IS_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr):
    """Tile [len(rows), len(cols)] of an (M, N) operand as float32, zeros outside; INT8 (IS_Q) times its block scale."""
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    x = tl.load(ptr + rows64[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0).to(tl.float32)
    if IS_Q:
        s = tl.load(scale_ptr + (rows64[:, None] // QR) * stride_sr + (cols[None, :] // QC) * stride_sc,
                    mask=mask, other=0.0)
        x = x * s
    return x


@triton.jit
def load_operand(ptr, scale_ptr, rows, cols, M, N, IS_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr):
    """``load_tile`` of a row-major (M, N) operand with a row-major scale grid (``_launch.Operand``)."""
    return load_tile(ptr, scale_ptr, rows, cols, M, N, N, 1, tl.cdiv(N, QC), 1, IS_Q, QR, QC)


@triton.jit
def emit_tile(y, out_ptr, out_scale_ptr, row0, col0, M, N, seed, BM: tl.constexpr, BN: tl.constexpr,
              OUT_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Write the float32 tile y = out[row0:row0+BM, col0:col0+BN] (tails masked) as float or per-block INT8.

    For INT8 output (``_launch.Output``), row0/col0/BM/BN must be multiples of QR/QC; the tile's
    out-of-range elements are zeroed before the block absmax.
    """
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if OUT_Q:
        q, scale = quantize_tile(tl.where(mask, y, 0.0), offs, seed, BM, BN, QR, QC, STOCHASTIC)
        tl.store(out_ptr + offs, q, mask=mask)
        srows = row0 // QR + tl.arange(0, BM // QR)
        scols = col0 // QC + tl.arange(0, BN // QC)
        n_scale_cols = tl.cdiv(N, QC)
        smask = (srows[:, None] < tl.cdiv(M, QR)) & (scols[None, :] < n_scale_cols)
        tl.store(out_scale_ptr + srows.to(tl.int64)[:, None] * n_scale_cols + scols[None, :], scale, mask=smask)
    else:
        tl.store(out_ptr + offs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_stats_update(mean, m2, x, c0, N, BLOCK_D: tl.constexpr, RMS: tl.constexpr):
    """Fold chunk x = rows x columns [c0, c0 + BLOCK_D) (zeros past N) into running (mean, m2) per row.

    LayerNorm: Chan et al.'s merge of (count, mean, sum of squared deviations), stable for rows with a
    large mean; RMS: m2 is the plain sum of squares (mean stays 0). rstd = 1 / sqrt(m2 / N + eps).
    """
    if RMS:
        m2 += tl.sum(x * x, axis=1)
    else:
        cols = c0 + tl.arange(0, BLOCK_D)
        n_chunk = tl.minimum(N - c0, BLOCK_D).to(tl.float32)
        n_new = c0 + n_chunk
        mean_chunk = tl.sum(x, axis=1) / n_chunk
        dev = tl.where((cols < N)[None, :], x - mean_chunk[:, None], 0.0)
        delta = mean_chunk - mean
        mean += delta * (n_chunk / n_new)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (c0 * n_chunk / n_new)
    return mean, m2


__all__ = ["cast_rne", "emit_tile", "load_operand", "load_tile", "quantize_tile", "quantize_values",
           "round_half_even", "row_stats_update", "scale_from_absmax", "tile_coords"]
