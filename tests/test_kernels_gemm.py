"""Triton per-block INT8 GEMM vs `int8flow.reference.block_gemm` (CPU: Triton interpreter; GPU: compiled)."""
import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install int8flow[test])")

from int8flow import format as fmt  # noqa: E402
from int8flow import reference as ref  # noqa: E402
from int8flow.kernels import gemm as kg  # noqa: E402
from int8flow.kernels._launch import interpreting  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
# The triton 3.6 interpreter converts 0-d arrays to int in loop bounds, which numpy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
SHAPES = [(1, 1, 1), (33, 40, 70), (64, 96, 128), (100, 77, 130)]
# (block of a, block of b): the exact paper mode and two coarse-K geometries (promotion every 128 of K).
GEOMETRIES = [("32x32", "32x32"), ("1x128", "128x128"), ("32x128", "128x128")]
# float32 summation order differs from the reference's matmul: relative to the largest |y|, 1e-5 is ~100 ulp.
FP32_TOL = 1e-5


def operand(rows, cols, block, seed, outlier=True):
    """Student-t(3) values with an outlier column x30, quantized with ``block``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, cols), generator=g) / (torch.randn((3, rows, cols), generator=g).pow(2).mean(0)).sqrt()
    if outlier and cols > 2:
        x[:, 1] *= 30.0
    return fmt.quantize(x.to(DEVICE), block)


def bf16_as_kernel(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 -> float32 as the kernel does it: truncation in the triton 3.6 interpreter, nearest on GPU."""
    if interpreting():
        return (x.contiguous().view(torch.int32) & -65536).view(torch.float32)
    return x.bfloat16().float()


def expected(a, b, bias, impl):
    """Float32 a @ b.T (+ bias); for dequant-on-load, operands rounded to bf16 first as the kernel does."""
    if kg.resolve_impl(impl, kg.promotion_group(a, b)) == "dequant":
        y = bf16_as_kernel(a.dequantize()) @ bf16_as_kernel(b.dequantize()).t()
        return y if bias is None else y + bias
    return ref.block_gemm(a, b, bias)


def assert_close_to(y, want, tol=FP32_TOL):
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) outputs"
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(y.float(), want.float(), rtol=tol, atol=tol * scale.item())


@pytest.fixture
def poisoned(monkeypatch):
    """Make torch.empty return NaN floats and -128 int8 (a value the kernels never write) to catch gaps."""
    real_empty = torch.empty

    def empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.dtype.is_floating_point:
            return t.fill_(float("nan"))
        if t.dtype == torch.int8:
            return t.fill_(-128)
        return t
    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("impl", ["int8", "dequant"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float_output_with_bias(shape, geometry, impl, poisoned):
    M, N, K = shape
    a, b = operand(M, K, geometry[0], seed=M + K), operand(N, K, geometry[1], seed=N + 2 * K)
    bias = torch.randn(N, device=DEVICE)
    assert_close_to(kg.block_gemm(a, b, bias, impl=impl), expected(a, b, bias, impl))


@pytest.mark.parametrize("impl", ["int8", "dequant"])
def test_three_gemms_of_a_linear_with_transposed_views(impl, poisoned):
    # x (M, K), w (N, K), dy (M, N), all 32x32 so that .t() views are valid operands of the backward GEMMs.
    M, N, K = 70, 45, 96
    x_q, w_q, dy_q = operand(M, K, "32x32", 1), operand(N, K, "32x32", 2), operand(M, N, "32x32", 3)
    assert_close_to(kg.linear_forward(x_q, w_q, impl=impl), expected(x_q, w_q, None, impl))
    dx = kg.linear_input_grad(dy_q, w_q, impl=impl)
    dw = kg.linear_weight_grad(dy_q, x_q, impl=impl)
    assert_close_to(dx, expected(dy_q, w_q.t(), None, impl))
    assert_close_to(dw, expected(dy_q.t(), x_q.t(), None, impl))


def test_general_strides_and_nested_k_blocks(poisoned):
    # a: a view with no unit stride; b: 128-wide K blocks against a's 32 (promotion every 32, b's scale reused).
    M, N, K = 40, 50, 160
    a = operand(M, K, "32x32", 5)
    storage = torch.zeros((M, 2 * K), dtype=torch.int8, device=DEVICE)
    storage[:, ::2] = a.data
    a_strided = fmt.QTensor(storage[:, ::2], a.scale, a.block)
    b = operand(N, K, "128x128", 6)
    assert kg.promotion_group(a_strided, b) == 32
    assert_close_to(kg.block_gemm(a_strided, b, impl="int8"), ref.block_gemm(a, b))


@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=lambda g: f"{g[0]}-{g[1]}")
def test_bf16_output(geometry, poisoned):
    M, N, K = 33, 40, 130
    a, b = operand(M, K, geometry[0], 8), operand(N, K, geometry[1], 9)
    y = kg.block_gemm(a, b, out_dtype=torch.bfloat16, impl="int8")
    assert y.dtype == torch.bfloat16
    # One bf16 ulp (2**-7 relative): the rounding of the float32 result may differ where its last bits do.
    assert_close_to(y, bf16_as_kernel(ref.block_gemm(a, b)), tol=2**-7)


def assert_quantized_close(got: fmt.QTensor, want: fmt.QTensor):
    """Scales equal to float32 noise; each value at most one quantization step away, and few of them."""
    assert got.block == want.block and got.data.shape == want.data.shape
    assert (got.data != -128).all(), "unwritten (poisoned) int8 outputs"
    assert not torch.isnan(got.scale).any(), "unwritten (NaN-poisoned) scales"
    torch.testing.assert_close(got.scale, want.scale, rtol=1e-5, atol=0)
    step = fmt.expand_scale(want.scale, want.block, tuple(want.shape))
    diff = (got.dequantize() - want.dequantize()).abs()
    assert (diff <= step * (1 + 127e-5)).all()  # a rounding flip, plus |q| <= 127 times the scales' rtol
    # A flip needs the float32 value within ~1e-6 of a rounding boundary: rare.
    assert (got.data != want.data).float().mean() < 0.01


@pytest.mark.parametrize("out_block", ["32x32", "1x128", "128x128", "3x5"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1]], ids=lambda g: f"{g[0]}-{g[1]}")
def test_int8_output(geometry, out_block, poisoned):
    M, N, K = 100, 77, 130
    a, b = operand(M, K, geometry[0], 10), operand(N, K, geometry[1], 11)
    bias = torch.randn(N, device=DEVICE)
    got = kg.block_gemm(a, b, bias, out_block=out_block, impl="int8")
    assert_quantized_close(got, ref.block_gemm(a, b, bias, out_block=out_block))


def test_int8_output_stochastic_rounding():
    M, N, K = 64, 64, 96
    a, b = operand(M, K, "32x32", 12, outlier=False), operand(N, K, "32x32", 13, outlier=False)
    y = ref.block_gemm(a, b)
    seeds = range(8)
    outs = [kg.block_gemm(a, b, out_block="32x32", rounding="stochastic", seed=s, impl="int8") for s in seeds]
    step = fmt.expand_scale(outs[0].scale, outs[0].block, (M, N))
    rel = torch.stack([(o.dequantize() - y) / step for o in outs])  # in units of one quantization step
    assert (rel.abs() < 1 + 1e-4).all()  # floor(v + u) is within one step of v
    # Unbiased: the mean error of n draws, each within one step (std <= 1/2), is within 5 / (2 sqrt(n)).
    assert abs(rel.mean().item()) < 5 / (2 * rel.numel() ** 0.5)
    again = kg.block_gemm(a, b, out_block="32x32", rounding="stochastic", seed=0, impl="int8")
    assert torch.equal(again.data, outs[0].data)
    assert not torch.equal(outs[1].data, outs[0].data)


def test_impl_rule_and_bad_arguments():
    assert kg.resolve_impl("auto", 32) == "dequant" and kg.resolve_impl("auto", 128) == "int8"
    assert kg.resolve_impl("auto", 32, fallback=True) == "int8"
    a, b = operand(8, 64, "32x32", 14), operand(8, 64, "32x32", 15)
    with pytest.raises(ValueError, match="impl"):
        kg.block_gemm(a, b, impl="fast")
    with pytest.raises(ValueError, match="same K"):
        kg.block_gemm(a, operand(8, 32, "32x32", 16))
    with pytest.raises(TypeError, match="QTensor"):
        kg.block_gemm(a.dequantize(), b)
    with pytest.raises(ValueError, match="bias"):
        kg.block_gemm(a, b, bias=torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="out_dtype"):
        kg.block_gemm(a, b, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="quantize_transposed"):  # K blocks of 1 (a 1x128 operand transposed)
        kg.block_gemm(operand(64, 8, "1x128", 17).t(), operand(64, 8, "1x128", 18).t())


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["int8", "dequant"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}")
def test_real_shape_on_gpu(geometry, impl):
    M, N, K = 16384, 4096, 4096
    a, b = operand(M, K, geometry[0], 20), operand(N, K, geometry[1], 21)
    bias = torch.randn(N, device=DEVICE)
    assert_close_to(kg.block_gemm(a, b, bias, impl=impl), expected(a, b, bias, impl), tol=1e-4)
    got = kg.block_gemm(a, b, bias, out_block=geometry[0], impl=impl)
    if impl == "int8":
        assert_quantized_close(got, ref.block_gemm(a, b, bias, out_block=geometry[0]))


def test_kernels_compile_for_hopper_with_wgmma():
    """The compiled (non-interpreted) path: every GEMM variant builds for sm_90 and uses wgmma (no GPU needed)."""
    import json
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "int8flow.kernels._hopper_check", "--quick"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    gemms = [r for r in reports if r["kernel"] == "block_gemm"]
    assert gemms and all(r["wgmma"] for r in gemms), "a GEMM variant fell off the Hopper tensor-core path"
    int8 = [r for r in gemms if r["impl"] == "int8"]
    assert all(".s32.s8.s8" in r["wgmma"][0] for r in int8)
    assert all(".bf16.bf16" in r["wgmma"][0] for r in gemms if r["impl"] == "dequant")
