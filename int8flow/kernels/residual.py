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
from . import _launch, nonfinite
from ._blockquant import cast_rne, emit3, emit3_t, load3, row_stats3, tile3
from ._launch import (
    Output, check_eps, check_int32_addressable, check_same_shape, operand, row_launch, seed_args, tile3_launch,
)

NORM_STATS = (None, "layernorm", "rmsnorm")


@triton.jit(do_not_specialize=['salt', 'salt_t'])
def _residual_add_kernel(r_ptr, d_ptr, d_scale, D_Q: tl.constexpr, D_QR: tl.constexpr, D_QC: tl.constexpr,
                         h_ptr, hq_ptr, hq_scale, HQ: tl.constexpr, HQ_QR: tl.constexpr, HQ_QC: tl.constexpr,
                         STOCHASTIC: tl.constexpr, hqt_ptr, hqt_scale, WITH_T: tl.constexpr,
                         mean_ptr, rstd_ptr, M, N, eps, seed_ptr, salt, salt_t, flag_ptr, flag_code,
                         STATS: tl.constexpr, R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """Rows [pid*R, +R): h = r + d, optional INT8 h_q (and its transpose), STATS 0 none / 1 LayerNorm / 2 RMSNorm.

    One walk over column chunks of G * C: h and h_q written as they are made, statistics merged per chunk.
    """
    BD: tl.constexpr = G * C
    row0 = tl.program_id(0) * R
    rows = row0 + tl.arange(0, R)
    row_ok = rows < M
    gcol0 = tl.arange(0, G) * C
    mean = tl.zeros((R,), tl.float32)
    m2 = tl.zeros((R,), tl.float32)
    for c0 in range(0, N, BD):
        gcol = c0 + gcol0
        _, mask, offs = tile3(rows, gcol, M, N, C)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = load3(d_ptr, d_scale, rows, gcol, M, N, D_Q, D_QR, D_QC, C)
        h = cast_rne(r + d, h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        h = h.to(tl.float32)
        if HQ:
            emit3(h, hq_ptr, hq_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, True, HQ_QR, HQ_QC, STOCHASTIC,
                  R, G, C)
            if WITH_T:
                emit3_t(h, hqt_ptr, hqt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)
        if STATS != 0:
            mean, m2 = row_stats3(mean, m2, h, c0, N, BD, STATS == 2, C)
    if STATS != 0:
        tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(m2 / N + eps), mask=row_ok)
    if STATS == 1:
        tl.store(mean_ptr + rows, mean, mask=row_ok)


@triton.jit(do_not_specialize=['salt', 'salt_t'])
def _convert_kernel(x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                    out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                    STOCHASTIC: tl.constexpr, outt_ptr, outt_scale, WITH_T: tl.constexpr,
                    M, N, seed_ptr, salt, salt_t, flag_ptr, flag_code, R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """out = x in another format (float <-> per-block INT8, any block shapes), optionally also transposed."""
    row0 = tl.program_id(0) * R
    rows = row0 + tl.arange(0, R)
    gcol = tl.program_id(1) * (G * C) + tl.arange(0, G) * C
    x = load3(x_ptr, x_scale, rows, gcol, M, N, X_Q, X_QR, X_QC, C)
    emit3(x, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC,
          R, G, C)
    if WITH_T:
        emit3_t(x, outt_ptr, outt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)


def convert(x, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest", seed=0,
            *, with_t: bool = False, salt: int = 0):
    """x (float or QTensor, (M, N)) re-emitted as out_dtype or INT8 with out_block blocks, in one pass;
    with ``with_t`` (1xK out_block) the pair (x_q, x_t_q)."""
    x_op = operand(x, "x")
    check_int32_addressable(x_op.data, "x")
    device = x_op.data.device
    out = Output(x_op.shape, device, out_dtype, out_block, rounding, with_t)
    grid, meta = tile3_launch(x_op.shape, out)
    flag, code = nonfinite.flag_args(device, "convert")
    if x_op.data.numel():
        _convert_kernel[grid](*x_op.args, *out.args, *out.t_args, *x_op.shape,
                              *seed_args(seed, salt, device, out.stochastic, flag), flag, code, **meta)
    return out.result()


def residual_add_forward(residual: torch.Tensor, delta, stats=None, eps: float = 1e-5, out_block=None,
                         rounding: str = "nearest", seed=0, *, with_t: bool = False, salt: int = 0) -> ResidualAdd:
    """h = residual + delta (float (M, D) residual; delta float or QTensor) -> ResidualAdd(h, h_q, mean, rstd).

    h has the residual's dtype; h_q INT8 in ``out_block`` blocks (with ``with_t``: the pair (h_q, h_t_q));
    mean/rstd float32 (M,) statistics of h for the next norm (``stats``).
    """
    if stats not in NORM_STATS:
        raise ValueError(f"stats must be one of {NORM_STATS}, got {stats!r}")
    if isinstance(residual, QTensor):
        raise TypeError("residual must be a float tensor (the high-precision stream), got a QTensor; "
                        "pass the float residual and the INT8 branch output as delta")
    check_eps(eps)
    r_op, d_op = operand(residual, "residual"), operand(delta, "delta")
    (m, n) = check_same_shape(("residual", r_op), ("delta", d_op))
    check_int32_addressable(residual, "residual")
    device = residual.device
    h = _launch.alloc((m, n), residual.dtype, device)
    if with_t and out_block is None:
        raise ValueError("with_t=True needs out_block (the INT8 copy of h to transpose), e.g. out_block='1x128'")
    h_q = Output((m, n), device, out_block=out_block, rounding=rounding, with_t=with_t) if out_block is not None else None
    hq_args = h_q.args if h_q is not None else (None, None, False, 1, 1, False)
    ht_args = h_q.t_args if h_q is not None else (None, None, False)
    rstd = _launch.alloc(m, torch.float32, device) if stats else None
    mean = _launch.alloc(m, torch.float32, device) if stats == "layernorm" else None
    probe = h_q if h_q is not None else Output((0, 0), device)
    meta = row_launch(n, probe)
    meta.pop("ONE")
    flag, code = nonfinite.flag_args(device, "residual_add_forward")
    if m:
        _residual_add_kernel[(triton.cdiv(m, meta["R"]),)](
            residual, *d_op.args, h, *hq_args, *ht_args, mean, rstd, m, n, float(eps),
            *seed_args(seed, salt, device, h_q is not None and h_q.stochastic, flag), flag, code, STATS=NORM_STATS.index(stats), **meta)
    return ResidualAdd(h, h_q.result() if h_q is not None else None, mean, rstd)


def residual_add_backward(dh, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                          seed=0, *, salt: int = 0):
    """Returns (dresidual, ddelta): dh itself (float32 when dh is INT8) and dh in the requested format."""
    dh_op = operand(dh, "dh")
    dres = convert(dh) if dh_op.is_q else dh
    if out_block is None and not dh_op.is_q and dh.dtype == out_dtype:
        return dres, dh
    return dres, convert(dh, out_dtype, out_block, rounding, seed, salt=salt)


__all__ = ["NORM_STATS", "convert", "residual_add_backward", "residual_add_forward"]
