"""References of the non-linear operators of the INT8 data flow, forward and backward.

Each operator reads float or INT8 (QTensor, dequantized on load) and writes, through `emit`, either a
float tensor or INT8 + per-block scales, which is what the paper's data flow moves between operators.
Backward functions are written out by hand (no autograd) because the kernels implement exactly these
formulas; the tests check them against float64 autograd.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..format import BlockShape, QTensor, quantize_transposed
from .gemm import emit

GELU_APPROXIMATIONS = ("none", "tanh")
NORM_STATS = (None, "layernorm", "rmsnorm")


def _emit(y: torch.Tensor, with_t=False, **out):
    """``emit``; with ``with_t`` (a 1xK ``out_block``) also the transposed copy, ``quantize_transposed`` of y:
    the pair (y_q, y_t_q) the kernels' dual-layout producers return; ``with_t='only'``: y_t_q alone."""
    if with_t not in (False, True, "only"):
        raise ValueError(f"with_t must be False, True or 'only' (the transposed copy alone), got {with_t!r}")
    q = emit(y, **out) if with_t != "only" else None
    if not with_t:
        return q
    block = out.get("out_block")
    if block is None or BlockShape.parse(block).rows != 1:
        raise ValueError(f"with_t=True writes the transposed copy in 1xK blocks along M: out_block must be '1xK' "
                         f"(e.g. '1x128'), got {block!r}; square blocks are their own transpose (use q.t())")
    q_t = quantize_transposed(y, block, out.get("rounding", "nearest"), out.get("generator"), check_finite=False)
    return q_t if q is None else (q, q_t)


def as_float(x, name: str = "x") -> torch.Tensor:
    """float32 view of an operator input: QTensors are dequantized, float tensors upcast."""
    if isinstance(x, QTensor):
        return x.dequantize(torch.float32)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor or a QTensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}; use x.reshape(-1, x.shape[-1])")
    return x.float()


def _same_shape(**tensors) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}; these operands must have the same (rows, features) shape")


def _check_vector(v: Optional[torch.Tensor], name: str, d: int) -> None:
    if v is not None and tuple(v.shape) != (d,):
        raise ValueError(f"{name} must have shape ({d},) to match the feature dimension, got {tuple(v.shape)}")


# --- LayerNorm --------------------------------------------------------------------------------


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite), got {eps!r}; "
                         "the usual values are 1e-5 (LayerNorm) and 1e-6 (RMSNorm)")


def _check_stats(t: Optional[torch.Tensor], name: str, rows: int) -> None:
    if t is not None and tuple(t.shape) != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), one value per row (from residual_add_forward), got {tuple(t.shape)}")


def layer_norm_forward(x, weight=None, bias=None, eps: float = 1e-5, *, mean=None, rstd=None, **out):
    """y = (x - mean) * rstd * weight + bias over the last dim; returns (y, mean, rstd).

    ``mean``/``rstd`` may be passed in when the residual add already computed them (Jetfire's fusion).
    """
    xf = as_float(x)
    _check_eps(eps)
    _check_vector(weight, "weight", xf.shape[1])
    _check_vector(bias, "bias", xf.shape[1])
    if (mean is None) != (rstd is None):
        raise ValueError("pass both mean and rstd (the residual add's LayerNorm statistics) or neither")
    _check_stats(mean, "mean", xf.shape[0])
    _check_stats(rstd, "rstd", xf.shape[0])
    if mean is None:
        mean = xf.mean(dim=1)
        rstd = torch.rsqrt(((xf - mean[:, None]) ** 2).mean(dim=1) + eps)
    y = (xf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return _emit(y, **out), mean, rstd


def _finish_dx(dx: torch.Tensor, dx_scale, residual) -> torch.Tensor:
    """``dx * dx_scale[:, None] + residual`` (each optional): a per-row factor (the forward's rstd when x was
    the normalized input) and the residual branch's gradient, applied before the output is written."""
    if dx_scale is not None:
        _check_stats(dx_scale, "dx_scale", dx.shape[0])
        dx = dx * dx_scale[:, None].float()
    if residual is not None:
        r = as_float(residual, "residual")
        _same_shape(dx=dx, residual=r)
        dx = dx + r
    return dx


def layer_norm_backward(dy, x, weight, mean, rstd, *, dx_scale=None, residual=None, **out):
    """Returns (dx, dweight, dbias); dweight/dbias are float32 (None when the forward had none).
    ``dx_scale`` (M,) / ``residual`` (M, D): dx becomes ``dx * dx_scale[:, None] + residual`` before it is
    written (the normalized-input form of the data flow, and the residual branch, in the same pass)."""
    dyf, xf = as_float(dy, "dy"), as_float(x)
    _same_shape(dy=dyf, x=xf)
    xhat = (xf - mean[:, None]) * rstd[:, None]
    wdy = dyf * weight.float() if weight is not None else dyf
    dx = rstd[:, None] * (wdy - wdy.mean(dim=1, keepdim=True) - xhat * (wdy * xhat).mean(dim=1, keepdim=True))
    dweight = (dyf * xhat).sum(dim=0) if weight is not None else None
    return _emit(_finish_dx(dx, dx_scale, residual), **out), dweight, dyf.sum(dim=0)


# --- RMSNorm ----------------------------------------------------------------------------------


def rms_norm_forward(x, weight=None, eps: float = 1e-6, *, rstd=None, **out):
    """y = x * rstd * weight with rstd = 1/sqrt(mean(x^2) + eps); returns (y, rstd) (``rstd`` may be passed in)."""
    xf = as_float(x)
    _check_eps(eps)
    _check_vector(weight, "weight", xf.shape[1])
    _check_stats(rstd, "rstd", xf.shape[0])
    if rstd is None:
        rstd = torch.rsqrt((xf * xf).mean(dim=1) + eps)
    y = xf * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    return _emit(y, **out), rstd


def rms_norm_backward(dy, x, weight, rstd, *, dx_scale=None, residual=None, **out):
    """Returns (dx, dweight); ``dx_scale`` / ``residual`` as `layer_norm_backward`."""
    dyf, xf = as_float(dy, "dy"), as_float(x)
    _same_shape(dy=dyf, x=xf)
    xhat = xf * rstd[:, None]
    wdy = dyf * weight.float() if weight is not None else dyf
    dx = rstd[:, None] * (wdy - xhat * (wdy * xhat).mean(dim=1, keepdim=True))
    dweight = (dyf * xhat).sum(dim=0) if weight is not None else None
    return _emit(_finish_dx(dx, dx_scale, residual), **out), dweight


# --- GELU -------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715


def _check_approx(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def gelu_forward(x, approximate: str = "none", **out):
    _check_approx(approximate)
    xf = as_float(x)
    if approximate == "none":
        y = 0.5 * xf * (1.0 + torch.erf(xf * math.sqrt(0.5)))
    else:
        y = 0.5 * xf * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (xf + _TANH_C * xf**3)))
    return _emit(y, **out)


def gelu_backward(dy, x, approximate: str = "none", **out):
    _check_approx(approximate)
    dyf, xf = as_float(dy, "dy"), as_float(x)
    _same_shape(dy=dyf, x=xf)
    if approximate == "none":
        cdf = 0.5 * (1.0 + torch.erf(xf * math.sqrt(0.5)))
        pdf = torch.exp(-0.5 * xf * xf) / math.sqrt(2.0 * math.pi)
        dydx = cdf + xf * pdf
    else:
        t = torch.tanh(_SQRT_2_OVER_PI * (xf + _TANH_C * xf**3))
        dydx = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * xf * xf)
    return _emit(dyf * dydx, **out)


# --- SwiGLU -----------------------------------------------------------------------------------


def swiglu_forward(gate, up, **out):
    """y = silu(gate) * up (Llama's MLP activation)."""
    gf, uf = as_float(gate, "gate"), as_float(up, "up")
    _same_shape(gate=gf, up=uf)
    return _emit(gf * torch.sigmoid(gf) * uf, **out)


def swiglu_backward(dy, gate, up, **out):
    """Returns (dgate, dup)."""
    dyf, gf, uf = as_float(dy, "dy"), as_float(gate, "gate"), as_float(up, "up")
    _same_shape(dy=dyf, gate=gf, up=uf)
    sig = torch.sigmoid(gf)
    dgate = dyf * uf * sig * (1.0 + gf * (1.0 - sig))
    dup = dyf * gf * sig
    return _emit(dgate, **out), _emit(dup, **out)


# --- Dropout ----------------------------------------------------------------------------------


def _check_p(p: float) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")


def dropout_forward(x, p: float, generator: Optional[torch.Generator] = None, **out):
    """Inverted dropout; returns (y, keep_mask). The mask comes from ``generator`` (seedable)."""
    _check_p(p)
    xf = as_float(x)
    keep = torch.rand(xf.shape, generator=generator, device=xf.device) >= p
    return _emit(xf * keep / (1.0 - p), **out), keep


def dropout_backward(dy, keep: torch.Tensor, p: float, **out):
    _check_p(p)
    dyf = as_float(dy, "dy")
    _same_shape(dy=dyf, keep=keep)
    return _emit(dyf * keep / (1.0 - p), **out)


# --- Residual add with the next norm's statistics ---------------------------------------------


class ResidualAdd(NamedTuple):
    h: torch.Tensor  # residual + delta, high precision (the residual's dtype)
    h_q: Optional[QTensor]  # INT8 copy for the next operator, when out_block is given
    mean: Optional[torch.Tensor]  # row mean of h (LayerNorm statistics), float32
    rstd: Optional[torch.Tensor]  # row 1/std (LayerNorm) or 1/rms (RMSNorm) of h, float32


def residual_add_forward(residual: torch.Tensor, delta, stats=None, eps: float = 1e-5, out_block=None,
                         rounding: str = "nearest", generator=None, with_t: bool = False) -> ResidualAdd:
    """h = residual + delta, plus what the next norm needs, computed while h is in registers (Jetfire fuses this)."""
    if stats not in NORM_STATS:
        raise ValueError(f"stats must be one of {NORM_STATS}, got {stats!r}")
    _check_eps(eps)
    rf, df = as_float(residual, "residual"), as_float(delta, "delta")
    _same_shape(residual=rf, delta=df)
    h = (rf + df).to(residual.dtype)
    hf = h.float()
    mean = rstd = None
    if stats == "layernorm":
        mean = hf.mean(dim=1)
        rstd = torch.rsqrt(((hf - mean[:, None]) ** 2).mean(dim=1) + eps)
    elif stats == "rmsnorm":
        rstd = torch.rsqrt((hf * hf).mean(dim=1) + eps)
    h_q = _emit(hf, with_t, out_block=out_block, rounding=rounding, generator=generator) if out_block is not None else None
    return ResidualAdd(h, h_q, mean, rstd)


def residual_add_backward(dh, **out):
    """Returns (dresidual, ddelta): the gradient flows unchanged into both; ddelta may be re-quantized."""
    dhf = as_float(dh, "dh")
    dres = dh if isinstance(dh, torch.Tensor) else dhf
    return dres, _emit(dhf, **out)
