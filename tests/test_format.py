"""The block-quantized format: rounding error bounds, tails, zero blocks, transposes, stochastic rounding."""
import math
import zlib

import pytest
import torch

from int8flow.format import (
    BlockShape, NonFiniteError, QTensor, block_absmax, dequantize, expand_scale, quantize, quantize_transposed,
)
from _inputs import DISTRIBUTIONS, sample

SHAPES = [(1, 1), (33, 70), (64, 64), (100, 77), (5, 300)]
BLOCKS = ["32x32", "1x32", "1x128", "32x128", "128x128"]


def _step(q: QTensor) -> torch.Tensor:
    return expand_scale(q.scale, q.block, tuple(q.shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nearest_error_within_half_step(shape, block, dist, dtype):
    x = sample(shape, dist, seed=zlib.crc32(repr((shape, block, dist)).encode()), dtype=dtype)
    q = quantize(x, block)
    x64 = x.double()
    # scale is the float32 rounding of absmax / 127 (absmax taken in float64 is exact for these inputs)
    absmax64 = block_absmax(x, block).double()  # absmax of float values is exact in float32
    torch.testing.assert_close(q.scale.double(), absmax64 / 127, rtol=2**-23, atol=0)
    err = (q.dequantize(torch.float64) - x64).abs()
    # half a step, plus float32 rounding of x/scale and of q*scale (a few ulps relative to the step)
    assert bool((err <= _step(q).double() * (0.5 + 1e-5)).all()), float((err / _step(q)).max())
    # the block maximum lands on +-127: the full INT8 range is used
    nonzero = q.scale > 0
    qmax = block_absmax(q.data.float(), block)
    assert bool((qmax[nonzero] == 127).all())


def test_round_half_to_even():
    # 2.5 and 3.5 steps exactly: round-half-even gives 2 and 4
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5, 1.5]])
    q = quantize(x, "1x32")
    assert q.scale.item() == 1.0
    assert q.data.tolist() == [[127, 2, 4, -2, 0, 2]]


@pytest.mark.parametrize("block", BLOCKS)
def test_tail_blocks_and_zero_blocks(block):
    b = BlockShape.parse(block)
    x = torch.zeros(b.rows * 2 + 3, b.cols + 5)
    x[: b.rows, : b.cols] = torch.randn(b.rows, b.cols)  # one non-zero block, zero blocks elsewhere incl. tails
    q = quantize(x, block)
    assert tuple(q.scale.shape) == (math.ceil(x.shape[0] / b.rows), math.ceil(x.shape[1] / b.cols))
    assert q.scale[0, 0] > 0 and bool((q.scale.flatten()[1:] == 0).all())
    y = q.dequantize()
    assert bool(torch.isfinite(y).all())
    assert bool((y[b.rows:] == 0).all()) and bool((y[:, b.cols:] == 0).all())


def test_extreme_magnitudes():
    """Values near the FP32 limit and subnormals: finite scales, error within half a step or flushed to zero."""
    x = torch.tensor([[3.0e38, -1.0e38, 1.0], [1e-39, -2e-40, 0.0]])
    q = quantize(x, "1x32")
    y = q.dequantize()
    assert bool(torch.isfinite(q.scale).all()) and bool(torch.isfinite(y).all())
    assert bool(((y[0] - x[0]).abs() <= _step(q)[0] * 0.5001).all())
    # absmax/127 of a subnormal row underflows toward 0: values flush, error bounded by the row's absmax
    assert float((y[1] - x[1]).abs().max()) <= 1e-39
    # a bf16 tensor at its own limit
    xb = torch.tensor([[3.3e38, -3.3e38]], dtype=torch.bfloat16)
    assert bool(torch.isfinite(quantize(xb, "1x32").dequantize()).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_refused_unless_asked(bad):
    x = torch.randn(40, 40)
    x[3, 7] = bad
    with pytest.raises(NonFiniteError, match="NaN|Inf"):
        quantize(x)
    quantize(x, check_finite=False)  # the caller asked: no error


@pytest.mark.parametrize("shape", [(33, 70), (64, 96), (1, 45)])
def test_square_blocks_transpose_without_requantizing(shape):
    x = sample(shape, "heavy_tailed", seed=3)
    q = quantize(x, "32x32")
    qt = quantize_transposed(x, "32x32")
    assert torch.equal(q.t().data, qt.data) and torch.equal(q.t().scale, qt.scale)
    assert torch.equal(q.t().dequantize(), q.dequantize().t())
    assert q.t().block == BlockShape(32, 32)


def test_nonsquare_transposed_requantizes_along_the_other_axis():
    x = sample((70, 40), "outlier_channels", seed=4)
    qt = quantize_transposed(x, "1x32")
    ref = quantize(x.t().contiguous(), "1x32")
    assert torch.equal(qt.data, ref.data) and torch.equal(qt.scale, ref.scale)
    assert qt.data.is_contiguous()
    assert quantize(x, "1x32").t().block == BlockShape(32, 1)  # a view keeps its (transposed) blocks


def test_stochastic_rounding_reproducible_and_seeded():
    x = torch.randn(50, 70)
    a = quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    b = quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    c = quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)
    err = (a.dequantize() - x).abs()
    assert bool((err < _step(a) * (1 + 1e-5)).all())  # stochastic error is below one step


@pytest.mark.parametrize("seed", [0, 1])
def test_stochastic_rounding_is_unbiased(seed):
    """Averaged over T draws, q - x/scale has mean 0.

    Per element, q - v is a centred two-point variable with variance f(1-f), f = frac(v). The aggregate
    z = sum(q - v) / sqrt(T * sum f(1-f)) is N(0, 1) for an unbiased rounding: |z| > 4.5 has probability
    6.8e-6 (the false-failure rate per seed). A floor-only or round-nearest rounder gives |z| in the hundreds.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=g)
    T = 300
    v = x / expand_scale(quantize(x).scale, "32x32", x.shape)
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(T):
        total += quantize(x, rounding="stochastic", generator=g).data.double()
    f = (v - v.floor()).double()
    z = float((total - T * v.double()).sum() / math.sqrt(T * float((f * (1 - f)).sum())))
    assert abs(z) < 4.5, z
    # nearest rounding, which is biased for a fixed input, must fail the same statistic
    nearest = quantize(x).data.double() * T
    z_nearest = float((nearest - T * v.double()).sum() / math.sqrt(T * float((f * (1 - f)).sum())))
    assert abs(z_nearest) > abs(z)


@pytest.mark.parametrize("spec,expected", [("32x32", (32, 32)), ((1, 128), (1, 128)), ("128X128", (128, 128))])
def test_block_shape_parse(spec, expected):
    b = BlockShape.parse(spec)
    assert (b.rows, b.cols) == expected


@pytest.mark.parametrize("spec", ["32", "axb", (0, 32), (32, -1), "32x32x32", 3.5])
def test_block_shape_rejects_bad_specs(spec):
    with pytest.raises((ValueError, TypeError), match="block|BlockShape"):
        BlockShape.parse(spec)


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="rounding"):
        quantize(torch.ones(4, 4), rounding="up")
    with pytest.raises(TypeError, match="QTensor"):
        dequantize(torch.ones(2, 2))
    with pytest.raises(ValueError, match="scale has shape"):
        QTensor(torch.zeros(64, 64, dtype=torch.int8), torch.zeros(1, 1), BlockShape(32, 32))


def test_k_major_copy_is_exact_and_only_when_needed():
    """k_major(): the same numbers in row-major storage (what Hopper's 8-bit GEMM reads); a no-op when already so."""
    x = torch.randn(70, 100)
    x[:, 3] *= 40.0
    q = quantize(x, "32x32")
    assert q.is_k_major and q.k_major() is q
    view = q.t()
    assert not view.is_k_major
    copy = view.k_major()
    assert copy.is_k_major and copy.data.is_contiguous() and copy.scale.is_contiguous()
    torch.testing.assert_close(copy.data, view.data, rtol=0, atol=0)
    torch.testing.assert_close(copy.dequantize(), q.dequantize().t(), rtol=0, atol=0)


def test_geometry_recipes():
    from int8flow.config import GEOMETRIES, Int8TrainingConfig

    jet = Int8TrainingConfig.from_recipe_name("jetfire")
    assert (str(jet.activation_block), str(jet.weight_block), str(jet.grad_block)) == ("32x32", "32x32", "32x32")
    for name in ("int8-1x128", "int8+fallback-1x128", "int8-linear-1x128"):
        c = Int8TrainingConfig.from_recipe_name(name)
        assert c.precision == name.removesuffix("-1x128")
        # every GEMM promotes every 128 of K: activations/gradients 1x128 along K, weights 128x128
        assert (c.activation_block.cols, c.grad_block.cols, c.weight_block.rows, c.weight_block.cols) == (128,) * 4
        assert c.activation_block.rows == c.grad_block.rows == 1
    assert set(GEOMETRIES) == {"jetfire", "1x128"}
