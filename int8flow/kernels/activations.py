"""GELU (erf and tanh) and SwiGLU, forward and backward, INT8 or float in and out, one pass each.

Each program owns a tile of whole output blocks (``tile_shape``): it loads its inputs (dequantizing
INT8 on load), computes in float32 and writes the output tile once, quantized in registers. The
formulas are those of ``int8flow.reference.nonlinear``; signatures mirror it with ``seed`` in place of
``generator`` (the noise of stochastic rounding is keyed by (seed, row, column); ``seed`` an int or a 1-element int64
device tensor, ``salt`` an int: ``_launch`` "seeds").
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _launch, nonfinite
from ._blockquant import emit3, emit3_t, load3
from ._launch import (
    Output, check_int32_addressable, check_same_shape, interpreting, next_pow2, operand, seed_args, t_cols,
    tile3_launch, transposed_tile, warps_for_tile,
)

GELU_APPROXIMATIONS = ("none", "tanh")
_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_TANH_C = tl.constexpr(0.044715)


_LOG2E = tl.constexpr(math.log2(math.e))
# gelu_tanh(x) = x * sigmoid(2 z), 2 z = x (A + B x^2): exp(-2 z) = exp2(x (A2 + B2 x^2)) with log2(e) folded in
_A2 = tl.constexpr(-2.0 * math.sqrt(2.0 / math.pi) * math.log2(math.e))
_B2 = tl.constexpr(-2.0 * math.sqrt(2.0 / math.pi) * 0.044715 * math.log2(math.e))
_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def _rcp(v):
    """1 / v: ``rcp.approx.ftz`` (one MUFU op, <= 1 ulp) on the GPU instead of the IEEE division's range
    checks; 1 / inf = 0. The interpreter divides."""
    if _INTERPRETING:
        return 1.0 / v
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _sigmoid_parts(u):
    """(s, 1 - s) for s = 1 / (1 + 2**u) (u = -t log2(e) gives sigmoid(t)): one exp2 and one reciprocal.

    1 - s is e * s (e = 2**u) where e <= 1 and 1 - s elsewhere, so neither side cancels and no inf * 0 appears.
    """
    e = tl.exp2(u)
    s = _rcp(1.0 + e)
    return s, tl.where(e <= 1.0, tl.minimum(e, 1.0) * s, 1.0 - s)  # min: no inf * 0 where discarded


@triton.jit
def _tanh_parts(z):
    """(tanh(z), 1 - tanh(z)^2) from s = sigmoid(2z) and 1 - s (see ``_sigmoid_parts``): no cancellation in
    1 - t^2 = 4 s (1 - s) where |t| -> 1 (libdevice's tanh is unavailable in the interpreter, the CPU test path)."""
    s_pos, s_neg = _sigmoid_parts(-2.0 * _LOG2E * z)
    return s_pos - s_neg, 4.0 * s_pos * s_neg


@triton.jit
def _tile(R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    row0 = tl.program_id(0) * R
    return row0, row0 + tl.arange(0, R), tl.program_id(1) * (G * C) + tl.arange(0, G) * C


@triton.jit(do_not_specialize=['salt', 'salt_t'])
def _gelu_kernel(dy_ptr, dy_scale, DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
                 x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                 out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                 STOCHASTIC: tl.constexpr, outt_ptr, outt_scale, WITH_T: tl.constexpr,
                 M, N, seed_ptr, salt, salt_t, flag_ptr, flag_code, BACKWARD: tl.constexpr, TANH: tl.constexpr,
                 R: tl.constexpr, G: tl.constexpr, C: tl.constexpr, ROW_OUT: tl.constexpr = True):
    """out = gelu(x) (forward) or dy * gelu'(x) (BACKWARD); all tensors (M, N) row-major; [R, G, C] tiles.
    ROW_OUT=False: only the transposed copy (``with_t='only'``)."""
    row0, rows, gcol = _tile(R, G, C)
    x = load3(x_ptr, x_scale, rows, gcol, M, N, X_Q, X_QR, X_QC, C)
    if TANH:  # 0.5 (1 + tanh z) = sigmoid(2 z): one exp2, one reciprocal
        x2 = x * x
        s, s_neg = _sigmoid_parts(x * (_A2 + _B2 * x2))
        cdf = s
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
    if BACKWARD:
        dy = load3(dy_ptr, dy_scale, rows, gcol, M, N, DY_Q, DY_QR, DY_QC, C)
        if TANH:  # d/dx [x s(2z)] = s + x s (1 - s) d(2z)/dx, d(2z)/dx = 2 sqrt(2/pi) (1 + 3 c x^2)
            dydx = cdf + x * s * s_neg * (2.0 * _SQRT_2_OVER_PI) * (1.0 + 3.0 * _TANH_C * x2)
        else:
            dydx = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        y = dy * dydx
    else:
        y = x * cdf
    if ROW_OUT:
        emit3(y, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC,
              R, G, C)
    if WITH_T:
        emit3_t(y, outt_ptr, outt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)


@triton.jit(do_not_specialize=['salt', 'salt2', 'salt_t', 'salt2_t'])
def _swiglu_kernel(dy_ptr, dy_scale, DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
                   g_ptr, g_scale, G_Q: tl.constexpr, G_QR: tl.constexpr, G_QC: tl.constexpr,
                   u_ptr, u_scale, U_Q: tl.constexpr, U_QR: tl.constexpr, U_QC: tl.constexpr,
                   out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                   STOCHASTIC: tl.constexpr, outt_ptr, outt_scale, WITH_T: tl.constexpr,
                   out2_ptr, out2_scale, out2t_ptr, out2t_scale,
                   M, N, seed_ptr, salt, salt2, salt_t, salt2_t, flag_ptr, flag_code,
                   BACKWARD: tl.constexpr,
                   R: tl.constexpr, G: tl.constexpr, C: tl.constexpr, ROW_OUT: tl.constexpr = True):
    """out = silu(g) * u (forward) or (out, out2) = (dgate, dup) (BACKWARD); out2 has out's format.
    ROW_OUT=False: only the transposed copies (``with_t='only'``)."""
    row0, rows, gcol = _tile(R, G, C)
    g = load3(g_ptr, g_scale, rows, gcol, M, N, G_Q, G_QR, G_QC, C)
    u = load3(u_ptr, u_scale, rows, gcol, M, N, U_Q, U_QR, U_QC, C)
    sig, one_minus = _sigmoid_parts(-_LOG2E * g)
    if BACKWARD:
        dy = load3(dy_ptr, dy_scale, rows, gcol, M, N, DY_Q, DY_QR, DY_QC, C)
        dgate = dy * u * sig * (1.0 + g * one_minus)
        if ROW_OUT:
            emit3(dgate, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, OUT_Q, OUT_QR, OUT_QC,
                  STOCHASTIC, R, G, C)
        if WITH_T:
            emit3_t(dgate, outt_ptr, outt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)
        dup = dy * g * sig
        if ROW_OUT:
            emit3(dup, out2_ptr, out2_scale, rows, gcol, M, N, seed_ptr, salt2, flag_ptr, flag_code, OUT_Q, OUT_QR, OUT_QC,
                  STOCHASTIC, R, G, C)
        if WITH_T:
            emit3_t(dup, out2t_ptr, out2t_scale, row0, rows, gcol, M, N, seed_ptr, salt2_t, flag_ptr, flag_code, STOCHASTIC,
                    R, C)
    else:
        y = g * sig * u
        if ROW_OUT:
            emit3(y, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, OUT_Q, OUT_QR, OUT_QC,
                  STOCHASTIC, R, G, C)
        if WITH_T:
            emit3_t(y, outt_ptr, outt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)


def _check_approx(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def _gelu(dy, x, approximate, out_dtype, out_block, rounding, seed, with_t, salt=0):
    _check_approx(approximate)
    x_op = operand(x, "x")
    dy_op = x_op if dy is None else operand(dy, "dy")
    shape = check_same_shape(("dy", dy_op), ("x", x_op))
    check_int32_addressable(x_op.data, "x")
    device = x_op.data.device
    out = Output(shape, device, out_dtype, out_block, rounding, with_t, t_only_ok=dy is None)
    grid, meta = tile3_launch(shape, out, per_thread=16 if dy is None else 8, t_cols=t_cols(x_op, dy_op))
    flag, code = nonfinite.flag_args(device, "gelu_forward" if dy is None else "gelu_backward")
    if shape[0] and shape[1]:
        _gelu_kernel[grid](*dy_op.args, *x_op.args, *out.args, *out.t_args, shape[0], shape[1],
                           *seed_args(seed, salt, device, out.stochastic, flag), flag, code, BACKWARD=dy is not None, TANH=approximate == "tanh",
                           ROW_OUT=out.row, **meta)
    return out.result()


def gelu_forward(x, approximate: str = "none", out_dtype: torch.dtype = torch.float32, out_block=None,
                 rounding: str = "nearest", seed=0, *, with_t=False, salt: int = 0):
    """gelu(x); x float (M, D) or QTensor; returns a float tensor of out_dtype or a QTensor (out_block);
    with ``with_t`` (1xK out_block) the pair (y_q, y_t_q), y_t_q = quantize_transposed(y) from the same pass;
    with ``with_t='only'`` y_t_q alone (the wgrad operand, when y itself is not needed)."""
    return _gelu(None, x, approximate, out_dtype, out_block, rounding, seed, with_t, salt)


def gelu_backward(dy, x, approximate: str = "none", out_dtype: torch.dtype = torch.float32, out_block=None,
                  rounding: str = "nearest", seed=0, *, with_t: bool = False, salt: int = 0):
    """dx = dy * gelu'(x) (with ``with_t``: (dx_q, dx_t_q))."""
    return _gelu(dy, x, approximate, out_dtype, out_block, rounding, seed, with_t, salt)


def _swiglu(dy, gate, up, out_dtype, out_block, rounding, seed, with_t, salt=0):
    g_op, u_op = operand(gate, "gate"), operand(up, "up")
    dy_op = g_op if dy is None else operand(dy, "dy")
    shape = check_same_shape(("dy", dy_op), ("gate", g_op), ("up", u_op))
    check_int32_addressable(g_op.data, "gate")
    device = g_op.data.device
    out = Output(shape, device, out_dtype, out_block, rounding, with_t, t_only_ok=dy is None)
    out2 = Output(shape, device, out_dtype, out_block, rounding, with_t) if dy is not None else out
    flag, code = nonfinite.flag_args(device, "swiglu_forward" if dy is None else "swiglu_backward")
    seeds = seed_args(seed, salt, device, out.stochastic, flag, streams=(0, 1, 2, 3))  # ptr, salts of out, out2, t's

    def launch(grid, meta, row_out, with_t):
        t1 = out.t_args[:2] if with_t else (out.data, out.scale)
        t2 = out2.t_args[:2] if with_t else (out2.data, out2.scale)
        _swiglu_kernel[grid](*dy_op.args, *g_op.args, *u_op.args, *out.args, *t1, with_t, out2.data, out2.scale,
                             *t2, shape[0], shape[1], *seeds, flag, code, BACKWARD=dy is not None, ROW_OUT=row_out,
                             **meta)

    if not (shape[0] and shape[1]):
        pass
    elif dy is not None and out.with_t and SPLIT_BACKWARD_T:
        # Backward with the transposed copies: two launches, each on its own tile (the inputs read twice, 3 bytes an
        # element). The row copies exactly as with_t=False ([4, 8, 128] x 8 warps: 94 SASS instructions an element on
        # sm_90, 112 registers, 16 warps/SM), the transposed copies alone on one-warp [K, 1, 8] tiles
        # (``_launch.transposed_tile``: 120 SASS an element, no spills; session 4's [K, G, 32] x 4 warps: 152); the
        # fused [128, 1, 128] x 32-warp launch was 310 with 320 B of spills (docs/notes/membound_h200.md, "v4",
        # "Session 5"). Same values, seeds and noise (keyed by position) as the fused kernel: bit for bit its output.
        launch(*tile3_launch(shape, _RowOnly(out.qr, out.qc), per_thread=BACKWARD_PER_THREAD), True, False)
        if _launch.T_ONE_WARP:
            meta = transposed_tile(out.qc, shape[1], t_cols(g_op, u_op, dy_op))
        else:
            r, c = out.qc, 32
            g = max(1, min(next_pow2(-(-shape[1] // c)), 4096 // (r * c)))
            meta = dict(R=r, G=g, C=c, num_warps=warps_for_tile(r * g * c, 32))
        launch((triton.cdiv(shape[0], meta["R"]), triton.cdiv(shape[1], meta["G"] * meta["C"])), meta, False, True)
    else:
        grid, meta = tile3_launch(shape, out, per_thread=16 if dy is None else BACKWARD_PER_THREAD,
                                  t_cols=t_cols(g_op, u_op, dy_op))
        launch(grid, meta, out.row, out.with_t)
    return out.result() if dy is None else (out.result(), out2.result())


class _RowOnly(NamedTuple):
    """The geometry ``tile3_launch`` reads from an Output, for the row-copy launch of a with_t backward."""

    qr: int
    qc: int
    with_t: bool = False
    row: bool = True


# SwiGLU backward: values a thread (16: [4, 8, 128] tiles x 8 warps, 94 SASS an element, 16 warps/SM; v3's 4 gave
# 32 warps of 4 values, 202 an element) and the with_t launch split (row copies, transposed copies); module switches
# so that scripts/gpu/dual_probe.py can time v3's choices (4, False) in the same run.
BACKWARD_PER_THREAD = 16
SPLIT_BACKWARD_T = True


def swiglu_forward(gate, up, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                   seed=0, *, with_t=False, salt: int = 0):
    """silu(gate) * up (Llama's MLP activation); gate/up float (M, D) or QTensors; ``with_t`` as `gelu_forward`
    (True: the pair (y_q, y_t_q); 'only': y_t_q alone)."""
    return _swiglu(None, gate, up, out_dtype, out_block, rounding, seed, with_t, salt)


def swiglu_backward(dy, gate, up, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                    seed=0, *, with_t: bool = False, salt: int = 0):
    """Returns (dgate, dup), both in the requested output format (independent rounding noise); with
    ``with_t`` each is a pair (q, q_t)."""
    return _swiglu(dy, gate, up, out_dtype, out_block, rounding, seed, with_t, salt)


__all__ = ["GELU_APPROXIMATIONS", "gelu_backward", "gelu_forward", "swiglu_backward", "swiglu_forward"]
