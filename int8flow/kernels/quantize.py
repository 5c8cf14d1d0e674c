"""Triton per-block quantize / dequantize, with the fused quantize+transpose of the backward pass.

Numerics equal `int8flow.format.quantize` bit for bit under nearest rounding: the absmax is exact,
``scale = absmax / 127`` and ``x / scale`` use IEEE round-to-nearest division (`tl.math.div_rn`,
the same correctly rounded float32 division torch does), and rounding half to even is written with
exact float32 operations (`round_half_even`) so that it also runs in the Triton interpreter, which
has no libdevice. Stochastic rounding draws ``u ~ U[0, 1)`` from Philox (`tl.rand(seed, offset)`),
keyed by the element's position, so a given seed reproduces the same result on any launch geometry.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import ROUNDING_MODES, BlockShape, QTensor
from ..format.blocks import _SCALE_MAX, BlockLike, PAPER_BLOCK, _check_input
from ._launch import check_device, check_float, check_int32_addressable, next_pow2

# Largest finite scale whose 127 multiple stays finite (the format clamps to it; absmax = FLT_MAX needs it).
SCALE_MAX = tl.constexpr(_SCALE_MAX)
# Elements one quantize program handles: 4096 keeps ~32 fp32 values per thread at 4 warps.
_TILE_ELEMS = 4096


@triton.jit
def round_half_even(v):
    """Round float32 to the nearest integer, ties to even, for |v| < 2**22 (exact: v + 0.5 is exact there)."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def scale_from_absmax(amax):
    """absmax / 127 correctly rounded, clamped like `int8flow.format` (finite scales only; NaN/Inf stay)."""
    scale = tl.math.div_rn(amax, 127.0)
    return tl.where((scale > SCALE_MAX) & (scale < float("inf")), SCALE_MAX, scale)


@triton.jit
def quantize_values(x, scale, seed, offsets, STOCHASTIC: tl.constexpr):
    """int8 values of float32 ``x`` under a broadcastable per-block ``scale`` (0 where scale is 0)."""
    safe = tl.where(scale > 0.0, scale, 1.0)
    v = tl.where(scale > 0.0, tl.math.div_rn(x, safe), 0.0)
    if STOCHASTIC:
        q = tl.floor(v + tl.rand(seed, offsets))
    else:
        q = round_half_even(v)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return q.to(tl.int8)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr,  # x: (R, C) any strides; q: contiguous (R, C) or (C, R) when TRANSPOSE
    R, C, stride_xr, stride_xc,
    ld_q, ld_scale,  # leading dimension of the (possibly transposed) contiguous outputs
    seed,
    BR: tl.constexpr, BC: tl.constexpr,  # quantization block in x's layout
    BR_P: tl.constexpr, BC_P: tl.constexpr,  # the same padded to powers of two (tl.arange needs them)
    RB: tl.constexpr, CB: tl.constexpr,  # blocks per program along rows / cols
    TRANSPOSE: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    # A program owns RB x CB whole blocks held as a 4-D tile (block row, row in block, block col, col in block),
    # so the per-block absmax is two reductions and never crosses programs.
    blk_r = tl.program_id(0) * RB + tl.arange(0, RB)[:, None, None, None]
    in_r = tl.arange(0, BR_P)[None, :, None, None]
    blk_c = tl.program_id(1) * CB + tl.arange(0, CB)[None, None, :, None]
    in_c = tl.arange(0, BC_P)[None, None, None, :]
    rows = blk_r * BR + in_r
    cols = blk_c * BC + in_c
    mask = (in_r < BR) & (in_c < BC) & (rows < R) & (cols < C)
    x = tl.load(x_ptr + rows * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)

    amax = tl.max(tl.max(tl.abs(x), axis=3, keep_dims=True), axis=1, keep_dims=True)
    scale = scale_from_absmax(amax)
    q = quantize_values(x, scale, seed, rows * C + cols, STOCHASTIC)

    blk_mask = (blk_r < tl.cdiv(R, BR)) & (blk_c < tl.cdiv(C, BC))
    if TRANSPOSE:
        tl.store(q_ptr + cols * ld_q + rows, q, mask=mask)
        tl.store(scale_ptr + blk_c * ld_scale + blk_r, scale, mask=blk_mask)
    else:
        tl.store(q_ptr + rows * ld_q + cols, q, mask=mask)
        tl.store(scale_ptr + blk_r * ld_scale + blk_c, scale, mask=blk_mask)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr,  # q: (R, C) any strides; out: contiguous (R, C)
    R, C, stride_qr, stride_qc, stride_sr, stride_sc,
    BR: tl.constexpr, BC: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
):
    rows = tl.program_id(0) * TILE_R + tl.arange(0, TILE_R)[:, None]
    cols = tl.program_id(1) * TILE_C + tl.arange(0, TILE_C)[None, :]
    mask = (rows < R) & (cols < C)
    q = tl.load(q_ptr + rows * stride_qr + cols * stride_qc, mask=mask, other=0)
    s = tl.load(scale_ptr + (rows // BR) * stride_sr + (cols // BC) * stride_sc, mask=mask, other=0.0)
    tl.store(out_ptr + rows * C + cols, (q.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=mask)


def _tiling(block: BlockShape) -> tuple[int, int, int, int, int]:
    """Padded block dims, blocks per program (rows, cols) and warps: ~_TILE_ELEMS elements, >=128 columns wide."""
    br_p, bc_p = next_pow2(block.rows), next_pow2(block.cols)
    cb = max(1, 128 // bc_p)
    rb = max(1, _TILE_ELEMS // (br_p * bc_p * cb))
    warps = 8 if rb * cb * br_p * bc_p > _TILE_ELEMS else 4
    return br_p, bc_p, rb, cb, warps


def _launch_quantize(x: torch.Tensor, block: BlockShape, rounding: str, seed: int, transpose: bool) -> QTensor:
    """Quantize x (R, C) with ``block`` in x's layout; with ``transpose`` write x.T (blocks transposed)."""
    R, C = x.shape
    out_shape = (C, R) if transpose else (R, C)
    out_block = block.t() if transpose else block
    q = torch.empty(out_shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(out_block.grid(out_shape), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        scale.zero_()
        return QTensor(q, scale, out_block)
    br_p, bc_p, rb, cb, warps = _tiling(block)
    nbr, nbc = block.grid((R, C))
    grid = (triton.cdiv(nbr, rb), triton.cdiv(nbc, cb))
    _quantize_kernel[grid](
        x, q, scale, R, C, x.stride(0), x.stride(1), q.stride(0), scale.stride(0), seed,
        BR=block.rows, BC=block.cols, BR_P=br_p, BC_P=bc_p, RB=rb, CB=cb,
        TRANSPOSE=transpose, STOCHASTIC=rounding == "stochastic", num_warps=warps,
    )
    return QTensor(q, scale, out_block)


def _check_args(x: torch.Tensor, rounding: str, seed: int, check_finite: bool) -> None:
    check_float(x, "x")
    check_device(x, "x")
    check_int32_addressable(x, "x")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    _check_input(x, "x", check_finite)


def quantize(
    x: torch.Tensor,
    block: BlockLike = PAPER_BLOCK,
    rounding: str = "nearest",
    seed: int = 0,
    check_finite: bool = True,
) -> QTensor:
    """Kernel twin of `int8flow.format.quantize`; ``seed`` keys the stochastic rounding noise.

    ``check_finite`` costs a device sync; the training hot path passes False.
    """
    block = BlockShape.parse(block)
    _check_args(x, rounding, seed, check_finite)
    return _launch_quantize(x, block, rounding, seed, transpose=False)


def quantize_transposed(
    x: torch.Tensor,
    block: BlockLike = PAPER_BLOCK,
    rounding: str = "nearest",
    seed: int = 0,
    check_finite: bool = True,
) -> QTensor:
    """Kernel twin of `int8flow.format.quantize_transposed`: x.T quantized with ``block``, data contiguous.

    One pass: x is read in its own layout (blocks ``block.t()``) and written transposed.
    """
    block = BlockShape.parse(block)
    _check_args(x, rounding, seed, check_finite)
    return _launch_quantize(x, block.t(), rounding, seed, transpose=True)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kernel twin of `int8flow.format.dequantize`: int8 * scale in float32, written contiguous in ``dtype``."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(q).__name__}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    check_device(q.data, "q.data")
    check_int32_addressable(q.data, "q.data")
    R, C = q.shape
    out = torch.empty((R, C), dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    tile_r, tile_c = 32, 128
    grid = (triton.cdiv(R, tile_r), triton.cdiv(C, tile_c))
    _dequantize_kernel[grid](
        q.data, q.scale, out, R, C, q.data.stride(0), q.data.stride(1), q.scale.stride(0), q.scale.stride(1),
        BR=q.block.rows, BC=q.block.cols, TILE_R=tile_r, TILE_C=tile_c, num_warps=4,
    )
    return out


__all__ = ["quantize", "quantize_transposed", "dequantize", "quantize_values", "round_half_even", "scale_from_absmax"]
