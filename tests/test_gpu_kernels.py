"""GPU tier: every kernel compiled, at the shapes training runs, against its reference (``pytest -m gpu``).

Skipped without CUDA (tests/conftest.py). Inputs are fresh random tensors with outlier channels; every
kernel output buffer is poisoned (NaN / 99) first, so an element the kernel forgets to write fails.

Thresholds (relative Frobenius error ``||got - ref|| / ||ref||`` against float64 on the dequantized operands):
* GEMM on int8 tensor cores: the int32 products are exact and each promotion group is an exact float32
  conversion, so only the float32 accumulation over K / G groups and the float32 scale products round:
  about sqrt(K / G) * 2**-24; 1e-5 leaves a wide margin and still catches a wrong block or scale (>= 1e-2).
* GEMM on bf16 tensor cores (dequantize-on-load): each scaled operand rounds once to bf16 (relative error
  <= 2**-9), so a product term is off by <= 2**-8 relative; errors of independent terms add in quadrature,
  so the relative error stays near 2**-9 * sqrt(2) ~ 2.8e-3; 1e-2 bounds it with margin.
* INT8 output: each element within half a quantization step (its block's scale / 2) of the same kernel's
  float output, plus that float output's own error.
"""
import math

import pytest
import torch

from int8flow.format import QTensor, expand_scale, quantize
from int8flow.format import quantize as fmt_quantize
from int8flow.kernels import _launch

pytestmark = pytest.mark.gpu

TOKENS = 16384
GEMM_SHAPES = {  # (M, N, K) of a linear layer's forward GEMM
    "llama-qkv": (TOKENS, 4096, 4096), "llama-up": (TOKENS, 11008, 4096), "llama-down": (TOKENS, 4096, 11008),
    "gpt2-qkv": (TOKENS, 2304, 768), "gpt2-fc1": (TOKENS, 3072, 768), "gpt2-fc2": (TOKENS, 768, 3072),
    "odd": (1531, 1037, 1111),  # no dimension a multiple of any block
}
# act/grad block, weight block: the paper's exact mode and the coarse-K geometry (promotion every 128 of K)
GEOMETRIES = {"jetfire": ("32x32", "32x32"), "coarse128": ("1x128", "128x128")}
INT8_TC_RTOL, BF16_TC_RTOL = 1e-5, 1e-2


def outliers(shape, seed, scale=1.0, channels_frac=1 / 64):
    """Gaussian with a few columns 30x larger (LLM-style outlier channels), on the GPU, float32."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda") * scale
    cols = torch.randperm(shape[1], generator=g, device="cuda")[: max(1, int(shape[1] * channels_frac))]
    x[:, cols] *= 30.0
    return x


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(99 if dtype == torch.int8 else float("nan"))
    monkeypatch.setattr(_launch, "alloc", alloc)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite (unwritten?) elements in the kernel output"
    return float((got - ref).norm() / ref.norm())


def ref_gemm(a: QTensor, b: QTensor) -> torch.Tensor:
    return a.dequantize().double() @ b.dequantize().double().t()


def gemm_rtol(a: QTensor, b: QTensor) -> float:
    from int8flow.kernels import gemm as kg

    group = kg.promotion_group(a, b)
    return INT8_TC_RTOL if kg.resolve_impl("auto", group) == "int8" else BF16_TC_RTOL


def _operands(gemm: str, shape, geometry, seed):
    """The two K-major operands of one GEMM of a linear layer, quantized the way the data flow does."""
    M, N, K = shape
    act, wblk = GEOMETRIES[geometry]
    if gemm == "fwd":  # y = x @ w.T
        return quantize(outliers((M, K), seed), act), quantize(outliers((N, K), seed + 1, 0.02), wblk)
    if gemm == "dgrad":  # dx = dy @ w: b = w.T, a K-major copy of the weight (N is the reduction)
        w_t = outliers((N, K), seed + 1, 0.02).t().contiguous()
        return quantize(outliers((M, N), seed, 1e-3), act), quantize(w_t, wblk)
    # wgrad: dw = dy.T @ x, both transposed copies quantized along M (the reduction)
    dy_t, x_t = outliers((M, N), seed, 1e-3).t().contiguous(), outliers((M, K), seed + 1).t().contiguous()
    return quantize(dy_t, act), quantize(x_t, act)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("gemm", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("name", list(GEMM_SHAPES))
def test_gemm_real_shapes(name, gemm, geometry):
    from int8flow.kernels import gemm as kg

    a, b = _operands(gemm, GEMM_SHAPES[name], geometry, seed=hash((name, gemm)) % 1000)
    ref = ref_gemm(a, b)
    bias = torch.randn(b.shape[0], device="cuda") if gemm == "fwd" else None
    y = kg.block_gemm(a, b, bias, out_dtype=torch.float32)
    if bias is not None:
        ref = ref + bias.double()
    assert rel_err(y, ref) <= gemm_rtol(a, b)
    if gemm == "wgrad":
        return  # the weight gradient leaves the GEMM in float (it feeds the optimizer)
    # INT8 epilogue (the data flow's output format): within half a step of the float result
    out_block = GEOMETRIES[geometry][0]
    yq = kg.block_gemm(a, b, bias, out_block=out_block)
    step = expand_scale(yq.scale, yq.block, tuple(yq.shape))
    assert bool(((yq.dequantize() - y).abs() <= 0.5 * step * (1 + 1e-5) + 1e-6 * y.abs()).all())


def test_gemm_transposed_view_operand():
    """The 32x32 data flow's dgrad reads w_q.t() (square blocks are their own transpose): right result."""
    from int8flow.kernels import gemm as kg

    M, N, K = 4096, 1024, 768
    dy_q, w_q = quantize(outliers((M, N), 1, 1e-3), "32x32"), quantize(outliers((N, K), 2, 0.02), "32x32")
    try:
        dx = kg.block_gemm(dy_q, w_q.t())
    except ValueError as e:  # a fast route may refuse non-K-major views: then the message must name the fix
        assert "K-major" in str(e) or "quantize_transposed" in str(e), str(e)
        return
    assert rel_err(dx, ref_gemm(dy_q, w_q.t())) <= gemm_rtol(dy_q, w_q.t())


@pytest.mark.parametrize("pattern", ["channel", "scattered"])
def test_gemm_fallback_term_real_shape(pattern):
    """(x + residual) @ w.T in one pass, the residual present on ~5% of the activation blocks."""
    from int8flow.kernels import gemm as kg

    M, N, K = TOKENS, 4096, 4096
    x = outliers((M, K), 5)
    x_q = quantize(x, "1x128")
    resid = x - x_q.dequantize()
    grid = x_q.scale.shape
    g = torch.Generator(device="cuda").manual_seed(6)
    if pattern == "channel":
        flags = torch.zeros(grid, dtype=torch.bool, device="cuda")
        flags[:, torch.randperm(grid[1], generator=g, device="cuda")[: max(1, grid[1] // 20)]] = True
    else:
        flags = torch.rand(grid, generator=g, device="cuda") < 0.05
    resid = resid * expand_scale(flags.float(), x_q.block, (M, K))
    r_q = quantize(resid, "1x128")
    w_q = quantize(outliers((N, K), 7, 0.02), "128x128")
    y = kg.block_gemm(x_q, w_q, a_fallback=r_q, a_fallback_flags=flags)
    ref = (x_q.dequantize().double() + r_q.dequantize().double()) @ w_q.dequantize().double().t()
    assert rel_err(y, ref) <= INT8_TC_RTOL


def test_stochastic_rounding_unbiased_at_scale():
    """GEMM INT8 epilogue with stochastic rounding: mean error over 16384 x 4096 outputs is zero (z-test).

    Each element's rounding error e has E[e] = 0 and Var[e] <= step^2 / 4; the sum of 67M independent errors
    divided by sqrt(sum step^2 / 4) is then ~N(0, <=1): |z| < 5 fails a correct kernel with p < 6e-7.
    """
    from int8flow.kernels import gemm as kg

    a, b = _operands("fwd", (TOKENS, 4096, 4096), "coarse128", seed=11)
    y = kg.block_gemm(a, b, out_dtype=torch.float32)
    yq = kg.block_gemm(a, b, out_block="1x128", rounding="stochastic", seed=1234)
    step = expand_scale(yq.scale, yq.block, tuple(yq.shape)).double()
    err = yq.dequantize().double() - y.double()
    z = float(err.sum() / ((step**2).sum() / 4).sqrt())
    assert abs(z) < 5.0, z
    # and it is not nearest rounding in disguise: errors beyond half a step occur
    assert bool((err.abs() > 0.5 * step * 1.001).any())


# --- memory-bound kernels ----------------------------------------------------------------------------
WIDTHS = [768, 4096, 11008]


@pytest.mark.parametrize("block", ["32x32", "1x128"])
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_bit_exact_real_shapes(d, block, dtype):
    from int8flow.kernels import quantize as kq

    x = outliers((TOKENS, d), d).to(dtype)
    got, want = kq.quantize(x, block), fmt_quantize(x, block)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.data, want.data)
    got_t = kq.quantize_transposed(x, block)
    want_t = fmt_quantize(x.t().contiguous(), block)
    assert torch.equal(got_t.scale, want_t.scale) and torch.equal(got_t.data, want_t.data)


def _close(got, want, what):
    """float: within float32 summation-order noise; QTensor: dequantized within one step of the reference."""
    if isinstance(want, QTensor):
        step = expand_scale(torch.maximum(got.scale, want.scale), want.block, tuple(want.shape))
        diff = (got.dequantize() - want.dequantize()).abs()
        # one rounding flip (a step) plus |q| <= 127 times the scales' float32 difference (rtol 1e-5)
        torch.testing.assert_close(got.scale, want.scale, rtol=3e-5, atol=0)  # see test_kernels_nonlinear
        assert bool((diff <= step * (1 + 127 * 3e-5)).all()), f"{what}: max |diff|/step {float((diff / step).nan_to_num().max())}"
        assert (got.data == want.data).float().mean().item() >= 0.99, what
    else:
        assert rel_err(got.float(), want.float()) <= (2**-7 if want.dtype == torch.bfloat16 else 1e-5), what


@pytest.mark.parametrize("out", ["bf16", "1x128", "32x32"])
@pytest.mark.parametrize("d", WIDTHS)
def test_nonlinear_kernels_real_shapes(d, out):
    from int8flow.kernels import activations, norms
    from int8flow.reference import nonlinear as ref

    kw = dict(out_dtype=torch.bfloat16) if out == "bf16" else dict(out_block=out)
    x = outliers((TOKENS, d), 1).to(torch.bfloat16) + 3.0
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16)
    bias = torch.randn(d, device="cuda").to(torch.bfloat16)
    dy = outliers((TOKENS, d), 2, 1e-3).to(torch.bfloat16)

    y, mean, rstd = norms.layer_norm_forward(x, w, bias, **kw)
    y_r, mean_r, rstd_r = ref.layer_norm_forward(x, w, bias, **kw)
    torch.testing.assert_close(mean, mean_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, rstd_r, rtol=5e-5, atol=0)  # see test_residual_and_dropout_real_shapes
    _close(y, y_r, "layer_norm_forward")
    dx, dw, db = norms.layer_norm_backward(dy, x, w, mean_r, rstd_r, **kw)
    dx_r, dw_r, db_r = ref.layer_norm_backward(dy, x, w, mean_r, rstd_r, **kw)
    _close(dx, dx_r, "layer_norm_backward dx")
    assert rel_err(dw, dw_r) <= 1e-4 and rel_err(db, db_r) <= 1e-4  # column sums over 16384 rows, other order

    y, rstd = norms.rms_norm_forward(x, w, **kw)
    y_r, rstd_r = ref.rms_norm_forward(x, w, **kw)
    _close(y, y_r, "rms_norm_forward")
    dx, dw = norms.rms_norm_backward(dy, x, w, rstd_r, **kw)
    dx_r, dw_r = ref.rms_norm_backward(dy, x, w, rstd_r, **kw)
    _close(dx, dx_r, "rms_norm_backward dx")
    assert rel_err(dw, dw_r) <= 1e-4

    _close(activations.gelu_forward(x, **kw), ref.gelu_forward(x, **kw), "gelu_forward")
    _close(activations.gelu_backward(dy, x, **kw), ref.gelu_backward(dy, x, **kw), "gelu_backward")
    up = outliers((TOKENS, d), 3).to(torch.bfloat16)
    _close(activations.swiglu_forward(x, up, **kw), ref.swiglu_forward(x, up, **kw), "swiglu_forward")
    for got, want in zip(activations.swiglu_backward(dy, x, up, **kw), ref.swiglu_backward(dy, x, up, **kw)):
        _close(got, want, "swiglu_backward")


@pytest.mark.parametrize("d", WIDTHS)
def test_residual_and_dropout_real_shapes(d):
    from int8flow.kernels import dropout, residual
    from int8flow.reference import nonlinear as ref

    r = outliers((TOKENS, d), 4).to(torch.bfloat16)
    delta = quantize(outliers((TOKENS, d), 5), "1x128")
    got = residual.residual_add_forward(r, delta, stats="rmsnorm", out_block="1x128")
    want = ref.residual_add_forward(r, delta, stats="rmsnorm", out_block="1x128")
    # h: the kernel may fuse residual + q * scale into one FMA (one rounding): within one bf16 ulp of h plus one
    # float32 ulp of the terms (where residual and delta cancel, an ulp of the terms exceeds an ulp of h)
    bound = 2**-7 * want.h.float().abs() + 2.0**-23 * (r.float().abs() + delta.dequantize().abs())
    assert bool(((got.h.float() - want.h.float()).abs() <= bound).all()), "residual h: more than one rounding off"
    # rstd: a float32 sum of d squares in another order (~sqrt(d) * 2**-24 relative, rare rows a few times
    # that), halved by the square root: 5e-5 bounds it
    torch.testing.assert_close(got.rstd, want.rstd, rtol=5e-5, atol=0)
    # h_q is quantized from the kernel's own h, which may sit one rounding (the bound above) from the reference's,
    # and a block's absmax with it (seen on the H200: 1 block of 44k off by 2**-8 relative). So: block scales within
    # that rounding of the reference's, and every code within half a step of the kernel's own h (plus h's bf16
    # rounding, 2**-8 relative, when the kernel quantizes the float32 value before rounding it to bf16)
    torch.testing.assert_close(got.h_q.scale, want.h_q.scale, rtol=2**-7, atol=0)
    step = expand_scale(got.h_q.scale, got.h_q.block, tuple(got.h_q.shape))
    off = (got.h_q.dequantize() - got.h.float()).abs()
    assert bool((off <= 0.5 * step * (1 + 1e-5) + 2**-8 * got.h.float().abs()).all()), "residual h_q: off its own h"
    assert (got.h_q.data == want.h_q.data).float().mean().item() >= 0.99, "residual h_q codes"

    p = 0.1
    x = outliers((TOKENS, d), 6)
    y, mask = dropout.dropout_forward(x, p, seed=3, out_dtype=torch.float32)
    keep = (y != 0) | (x == 0)
    frac = keep.float().mean().item()
    # 16384*d Bernoulli(0.9) draws: the kept fraction is within 6 sigma of 0.9
    assert abs(frac - (1 - p)) < 6 * math.sqrt(p * (1 - p) / x.numel()), frac
    torch.testing.assert_close(y[keep], (x / (1 - p))[keep], rtol=1e-6, atol=0)
    dx = dropout.dropout_backward(x, mask, p, out_dtype=torch.float32)
    torch.testing.assert_close(dx, y, rtol=0, atol=0)  # same mask, same input: same output
