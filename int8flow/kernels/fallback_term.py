"""The column fallback term and its GEMM operand in one launch: ``[term | x_q]`` written directly.

`fallback_column_term` computes, for a 1xbk-block activation x (M, K) with first quantization x_q, the chosen
K groups ``groups`` (G,) and the per-block flags (M, G) of ``ops.fallback.select_groups``, the extended A operand
of the GEMM over K + G*bk (``ops.primitives.with_term``): int8 (M, G*bk + K) and float32 scales (M, G + nG),
where column group j < G holds the quantized residual ``x - dequant(x_q)`` of K group ``groups[j]`` (zero blocks
with scale 0 where not flagged, zeros past K in a tail group) and the rest is a copy of x_q. Bit for bit what
``column_residual`` + ``quantize(..., 'nearest')`` + ``concat_k`` compute (the torch composition of
``ops.primitives.fallback_term``, the oracle on CPU): the residual is one float32 multiply then one subtraction
(the kernel is compiled with ``enable_fp_fusion=False``: a contracted fma would round once, not twice), and the
block quantization is ``_blockquant``'s (``scale_from_absmax``, ``quantize_by_scale``), which the 1x128 quantize
kernel uses.

One launch replaces 22 small torch ops (gathers of x and x_q, dequantize, residual, mask, quantize, two
concatenations). ``gathered=True`` takes the float values already gathered (M, G*bk) - a producer re-run on the
chosen groups' INT8 inputs (``ops.flow``) - with the identity group mapping for x (x_q is still read through
``groups``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import QTensor
from ._blockquant import absmax_nan, flag_nonfinite, i8_to_f32, quantize_by_scale, scale_from_absmax
from . import _launch, nonfinite
from ._launch import FLOAT_DTYPES, check_device, next_pow2

_COPY_ELEMS = 8192  # int8 elements of a copy program: [R, GC, BK_P]
NUM_WARPS = 4


@triton.jit
def _column_term_kernel(
    x_ptr, stride_xr, stride_xc,  # float (M, K), or (M, G * BK) when GATHERED; any strides
    q_ptr, stride_qr, stride_qc,  # x_q data int8 (M, K)
    s_ptr, stride_sr, stride_sc,  # x_q scales float32 (M, NG)
    groups_ptr,  # int64 (G,): the K groups of the term
    f_ptr, stride_fr, stride_fc,  # flags uint8 (M, G)
    out_ptr, out_scale_ptr,  # int8 (M, G * BK + K) and float32 (M, G + NG), contiguous
    M, K, G, NG,
    flag_ptr, flag_code,
    GATHERED: tl.constexpr, BK: tl.constexpr, BK_P: tl.constexpr,
    R: tl.constexpr, GT: tl.constexpr, GC: tl.constexpr,
):
    """Programs (row tile, j): j < cdiv(G, GT) quantize the residual of GT term groups ([R, GT, BK_P] tile); the
    others copy GC groups of x_q ([R, GC, BK_P]) behind the term."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    pid = tl.program_id(1)
    W = G * BK + K
    NS = G + NG
    c = tl.arange(0, BK_P)[None, None, :]
    r3 = rows[:, None, None]
    r_ok = rows[:, None] < M
    n_term = tl.cdiv(G, GT)
    if pid < n_term:
        j = pid * GT + tl.arange(0, GT)  # output groups
        j_ok = r_ok & (j[None, :] < G)  # [R, GT]
        src = tl.load(groups_ptr + j, mask=j < G, other=0).to(tl.int32)
        cols = src[None, :, None] * BK + c  # x_q's columns of the group (and x's unless GATHERED)
        inb = j_ok[:, :, None] & (c < BK)  # output elements of this tile
        flag = tl.load(f_ptr + rows[:, None] * stride_fr + j[None, :] * stride_fc, mask=j_ok, other=0) != 0
        keep = inb & flag[:, :, None] & (cols < K)  # the residual's support: flagged blocks, inside the activation
        if GATHERED:
            xcols = j[None, :, None] * BK + c
        else:
            xcols = cols
        x = tl.load(x_ptr + r3 * stride_xr + xcols * stride_xc, mask=keep, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + r3 * stride_qr + cols * stride_qc, mask=keep, other=0)
        s = tl.load(s_ptr + rows[:, None] * stride_sr + src[None, :] * stride_sc, mask=j_ok & flag, other=0.0)
        p = i8_to_f32(q) * s[:, :, None]  # dequant(x_q): one rounding (no fma contraction, see the module doc)
        res = tl.where(keep, x - p, 0.0)
        am = absmax_nan(res, 2)  # [R, GT]
        flag_nonfinite(am, flag_ptr, flag_code)
        scale = scale_from_absmax(am)
        qo = quantize_by_scale(res, scale[:, :, None], 0.0, False)
        tl.store(out_ptr + r3 * W + j[None, :, None] * BK + c, qo, mask=inb)
        tl.store(out_scale_ptr + rows[:, None] * NS + j[None, :], scale, mask=j_ok)
    else:
        gi = (pid - n_term) * GC + tl.arange(0, GC)  # x_q's groups (names apart from the other branch's: Triton
        g_ok = r_ok & (gi[None, :] < NG)  # types a name assigned in both branches of an `if` as one)
        c_cols = gi[None, :, None] * BK + c
        c_mask = g_ok[:, :, None] & (c < BK) & (c_cols < K)
        c_q = tl.load(q_ptr + r3 * stride_qr + c_cols * stride_qc, mask=c_mask, other=0)
        tl.store(out_ptr + r3 * W + G * BK + c_cols, c_q, mask=c_mask)
        c_s = tl.load(s_ptr + rows[:, None] * stride_sr + gi[None, :] * stride_sc, mask=g_ok, other=0.0)
        tl.store(out_scale_ptr + rows[:, None] * NS + G + gi[None, :], c_s, mask=g_ok)


def tiling(bk: int, n_groups: int, g: int) -> dict:
    """Constexprs of a launch: BK_P, the rows R, term groups GT and copy groups GC per program."""
    bk_p = next_pow2(bk)
    gc = max(1, min(next_pow2(n_groups), max(1, 1024 // bk_p)))
    r = max(1, _COPY_ELEMS // (gc * bk_p))
    gt = max(1, min(next_pow2(g), 2048 // (r * bk_p)))  # term tiles of <= 2048 elements: [8, 8, 128] took 128
    # registers on sm_90 (16 warps per SM for every program of the launch, the copies too); [8, 2, 128] takes 40
    return dict(BK_P=bk_p, R=r, GT=gt, GC=gc)


def _fail(msg: str) -> None:
    raise ValueError(f"fallback_column_term: {msg}")


def _check(x, x_q, groups, flags, gathered: bool) -> None:
    if not isinstance(x_q, QTensor):
        _fail(f"x_q must be a QTensor (the activation's 1xbk quantization), got {type(x_q).__name__}; "
              "quantize x first with block '1x128'")
    if x_q.block.rows != 1:
        _fail(f"x_q has blocks {x_q.block}; the column term needs 1xbk activation blocks (e.g. '1x128'): other "
              "geometries take the dense fallback term (ops.fallback.fallback_mask)")
    if x_q.data.dtype != torch.int8 or x_q.data.dim() != 2:
        _fail(f"x_q.data must be a 2-D int8 tensor, got {x_q.data.dtype} of shape {tuple(x_q.data.shape)}")
    m, k = x_q.data.shape
    bk = x_q.block.cols
    ng = -(-k // bk)
    if x_q.scale.dtype != torch.float32 or tuple(x_q.scale.shape) != (m, ng):
        _fail(f"x_q.scale must be float32 of shape ({m}, {ng}), got {x_q.scale.dtype} {tuple(x_q.scale.shape)}; "
              "pass the QTensor quantize returned")
    if not isinstance(groups, torch.Tensor) or groups.dtype != torch.int64 or groups.dim() != 1:
        _fail(f"groups must be a 1-D int64 tensor (select_groups' first output), got "
              f"{getattr(groups, 'dtype', type(groups).__name__)} of shape {tuple(getattr(groups, 'shape', ()))}")
    g = groups.shape[0]
    if not min(1, ng) <= g <= ng:
        _fail(f"groups holds {g} K groups; x_q has {ng}: pass between {min(1, ng)} and {ng} (group_capacity)")
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        _fail(f"x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x).__name__)}; "
              "convert with x.float()")
    want = (m, g * bk) if gathered else (m, k)
    if tuple(x.shape) != want:
        what = "the gathered values of the groups (M, G * bk)" if gathered else "x_q's shape (the activation)"
        _fail(f"x must have shape {want}, {what}, got {tuple(x.shape)}")
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.bool or tuple(flags.shape) != (m, g):
        _fail(f"flags must be a bool tensor of shape ({m}, {g}) (select_groups' second output), got "
              f"{getattr(flags, 'dtype', type(flags).__name__)} {tuple(getattr(flags, 'shape', ()))}")
    for name, t in (("x", x), ("x_q.data", x_q.data), ("x_q.scale", x_q.scale), ("groups", groups),
                    ("flags", flags)):
        check_device(t, name)
        if t.device != x_q.data.device:
            _fail(f"{name} is on {t.device} but x_q.data on {x_q.data.device}; move them to one device")
    for name, t in (("x", x), ("x_q.data", x_q.data)):
        _launch.check_int32_addressable(t, name)
    if m * (g * bk + k) >= 2**31:
        _fail(f"the extended operand ({m}, {g * bk + k}) needs >= 2**31 elements; split the activation along its rows")


def fallback_column_term(x: torch.Tensor, x_q: QTensor, groups: torch.Tensor, flags: torch.Tensor,
                         gathered: bool = False, seed=0, flag_op: str = "fallback term", salt: int = 0) -> QTensor:
    """``[term | x_q]``: the A operand (M, G*bk + K) of the GEMM over K + G*bk with the column fallback term.

    x: float (M, K) of any strides (the activation x_q quantizes), or with ``gathered`` its values on the term's
    groups, (M, G*bk) (anything past column K). x_q: 1xbk QTensor (M, K). groups: int64 (G,) on x's device (distinct,
    in [0, nG): not checked, that would sync). flags: bool (M, G). ``seed`` / ``salt`` are unused (nearest rounding only;
    the dispatch passes them). A NaN/Inf block of the term is recorded as ``flag_op`` in the device flag.
    Returns a QTensor of x_q's block, data int8 (M, G*bk + K) and scales float32 (M, G + nG), contiguous.
    """
    _check(x, x_q, groups, flags, gathered)
    m, k = x_q.data.shape
    bk, g = x_q.block.cols, groups.shape[0]
    ng = x_q.scale.shape[1]
    device = x_q.data.device
    out = _launch.alloc((m, g * bk + k), torch.int8, device)
    out_scale = _launch.alloc((m, g + ng), torch.float32, device)
    if out.numel() and m:
        t = tiling(bk, ng, g)
        flag, code = nonfinite.flag_args(device, flag_op)
        f8 = flags.view(torch.uint8)
        grid = (triton.cdiv(m, t["R"]), triton.cdiv(g, t["GT"]) + triton.cdiv(ng, t["GC"]))
        _column_term_kernel[grid](
            x, x.stride(0), x.stride(1), x_q.data, x_q.data.stride(0), x_q.data.stride(1),
            x_q.scale, x_q.scale.stride(0), x_q.scale.stride(1), groups, f8, f8.stride(0), f8.stride(1),
            out, out_scale, m, k, g, ng, flag, code,
            GATHERED=gathered, BK=bk, **t, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return QTensor(out, out_scale, x_q.block)


__all__ = ["fallback_column_term", "tiling"]
