"""Triton non-linear kernels (norms, activations, residual add, dropout) against the reference.

Runs on CPU through the Triton interpreter and, on a CUDA machine, the compiled kernels on CUDA tensors
(tests/conftest.py makes that one decision).

Thresholds:
* INT8 outputs: kernel and reference quantize float32 values that differ only by summation order /
  transcendental implementation (a few float32 ulps), which can flip a rounding decision: dequantized
  values agree within one quantization step of their block, scales to float32 rounding, and almost
  all int8 codes are identical.
* float outputs: both compute in float32 from the same inputs: float32 results agree to a few ulps of
  the row's magnitude (rtol 1e-5, atol 1e-5 * max|ref|); bfloat16 results are the same float32 values
  rounded once, so they agree within one bfloat16 ulp (rtol 2**-7).
"""
import math


import pytest
import torch

pytest.importorskip("triton")

from int8flow.format import QTensor, expand_scale, quantize  # noqa: E402
from int8flow.format.blocks import _SCALE_MAX  # noqa: E402
from int8flow.reference import nonlinear as ref  # noqa: E402
from int8flow.kernels import _launch, activations, dropout, norms, residual  # noqa: E402

from _inputs import sample  # noqa: E402

INTERPRET = _launch.interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),  # exp overflow -> inf, used on purpose
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),  # interpreter internals
]

SHAPES = [(1, 32), (33, 77), (64, 160), (100, 77), (33, 160), (100, 32), (64, 32), (1, 160)]
OUTS = ["float32", "bfloat16", "32x32", "1x32", "1x128"]
DISTS = ["gaussian", "heavy_tailed", "outlier_channels"]


def _cases(n: int):
    """n cases (shape, out format, input dtype, QTensor input?, distribution) varying every axis; each shape
    meets both dtypes and both input kinds within 16 cases."""
    return [(SHAPES[i % 8], OUTS[i % 5], (torch.float32, torch.bfloat16)[(i // 8) % 2], (i // 2 + i // 8) % 2 == 1,
             DISTS[i % 3]) for i in range(n)]


CASES = _cases(16)
CASE_IDS = [f"{m}x{d}-{o}-{str(dt)[6:]}-{'q' if q else 'f'}-{dist}" for (m, d), o, dt, q, dist in CASES]


def _x(shape, dist, dtype, quantized, seed, scale=1.0):
    x = (sample(shape, dist, seed) * scale).to(dtype).to(DEVICE)
    return quantize(x.float(), "32x32") if quantized else x


def _out_kwargs(out: str) -> dict:
    if "x" in out:
        return dict(out_block=out)
    return dict(out_dtype=getattr(torch, out))


def assert_matches(got, want):
    """Kernel output vs reference output, by the rules in the module docstring."""
    if isinstance(want, QTensor):
        assert isinstance(got, QTensor) and got.block == want.block
        # Scales: float32 results of another summation order. LayerNorm's backward subtracts row means
        # (dx = rstd * (g - mean(g) - xhat * mean(g * xhat))), so near cancellation its relative error reaches
        # ~1e-5 (1.14e-5 seen on the H200); 3e-5 bounds it.
        torch.testing.assert_close(got.scale, want.scale, rtol=3e-5, atol=1e-30)
        step = expand_scale(torch.maximum(got.scale, want.scale), want.block, tuple(want.shape))
        diff = (got.dequantize() - want.dequantize()).abs()
        # one rounding flip (a step) plus q * (scale difference), |q| <= 127 and scales within rtol 3e-5
        assert bool((diff <= step * (1 + 127 * 3e-5)).all()), f"max |diff| / step = {float((diff / step).nan_to_num().max())}"
        same = (got.data == want.data).float().mean().item()
        assert same >= 0.99, f"only {same:.4f} of the int8 codes agree"
    else:
        assert got.dtype == want.dtype and got.shape == want.shape
        w = want.float()
        if want.dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(w.abs().max().clamp_min(1e-30)))
        else:
            torch.testing.assert_close(got.float(), w, rtol=2**-7, atol=1e-6 * float(w.abs().max()))


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN / 99 so an element the kernel forgets to write fails the comparison."""
    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(99 if dtype == torch.int8 else float("nan"))
    monkeypatch.setattr(_launch, "alloc", alloc)


# --- LayerNorm / RMSNorm -------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out,dtype,quantized,dist", CASES, ids=CASE_IDS)
def test_layer_norm(poisoned, shape, out, dtype, quantized, dist):
    x = _x(shape, dist, dtype, quantized, seed=1, scale=3.0)
    if not quantized:
        x = x + 5.0  # a large row mean: the variance must not be computed as E[x^2] - E[x]^2
    d = shape[1]
    weight = (1 + 0.1 * sample((d,), seed=2)).to(dtype).to(DEVICE)
    bias = sample((d,), seed=3).to(dtype).to(DEVICE)
    kw = _out_kwargs(out)
    y, mean, rstd = norms.layer_norm_forward(x, weight, bias, **kw)
    y_r, mean_r, rstd_r = ref.layer_norm_forward(x, weight, bias, **kw)
    torch.testing.assert_close(mean, mean_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, rstd_r, rtol=1e-5, atol=0)
    assert_matches(y, y_r)
    # Backward, with the gradient in the same format as the forward output and stochastic rounding.
    dy = _x(shape, "heavy_tailed", dtype, quantized, seed=4)
    dx, dw, db = norms.layer_norm_backward(dy, x, weight, mean_r, rstd_r, **kw)
    dx_r, dw_r, db_r = ref.layer_norm_backward(dy, x, weight, mean_r, rstd_r, **kw)
    assert_matches(dx, dx_r)
    # Column sums over M rows in a different order: float32 error grows ~ sqrt(M) ulps of the sum of |terms|.
    torch.testing.assert_close(dw, dw_r, rtol=1e-5, atol=1e-5 * shape[0])
    torch.testing.assert_close(db, db_r, rtol=1e-5, atol=1e-5 * shape[0])


@pytest.mark.parametrize("shape,out,dtype,quantized,dist", CASES[1::2], ids=CASE_IDS[1::2])
def test_rms_norm(poisoned, shape, out, dtype, quantized, dist):
    x = _x(shape, dist, dtype, quantized, seed=5, scale=2.0)
    weight = (1 + 0.1 * sample((shape[1],), seed=6)).to(dtype).to(DEVICE)
    kw = _out_kwargs(out)
    y, rstd = norms.rms_norm_forward(x, weight, **kw)
    y_r, rstd_r = ref.rms_norm_forward(x, weight, **kw)
    torch.testing.assert_close(rstd, rstd_r, rtol=1e-5, atol=0)
    assert_matches(y, y_r)
    dy = _x(shape, "gaussian", dtype, quantized, seed=7)
    dx, dw = norms.rms_norm_backward(dy, x, weight, rstd_r, **kw)
    dx_r, dw_r = ref.rms_norm_backward(dy, x, weight, rstd_r, **kw)
    assert_matches(dx, dx_r)
    torch.testing.assert_close(dw, dw_r, rtol=1e-5, atol=1e-5 * shape[0])


@pytest.mark.parametrize("rms", [False, True])
def test_norm_without_affine(rms):
    x = _x((33, 160), "heavy_tailed", torch.float32, False, seed=8)
    dy = _x((33, 160), "gaussian", torch.float32, False, seed=9)
    if rms:
        (y, rstd), (y_r, rstd_r) = norms.rms_norm_forward(x), ref.rms_norm_forward(x)
        got, want = norms.rms_norm_backward(dy, x, None, rstd_r), ref.rms_norm_backward(dy, x, None, rstd_r)
    else:
        (y, _, _), (y_r, mean_r, rstd_r) = norms.layer_norm_forward(x), ref.layer_norm_forward(x)
        got = norms.layer_norm_backward(dy, x, None, mean_r, rstd_r)
        want = ref.layer_norm_backward(dy, x, None, mean_r, rstd_r)
    assert_matches(y, y_r)
    assert_matches(got[0], want[0])
    assert got[1] is None and want[1] is None
    if not rms:
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape,out", [((70, 96), "bfloat16"), ((33, 300), "float32"), ((130, 160), "1x32"),
                                       ((66, 200), "32x32")])  # the last: chunked launch
def test_norm_backward_scales_rows_and_adds_the_residual(poisoned, rms, shape, out):
    """dx_scale / residual: dx * dx_scale[:, None] + residual written by the same kernel (whole-row and chunked
    launches, tails), equal to the reference within the module's rules, and to the two-step form."""
    m, d = shape
    x = _x(shape, "outlier_channels", torch.float32, True, seed=120, scale=2.0)
    dy = _x(shape, "heavy_tailed", torch.float32, True, seed=121)
    w = (1 + 0.1 * sample((d,), seed=122)).to(DEVICE)
    mean, rstd = torch.zeros(m, device=DEVICE), torch.ones(m, device=DEVICE)  # the unit statistics of a normalized x
    scale = (0.5 + sample((m,), seed=123).abs()).to(DEVICE)
    res = _x(shape, "gaussian", torch.bfloat16, False, seed=124)
    kw = dict(dx_scale=scale, residual=res, **_out_kwargs(out))

    def run(mod, **o):
        return (mod.rms_norm_backward(dy, x, w, rstd, **o) if rms else mod.layer_norm_backward(dy, x, w, mean, rstd, **o))[0]

    got, want = run(norms, **kw), run(ref, **kw)
    assert_matches(got, want)
    if out == "float32":  # the fused form is the two-step one, up to the float32 rounding of one multiply-add
        plain = run(norms, out_dtype=torch.float32)
        torch.testing.assert_close(got, plain * scale[:, None] + res.float(), rtol=1e-5, atol=1e-5)


def test_norm_backward_residual_must_be_a_float_tensor():
    x = _x((8, 64), "gaussian", torch.float32, False, seed=125)
    one = torch.ones(8, device=DEVICE)
    with pytest.raises(TypeError, match="residual must be a float tensor"):
        norms.rms_norm_backward(x, x, None, one, residual=quantize(x, "1x32"))
    with pytest.raises(ValueError, match="shape mismatch"):
        norms.rms_norm_backward(x, x, None, one, residual=x[:, :32].contiguous())


def test_layer_norm_backward_matches_autograd_float64():
    """dx uses the full width D in its means (the paper's kernel divided by D while summing 128 columns)."""
    m, d = 5, 300  # several column chunks
    x = sample((m, d), "outlier_channels", seed=10, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = (1 + sample((d,), seed=11, dtype=torch.float64)).to(DEVICE).requires_grad_()
    b = sample((d,), seed=12, dtype=torch.float64).to(DEVICE).requires_grad_()
    dy = sample((m, d), seed=13, dtype=torch.float64).to(DEVICE)
    torch.nn.functional.layer_norm(x, (d,), w, b, eps=1e-5).backward(dy)
    _, mean, rstd = norms.layer_norm_forward(x.detach().float(), w.detach().float(), b.detach().float())
    dx, dw, db = norms.layer_norm_backward(dy.float(), x.detach().float(), w.detach().float(), mean, rstd)
    for got, want in ((dx, x.grad), (dw, w.grad), (db, b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_layer_norm_with_given_stats_reads_them():
    x = _x((64, 77), "gaussian", torch.float32, False, seed=14)
    _, mean, rstd = ref.layer_norm_forward(x)
    y, mean_out, rstd_out = norms.layer_norm_forward(x, mean=mean * 0 + 1.0, rstd=rstd, out_block="32x32")
    assert mean_out is not mean and bool((mean_out == 1.0).all())
    torch.testing.assert_close(y.dequantize(), (x - 1.0) * rstd[:, None], rtol=0, atol=float(y.scale.max()) / 2 + 1e-6)


# --- GELU / SwiGLU -------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,out,dtype,quantized,dist", CASES[::2], ids=CASE_IDS[::2])
def test_gelu(poisoned, approximate, shape, out, dtype, quantized, dist):
    x = _x(shape, dist, dtype, quantized, seed=20, scale=2.0)
    kw = _out_kwargs(out)
    assert_matches(activations.gelu_forward(x, approximate, **kw), ref.gelu_forward(x, approximate, **kw))
    dy = _x(shape, "heavy_tailed", dtype, quantized, seed=21)
    assert_matches(activations.gelu_backward(dy, x, approximate, **kw), ref.gelu_backward(dy, x, approximate, **kw))


@pytest.mark.parametrize("shape,out,dtype,quantized,dist", CASES[::2], ids=CASE_IDS[::2])
def test_swiglu(poisoned, shape, out, dtype, quantized, dist):
    gate = _x(shape, dist, dtype, quantized, seed=30, scale=3.0)
    up = _x(shape, "heavy_tailed", dtype, quantized, seed=31)
    kw = _out_kwargs(out)
    assert_matches(activations.swiglu_forward(gate, up, **kw), ref.swiglu_forward(gate, up, **kw))
    dy = _x(shape, "gaussian", dtype, quantized, seed=32)
    for got, want in zip(activations.swiglu_backward(dy, gate, up, **kw), ref.swiglu_backward(dy, gate, up, **kw)):
        assert_matches(got, want)


# --- residual add --------------------------------------------------------------------------------


def _assert_residual_sum(got, want, res, delta):
    """h = residual + dequantized delta: the reference rounds q * scale, then the sum; the compiled kernel may fuse
    them into one FMA (one rounding, more accurate). Exact in the interpreter (no FMA contraction); on the GPU the
    two differ by the rounding of q * scale, at most one float32 ulp of |delta| (which exceeds an ulp of h where
    residual and delta cancel), plus one ulp of h's dtype when h is stored narrower than float32."""
    if INTERPRET:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    d = delta.dequantize() if isinstance(delta, QTensor) else delta.float()
    bound = torch.finfo(want.dtype).eps * want.float().abs() + 2.0**-23 * (res.float().abs() + d.abs())
    assert bool(((got.float() - want.float()).abs() <= bound).all()), "h differs by more than one rounding"


@pytest.mark.parametrize("stats", [None, "layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape,out,dtype,quantized,dist", CASES[1::3], ids=CASE_IDS[1::3])
def test_residual_add(poisoned, stats, shape, out, dtype, quantized, dist):
    res = (_x(shape, dist, dtype, False, seed=40, scale=4.0) + 2.0).to(dtype)
    delta = _x(shape, "heavy_tailed", dtype, quantized, seed=41)
    out_block = out if "x" in out else None
    got = residual.residual_add_forward(res, delta, stats, out_block=out_block)
    want = ref.residual_add_forward(res, delta, stats, out_block=out_block)
    _assert_residual_sum(got.h, want.h, res, delta)
    if out_block is None:
        assert got.h_q is None
    else:
        assert_matches(got.h_q, want.h_q)
    for name in ("mean", "rstd"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out", ["float32", "bfloat16", "32x32", "1x128"])
@pytest.mark.parametrize("quantized", [False, True])
def test_residual_add_backward(out, quantized):
    dh = _x((33, 77), "heavy_tailed", torch.float32, quantized, seed=42)
    kw = _out_kwargs(out)
    (dres, ddelta), (dres_r, ddelta_r) = residual.residual_add_backward(dh, **kw), ref.residual_add_backward(dh, **kw)
    torch.testing.assert_close(dres, dres_r, rtol=0, atol=0)
    assert_matches(ddelta, ddelta_r)
    if not quantized:
        assert dres is dh
        if out == "float32":
            assert ddelta is dh


# --- dropout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out,dtype,quantized,dist", CASES[::3], ids=CASE_IDS[::3])
def test_dropout_regenerated_mask(poisoned, shape, out, dtype, quantized, dist):
    """Forward and backward apply the same mask: the one DropoutMask.materialize() returns."""
    p = 0.25
    x = _x(shape, dist, dtype, quantized, seed=90)
    kw = _out_kwargs(out)
    y, mask = dropout.dropout_forward(x, p, seed=5, **kw)
    keep = mask.materialize(DEVICE)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert_matches(y, ref.dropout_backward(x, keep, p, **kw))  # the reference's formula with this mask
    dy = _x(shape, "heavy_tailed", dtype, quantized, seed=91)
    want = ref.dropout_backward(dy, keep, p, **kw)
    assert_matches(dropout.dropout_backward(dy, mask, p, **kw), want)
    assert_matches(dropout.dropout_backward(dy, keep, p, **kw), want)  # the reference-compatible bool path


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout_mask_statistics(p):
    shape = (256, 200)
    x = torch.ones(shape, device=DEVICE)
    y, mask = dropout.dropout_forward(x, p, seed=11)
    keep = y != 0
    assert torch.equal(keep, mask.materialize(DEVICE))
    torch.testing.assert_close(y[keep], torch.full_like(y[keep], 1.0 / (1.0 - p)), rtol=0, atol=0)
    n = keep.numel()
    tol = 5 * math.sqrt(p * (1 - p) / (n / 4)) + 1e-12  # 5 sigma on each quarter of the tensor
    for part in (keep[:128, :100], keep[:128, 100:], keep[128:, :100], keep[128:, 100:]):
        assert abs(float(part.float().mean()) - (1 - p)) <= tol
    if p > 0:
        assert not torch.equal(keep, dropout.dropout_forward(x, p, seed=12)[1].materialize(DEVICE))
        # neighbouring elements independent: P(both kept) = q = (1-p)^2 within 5 sigma (overlapping pairs
        # share an element, which at most triples the variance q(1-q)/n of the pair average)
        both = float((keep[:, 1:] & keep[:, :-1]).float().mean())
        q = (1 - p) ** 2
        assert abs(both - q) <= 5 * math.sqrt(3 * q * (1 - q) / keep[:, 1:].numel())
    assert torch.equal(dropout.dropout_forward(x, p, seed=11)[0], y)


def test_dropout_bad_arguments():
    x = _x((33, 77), "gaussian", torch.float32, False, seed=92)
    _, mask = dropout.dropout_forward(x, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout.dropout_forward(x, 1.0)
    with pytest.raises(ValueError, match="matching forward"):
        dropout.dropout_backward(x, mask, 0.2)
    with pytest.raises(TypeError, match="bool"):
        dropout.dropout_backward(x, torch.ones(33, 77), 0.1)


# --- the block quantizer itself ------------------------------------------------------------------


@pytest.mark.parametrize("block", ["32x32", "1x32", "1x128", "64x64", "128x128", "2x64"])
@pytest.mark.parametrize("shape", [(1, 32), (33, 77), (100, 160)])
def test_convert_equals_format_quantize(block, shape):
    """Nearest rounding of a float tensor is bit-identical to int8flow.format.quantize (same float32 ops)."""
    x = _x(shape, "outlier_channels", torch.float32, False, seed=50)
    x[0, :] = 0.0  # an all-zero block row where shape allows
    x[-1, -1] = torch.finfo(torch.float32).max  # the format clamps this block's scale to stay finite
    got, want = residual.convert(x, out_block=block), quantize(x, block)
    assert torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)
    # and back: INT8 in (any block) -> float out is exact dequantization
    torch.testing.assert_close(residual.convert(got), want.dequantize(), rtol=0, atol=0)


def _extreme_blocks(seed: int) -> torch.Tensor:
    """(64, 96) input: 32x32 block (0, 0) holds FLT_MAX-adjacent values (the scale clamp), block (1, 1) only
    subnormals (a subnormal scale), the rest Gaussian."""
    x = sample((64, 96), "gaussian", seed)
    big = torch.finfo(torch.float32).max
    x[:32, :32] = torch.rand(32, 32, generator=torch.Generator().manual_seed(seed)) * big
    x[0, 0], x[1, 1] = big, -torch.nextafter(torch.tensor(big), torch.tensor(0.0))
    x[32:, 32:64] = sample((32, 32), "gaussian", seed + 1) * 1e-39
    return x.to(DEVICE)


def _nonlinear_ops(x: torch.Tensor) -> dict:
    """Each non-linear kernel as fn(**out) -> its main output, arranged to carry x's extreme blocks to the output."""
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    n = x.shape[1]
    weight = torch.ones(n, device=x.device)
    weight[32:64] = 0.0  # y = bias there: subnormal
    bias = torch.zeros(n, device=x.device)
    bias[:32], bias[32:64] = torch.finfo(torch.float32).max, 1e-39
    x_norm = sample(tuple(x.shape), "gaussian", 80).to(x.device)
    return {
        "gelu": lambda **o: activations.gelu_forward(x, **o),
        "swiglu": lambda **o: activations.swiglu_forward(x, ones, **o),
        "dropout_p0": lambda **o: dropout.dropout_forward(x, 0.0, **o)[0],
        "residual_add": lambda **o: (residual.residual_add_forward(x, zeros, out_block=o["out_block"]).h_q
                                     if "out_block" in o else residual.residual_add_forward(x, zeros).h),
        "layer_norm": lambda **o: norms.layer_norm_forward(x_norm, weight, bias, **o)[0],
        "convert": lambda **o: residual.convert(x, **o),
    }


@pytest.mark.parametrize("block", ["32x32", "1x32"])
@pytest.mark.parametrize("op", ["gelu", "swiglu", "dropout_p0", "residual_add", "layer_norm", "convert"])
def test_int8_outputs_equal_format_quantize_at_extremes(op, block):
    """INT8 out of every non-linear kernel == int8flow.format.quantize of the same kernel's float32 out, bit for bit,
    with a FLT_MAX-adjacent block (scale clamped) and a subnormal block (scale subnormal) in the output."""
    fn = _nonlinear_ops(_extreme_blocks(90))[op]
    y = fn(out_dtype=torch.float32)
    got, want = fn(out_block=block), quantize(y, block)
    assert torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)
    # the cases are exercised: one block at the clamped scale, one with a subnormal nonzero scale
    assert float(want.scale.max()) == _SCALE_MAX
    tiny = want.scale[(want.scale > 0) & (want.scale < torch.finfo(torch.float32).tiny)]
    assert tiny.numel() > 0


def test_stochastic_rounding_unbiased_and_reproducible():
    """Values sitting 0.3 of a step above a code: nearest is biased by -0.3 step, stochastic is not."""
    m, d = 64, 64
    codes = torch.randint(-100, 100, (m, d), generator=torch.Generator().manual_seed(0)).float()
    codes[:, 0] = 127.0  # every 1x64 block's absmax is 127 * 0.5: scale = 0.5 exactly
    x = ((codes + 0.3 * (codes < 127)) * 0.5).to(DEVICE)
    step = 0.5
    nearest = residual.convert(x, out_block="1x64").dequantize()
    assert abs(float((nearest - x).mean()) / step + 0.3) < 0.02
    draws = torch.stack([residual.convert(x, out_block="1x64", rounding="stochastic", seed=s).dequantize()
                         for s in range(32)])
    # mean error over 32 * 4096 draws with per-draw sd sqrt(0.3 * 0.7) step: 5 sigma = 0.0064 step
    assert abs(float((draws - x).mean()) / step) < 0.0064
    assert bool(((draws - x).abs() < step).all())
    again = residual.convert(x, out_block="1x64", rounding="stochastic", seed=3).dequantize()
    assert torch.equal(again, draws[3]) and not torch.equal(draws[3], draws[4])


def test_stochastic_gradients_reproducible_and_unbiased():
    x = _x((33, 77), "heavy_tailed", torch.float32, False, seed=60)
    dy = _x((33, 77), "gaussian", torch.float32, False, seed=61)
    kw = dict(out_block="32x32", rounding="stochastic")
    a = activations.gelu_backward(dy, x, seed=7, **kw)
    assert torch.equal(a.data, activations.gelu_backward(dy, x, seed=7, **kw).data)
    exact = ref.gelu_backward(dy, x)
    draws = torch.stack([activations.gelu_backward(dy, x, seed=s, **kw).dequantize() for s in range(16)])
    step = expand_scale(a.scale, a.block, tuple(x.shape))
    # mean over 16 draws: sd <= 0.5 / 4 step per element; all 2541 elements within 5 sd
    assert bool(((draws.mean(0) - exact).abs() <= 0.625 * step + 1e-7).all())
    dg, du = activations.swiglu_backward(dy, x, dy, seed=7, **kw)
    assert not torch.equal(dg.data, du.data)  # different tensors draw different noise


# --- validation ----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = _x((33, 77), "gaussian", torch.float32, False, seed=70)
    with pytest.raises(ValueError, match="block sides must be powers of two"):
        activations.gelu_forward(x, out_block="3x32")
    with pytest.raises(ValueError, match="shape mismatch"):
        activations.swiglu_forward(x, x[:, :32].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        activations.gelu_forward(x.t())
    with pytest.raises(ValueError, match="2-D"):
        activations.gelu_forward(x[0])
    with pytest.raises(ValueError, match="approximate"):
        activations.gelu_forward(x, "fast")
    with pytest.raises(ValueError, match="weight must have shape"):
        norms.layer_norm_forward(x, torch.ones(76))
    with pytest.raises(ValueError, match="rstd must be a float32"):
        norms.rms_norm_backward(x, x, None, torch.ones(32))
    with pytest.raises(ValueError, match="stats must be one of"):
        residual.residual_add_forward(x, x, stats="batchnorm")
    with pytest.raises(TypeError, match="int8"):
        activations.gelu_forward(x.to(torch.int8))


# --- dual layout: the output and its transposed 1xK-along-M copy from one pass ---------------------


def _with_t_ops(m: int, d: int, block: str) -> dict:
    """op -> fn(module, **out): each producer's main INT8 output, called on the kernels or the reference."""
    x = _x((m, d), "outlier_channels", torch.float32, False, seed=100, scale=2.0)
    dy = _x((m, d), "heavy_tailed", torch.float32, True, seed=101)
    w = (1 + 0.1 * sample((d,), seed=102)).to(DEVICE)
    _, mean, rstd = ref.layer_norm_forward(x, w, w)
    return {
        "layer_norm_fwd": lambda mod, **o: mod.layer_norm_forward(x, w, w, **o)[0],
        "layer_norm_bwd": lambda mod, **o: mod.layer_norm_backward(dy, x, w, mean, rstd, **o)[0],
        "rms_norm_bwd": lambda mod, **o: mod.rms_norm_backward(dy, x, w, rstd, **o)[0],
        "gelu_fwd": lambda mod, **o: mod.gelu_forward(x, "tanh", **o),
        "swiglu_bwd": lambda mod, **o: mod.swiglu_backward(dy, x, x, **o)[1],
        "residual_add": lambda mod, **o: mod.residual_add_forward(x, dy, "rmsnorm", out_block=o["out_block"],
                                                                  with_t=o["with_t"]).h_q,
    }


_KERNEL_MODULE = {"layer_norm_fwd": norms, "layer_norm_bwd": norms, "rms_norm_bwd": norms, "gelu_fwd": activations,
                  "swiglu_bwd": activations, "residual_add": residual}


@pytest.mark.parametrize("op,block,shape", [("layer_norm_fwd", "1x32", (70, 96)), ("layer_norm_bwd", "1x32", (33, 160)),
                                            ("rms_norm_bwd", "1x128", (130, 77)), ("gelu_fwd", "1x32", (40, 160)),
                                            ("swiglu_bwd", "1x32", (70, 40)), ("residual_add", "1x32", (33, 77))])
def test_with_t_writes_the_transposed_copy(poisoned, op, block, shape):
    """with_t=True: (y_q, y_t_q) with y_t_q = quantize_transposed(y) (1xK blocks along M), y_q as without it;
    the reference twin returns the same pair. Tails in both dimensions, every element written (poisoned)."""
    fn = _with_t_ops(*shape, block)[op]
    kernel = _KERNEL_MODULE[op]
    (y_q, y_t_q), (r_q, r_t_q) = fn(kernel, out_block=block, with_t=True), fn(ref, out_block=block, with_t=True)
    assert y_t_q.shape == (shape[1], shape[0]) and y_t_q.block.rows == 1 and y_t_q.data.is_contiguous()
    assert_matches(y_q, r_q)
    assert_matches(y_t_q, r_t_q)
    assert torch.equal(y_q.data, fn(kernel, out_block=block, with_t=False).data)  # same row copy either way
    # the transposed copy is the row copy's float values re-blocked along M: dequantized, both agree to a step
    step = expand_scale(y_t_q.scale, y_t_q.block, tuple(y_t_q.shape)).t() + expand_scale(y_q.scale, y_q.block,
                                                                                         tuple(y_q.shape))
    assert bool(((y_t_q.dequantize().t() - y_q.dequantize()).abs() <= step).all())


@pytest.mark.parametrize("op,block,shape", [("layer_norm_fwd", "1x32", (70, 96)), ("rms_norm_fwd_stats", "1x128", (130, 300)),
                                            ("gelu_fwd", "1x32", (40, 160)), ("swiglu_fwd", "1x128", (150, 77))])
def test_with_t_only_writes_the_transposed_copy_alone(poisoned, op, block, shape):
    """with_t='only' (the wgrad operand of a recomputed output): exactly the transposed copy of with_t=True, bit for
    bit (kernel and reference), and no row-quantized output; tails in both dimensions, buffers poisoned."""
    m, d = shape
    x = _x((m, d), "outlier_channels", torch.float32, False, seed=110, scale=2.0)
    u = _x((m, d), "heavy_tailed", torch.float32, False, seed=111)
    w = (1 + 0.1 * sample((d,), seed=112)).to(DEVICE)
    rstd = (1 + 0.1 * sample((m,), seed=113).abs()).to(DEVICE)
    fns = {
        "layer_norm_fwd": lambda mod, **o: mod.layer_norm_forward(x, w, w, **o)[0],
        "rms_norm_fwd_stats": lambda mod, **o: mod.rms_norm_forward(x, w, rstd=rstd, **o)[0],
        "gelu_fwd": lambda mod, **o: mod.gelu_forward(x, "tanh", **o),
        "swiglu_fwd": lambda mod, **o: mod.swiglu_forward(x, u, **o),
    }
    fn = fns[op]
    kernel = norms if "norm" in op else activations
    only, (_, pair_t) = fn(kernel, out_block=block, with_t="only"), fn(kernel, out_block=block, with_t=True)
    assert isinstance(only, QTensor) and only.shape == (d, m) and only.data.is_contiguous()
    assert torch.equal(only.data, pair_t.data) and torch.equal(only.scale, pair_t.scale)
    assert_matches(only, fn(ref, out_block=block, with_t="only"))


def test_with_t_only_is_refused_where_a_kernel_cannot_skip_the_row_copy():
    x = _x((33, 77), "gaussian", torch.float32, False, seed=114)
    with pytest.raises(ValueError, match="with_t=True here"):
        activations.swiglu_backward(x, x, x, out_block="1x128", with_t="only")
    with pytest.raises(ValueError, match="'only'"):
        activations.gelu_forward(x, out_block="1x128", with_t="both")


def test_with_t_needs_a_1xk_block():
    x = _x((33, 77), "gaussian", torch.float32, False, seed=103)
    for kw in (dict(out_block="32x32", with_t=True), dict(out_dtype=torch.float32, with_t=True)):
        with pytest.raises(ValueError, match="1xK"):
            activations.gelu_forward(x, **kw)
        with pytest.raises(ValueError, match="1xK"):
            ref.gelu_forward(x, **kw)


def test_device_flag_names_the_op_at_the_step_boundary():
    """A NaN reaching an INT8 output sets the device flag (no host check inside the op); the step-boundary check
    applies the policy: 'raise' names the op, other policies return False, a clean step True."""
    from int8flow import guards
    from int8flow.format import NonFiniteError
    from int8flow.kernels import nonfinite

    nonfinite.take(DEVICE)
    x = _x((33, 160), "gaussian", torch.float32, False, seed=104)
    norms.rms_norm_forward(x, out_block="1x128")
    assert guards.check_device_nonfinite(DEVICE, "raise")
    x[7, 100] = float("nan")
    norms.rms_norm_forward(x, out_block="1x128")
    activations.gelu_forward(x, out_block="1x128")  # later ops see it too; the first is named
    with pytest.raises(NonFiniteError, match="rms_norm_forward"):
        guards.check_device_nonfinite(DEVICE, "raise")
    assert guards.check_device_nonfinite(DEVICE, "raise")  # cleared by the check
    activations.gelu_forward(x, out_block="1x128")
    events = []
    assert not guards.check_device_nonfinite(DEVICE, "skip", events) and events[0].where == "gelu_forward"
    # the flag's values can come with the loss in one copy
    activations.gelu_forward(x, out_block="1x128")
    values = nonfinite.device_flag(DEVICE).tolist()
    with pytest.raises(NonFiniteError, match="gelu_forward"):
        guards.check_device_nonfinite(DEVICE, "raise", flag_values=values)


# --- benchmark wiring --------------------------------------------------------------------------


def test_membound_cases_run_and_count_bytes():
    """Each timed pair runs at a tiny shape (uncompiled baseline); INT8 moves fewer bytes than BF16 except in the
    residual add, which also writes the INT8 copy the next operator reads instead of the BF16 sum."""
    from int8flow.bench.membound import _cases

    cases = _cases(40, 96, DEVICE, compile_=lambda fn: fn)
    assert len({c.op for c in cases}) == len(cases)
    for case in cases:
        case.ours()
        case.baseline()
        assert 0 < case.ours_bytes, case.op
        if case.op.startswith("quantize"):  # its twin is the same quantizer compiled: the same bytes
            assert case.ours_bytes == case.baseline_bytes, case.op
        elif not case.op.startswith("residual"):
            assert case.ours_bytes < case.baseline_bytes, case.op


# --- GPU shapes ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="compiled kernels: needs a CUDA GPU")
@pytest.mark.parametrize("d", [4096, 11008])
def test_gpu_llm_shapes(d):
    m = 2048
    x = _x((m, d), "outlier_channels", torch.bfloat16, True, seed=80)
    w = torch.ones(d, device=DEVICE, dtype=torch.bfloat16)
    kw = dict(out_block="32x32")
    (y, mean, rstd), (y_r, mean_r, rstd_r) = norms.layer_norm_forward(x, w, w, **kw), ref.layer_norm_forward(x, w, w, **kw)
    assert_matches(y, y_r)
    dy = _x((m, d), "heavy_tailed", torch.bfloat16, True, seed=81)
    dx, dw, db = norms.layer_norm_backward(dy, x, w, mean_r, rstd_r, **kw)
    dx_r, dw_r, db_r = ref.layer_norm_backward(dy, x, w, mean_r, rstd_r, **kw)
    assert_matches(dx, dx_r)
    torch.testing.assert_close(dw, dw_r, rtol=1e-4, atol=1e-3 * math.sqrt(m))
    assert_matches(activations.swiglu_forward(x, dy, **kw), ref.swiglu_forward(x, dy, **kw))
    r = torch.randn(m, d, device=DEVICE, dtype=torch.bfloat16)
    got, want = residual.residual_add_forward(r, x, "rmsnorm", out_block="32x32"), ref.residual_add_forward(
        r, x, "rmsnorm", out_block="32x32")
    _assert_residual_sum(got.h, want.h, r, x)
    torch.testing.assert_close(got.rstd, want.rstd, rtol=5e-5, atol=0)


@pytest.mark.parametrize("shape,block", [((300, 384), "1x128"), ((70, 40), "1x32")])
def test_swiglu_backward_split_with_t_is_the_fused_kernel_bit_for_bit(poisoned, shape, block, monkeypatch):
    """with_t=True backward as two launches (row copies, transposed copies; v4) writes exactly what v3's one fused launch
    wrote, stochastic rounding included (same seeds, noise keyed by position): the split changes the tiles, not the bits."""
    dy, g, u = (_x(shape, "heavy_tailed", torch.float32, True, seed=s, scale=3.0) for s in (130, 131, 132))
    kw = dict(out_block=block, rounding="stochastic", seed=5, with_t=True)
    split = activations.swiglu_backward(dy, g, u, **kw)
    monkeypatch.setattr(activations, "SPLIT_BACKWARD_T", False)
    monkeypatch.setattr(activations, "BACKWARD_PER_THREAD", 4)
    fused = activations.swiglu_backward(dy, g, u, **kw)
    for a, b in zip(split, fused):
        for x, y in zip(a, b):
            assert torch.equal(x.data, y.data) and torch.equal(x.scale, y.scale)


@pytest.mark.parametrize("op,shape", [("swiglu_fwd", (150, 200)), ("gelu_fwd", (130, 40)), ("rms_norm_fwd", (140, 72)),
                                      ("swiglu_bwd", (129, 136))])
def test_transposed_one_warp_tiles_write_session4s_bits(poisoned, op, shape, monkeypatch):
    """The transposed-copy launches on one-warp [K, 1, 8] programs (INT8 1x128 inputs; ``_launch.T_ONE_WARP``) write
    bit for bit what session 4's tiles wrote, stochastic rounding (noise keyed by position) and tails included."""
    m, d = shape
    g, u, dy = (quantize(_x(shape, "heavy_tailed", torch.float32, False, seed=s, scale=3.0), "1x128")
                for s in (140, 141, 142))
    w = (1 + 0.1 * sample((d,), seed=143)).to(DEVICE)
    rstd = (1 + 0.1 * sample((m,), seed=144).abs()).to(DEVICE)
    kw = dict(out_block="1x128", rounding="stochastic", seed=7)
    fns = {
        "swiglu_fwd": lambda: [activations.swiglu_forward(g, u, with_t="only", **kw)],
        "gelu_fwd": lambda: [activations.gelu_forward(g, "tanh", with_t="only", **kw)],
        "rms_norm_fwd": lambda: [norms.rms_norm_forward(g, w, rstd=rstd, with_t="only", **kw)[0]],
        "swiglu_bwd": lambda: [q for pair in activations.swiglu_backward(dy, g, u, with_t=True, **kw) for q in pair],
    }
    new = fns[op]()
    monkeypatch.setattr(_launch, "T_ONE_WARP", False)
    old = fns[op]()
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
