"""Triton per-block quantize / dequantize, with the fused quantize+transpose of the backward pass.

Numerics are those of `int8flow.format.quantize` (bit for bit under nearest rounding): see
``_blockquant``, whose ``scale_from_absmax`` / ``quantize_values`` this kernel applies to a 4-D tile of
whole blocks. Block sides need not be powers of two here (blocks are padded in registers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import BlockShape, QTensor
from ..format.blocks import PAPER_BLOCK, BlockLike, _check_input
from ._blockquant import cast_rne, load_tile, quantize_values, scale_from_absmax
from . import _launch
from ._launch import (
    check_float, check_int32_addressable, check_qtensor, check_out_dtype, check_rounding, next_pow2, stream_seed,
)

# Elements one quantize program handles: 4096 keeps ~32 fp32 values per thread at 4 warps.
_TILE_ELEMS = 4096


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
    rows = tl.program_id(0) * TILE_R + tl.arange(0, TILE_R)
    cols = tl.program_id(1) * TILE_C + tl.arange(0, TILE_C)
    x = load_tile(q_ptr, scale_ptr, rows, cols, R, C, stride_qr, stride_qc, stride_sr, stride_sc, True, BR, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], cast_rne(x, out_ptr.dtype.element_ty), mask=mask)


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
    q = _launch.alloc(out_shape, torch.int8, x.device)
    scale = _launch.alloc(out_block.grid(out_shape), torch.float32, x.device)
    if x.numel() == 0:
        scale.zero_()
        return QTensor(q, scale, out_block)
    br_p, bc_p, rb, cb, warps = _tiling(block)
    nbr, nbc = block.grid((R, C))
    grid = (triton.cdiv(nbr, rb), triton.cdiv(nbc, cb))
    _quantize_kernel[grid](
        x, q, scale, R, C, x.stride(0), x.stride(1), q.stride(0), scale.stride(0), stream_seed(seed),
        BR=block.rows, BC=block.cols, BR_P=br_p, BC_P=bc_p, RB=rb, CB=cb,
        TRANSPOSE=transpose, STOCHASTIC=rounding == "stochastic", num_warps=warps,
    )
    return QTensor(q, scale, out_block)


def _check_args(x: torch.Tensor, rounding: str, seed: int, check_finite: bool) -> None:
    check_float(x, "x")
    check_int32_addressable(x, "x")
    check_rounding(rounding)
    stream_seed(seed)
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
    check_qtensor(q, "q")
    check_out_dtype(dtype, "dtype")
    check_int32_addressable(q.data, "q.data")
    R, C = q.shape
    out = _launch.alloc((R, C), dtype, q.device)
    if out.numel() == 0:
        return out
    tile_r, tile_c = 32, 128
    grid = (triton.cdiv(R, tile_r), triton.cdiv(C, tile_c))
    _dequantize_kernel[grid](
        q.data, q.scale, out, R, C, q.data.stride(0), q.data.stride(1), q.scale.stride(0), q.scale.stride(1),
        BR=q.block.rows, BC=q.block.cols, TILE_R=tile_r, TILE_C=tile_c, num_warps=4,
    )
    return out


__all__ = ["quantize", "quantize_transposed", "dequantize"]
