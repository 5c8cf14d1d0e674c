"""Triton per-block INT8 GEMM ``C = A @ B.T`` for the three GEMMs of a linear layer.

Geometry. ``A`` (M, K) and ``B`` (N, K) are QTensors; their block size along K sets the promotion
group ``G`` (the smaller of the two when they differ; the larger must be a multiple). Along M and N the
blocks may be anything (1 = per-row, 32, 128): scales are gathered per row/column of the tile.

* exact 32x32 mode: both operands 32x32 (the paper), ``G = 32``.
* coarse-K mode: ``G = 128``, e.g. activations 1x128 or 32x128 and weights 128x128 (the route to
  beat BF16 on Hopper, docs/kernels.md).

Two inner products, picked by ``impl``:

* ``"int8"``: int8 ``tl.dot`` into an int32 product per K group, then promotion
  ``acc += p * scale_a[:, None] * scale_b[None, :]`` in float32. The int32 product of one group
  is bounded by ``G * 127 * 127`` (2,064,512 at G=128), far from 2**31, so it cannot overflow for any
  G <= 133,000; for G <= 1024 it is also below 2**24, so its float32 conversion is exact and the
  result equals the reference up to float32 summation order. ``overlap`` (an autotuned switch)
  delays each promotion by one group so it can run on the CUDA cores while the next group's wgmma
  runs on the tensor cores.
* ``"dequant"``: int8 tiles are loaded (INT8 memory traffic), scaled to bf16 in registers and fed
  to a bf16 ``tl.dot`` with float32 accumulation: no per-group promotion of the (BM, BN) tile, but
  each scaled operand rounds to bf16 (8-bit significand, relative error <= 2**-9 per operand).

``impl="auto"`` picks ``"int8"`` for G >= 128 (promotion costs <= 1/4 of the tensor work and can
hide under it) and ``"dequant"`` for G < 128 (promotion every 32 of K costs as much as the
tensor work: ~0.45x BF16 measured, ANCHORS.md).

Epilogue: optional bias, then either a float store (fp32/bf16/fp16) or re-quantization of each
``out_block`` of the tile to INT8 + float32 scales (nearest or stochastic rounding), written
directly. An output block must lie inside one tile: its dims must be powers of two that divide
the tile (32x32, 1x128, 32x128, 128x128, ...); other output blocks go through a float32 result
and the quantize kernel (two passes, documented fallback).

Fallback quantization: an optional second INT8 term of ``A`` (``a_fallback``, zero outside the flagged
blocks) is multiplied in the same K loop, only for (tile rows, K block) pairs whose per-band flag is set
(a constexpr switch plus one runtime branch per K group; docs/kernels.md has the cost model).

Operands may be any strided views (``w_q.t()``, ``x_q.t()``): each operand's layout (K-contiguous,
row-contiguous, general) is a compile-time switch so the contiguous dimension is known to the compiler.

Route. On an sm_90 GPU with Gluon importable, calls with K-major operands, K blocks of 128 and a float or
1x128-block INT8 epilogue go to the warp-specialized Gluon kernel (``gluon_gemm``, issue 11); everything
else (the CPU interpreter, 32x32 blocks, other output blocks, the fallback term, transposed views) runs
this Triton kernel. ``route(...)`` says which and why without running; ``last_route`` holds the latest
call's choice; the first call taking each route logs it (logger ``int8flow.kernels.gemm``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from ..format import BlockShape, QTensor
from ..format.blocks import BlockLike
from ._blockquant import cast_rne, load_seed, quantize_tile
from . import _launch
from ._launch import (
    check_int32_addressable, check_out_dtype, check_qtensor, check_rounding, check_salt, check_seed, check_vector,
    interpreting, is_pow2, num_sms, seed_ptr, stream_salt,
)
from .quantize import quantize as _quantize_kernel_wrapper
from . import gluon_gemm

_log = logging.getLogger(__name__)
KERNELS = ("auto", "gluon", "triton")
# (kernel, reason) of the latest block_gemm call: the route the bench records.
last_route: tuple[str, str] = ("", "")
_logged_routes: set = set()

IMPLS = ("auto", "int8", "dequant")
# Operand layouts (compile-time). TMA (the Hopper bulk tensor copy engine, via tl.make_tensor_descriptor)
# needs a unit stride and 16-byte aligned base and row stride; it then needs no pointer tensors in
# registers (a 128x128 int8 tile of pointers alone is 128 registers per thread at 8 warps) and zero-fills
# out-of-range rows and K tails. Other views go through pointer loads.
_TMA_K_MAJOR, _TMA_ROW_MAJOR, _POINTERS = 0, 1, 2
# Rows per fallback flag the kernel reads (a band): every tile height (32 in the interpreter, 64/128 on
# the GPU) is a whole number of bands, so a tile's "any flagged?" is a max over BM / FLAG_ROWS bytes.
FLAG_ROWS = 32


@triton.jit
def _operand_desc(ptr, R, K, stride_r, stride_k, BR: tl.constexpr, BK: tl.constexpr, LAYOUT: tl.constexpr):
    """TMA descriptor of an (R, K) operand: over (R, K) when K is contiguous, over (K, R) for a transposed view."""
    if LAYOUT == 0:
        desc = tl.make_tensor_descriptor(ptr, shape=[R, K], strides=[stride_r, 1], block_shape=[BR, BK])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[K, R], strides=[stride_k, 1], block_shape=[BK, BR])
    return desc


@triton.jit
def _load_tile(desc, ptr, r0, rows, offs_k, k0, K, stride_r, stride_k, LAYOUT: tl.constexpr):
    """(BR, BK) int8 tile of rows ``r0 + [0, BR)`` and columns ``k0 + [0, BK)``; zeros past K."""
    if LAYOUT == 0:
        tile = desc.load([r0, k0])
    elif LAYOUT == 1:
        tile = tl.trans(desc.load([k0, r0]))
    else:
        ks = k0 + offs_k
        tile = tl.load(ptr + rows[:, None] * stride_r + ks[None, :] * stride_k, mask=(ks < K)[None, :], other=0)
    return tile


@triton.jit
def _promote(acc, p, scale_a, scale_b):
    return acc + p.to(tl.float32) * (scale_a[:, None] * scale_b[None, :])


@triton.jit
def _scaled(q, scale, DOT_DTYPE: tl.constexpr):
    """int8 tile times per-row scale, rounded to bf16 (then DOT_DTYPE: bf16 on GPU, fp32 in the interpreter)."""
    return (q.to(tl.float32) * scale[:, None]).to(tl.bfloat16).to(DOT_DTYPE)


@triton.jit
def _fallback_group(acc, a2_desc, a2_ptr, b_desc, b_ptr, sa2_rows, sb, pid_m, pid_n, rows_a, rows_b, offs_k,
                    k_group, K, stride_a2m, stride_a2k, stride_sak, stride_bn, stride_bk,
                    A2_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, A_BK: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, G: tl.constexpr, BK: tl.constexpr, DEQUANT: tl.constexpr,
                    DOT_DTYPE: tl.constexpr):
    """acc + (a2 @ b.T over one K group), promoted with the residual's own scales (s2_a * s_b).

    b is reloaded (an L2 hit: the main product just read it) rather than kept live, so the
    unflagged path holds no extra tile.
    """
    sa2 = tl.load(sa2_rows + (k_group // A_BK) * stride_sak)
    p2 = tl.zeros((BM, BN), dtype=tl.int32)
    for s in tl.static_range(G // BK):
        k0 = k_group + s * BK
        a2 = _load_tile(a2_desc, a2_ptr, pid_m * BM, rows_a, offs_k, k0, K, stride_a2m, stride_a2k, A2_LAYOUT)
        b = _load_tile(b_desc, b_ptr, pid_n * BN, rows_b, offs_k, k0, K, stride_bn, stride_bk, B_LAYOUT)
        if DEQUANT:
            acc = tl.dot(_scaled(a2, sa2, DOT_DTYPE), tl.trans(_scaled(b, sb, DOT_DTYPE)), acc)
        else:
            p2 = tl.dot(a2, tl.trans(b), p2, out_dtype=tl.int32)
    if not DEQUANT:
        acc = _promote(acc, p2, sa2, sb)
    return acc


@triton.jit(do_not_specialize=['salt'])
def _block_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, sc_ptr,
    a2_ptr, sa2_ptr, flag_ptr,  # fallback term of a (int8 + scales) and its band flags (uint8)
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk,  # a: (M, K) int8, b: (N, K) int8
    stride_sam, stride_sak, stride_sbn, stride_sbk,  # per-block float32 scales of a and b
    stride_a2m, stride_a2k, stride_fm, stride_fk,  # a2's scales have a's strides (the wrapper makes sure)
    stride_cm, stride_cn, stride_scm, stride_scn,  # c: (M, N) float or int8; sc: output scales
    seed_ptr, salt,  # base seed (1-element int64 on the device) and salt of the output's rounding noise
    A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr,
    FALLBACK: tl.constexpr, A2_LAYOUT: tl.constexpr, FLAG_ROWS: tl.constexpr,
    A_BR: tl.constexpr, A_BK: tl.constexpr, B_BR: tl.constexpr, B_BK: tl.constexpr,  # operand blocks
    G: tl.constexpr,  # promotion group along K
    HAS_BIAS: tl.constexpr, OUT_QUANT: tl.constexpr, OBR: tl.constexpr, OBC: tl.constexpr,
    STOCHASTIC: tl.constexpr, DEQUANT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, OVERLAP: tl.constexpr,
):
    SUB: tl.constexpr = G // BK  # K steps of BK per promotion group
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    num_groups = tl.cdiv(K, G)
    a_desc = a_ptr
    b_desc = b_ptr
    if A_LAYOUT != 2:
        a_desc = _operand_desc(a_ptr, M, K, stride_am, stride_ak, BM, BK, A_LAYOUT)
    if B_LAYOUT != 2:
        b_desc = _operand_desc(b_ptr, N, K, stride_bn, stride_bk, BN, BK, B_LAYOUT)
    a2_desc = a2_ptr
    if FALLBACK and A2_LAYOUT != 2:
        a2_desc = _operand_desc(a2_ptr, M, K, stride_a2m, stride_a2k, BM, BK, A2_LAYOUT)
    # Persistent grid: each program walks tiles in GROUP_M-row bands so neighbours share L2 lines.
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        band = tile // (GROUP_M * num_pid_n)
        first_m = band * GROUP_M
        band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % band_m
        pid_n = (tile % (GROUP_M * num_pid_n)) // band_m

        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        # Rows/cols past M/N read a valid row instead (pointer path; TMA zero-fills); the epilogue drops them.
        rows_a = offs_m % M
        rows_b = offs_n % N
        offs_k = tl.arange(0, BK)
        sa_offs = (rows_a // A_BR) * stride_sam  # a's scales and the fallback term's share strides
        sa_rows = sa_ptr + sa_offs
        sb_rows = sb_ptr + (rows_b // B_BR) * stride_sbn
        sa2_rows = sa2_ptr + sa_offs
        bands = pid_m * (BM // FLAG_ROWS) + tl.arange(0, BM // FLAG_ROWS)
        band_flags = flag_ptr + bands * stride_fm
        bands_in = bands < tl.cdiv(M, FLAG_ROWS)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        p_prev = tl.zeros((BM, BN), dtype=tl.int32)
        sa_prev = tl.zeros((BM,), dtype=tl.float32)
        sb_prev = tl.zeros((BN,), dtype=tl.float32)
        for g in tl.range(0, num_groups):
            k_group = g * G
            sa = tl.load(sa_rows + (k_group // A_BK) * stride_sak)
            sb = tl.load(sb_rows + (k_group // B_BK) * stride_sbk)
            p = tl.zeros((BM, BN), dtype=tl.int32)
            for s in tl.static_range(SUB):
                k0 = k_group + s * BK
                a = _load_tile(a_desc, a_ptr, pid_m * BM, rows_a, offs_k, k0, K, stride_am, stride_ak, A_LAYOUT)
                b = _load_tile(b_desc, b_ptr, pid_n * BN, rows_b, offs_k, k0, K, stride_bn, stride_bk, B_LAYOUT)
                if DEQUANT:
                    acc = tl.dot(_scaled(a, sa, DOT_DTYPE), tl.trans(_scaled(b, sb, DOT_DTYPE)), acc)
                else:
                    p = tl.dot(a, tl.trans(b), p, out_dtype=tl.int32)
            if not DEQUANT:
                if OVERLAP:
                    acc = _promote(acc, p_prev, sa_prev, sb_prev)
                    p_prev, sa_prev, sb_prev = p, sa, sb
                else:
                    acc = _promote(acc, p, sa, sb)
            if FALLBACK:
                # Second term only where a row band of this tile is flagged at this K block: one tiny load
                # per group on the unflagged path. Placed after the promotion so no extra product is live.
                flagged = tl.load(band_flags + (k_group // A_BK) * stride_fk, mask=bands_in, other=0)
                if tl.max(flagged, 0) != 0:
                    acc = _fallback_group(acc, a2_desc, a2_ptr, b_desc, b_ptr, sa2_rows, sb, pid_m, pid_n, rows_a,
                                          rows_b, offs_k, k_group, K, stride_a2m, stride_a2k, stride_sak,
                                          stride_bn, stride_bk, A2_LAYOUT, B_LAYOUT, A_BK, BM, BN, G, BK,
                                          DEQUANT, DOT_DTYPE)
        if not DEQUANT:
            if OVERLAP:
                acc = _promote(acc, p_prev, sa_prev, sb_prev)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        in_c = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        if OUT_QUANT:
            seed = 0
            if STOCHASTIC:  # the Philox key, derived in the epilogue (a register held across the K loop spills)
                seed = load_seed(seed_ptr, salt)
            # Zero the out-of-range rows/cols (they hold wrapped-around rows) before each block's absmax.
            q, scale = quantize_tile(tl.where(in_c, acc, 0.0), offs_m[:, None] * N + offs_n[None, :], seed,
                                     BM, BN, OBR, OBC, STOCHASTIC)
            tl.store(c_ptr + c_offs, q, mask=in_c)
            blk_m = pid_m * (BM // OBR) + tl.arange(0, BM // OBR)
            blk_n = pid_n * (BN // OBC) + tl.arange(0, BN // OBC)
            blk_in = (blk_m < tl.cdiv(M, OBR))[:, None] & (blk_n < tl.cdiv(N, OBC))[None, :]
            tl.store(sc_ptr + blk_m[:, None] * stride_scm + blk_n[None, :] * stride_scn, scale, mask=blk_in)
        else:
            tl.store(c_ptr + c_offs, cast_rne(acc, c_ptr.dtype.element_ty), mask=in_c)


# --- configurations --------------------------------------------------------------------------------
# Register budget (Hopper, 255 regs/thread): the int8 path holds the fp32 accumulator plus one int32
# product (two with OVERLAP) of BM x BN, so BM*BN/threads <= 64 per tile (128x128 at 8 warps, 64x256 at 8);
# the dequant path holds only the fp32 accumulator, so it can take BF16-style 128x256 tiles.
def _config(bm, bn, warps, stages, overlap=False, group_m=8):
    return triton.Config({"BM": bm, "BN": bn, "GROUP_M": group_m, "OVERLAP": overlap},
                         num_warps=warps, num_stages=stages)


_INT8_CONFIGS = [
    _config(bm, bn, w, 4, ov)
    for (bm, bn, w) in ((128, 128, 8), (64, 256, 8), (128, 64, 4), (64, 128, 4))
    for ov in (False, True)
]
_DEQUANT_CONFIGS = [
    _config(bm, bn, w, st)
    for (bm, bn, w) in ((128, 256, 8), (128, 128, 8), (64, 256, 4))
    for st in (3, 4)
]


def _bench_config(fn, quantiles):
    """Autotuning timer: short warm-up and repeat so a sweep of shapes stays within minutes."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _fits(cfg_kwargs: dict, obr: int, obc: int, out_quant: bool) -> bool:
    return not out_quant or (cfg_kwargs["BM"] % obr == 0 and cfg_kwargs["BN"] % obc == 0)


def _prune(configs, named_args, **kwargs):
    """Keep the tile shapes matching the inner product and holding whole output blocks."""
    args = {**named_args, **kwargs}
    pool = _DEQUANT_CONFIGS if args["DEQUANT"] else _INT8_CONFIGS
    return [c for c in configs if c in pool and _fits(c.kwargs, args["OBR"], args["OBC"], args["OUT_QUANT"])]


_tuned_kernel = triton.autotune(
    configs=_INT8_CONFIGS + _DEQUANT_CONFIGS,
    key=["M", "N", "K", "A_LAYOUT", "B_LAYOUT", "A_BR", "B_BR", "G", "HAS_BIAS", "OUT_QUANT", "OBR", "OBC",
         "STOCHASTIC", "DEQUANT", "FALLBACK", "A2_LAYOUT"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_bench_config,
    # The choice per key is kept in Triton's on-disk cache: a later process (the next run, another test worker)
    # compiles only the chosen config. A first step of the 32x32 route meets ~12 keys x 8 configs, ~1.2 s of
    # sm_90 compilation each on a free core (`_hopper_check.gemm_variant`): minutes, once per machine.
    cache_results=True,
)(_block_gemm_kernel)


def _interpreter_config(obr: int, obc: int) -> dict:
    """One small tile for the CPU interpreter (no autotuning there): 32x32, widened to hold an output block."""
    return {"BM": max(32, obr), "BN": max(32, obc), "GROUP_M": 2, "OVERLAP": True}


# --- wrapper -----------------------------------------------------------------------------------------
def _layout(t: torch.Tensor, use_tma: bool) -> int:
    """TMA when the view has a unit stride and a 16-byte aligned base and leading stride, else pointers."""
    if use_tma and t.data_ptr() % 16 == 0:
        if t.stride(1) == 1 and t.stride(0) % 16 == 0:
            return _TMA_K_MAJOR
        if t.stride(0) == 1 and t.stride(1) % 16 == 0:
            return _TMA_ROW_MAJOR
    return _POINTERS


def _tma_allocator(size: int, alignment: int, stream):
    """Global scratch for the device-side TMA descriptors (Triton asks for it at launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def promotion_group(a: QTensor, b: QTensor) -> int:
    """K elements between two promotions: the operands' K block sizes must nest, and be a power of two >= 32."""
    ka, kb = a.block.cols, b.block.cols
    g, big = min(ka, kb), max(ka, kb)
    if big % g or not is_pow2(g) or g < 32:
        raise ValueError(
            f"block_gemm needs operand blocks along K that are powers of two >= 32 and nest; got a {a.block} "
            f"(K block {ka}) and b {b.block} (K block {kb}). Re-quantize the operand, e.g. with "
            "int8flow.kernels.quantize.quantize_transposed(x, '1x128') for the weight-gradient GEMM."
        )
    return g


def resolve_impl(impl: str, group: int, fallback: bool = False) -> str:
    """``auto``: int8 tensor cores from G=128 up (promotion can hide under the product), dequant-on-load below;
    always int8 with a fallback term, whose ~16-bit precision the dequant path's bf16 operands would round away."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "int8" if group >= 128 or fallback else "dequant"
    return impl


def _check_gemm_args(a, b, bias, out_dtype, rounding, seed, salt=0):
    for name, t in (("a", a), ("b", b)):
        check_qtensor(t, name)
        check_int32_addressable(t.data, f"{name}.data")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"block_gemm computes a @ b.T and needs a (M, K), b (N, K) with the same K; "
                         f"got a {tuple(a.shape)}, b {tuple(b.shape)}; pass b.t() if b is (K, N)")
    if a.device != b.device:
        raise ValueError(f"block_gemm: a is on {a.device}, b on {b.device}; move both to one device")
    check_vector(bias, "bias", b.shape[0], a.device)
    check_out_dtype(out_dtype)
    check_rounding(rounding)
    check_seed(seed, a.device)
    check_salt(salt)


def _check_fallback(a: QTensor, a_fallback: Optional[QTensor], flags: Optional[torch.Tensor]) -> None:
    if a_fallback is None:
        if flags is not None:
            raise ValueError("block_gemm: a_fallback_flags given without a_fallback; pass the fallback term too "
                             "or drop the flags")
        return
    check_qtensor(a_fallback, "a_fallback")
    check_int32_addressable(a_fallback.data, "a_fallback.data")
    if tuple(a_fallback.shape) != tuple(a.shape) or a_fallback.block != a.block or a_fallback.device != a.device:
        raise ValueError(
            f"block_gemm: a_fallback must have a's shape, block and device (it is a's second INT8 term); got "
            f"a {tuple(a.shape)} {a.block} on {a.device}, a_fallback {tuple(a_fallback.shape)} {a_fallback.block} "
            f"on {a_fallback.device}; quantize the residual with a's block (zeros outside the flagged blocks)")
    if flags is None:
        return
    grid = a.block.grid(tuple(a.shape))
    if not isinstance(flags, torch.Tensor) or flags.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"a_fallback_flags must be a bool or uint8 tensor, got {getattr(flags, 'dtype', type(flags))}")
    if tuple(flags.shape) != grid or flags.device != a.device:
        raise ValueError(f"a_fallback_flags must have shape {grid} (one flag per block of a) on {a.device}, got "
                         f"{tuple(flags.shape)} on {flags.device}; for a transposed operand pass the flags' .t()")


def fallback_band_flags(flags: torch.Tensor, block: BlockShape, rows: int) -> torch.Tensor:
    """Per-block flags (GR, GK) -> uint8 (ceil(rows / FLAG_ROWS), GK): 1 where any block of that band of
    ``FLAG_ROWS`` rows is flagged. The kernel reads one band per ``FLAG_ROWS`` rows of its tile."""
    f = flags.to(torch.uint8)
    br = block.rows
    if FLAG_ROWS % br:  # blocks taller than a band, or not dividing it: go through per-row flags
        f, br = f.repeat_interleave(br, dim=0)[:rows], 1
    per_band = FLAG_ROWS // br
    bands = triton.cdiv(rows, FLAG_ROWS)
    f = torch.nn.functional.pad(f, (0, 0, 0, bands * per_band - f.shape[0]))
    return f.view(bands, per_band, f.shape[1]).amax(dim=1)


def out_block_fits(out_block: BlockShape, max_tile: tuple[int, int] = (128, 256)) -> bool:
    """Whether the epilogue can quantize ``out_block`` in-tile (power-of-two dims within the largest tile)."""
    return (is_pow2(out_block.rows) and is_pow2(out_block.cols)
            and out_block.rows <= max_tile[0] and out_block.cols <= max_tile[1])


def route(a: QTensor, b: QTensor, out_dtype: torch.dtype = torch.float32, out_block: Optional[BlockLike] = None,
          impl: str = "auto", a_fallback: Optional[QTensor] = None, kernel: str = "auto") -> tuple[str, str]:
    """("gluon" | "triton", why) for a `block_gemm` call with these arguments; nothing runs.

    ``kernel="gluon"`` raises ValueError (naming the fix) when the Gluon kernel cannot take the call.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton":
        return "triton", "asked for"
    out_block = None if out_block is None else BlockShape.parse(out_block)
    if interpreting():
        why = "the CPU interpreter runs Triton kernels only"
    elif impl == "dequant":
        why = "impl='dequant' is the Triton kernel's"
    else:
        why = gluon_gemm.unsupported(a, b, out_dtype, out_block, a_fallback)
    if why is None:
        return "gluon", "sm_90, K-major operands, K blocks of 128"
    if kernel == "gluon":
        raise ValueError(f"block_gemm(kernel='gluon'): {why}")
    return "triton", why


def _note_route(choice: tuple[str, str]) -> None:
    global last_route
    last_route = choice
    if choice not in _logged_routes:
        _logged_routes.add(choice)
        # A transposed operand on the GPU is the 3-4x slow path: say so louder.
        level = logging.WARNING if "not K-major" in choice[1] and not interpreting() else logging.INFO
        _log.log(level, "block_gemm runs the %s kernel: %s", *choice)


def block_gemm(
    a: QTensor,
    b: QTensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    out_block: Optional[BlockLike] = None,
    rounding: str = "nearest",
    seed=0,
    impl: str = "auto",
    tma: bool = True,
    a_fallback: Optional[QTensor] = None,
    a_fallback_flags: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    salt: int = 0,
):
    """``a @ b.T (+ bias)`` on per-block INT8 operands; float ``out_dtype`` or, with ``out_block``, a QTensor.

    ``kernel``: "auto" (the Gluon kernel where it can run, else Triton; `route` says which), "gluon" (raise
    where it cannot) or "triton".

    Kernel twin of `int8flow.reference.block_gemm` (``seed`` in place of ``generator``; ``rounding`` applies
    only to a quantized output; ``seed`` an int or a 1-element int64 tensor on the operands' device, read by the
    kernel from device memory - graph-safe, see ``_launch`` "seeds" - and ``salt`` an int in [0, 2**62] picking an
    independent stream of that base seed). ``impl``: "auto" | "int8" | "dequant" (module docstring). ``tma=False``
    forces pointer loads (for comparison; views TMA cannot read use them anyway).

    Fallback quantization: ``a_fallback`` is a's second INT8 term (same shape and block; zero outside the
    flagged blocks), so the result is ``(a + a_fallback) @ b.T`` in one pass; its product is computed only
    for (tile rows, K block) pairs where some block is flagged. ``a_fallback_flags`` (bool/uint8, a's block
    grid) says which blocks; default ``a_fallback.scale != 0``, exact since a zero-scale block holds zeros.
    Given flags must cover every non-zero block of ``a_fallback`` (unflagged blocks are skipped unread).
    """
    _check_gemm_args(a, b, bias, out_dtype, rounding, seed, salt)
    _check_fallback(a, a_fallback, a_fallback_flags)
    group = promotion_group(a, b)
    choice = route(a, b, out_dtype, out_block, impl, a_fallback, kernel)
    _note_route(choice)
    if choice[0] == "gluon":
        return gluon_gemm.block_gemm(a, b, bias, out_dtype, out_block, rounding, seed, checked=True, salt=salt)
    dequant = resolve_impl(impl, group, a_fallback is not None) == "dequant"
    out_block = None if out_block is None else BlockShape.parse(out_block)
    if out_block is not None and not out_block_fits(out_block):
        y = block_gemm(a, b, bias, torch.float32, None, rounding, seed, impl, tma, a_fallback, a_fallback_flags,
                       kernel, salt)
        return _quantize_kernel_wrapper(y, out_block, rounding, seed, check_finite=False, salt=salt)

    M, K = a.shape
    N = b.shape[0]
    out_quant = out_block is not None
    c = _launch.alloc((M, N), torch.int8 if out_quant else out_dtype, a.device)
    sc = _launch.alloc(out_block.grid((M, N)) if out_quant else (0, 0), torch.float32, a.device)
    if M == 0 or N == 0:
        return QTensor(c, sc.zero_(), out_block) if out_quant else c

    obr, obc = (out_block.rows, out_block.cols) if out_quant else (1, 1)
    fallback = a_fallback is not None
    a2_data, a2_scale = a.data, a.scale  # unused placeholders without fallback (compiled out)
    if fallback:
        a2_data, a2_scale = a_fallback.data, a_fallback.scale
        if a2_scale.stride() != a.scale.stride():  # the kernel indexes both scale grids with one offset vector
            a2_scale = torch.empty_strided(a.scale.shape, a.scale.stride(), dtype=torch.float32,
                                           device=a.device).copy_(a2_scale)
        flags = a_fallback_flags if a_fallback_flags is not None else a_fallback.scale != 0
        band_flags = fallback_band_flags(flags, a.block, M)
    else:
        band_flags = a.scale
    args = (a.data, b.data, a.scale, b.scale, bias if bias is not None else c, c, sc,
            a2_data, a2_scale, band_flags, M, N, K,
            a.data.stride(0), a.data.stride(1), b.data.stride(0), b.data.stride(1),
            a.scale.stride(0), a.scale.stride(1), b.scale.stride(0), b.scale.stride(1),
            a2_data.stride(0), a2_data.stride(1),
            band_flags.stride(0), band_flags.stride(1),
            c.stride(0), c.stride(1), sc.stride(0) if out_quant else 0, sc.stride(1) if out_quant else 0,
            seed_ptr(seed, a.device, out_quant and rounding == "stochastic", placeholder=sc), stream_salt(salt, 0))
    meta = dict(A_LAYOUT=_layout(a.data, tma), B_LAYOUT=_layout(b.data, tma),
                FALLBACK=fallback, A2_LAYOUT=_layout(a2_data, tma) if fallback else _POINTERS, FLAG_ROWS=FLAG_ROWS,
                A_BR=a.block.rows, A_BK=a.block.cols, B_BR=b.block.rows, B_BK=b.block.cols,
                G=group, BK=min(group, 128), HAS_BIAS=bias is not None, OUT_QUANT=out_quant, OBR=obr, OBC=obc,
                STOCHASTIC=rounding == "stochastic", DEQUANT=dequant,
                DOT_DTYPE=tl.float32 if interpreting() else tl.bfloat16)

    if interpreting():
        cfg = _interpreter_config(obr, obc)
        tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
        _block_gemm_kernel[(tiles,)](*args, **meta, **cfg)
    else:
        if any(meta[k] != _POINTERS for k in ("A_LAYOUT", "B_LAYOUT", "A2_LAYOUT")):
            triton.set_allocator(_tma_allocator)
        sms = num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
        grid = lambda cfg: (min(sms, triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])),)  # noqa: E731
        _tuned_kernel[grid](*args, **meta)
    return QTensor(c, sc, out_block) if out_quant else c


def linear_forward(x_q: QTensor, w_q: QTensor, bias=None, **out):
    """y = x @ w.T + bias."""
    return block_gemm(x_q, w_q, bias, **out)


def linear_input_grad(dy_q: QTensor, w_q: QTensor, **out):
    """dx = dy @ w, reading the forward pass's quantized weight through a transposed view."""
    return block_gemm(dy_q, w_q.t(), **out)


def linear_weight_grad(dy_q: QTensor, x_q: QTensor, **out):
    """dw = dy.T @ x, reading both operands through transposed views (their blocks must nest along M)."""
    return block_gemm(dy_q.t(), x_q.t(), **out)


__all__ = ["FLAG_ROWS", "IMPLS", "KERNELS", "block_gemm", "route", "fallback_band_flags", "linear_forward", "linear_input_grad",
           "linear_weight_grad", "promotion_group", "resolve_impl", "out_block_fits"]
