"""Triton per-block quantize / dequantize, with the fused quantize+transpose of the backward pass.

Numerics are those of `int8flow.format.quantize` (bit for bit under nearest rounding): see
``_blockquant``, whose ``scale_from_absmax`` / ``quantize_values`` this kernel applies to a 4-D tile of
whole blocks. Block sides need not be powers of two here (blocks are padded in registers).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..format import BlockShape, QTensor
from ..format.blocks import PAPER_BLOCK, BlockLike, _check_input
from ._blockquant import (
    cast_rne, emit3, emit3_t, load_seed, load_tile, quantize_values, scale_from_absmax,
)
from . import _launch, nonfinite
from ._launch import (
    check_float, check_int32_addressable, check_qtensor, check_out_dtype, check_rounding, check_salt, check_seed,
    next_pow2, seed_ptr, stream_salt,
)

# Elements one quantize program handles: 4096 keeps ~32 fp32 values per thread at 4 warps.
_TILE_ELEMS = 4096


@triton.jit(do_not_specialize=['salt'])
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr,  # x: (R, C) any strides; q: contiguous (R, C) or (C, R) when TRANSPOSE
    R, C, stride_xr, stride_xc,
    ld_q, ld_scale,  # leading dimension of the (possibly transposed) contiguous outputs
    seed_ptr, salt,  # base seed (1-element int64 on the device) and this stream's salt (``_launch`` "seeds")
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
    seed = 0
    if STOCHASTIC:
        seed = load_seed(seed_ptr, salt)
    q = quantize_values(x, scale, seed, rows * C + cols, STOCHASTIC)

    blk_mask = (blk_r < tl.cdiv(R, BR)) & (blk_c < tl.cdiv(C, BC))
    if TRANSPOSE:
        tl.store(q_ptr + cols * ld_q + rows, q, mask=mask)
        tl.store(scale_ptr + blk_c * ld_scale + blk_r, scale, mask=blk_mask)
    else:
        tl.store(q_ptr + rows * ld_q + cols, q, mask=mask)
        tl.store(scale_ptr + blk_r * ld_scale + blk_c, scale, mask=blk_mask)


@triton.jit(do_not_specialize=['salt', 'salt_t'])
def _quant3_kernel(
    x_ptr, M, N, stride_xr, stride_xc,  # x: (M, N) any strides
    q_ptr, q_scale, qt_ptr, qt_scale,  # row-quantized (M, N) and transposed (N, M) outputs, contiguous
    seed_ptr, salt, salt_t, flag_ptr, flag_code,
    QR: tl.constexpr, QC: tl.constexpr, ROWQ: tl.constexpr, TRANS: tl.constexpr, STOCHASTIC: tl.constexpr,
    R: tl.constexpr, G: tl.constexpr, C: tl.constexpr,
):
    """One read of an [R, G, C] tile of x; writes its QR x QC blocks (ROWQ) and/or its transpose in
    blocks of 1 x R along M (TRANS): ``quantize(x)`` / ``quantize(x.t())`` / both from the same registers."""
    row0 = tl.program_id(0) * R
    rows = row0 + tl.arange(0, R)
    gcol = tl.program_id(1) * (G * C) + tl.arange(0, G) * C
    cols = gcol[None, :, None] + tl.arange(0, C)[None, None, :]
    mask = (rows[:, None, None] < M) & (cols < N)
    x = tl.load(x_ptr + rows[:, None, None] * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if ROWQ:
        emit3(x, q_ptr, q_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, True, QR, QC, STOCHASTIC,
              R, G, C)
    if TRANS:
        emit3_t(x, qt_ptr, qt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)


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


@triton.jit
def _transpose_i8_kernel(src_ptr, dst_ptr, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """dst (C, R), contiguous = src (R, C).T: a [BR, BC] tile read along src's rows, written along dst's rows
    (the register transpose goes through shared memory)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(src_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0)
    tl.store(dst_ptr + cols[:, None] * R + rows[None, :], tl.trans(x), mask=tl.trans(mask))


def _tiling(block: BlockShape) -> tuple[int, int, int, int, int]:
    """Padded block dims, blocks per program (rows, cols) and warps: ~_TILE_ELEMS elements, >=128 columns wide."""
    br_p, bc_p = next_pow2(block.rows), next_pow2(block.cols)
    cb = max(1, 128 // bc_p)
    rb = max(1, _TILE_ELEMS // (br_p * bc_p * cb))
    warps = 8 if rb * cb * br_p * bc_p > _TILE_ELEMS else 4
    return br_p, bc_p, rb, cb, warps


def _fast_row_block(block: BlockShape) -> bool:
    """Blocks the 3-D tile kernel writes: power-of-two sides, columns up to 128."""
    return _launch.is_pow2(block.rows) and _launch.is_pow2(block.cols) and block.rows <= 128 and block.cols <= 128


def _tile3(rows: int, cols: int, n: int, elems: int = 8192) -> tuple[int, int, int]:
    """(R, G, C) of a quantize program: R rows (a multiple of ``rows``), G groups of C = ``cols`` columns.

    Tall blocks (128x128 weights) take one group per program: their G = 8 tile was 131,072 values (528 B of
    spills at 32 warps in the sm_90 build; the weights' quantize ran at ~0.2 of copy on the H200), where
    [128, 1, 128] compiles like the 1x128 row quantizer (31.5 SASS instructions per element, no spills:
    0.7 of copy measured)."""
    c = cols
    g = max(1, min(next_pow2(-(-n // c)), max(1, 1024 // c)))
    if rows >= 64:
        g = max(1, min(g, 16384 // (rows * c)))
    r = max(rows, min(256, elems // (g * c)))
    return r, g, c


def _launch_quant3(x: torch.Tensor, row_block: Optional[BlockShape], t_len: int, rounding: str, seed,
                   flag_op: str = "quantize", salt: int = 0):
    """Row-quantized x (``row_block``) and/or x.T in blocks of 1 x ``t_len`` (0: none), one launch each."""
    M, N = x.shape
    device = x.device
    outs = []
    q = qs = qt = qts = None
    if row_block is not None:
        q = _launch.alloc((M, N), torch.int8, device)
        qs = _launch.alloc(row_block.grid((M, N)), torch.float32, device)
    if t_len:
        tb = BlockShape(1, t_len)
        qt = _launch.alloc((N, M), torch.int8, device)
        qts = _launch.alloc(tb.grid((N, M)), torch.float32, device)
    if x.numel():
        flag, code = nonfinite.flag_args(device, flag_op)
        stoch = rounding == "stochastic"
        sp = seed_ptr(seed, device, stoch, placeholder=flag)

        def launch(rowq: bool, r: int, g: int, c: int, warps: int, salt_row: int, salt_t: int) -> None:
            _quant3_kernel[(triton.cdiv(M, r), triton.cdiv(N, g * c))](
                x, M, N, x.stride(0), x.stride(1), q, qs, qt, qts, sp, salt_row, salt_t, flag, code,
                QR=row_block.rows if rowq else 1, QC=row_block.cols if rowq else 1, ROWQ=rowq, TRANS=not rowq,
                STOCHASTIC=stoch, R=r, G=g, C=c, num_warps=warps)

        # Both copies: two launches reading x twice. One fused [128, 1, 128] tile compiled (sm_90) to ~140 SASS
        # instructions per element with stochastic rounding, the pair below to ~90, and these kernels are
        # issue-bound, not bandwidth-bound (the fused one measured 0.14-0.16 of copy on the H200).
        if row_block is not None:
            r, g, c = _tile3(row_block.rows, row_block.cols, N)
            launch(True, r, g, c, _launch.warps_for_tile(r * g * c, 16), stream_salt(salt, 0), 0)
        if t_len:
            # the transposed copy: 1 x t_len blocks along M; one-warp [t_len, 1, 16] programs keep the block axis in
            # a warp (``_launch.transposed_tile``: bf16 29 SASS instructions per element nearest, 38 stochastic, no
            # spills; session 4's [128, 1, 64] x 8 warps: 40 / 49; [128, 1, 128] x 32 warps: 63)
            salt_t = stream_salt(salt, 1 if row_block is not None else 0)
            if _launch.T_ONE_WARP:
                t = _launch.transposed_tile(t_len, N, _launch.T_COLS_FLOAT_IN)
                launch(False, t["R"], t["G"], t["C"], t["num_warps"], 0, salt_t)
            else:
                c = 64
                g = max(1, min(next_pow2(-(-N // c)), 8192 // (t_len * c)))
                launch(False, t_len, g, c, _launch.warps_for_tile(t_len * g * c, 32), 0, salt_t)
    elif qs is not None or qts is not None:
        for s_ in (qs, qts):
            if s_ is not None:
                s_.zero_()
    if row_block is not None:
        outs.append(QTensor(q, qs, row_block))
    if t_len:
        outs.append(QTensor(qt, qts, BlockShape(1, t_len)))
    return outs


def _launch_quantize(x: torch.Tensor, block: BlockShape, rounding: str, seed, transpose: bool,
                     flag_op: str = "quantize", salt: int = 0) -> QTensor:
    """Quantize x (R, C) with ``block`` in x's layout; with ``transpose`` write x.T (blocks transposed)."""
    if not transpose and _fast_row_block(block) and (rounding == "nearest" or block.cols >= 8):
        return _launch_quant3(x, block, 0, rounding, seed, flag_op, salt)[0]
    if transpose and block.cols == 1 and _fast_row_block(block.t()):
        return _launch_quant3(x, None, block.rows, rounding, seed, flag_op, salt)[0]
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
        x, q, scale, R, C, x.stride(0), x.stride(1), q.stride(0), scale.stride(0),
        seed_ptr(seed, x.device, rounding == "stochastic", placeholder=scale), stream_salt(salt, 0),
        BR=block.rows, BC=block.cols, BR_P=br_p, BC_P=bc_p, RB=rb, CB=cb,
        TRANSPOSE=transpose, STOCHASTIC=rounding == "stochastic", num_warps=warps,
    )
    return QTensor(q, scale, out_block)


def _check_args(x: torch.Tensor, rounding: str, seed, check_finite: bool, salt: int = 0) -> None:
    check_float(x, "x")
    check_int32_addressable(x, "x")
    check_rounding(rounding)
    check_seed(seed, x.device)
    check_salt(salt)
    _check_input(x, "x", check_finite)


def quantize(
    x: torch.Tensor,
    block: BlockLike = PAPER_BLOCK,
    rounding: str = "nearest",
    seed=0,
    check_finite: bool = True,
    flag_op: str = "quantize",
    salt: int = 0,
) -> QTensor:
    """Kernel twin of `int8flow.format.quantize`; ``seed`` (and ``salt``) key the stochastic rounding noise.

    x: (M, N) float32/bfloat16/float16, any strides; returns int8 (M, N) contiguous + float32 block scales.
    ``check_finite`` costs an isfinite pass and a device sync; the training hot path passes False and relies
    on the device flag (`int8flow.kernels.nonfinite`), where a NaN/Inf block is recorded as ``flag_op``.
    ``seed``: an int, or a 1-element int64 tensor on x's device holding the base seed (graph-safe: the kernel
    reads it from device memory, see ``_launch`` "seeds"; an int becomes such a tensor per stochastic call).
    ``salt`` (an int in [0, 2**62]) picks an independent stream of the same base seed.
    """
    block = BlockShape.parse(block)
    _check_args(x, rounding, seed, check_finite, salt)
    return _launch_quantize(x, block, rounding, seed, transpose=False, flag_op=flag_op, salt=salt)


def quantize_transposed(
    x: torch.Tensor,
    block: BlockLike = PAPER_BLOCK,
    rounding: str = "nearest",
    seed=0,
    check_finite: bool = True,
    flag_op: str = "quantize_transposed",
    salt: int = 0,
) -> QTensor:
    """Kernel twin of `int8flow.format.quantize_transposed`: x.T quantized with ``block``, data contiguous.

    One pass: x is read in its own layout (blocks ``block.t()``) and written transposed (N, M). ``seed`` / ``salt``
    as in `quantize`.
    """
    block = BlockShape.parse(block)
    _check_args(x, rounding, seed, check_finite, salt)
    return _launch_quantize(x, block.t(), rounding, seed, transpose=True, flag_op=flag_op, salt=salt)


def quantize_dual(
    x: torch.Tensor,
    block: BlockLike = "1x128",
    rounding: str = "nearest",
    seed=0,
    check_finite: bool = True,
    flag_op: str = "quantize_dual",
    salt: int = 0,
) -> tuple[QTensor, QTensor]:
    """Both layouts of x: ``(quantize(x, block), quantize_transposed(x, block))`` (two launches, see
    ``_launch_quant3``).

    x: (M, N) float32/bfloat16/float16, any strides. ``block`` must be ``1xK`` (K a power of two <= 128):
    x_q (M, N) int8 in 1xK blocks along N (the next GEMM's operand) and x_t_q (N, M) int8, contiguous,
    in 1xK blocks along M (the K-major copy the weight-gradient GEMM reads). Square blocks need no second
    copy: ``quantize(x, block).t()`` is already that tensor. Stochastic rounding draws independent noise
    for each copy from the same stream positions as ``quantize`` / ``quantize_transposed`` (the row copy salt
    ``salt``, the transposed copy ``salt + 1``; ``seed`` as in `quantize`).
    """
    block = BlockShape.parse(block)
    if block.rows != 1 or not _fast_row_block(block) or block.cols < 8:
        raise ValueError(f"quantize_dual writes 1xK blocks (K a power of two, 8 <= K <= 128, e.g. '1x128'), got {block}; "
                         "square blocks are their own transpose: use quantize(x, block).t()")
    _check_args(x, rounding, seed, check_finite, salt)
    x_q, x_t_q = _launch_quant3(x, block, block.cols, rounding, seed, flag_op, salt)
    return x_q, x_t_q


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


def transpose_qtensor(q: QTensor) -> QTensor:
    """``q.t()`` in contiguous (K-major) storage: one INT8 pass (1 byte per element read and written), the
    numbers unchanged. The GEMM operand of a transposed view (``w_q.t()`` in dgrad, square-block operands of
    wgrad); a strided ``.contiguous()`` of INT8 data runs at a tenth of copy bandwidth on the H200.

    q: QTensor (M, N), data with any strides; returns a QTensor (N, M) with blocks ``q.block.t()``.
    """
    check_qtensor(q, "q")
    check_int32_addressable(q.data, "q.data")
    M, N = q.shape
    out = _launch.alloc((N, M), torch.int8, q.device)
    if out.numel():
        br, bc = 64, 128
        grid = (triton.cdiv(M, br), triton.cdiv(N, bc))
        _transpose_i8_kernel[grid](q.data, out, M, N, q.data.stride(0), q.data.stride(1), BR=br, BC=bc, num_warps=4)
    return QTensor(out, q.scale.t().contiguous(), q.block.t())


__all__ = ["quantize", "quantize_dual", "quantize_transposed", "dequantize", "transpose_qtensor"]
