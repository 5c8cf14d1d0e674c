"""GELU (erf and tanh) and SwiGLU, forward and backward, INT8 or float in and out, one pass each.

Each program owns a tile of whole output blocks (``tile_shape``): it loads its inputs (dequantizing
INT8 on load), computes in float32 and writes the output tile once, quantized in registers. The
formulas are those of ``int8flow.reference.nonlinear``; signatures mirror it with ``seed`` in place of
``generator`` (the noise of stochastic rounding comes from ``tl.rand(seed, element_index)``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._blockquant import emit_tile, load_operand, tile_coords
from ._launch import Output, check_same_shape, elementwise_launch, operand, stream_seed

GELU_APPROXIMATIONS = ("none", "tanh")
_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh_parts(z):
    """(tanh(z), 1 - tanh(z)^2) from sigmoid(+-2z): no cancellation in 1 - t^2 where |t| -> 1.

    (libdevice's tanh is unavailable in the Triton interpreter, the CPU test path.)
    """
    s_pos = tl.sigmoid(2.0 * z)
    s_neg = tl.sigmoid(-2.0 * z)
    return s_pos - s_neg, 4.0 * s_pos * s_neg


@triton.jit
def _gelu_kernel(dy_ptr, dy_scale, DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
                 x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                 out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                 STOCHASTIC: tl.constexpr,
                 M, N, seed, BACKWARD: tl.constexpr, TANH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out = gelu(x) (forward) or dy * gelu'(x) (BACKWARD); all tensors (M, N) row-major."""
    row0, col0, rows, cols = tile_coords(BM, BN)
    x = load_operand(x_ptr, x_scale, rows, cols, M, N, X_Q, X_QR, X_QC)
    if TANH:
        t, sech2 = _tanh_parts(_SQRT_2_OVER_PI * (x + _TANH_C * x * x * x))
        cdf = 0.5 * (1.0 + t)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
    if BACKWARD:
        dy = load_operand(dy_ptr, dy_scale, rows, cols, M, N, DY_Q, DY_QR, DY_QC)
        if TANH:
            dydx = cdf + 0.5 * x * sech2 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * x * x)
        else:
            dydx = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        y = dy * dydx
    else:
        y = x * cdf
    emit_tile(y, out_ptr, out_scale, row0, col0, M, N, seed, BM, BN, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC)


@triton.jit
def _swiglu_kernel(dy_ptr, dy_scale, DY_Q: tl.constexpr, DY_QR: tl.constexpr, DY_QC: tl.constexpr,
                   g_ptr, g_scale, G_Q: tl.constexpr, G_QR: tl.constexpr, G_QC: tl.constexpr,
                   u_ptr, u_scale, U_Q: tl.constexpr, U_QR: tl.constexpr, U_QC: tl.constexpr,
                   out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                   STOCHASTIC: tl.constexpr,
                   out2_ptr, out2_scale,
                   M, N, seed, seed2, BACKWARD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out = silu(g) * u (forward) or (out, out2) = (dgate, dup) (BACKWARD); out2 has out's format."""
    row0, col0, rows, cols = tile_coords(BM, BN)
    g = load_operand(g_ptr, g_scale, rows, cols, M, N, G_Q, G_QR, G_QC)
    u = load_operand(u_ptr, u_scale, rows, cols, M, N, U_Q, U_QR, U_QC)
    sig = tl.sigmoid(g)
    if BACKWARD:
        dy = load_operand(dy_ptr, dy_scale, rows, cols, M, N, DY_Q, DY_QR, DY_QC)
        dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
        emit_tile(dgate, out_ptr, out_scale, row0, col0, M, N, seed, BM, BN, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC)
        emit_tile(dy * g * sig, out2_ptr, out2_scale, row0, col0, M, N, seed2, BM, BN, OUT_Q, OUT_QR, OUT_QC,
                  STOCHASTIC)
    else:
        emit_tile(g * sig * u, out_ptr, out_scale, row0, col0, M, N, seed, BM, BN, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC)


def _check_approx(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def _gelu(dy, x, approximate, out_dtype, out_block, rounding, seed):
    _check_approx(approximate)
    x_op = operand(x, "x")
    dy_op = x_op if dy is None else operand(dy, "dy")
    shape = check_same_shape(("dy", dy_op), ("x", x_op))
    out = Output(shape, x_op.data.device, out_dtype, out_block, rounding)
    grid, meta = elementwise_launch(shape, out)
    _gelu_kernel[grid](*dy_op.args, *x_op.args, *out.args, shape[0], shape[1], stream_seed(seed, 0),
                       BACKWARD=dy is not None, TANH=approximate == "tanh", **meta)
    return out.result()


def gelu_forward(x, approximate: str = "none", out_dtype: torch.dtype = torch.float32, out_block=None,
                 rounding: str = "nearest", seed: int = 0):
    """gelu(x); x float (M, D) or QTensor; returns a float tensor of out_dtype or a QTensor (out_block)."""
    return _gelu(None, x, approximate, out_dtype, out_block, rounding, seed)


def gelu_backward(dy, x, approximate: str = "none", out_dtype: torch.dtype = torch.float32, out_block=None,
                  rounding: str = "nearest", seed: int = 0):
    """dx = dy * gelu'(x)."""
    return _gelu(dy, x, approximate, out_dtype, out_block, rounding, seed)


def _swiglu(dy, gate, up, out_dtype, out_block, rounding, seed):
    g_op, u_op = operand(gate, "gate"), operand(up, "up")
    dy_op = g_op if dy is None else operand(dy, "dy")
    shape = check_same_shape(("dy", dy_op), ("gate", g_op), ("up", u_op))
    device = g_op.data.device
    out = Output(shape, device, out_dtype, out_block, rounding)
    out2 = Output(shape, device, out_dtype, out_block, rounding) if dy is not None else out
    grid, meta = elementwise_launch(shape, out)
    _swiglu_kernel[grid](*dy_op.args, *g_op.args, *u_op.args, *out.args, out2.data, out2.scale,
                         shape[0], shape[1], stream_seed(seed, 0), stream_seed(seed, 1),
                         BACKWARD=dy is not None, **meta)
    return out.result() if dy is None else (out.result(), out2.result())


def swiglu_forward(gate, up, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                   seed: int = 0):
    """silu(gate) * up (Llama's MLP activation)."""
    return _swiglu(None, gate, up, out_dtype, out_block, rounding, seed)


def swiglu_backward(dy, gate, up, out_dtype: torch.dtype = torch.float32, out_block=None, rounding: str = "nearest",
                    seed: int = 0):
    """Returns (dgate, dup), both in the requested output format (independent rounding noise)."""
    return _swiglu(dy, gate, up, out_dtype, out_block, rounding, seed)


__all__ = ["GELU_APPROXIMATIONS", "gelu_backward", "gelu_forward", "swiglu_backward", "swiglu_forward"]
