"""Reference operators against float64 math: GEMMs, norms, activations, dropout, residual add, and backward passes."""
import math

import pytest
import torch
import torch.nn.functional as F

from int8flow.format import expand_scale, quantize
from int8flow import reference as ref
from _inputs import DISTRIBUTIONS, sample, sqnr_db

BLOCKS = ["32x32", "1x32", "1x128", "32x128", "128x128"]
GEMM_SHAPES = [(1, 1, 1), (33, 40, 70), (64, 96, 128), (100, 77, 130)]


def _step(q):
    return expand_scale(q.scale, q.block, tuple(q.shape)).double()


def _within_half_step(q, exact64, slack=1e-4):
    """|dequant(q) - exact| <= step/2 + slack * (typical magnitude): the epilogue's only error is its rounding."""
    err = (q.dequantize(torch.float64) - exact64).abs()
    return bool((err <= _step(q) * 0.5 + slack * exact64.abs().amax().clamp_min(1e-30) * 1e-2).all())


# --- GEMMs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mnk", GEMM_SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_block_gemm_equals_product_of_dequantized_operands(mnk, block):
    M, N, K = mnk
    a, b = quantize(sample((M, K), "heavy_tailed", 1), block), quantize(sample((N, K), "gaussian", 2), block)
    exact = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()
    y = ref.block_gemm(a, b)
    # float32 accumulation over K terms: relative error ~ K * 2^-24 of sum|a||b|
    bound = (a.dequantize(torch.float64).abs() @ b.dequantize(torch.float64).abs().t()) * (K * 2**-23) + 1e-30
    assert bool(((y.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("block", BLOCKS)
def test_block_gemm_sqnr_matches_quantization_noise(dist, block):
    """Output noise = sum of the two operands' quantization noise (independent): measured SQNR must reach the
    prediction minus 1.5 dB (the prediction ignores correlations; 1.5 dB is ~40% more noise than predicted)."""
    x, w = sample((100, 256), dist, 3), sample((77, 256), "gaussian", 4)
    xq, wq = quantize(x, block), quantize(w, block)
    sx, sw = sqnr_db(x, xq.dequantize()), sqnr_db(w, wq.dequantize())
    predicted = -10 * math.log10(10 ** (-sx / 10) + 10 ** (-sw / 10))
    measured = sqnr_db(x.double() @ w.double().t(), ref.block_gemm(xq, wq))
    assert measured >= predicted - 1.5, (measured, predicted)


def test_three_linear_gemms_use_transposed_views():
    x, w, dy = sample((70, 96), "outlier_channels", 5), sample((40, 96), "gaussian", 6), sample((70, 40), "heavy_tailed", 7)
    xq, wq, dyq = quantize(x), quantize(w), quantize(dy, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    X, W, DY = xq.dequantize(torch.float64), wq.dequantize(torch.float64), dyq.dequantize(torch.float64)
    bias = torch.randn(40)
    torch.testing.assert_close(ref.linear_forward(xq, wq, bias).double(), X @ W.t() + bias.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref.linear_input_grad(dyq, wq).double(), DY @ W, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref.linear_weight_grad(dyq, xq).double(), DY.t() @ X, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out_block", ["32x32", "1x128"])
def test_gemm_quantized_epilogue(out_block):
    a, b = quantize(sample((65, 100), "gaussian", 8)), quantize(sample((90, 100), "gaussian", 9))
    exact = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()
    yq = ref.block_gemm(a, b, out_block=out_block)
    assert yq.data.dtype == torch.int8 and yq.shape == (65, 90)
    assert _within_half_step(yq, exact)
    ys = ref.block_gemm(a, b, out_block=out_block, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert bool(((ys.dequantize(torch.float64) - exact).abs() <= _step(ys) * 1.0001).all())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_output_dtype(out_dtype):
    a, b = quantize(torch.randn(8, 32)), quantize(torch.randn(4, 32))
    assert ref.block_gemm(a, b, out_dtype=out_dtype).dtype == out_dtype


def test_gemm_bad_operands():
    a, b = quantize(torch.randn(8, 32)), quantize(torch.randn(4, 40))
    with pytest.raises(ValueError, match="same K"):
        ref.block_gemm(a, b)
    with pytest.raises(TypeError, match="QTensor"):
        ref.block_gemm(torch.randn(8, 32), a)
    with pytest.raises(ValueError, match="bias"):
        ref.block_gemm(a, quantize(torch.randn(4, 32)), bias=torch.randn(5))


# --- Non-linear operators: forward against float64 ---------------------------------------------

ROW_SHAPES = [(1, 32), (33, 77), (64, 160), (100, 45)]


def _q_or_float(x, quantized):
    return quantize(x) if quantized else x


def _forward_cases():
    return {
        "layernorm": (lambda x, w, b: ref.layer_norm_forward(x, w, b)[0],
                      lambda x, w, b: F.layer_norm(x, (x.shape[1],), w, b, 1e-5)),
        "rmsnorm": (lambda x, w, b: ref.rms_norm_forward(x, w)[0],
                    lambda x, w, b: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * w),
        "gelu": (lambda x, w, b: ref.gelu_forward(x), lambda x, w, b: F.gelu(x)),
        "gelu_tanh": (lambda x, w, b: ref.gelu_forward(x, "tanh"), lambda x, w, b: F.gelu(x, approximate="tanh")),
    }


FORWARD_OPS = ["layernorm", "rmsnorm", "gelu", "gelu_tanh"]


@pytest.mark.parametrize("op", FORWARD_OPS)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("quantized_in", [False, True])
def test_forward_against_float64(op, shape, dist, quantized_in):
    ours, exact = _forward_cases()[op]
    x = sample(shape, dist, seed=11)
    w, b = 1 + 0.1 * torch.randn(shape[1]), 0.1 * torch.randn(shape[1])
    xin = _q_or_float(x, quantized_in)
    x64 = xin.dequantize(torch.float64) if quantized_in else x.double()
    want = exact(x64, w.double(), b.double())
    # float output: float32 math, relative error a few float32 ulps of the output scale
    torch.testing.assert_close(ours(xin, w, b).double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # INT8 output: the only extra error is the output rounding (half a step)
    fn_q = {
        "layernorm": lambda: ref.layer_norm_forward(xin, w, b, out_block="32x32")[0],
        "rmsnorm": lambda: ref.rms_norm_forward(xin, w, out_block="32x32")[0],
        "gelu": lambda: ref.gelu_forward(xin, out_block="32x32"),
        "gelu_tanh": lambda: ref.gelu_forward(xin, "tanh", out_block="32x32"),
    }[op]
    assert _within_half_step(fn_q(), want)


@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_swiglu_forward(shape):
    g, u = sample(shape, "heavy_tailed", 12), sample(shape, "outlier_channels", 13)
    want = F.silu(g.double()) * u.double()
    torch.testing.assert_close(ref.swiglu_forward(g, u).double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert _within_half_step(ref.swiglu_forward(quantize(g), quantize(u), out_block="32x32"),
                             F.silu(quantize(g).dequantize(torch.float64)) * quantize(u).dequantize(torch.float64))


# --- Backward against float64 autograd --------------------------------------------------------


def _autograd64(fn, *inputs):
    """Gradients of sum(fn(*inputs) * dy) in float64."""
    leaves = [t.double().detach().requires_grad_(True) if t is not None else None for t in inputs]
    return leaves, fn(*leaves)


@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_norm_backward_against_autograd(shape, dist):
    x, dy = sample(shape, dist, 14), sample(shape, "gaussian", 15)
    w, b = 1 + 0.1 * torch.randn(shape[1]), 0.1 * torch.randn(shape[1])
    # LayerNorm
    (x64, w64, b64), y64 = _autograd64(lambda x, w, b: F.layer_norm(x, (shape[1],), w, b, 1e-5), x, w, b)
    gx, gw, gb = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    _, mean, rstd = ref.layer_norm_forward(x, w, b)
    dx, dw, db = ref.layer_norm_backward(dy, x, w, mean, rstd)
    for ours, want in ((dx, gx), (dw, gw), (db, gb)):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-12)
    # RMSNorm
    (x64, w64), y64 = _autograd64(lambda x, w: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * w, x, w)
    gx, gw = torch.autograd.grad(y64, (x64, w64), dy.double())
    _, rstd = ref.rms_norm_forward(x, w)
    dx, dw = ref.rms_norm_backward(dy, x, w, rstd)
    for ours, want in ((dx, gx), (dw, gw)):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_activation_backward_against_autograd(approximate, shape):
    x, dy = sample(shape, "heavy_tailed", 16), sample(shape, "gaussian", 17)
    (x64,), y64 = _autograd64(lambda x: F.gelu(x, approximate=approximate), x)
    (gx,) = torch.autograd.grad(y64, (x64,), dy.double())
    torch.testing.assert_close(ref.gelu_backward(dy, x, approximate).double(), gx, rtol=1e-5, atol=1e-5 * float(gx.abs().max()))
    u = sample(shape, "outlier_channels", 18)
    (g64, u64), y64 = _autograd64(lambda g, u: F.silu(g) * u, x, u)
    gg, gu = torch.autograd.grad(y64, (g64, u64), dy.double())
    dg, du = ref.swiglu_backward(dy, x, u)
    torch.testing.assert_close(dg.double(), gg, rtol=1e-5, atol=1e-5 * float(gg.abs().max()))
    torch.testing.assert_close(du.double(), gu, rtol=1e-5, atol=1e-5 * float(gu.abs().max()))


def test_quantized_gradients_stay_within_one_step():
    """Gradients written as INT8 with stochastic rounding (as the paper's backward does): error < one step."""
    shape = (70, 96)
    x, dy = sample(shape, "heavy_tailed", 19), sample(shape, "gaussian", 20)
    w = 1 + 0.1 * torch.randn(96)
    g = torch.Generator().manual_seed(0)
    _, mean, rstd = ref.layer_norm_forward(x, w, None)
    dx_f, _, _ = ref.layer_norm_backward(dy, x, w, mean, rstd)
    dx_q, _, _ = ref.layer_norm_backward(quantize(dy), x, w, mean, rstd, out_block="32x32", rounding="stochastic", generator=g)
    dx_exact = ref.layer_norm_backward(quantize(dy).dequantize(), x, w, mean, rstd)[0].double()
    assert bool(((dx_q.dequantize(torch.float64) - dx_exact).abs() <= _step(dx_q) * 1.0001).all())
    assert sqnr_db(dx_f, dx_q.dequantize()) > 25  # INT8 input + INT8 output: two roundings of ~40 dB each


# --- Dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout(p):
    x, dy = sample((64, 160), "gaussian", 21), sample((64, 160), "gaussian", 22)
    y, keep = ref.dropout_forward(x, p, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(y, x * keep / (1 - p))
    n = keep.numel()
    # keep count ~ Binomial(n, 1-p): |z| < 5 fails with probability 6e-7
    z = (keep.sum().item() - n * (1 - p)) / math.sqrt(max(n * p * (1 - p), 1e-12))
    assert abs(z) < 5 or p == 0.0
    assert bool(keep.all()) if p == 0.0 else True
    torch.testing.assert_close(ref.dropout_backward(dy, keep, p), dy * keep / (1 - p))
    y2, keep2 = ref.dropout_forward(x, p, generator=torch.Generator().manual_seed(3))
    assert torch.equal(keep, keep2)


@pytest.mark.parametrize("p", [-0.1, 1.0, "0.5"])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="dropout probability"):
        ref.dropout_forward(torch.randn(4, 4), p)


# --- Residual add with fused statistics -------------------------------------------------------


@pytest.mark.parametrize("stats", [None, "layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_residual_add_with_statistics(stats, shape):
    r, d = sample(shape, "gaussian", 23), sample(shape, "outlier_channels", 24)
    out = ref.residual_add_forward(r, quantize(d), stats=stats, out_block="32x32")
    h64 = r.double() + quantize(d).dequantize(torch.float64)
    torch.testing.assert_close(out.h.double(), h64, rtol=1e-6, atol=1e-6)
    assert _within_half_step(out.h_q, out.h.double())
    if stats == "layernorm":
        torch.testing.assert_close(out.mean.double(), h64.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.rstd.double(), 1 / torch.sqrt(h64.var(1, unbiased=False) + 1e-5), rtol=1e-5, atol=0)
        # the fused statistics are what LayerNorm would compute itself, and LayerNorm can take them
        y_own, mean_own, _ = ref.layer_norm_forward(out.h)
        torch.testing.assert_close(mean_own, out.mean)
        torch.testing.assert_close(ref.layer_norm_forward(out.h, mean=out.mean, rstd=out.rstd)[0], y_own)
    elif stats == "rmsnorm":
        torch.testing.assert_close(out.rstd.double(), 1 / torch.sqrt(h64.pow(2).mean(1) + 1e-5), rtol=1e-5, atol=0)
        torch.testing.assert_close(ref.rms_norm_forward(out.h, rstd=out.rstd)[0], ref.rms_norm_forward(out.h, eps=1e-5)[0])
    else:
        assert out.mean is None and out.rstd is None
    dh = sample(shape, "gaussian", 25)
    dres, ddelta = ref.residual_add_backward(dh, out_block="32x32")
    assert torch.equal(dres, dh)
    assert _within_half_step(ddelta, dh.double())


def test_operator_shape_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        ref.swiglu_forward(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="weight must have shape"):
        ref.layer_norm_forward(torch.randn(4, 8), torch.randn(9))
    with pytest.raises(ValueError, match="2-D"):
        ref.gelu_forward(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="approximate"):
        ref.gelu_forward(torch.randn(2, 8), approximate="fast")
    with pytest.raises(ValueError, match="stats"):
        ref.residual_add_forward(torch.randn(2, 8), torch.randn(2, 8), stats="batchnorm")
    for bad_eps in (-1.0, 0.0, float("nan"), "1e-5"):
        with pytest.raises(ValueError, match="eps must be a positive"):
            ref.layer_norm_forward(torch.randn(2, 8), eps=bad_eps)
        with pytest.raises(ValueError, match="eps must be a positive"):
            ref.rms_norm_forward(torch.randn(2, 8), eps=bad_eps)
    with pytest.raises(ValueError, match="both mean and rstd"):
        ref.layer_norm_forward(torch.randn(2, 8), mean=torch.zeros(2))
    with pytest.raises(ValueError, match="one value per row"):
        ref.rms_norm_forward(torch.randn(2, 8), rstd=torch.ones(3))
