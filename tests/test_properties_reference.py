"""Properties of the reference GEMM and non-linear operators against float64 math, over random shapes,
block shapes and value distributions (see _strategies.py).

The float64 oracle runs on the same (dequantized) inputs, so the only differences are float32 rounding:
* GEMM: |y - exact| <= (|A| @ |B|.T) * K * 2^-23 + K * 2^-149 (K float32 roundings of the running sum, each
  <= 2^-24 relative, doubled for margin; plus half the float32 subnormal spacing per product that underflows).
* Non-linear ops: per row, err <= 2^-20 * D * scale_row, where scale_row is the row's largest float64 term
  (see each test); D float32 roundings of a row reduction (mean, variance, dot product), 16x margin.
Inputs stay where float32 intermediates do not overflow (norms square x, so |x| <= 1e18); what happens
beyond is pinned in test_reliability_numerics.py.
"""
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from int8flow import reference as ref
from int8flow.format import QTensor, expand_scale, quantize
from _strategies import VALUE_KINDS, blocks, dims, make_values, seeds

PROPS = settings(deadline=None, max_examples=40, derandomize=True)
TINY = 2.0**-149
NORM_MAX = 1e18  # x^2 and row sums of x^2 stay below FLT_MAX = 3.4e38 for D <= 130
kinds = st.sampled_from(VALUE_KINDS)


@st.composite
def gemm_operands(draw):
    M, N, K = draw(dims), draw(dims), draw(dims)
    # near_max: the largest magnitudes whose product sum over K still fits float32.
    big = (torch.finfo(torch.float32).max / (2 * K)) ** 0.5
    a = make_values((M, K), draw(kinds), draw(seeds), max_abs=big)
    b = make_values((N, K), draw(kinds), draw(seeds), max_abs=big)
    return quantize(a, draw(blocks)), quantize(b, draw(blocks))


def _gemm_bound(A, B):
    K = A.shape[1]
    return (A.abs() @ B.abs().t()) * (K * 2.0**-23) + K * TINY


@PROPS
@given(gemm_operands(), st.booleans())
def test_gemm_matches_float64(ab, with_bias):
    a, b = ab
    A, B = a.dequantize(torch.float64), b.dequantize(torch.float64)
    bias = torch.randn(b.shape[0]) if with_bias else None
    y = ref.block_gemm(a, b, bias)
    exact = A @ B.t() + (bias.double() if with_bias else 0)
    bound = _gemm_bound(A, B) + (bias.double().abs() * 2.0**-23 if with_bias else 0)
    assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    assert bool(((y.double() - exact).abs() <= bound).all())


@PROPS
@given(gemm_operands(), blocks, st.sampled_from(["nearest", "stochastic"]), seeds)
def test_gemm_quantized_epilogue_matches_float64(ab, out_block, rounding, seed):
    a, b = ab
    A, B = a.dequantize(torch.float64), b.dequantize(torch.float64)
    yq = ref.block_gemm(a, b, out_block=out_block, rounding=rounding, generator=torch.Generator().manual_seed(seed))
    exact = A @ B.t()
    step = expand_scale(yq.scale, yq.block, tuple(yq.shape)).double()
    steps = 0.5 if rounding == "nearest" else 1.0
    # the epilogue adds one rounding (half a step / one step) of its input, itself within the GEMM bound; the
    # GEMM error can also move the block absmax, hence the bound counts it twice.
    bound = step * steps * (1 + 2.0**-20) + 2 * _gemm_bound(A, B) + exact.abs() * 2.0**-21 + 128 * TINY
    assert int(yq.data.min()) >= -127 and bool(torch.isfinite(yq.scale).all())
    assert bool(((yq.dequantize(torch.float64) - exact).abs() <= bound).all())


@PROPS
@given(gemm_operands())
def test_linear_gemms_agree_with_explicit_transposes(ab):
    """linear_input_grad / linear_weight_grad are block_gemm on .t() views: same numbers as the float64 products."""
    x_q, w_q = ab
    M, N = x_q.shape[0], w_q.shape[0]
    dy_q = quantize(make_values((M, N), "heavy_tailed", 7), "32x32")
    X, W, DY = (t.dequantize(torch.float64) for t in (x_q, w_q, dy_q))
    dx, dw = ref.linear_input_grad(dy_q, w_q).double(), ref.linear_weight_grad(dy_q, x_q).double()
    assert bool(((dx - DY @ W).abs() <= _gemm_bound(DY, W.t())).all())
    assert bool(((dw - DY.t() @ X).abs() <= _gemm_bound(DY.t(), X.t())).all())


# --- non-linear operators -----------------------------------------------------------------------


@st.composite
def rows(draw, max_abs=NORM_MAX, quantized=None):
    shape = (draw(dims), draw(dims))
    x = make_values(shape, draw(kinds), draw(seeds), max_abs=max_abs)
    q = draw(st.booleans()) if quantized is None else quantized
    return (quantize(x, draw(blocks)) if q else x), shape


def _f64(x):
    return x.dequantize(torch.float64) if isinstance(x, QTensor) else x.double()


def _assert_rows_close(got, want, scale_row):
    """|got - want| <= 2^-20 * D * scale_row (+ float32 subnormal slack), row by row."""
    D = want.shape[1]
    tol = scale_row[:, None] * (D * 2.0**-20) + 128 * TINY
    err = (got.double() - want).abs()
    assert bool(torch.isfinite(got).all())
    assert bool((err <= tol).all()), float((err - tol).max())


def _rowmax(t):
    return t.abs().amax(dim=1)


@PROPS
@given(rows(), seeds)
def test_layer_norm_forward_backward_match_float64(xs, seed):
    x, (M, D) = xs
    g = torch.Generator().manual_seed(seed)
    w, b, dy = 1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g), torch.randn(M, D, generator=g)
    x64 = _f64(x).requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    y64 = F.layer_norm(x64, (D,), w64, b64, 1e-5)
    y64.backward(dy.double())
    y, mean, rstd = ref.layer_norm_forward(x, w, b)
    r64 = torch.rsqrt(x64.detach().var(1, unbiased=False) + 1e-5)
    # the mean's rounding is amplified by rstd: scale = rstd * max|x| * max|w| (+ the output's own magnitude)
    _assert_rows_close(y, y64.detach(), r64 * _rowmax(x64.detach()) * float(w.abs().max()) + _rowmax(y64.detach()))
    dx, dw, db = ref.layer_norm_backward(dy, x, w, mean, rstd)
    # dx = rstd * (w dy - mean(w dy) - xhat mean(w dy xhat)): terms up to rstd * |w dy| * (1 + |xhat|^2),
    # and xhat's own error is rstd * (error of the mean).
    xhat_max = _rowmax((x64.detach() - x64.detach().mean(1, keepdim=True)) * r64[:, None])
    wdy = _rowmax(dy.double() * w.double())
    cond = 1 + r64 * _rowmax(x64.detach())
    _assert_rows_close(dx, x64.grad, r64 * wdy * (1 + xhat_max) ** 2 * cond)
    col = lambda v: v[None, :]
    _assert_rows_close(col(db), col(b64.grad), col(dy.double().abs().sum(0)) / D * M)
    _assert_rows_close(col(dw), col(w64.grad), col((dy.double().abs() * (1 + xhat_max[:, None]) * cond[:, None]).sum(0)) / D * M)


@PROPS
@given(rows(), seeds)
def test_rms_norm_forward_backward_match_float64(xs, seed):
    x, (M, D) = xs
    g = torch.Generator().manual_seed(seed)
    w, dy = 1 + 0.1 * torch.randn(D, generator=g), torch.randn(M, D, generator=g)
    x64 = _f64(x).requires_grad_()
    w64 = w.double().requires_grad_()
    r64 = torch.rsqrt(x64.pow(2).mean(1) + 1e-6)
    y64 = x64 * r64[:, None] * w64
    y64.backward(dy.double())
    y, rstd = ref.rms_norm_forward(x, w)
    _assert_rows_close(y, y64.detach(), _rowmax(y64.detach()) + 1e-30)
    dx, dw = ref.rms_norm_backward(dy, x, w, rstd)
    xhat_max = _rowmax(x64.detach() * r64.detach()[:, None])
    _assert_rows_close(dx, x64.grad, r64.detach() * _rowmax(dy.double() * w.double()) * (1 + xhat_max) ** 2)
    _assert_rows_close(dw[None], w64.grad[None], (dy.double().abs() * (1 + xhat_max[:, None])).sum(0)[None] / D * M)


@PROPS
@given(rows(max_abs=1e15), st.sampled_from(["none", "tanh"]), seeds)
def test_gelu_forward_backward_match_float64(xs, approximate, seed):
    x, (M, D) = xs
    dy = torch.randn(M, D, generator=torch.Generator().manual_seed(seed))
    x64 = _f64(x).requires_grad_()
    y64 = F.gelu(x64, approximate=approximate)
    y64.backward(dy.double())
    # elementwise: a few float32 roundings of |x| (and of |dy| (1 + |x|) for the derivative)
    _assert_rows_close(ref.gelu_forward(x, approximate), y64.detach(), _rowmax(x64.detach()) / D + TINY)
    _assert_rows_close(ref.gelu_backward(dy, x, approximate), x64.grad,
                       _rowmax(dy.double() * (1 + x64.detach().abs())) / D)


@PROPS
@given(rows(max_abs=1e15), rows(max_abs=1e15), seeds)
def test_swiglu_forward_backward_match_float64(gs, us, seed):
    gate, (M, D) = gs
    up = make_values((M, D), "heavy_tailed", seed)
    dy = torch.randn(M, D, generator=torch.Generator().manual_seed(seed))
    g64, u64 = _f64(gate).requires_grad_(), up.double().requires_grad_()
    y64 = F.silu(g64) * u64
    y64.backward(dy.double())
    mag = _rowmax(g64.detach()) * _rowmax(u64.detach())
    _assert_rows_close(ref.swiglu_forward(gate, up), y64.detach(), mag / D + TINY)
    dgate, dup = ref.swiglu_backward(dy, gate, up)
    _assert_rows_close(dgate, g64.grad, _rowmax(dy.double()) * _rowmax(u64.detach()) * (1 + _rowmax(g64.detach())) / D)
    _assert_rows_close(dup, u64.grad, _rowmax(dy.double()) * _rowmax(g64.detach()) / D)


@PROPS
@given(rows(max_abs=1e30), st.floats(0.0, 0.9), seeds)
def test_dropout_scales_kept_and_zeroes_dropped(xs, p, seed):
    x, (M, D) = xs
    y, keep = ref.dropout_forward(x, p, generator=torch.Generator().manual_seed(seed))
    x64 = _f64(x)
    want = x64 * keep / (1 - p)
    _assert_rows_close(y, want, _rowmax(want) / D + TINY)
    dy = torch.randn(M, D)
    _assert_rows_close(ref.dropout_backward(dy, keep, p), dy.double() * keep / (1 - p), _rowmax(dy.double()) * 2 / D)


@PROPS
@given(rows(quantized=False), kinds, seeds, st.sampled_from([None, "layernorm", "rmsnorm"]))
def test_residual_add_sum_and_statistics(rs, draw_kind, seed, stats):
    residual, (M, D) = rs
    delta = make_values((M, D), draw_kind, seed, max_abs=NORM_MAX)
    out = ref.residual_add_forward(residual, delta, stats=stats, out_block="32x32")
    h64 = residual.double() + delta.double()
    _assert_rows_close(out.h, h64, _rowmax(h64) / D + TINY)
    assert out.h.dtype == residual.dtype and out.h_q is not None
    hf = out.h.double()
    if stats == "layernorm":
        _assert_rows_close(out.mean[:, None], hf.mean(1, keepdim=True), _rowmax(hf))
        r64 = torch.rsqrt(hf.var(1, unbiased=False) + 1e-5)
        _assert_rows_close(out.rstd[:, None], r64[:, None], r64 * (1 + r64 * _rowmax(hf)) ** 2)
    elif stats == "rmsnorm":
        r64 = torch.rsqrt(hf.pow(2).mean(1) + 1e-5)
        _assert_rows_close(out.rstd[:, None], r64[:, None], r64)
    else:
        assert out.mean is None and out.rstd is None
