"""Fallback-term GEMM (`block_gemm(..., a_fallback=...)`) vs two reference GEMMs (CPU: Triton interpreter)."""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install int8flow[test])")

from _inputs import sample, sqnr_db  # noqa: E402
from int8flow import format as fmt  # noqa: E402
from int8flow import reference as ref  # noqa: E402
from int8flow.kernels import gemm as kg  # noqa: E402
from test_kernels_gemm import (  # noqa: E402,F401  (poisoned: the NaN / -128 output fixture)
    DEVICE, assert_close_to, assert_quantized_close, expected, poisoned,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
GEOMETRIES = [("32x32", "32x32"), ("1x128", "128x128")]


def fallback_operands(rows, cols, block, fraction, seed):
    """Heavy-tailed x with a few x100 outliers, its INT8 term, the flags (``fraction`` of the blocks, random)
    and the second term: the residual of the flagged blocks quantized with the same block, zeros elsewhere."""
    block = fmt.BlockShape.parse(block)
    x = sample((rows, cols), "heavy_tailed", seed)
    g = torch.Generator().manual_seed(seed + 1)
    hot = torch.randint(0, rows * cols, (max(1, rows * cols // 500),), generator=g)
    x.view(-1)[hot] *= 100.0
    x = x.to(DEVICE)
    x_q = fmt.quantize(x, block)
    flags = (torch.rand(block.grid((rows, cols)), generator=g) < fraction).to(DEVICE)
    keep = fmt.expand_scale(flags.float(), block, (rows, cols))
    x2_q = fmt.quantize((x - x_q.dequantize()) * keep, block)
    return x, x_q, flags, x2_q


def two_gemms(a, a2, b, bias, impl):
    """What the fused call must equal: a @ b.T (+ bias) plus a2 @ b.T, each as the plain kernel computes it."""
    return expected(a, b, bias, impl) + expected(a2, b, None, impl)


@pytest.mark.parametrize("impl", ["int8", "dequant"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}")
@pytest.mark.parametrize("shape", [(33, 40, 70), (100, 77, 130)], ids=lambda s: "x".join(map(str, s)))
def test_matches_two_reference_gemms(shape, geometry, impl, poisoned):
    M, N, K = shape
    _, a, flags, a2 = fallback_operands(M, K, geometry[0], 0.25, seed=M + K)
    b = fmt.quantize(sample((N, K), "outlier_channels", N).to(DEVICE), geometry[1])
    bias = torch.randn(N, device=DEVICE)
    y = kg.block_gemm(a, b, bias, impl=impl, a_fallback=a2, a_fallback_flags=flags)
    assert_close_to(y, two_gemms(a, a2, b, bias, impl))
    # The second term really ran: without it the result is off by far more than the tolerance.
    assert not torch.allclose(y, kg.block_gemm(a, b, bias, impl=impl), rtol=0, atol=1e-3)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}")
def test_all_unflagged_is_the_plain_gemm_bit_for_bit(geometry, poisoned):
    M, N, K = 77, 65, 130
    _, a, _, _ = fallback_operands(M, K, geometry[0], 0.0, seed=3)
    _, _, _, a2_full = fallback_operands(M, K, geometry[0], 1.0, seed=3)  # non-zero everywhere
    b = fmt.quantize(sample((N, K), "gaussian", 4).to(DEVICE), geometry[1])
    plain = kg.block_gemm(a, b, impl="int8")
    no_flags = torch.zeros(a.scale.shape, dtype=torch.bool, device=DEVICE)
    # All-zero term (flags derived from its zero scales) and a non-zero term whose blocks are all unflagged:
    # both skip the second product entirely, so nothing changes - not even the summation order.
    zero_term = fmt.QTensor(torch.zeros_like(a.data), torch.zeros_like(a.scale), a.block)
    assert torch.equal(kg.block_gemm(a, b, impl="int8", a_fallback=zero_term), plain)
    assert torch.equal(kg.block_gemm(a, b, impl="int8", a_fallback=a2_full, a_fallback_flags=no_flags), plain)


@pytest.mark.parametrize("impl", ["int8", "dequant"])
def test_all_flagged_and_default_flags(impl, poisoned):
    M, N, K = 64, 96, 128
    _, a, flags, a2 = fallback_operands(M, K, "32x32", 1.0, seed=5)
    assert flags.all()
    b = fmt.quantize(sample((N, K), "heavy_tailed", 6).to(DEVICE), "32x32")
    assert_close_to(kg.block_gemm(a, b, impl=impl, a_fallback=a2), two_gemms(a, a2, b, None, impl))


@pytest.mark.parametrize("out_block", ["32x32", "1x128", "3x5"])  # 3x5: the two-pass (float + quantize) route
def test_int8_output(out_block, poisoned):
    M, N, K = 100, 77, 130
    _, a, flags, a2 = fallback_operands(M, K, "32x32", 0.25, seed=7)
    b = fmt.quantize(sample((N, K), "gaussian", 8).to(DEVICE), "32x32")
    bias = torch.randn(N, device=DEVICE)
    got = kg.block_gemm(a, b, bias, out_block=out_block, impl="int8", a_fallback=a2, a_fallback_flags=flags)
    want = fmt.quantize(two_gemms(a, a2, b, bias, "int8"), out_block, check_finite=False)
    assert_quantized_close(got, want)


def test_transposed_operand_for_the_weight_gradient(poisoned):
    # dw.T = x.T @ dy: the fallback term of x rides on the A operand as .t() views (blocks and flags transposed).
    M, N, K = 96, 40, 70  # tokens, out features, in features
    _, x_q, flags, x2_q = fallback_operands(M, K, "32x32", 0.3, seed=9)
    dy_q = fmt.quantize(sample((M, N), "heavy_tailed", 10).to(DEVICE), "32x32")
    want = ref.block_gemm(x_q.t(), dy_q.t()) + ref.block_gemm(x2_q.t(), dy_q.t())
    dw_t = kg.block_gemm(x_q.t(), dy_q.t(), impl="int8", a_fallback=x2_q.t(), a_fallback_flags=flags.t())
    assert_close_to(dw_t, want)
    # The term in another layout than a (row-major copies of data and scales): its own loads, a's scale strides.
    x2_t = x2_q.t()
    x2_rows = fmt.QTensor(x2_t.data.contiguous(), x2_t.scale.contiguous(), x2_t.block)
    assert_close_to(kg.block_gemm(x_q.t(), dy_q.t(), impl="int8", a_fallback=x2_rows), want)


def test_second_term_recovers_16_bit_precision():
    # All blocks flagged: x ~ s1*q1 + s2*q2 with s2 <= s1/254, so the error drops ~48 dB; demand 30 dB over
    # plain INT8 (the product with b's own INT8 error is taken out by comparing against x @ dequant(b).T).
    M, N, K = 64, 64, 128
    x, a, _, a2 = fallback_operands(M, K, "32x32", 1.0, seed=11)
    b = fmt.quantize(sample((N, K), "gaussian", 12).to(DEVICE), "32x32")
    want = x.double() @ b.dequantize(torch.float64).t()
    fused = kg.block_gemm(a, b, impl="int8", a_fallback=a2)
    gain = sqnr_db(want, fused) - sqnr_db(want, kg.block_gemm(a, b, impl="int8"))
    assert gain > 30.0, gain


@pytest.mark.parametrize("block_rows", [1, 4, 32, 48, 128])
def test_band_flags_are_any_over_each_band_of_rows(block_rows):
    rows, cols = 150, 5
    g = torch.Generator().manual_seed(block_rows)
    block = fmt.BlockShape(block_rows, 32)
    flags = torch.rand(block.grid((rows, cols * 32)), generator=g) < 0.2
    per_row = flags.repeat_interleave(block_rows, 0)[:rows]
    bands = [per_row[r:r + kg.FLAG_ROWS].any(0) for r in range(0, rows, kg.FLAG_ROWS)]
    want = torch.stack(bands).to(torch.uint8)
    assert torch.equal(kg.fallback_band_flags(flags, block, rows), want)


def test_bad_fallback_arguments():
    _, a, flags, a2 = fallback_operands(40, 64, "32x32", 0.5, seed=13)
    b = fmt.quantize(sample((8, 64), "gaussian", 14).to(DEVICE), "32x32")
    with pytest.raises(ValueError, match="without a_fallback"):
        kg.block_gemm(a, b, a_fallback_flags=flags)
    with pytest.raises(TypeError, match="a_fallback must be a QTensor"):
        kg.block_gemm(a, b, a_fallback=a2.dequantize())
    with pytest.raises(ValueError, match="a's shape, block"):
        kg.block_gemm(a, b, a_fallback=fmt.quantize(a2.dequantize(), "1x32"))
    with pytest.raises(ValueError, match="a's shape, block"):
        kg.block_gemm(a, b, a_fallback=fmt.quantize(a2.dequantize()[:32], "32x32"))
    with pytest.raises(TypeError, match="bool or uint8"):
        kg.block_gemm(a, b, a_fallback=a2, a_fallback_flags=flags.float())
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        kg.block_gemm(a, b, a_fallback=a2, a_fallback_flags=flags[:1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test of the benchmark records (interpreter)")
def test_bench_records_on_tiny_shapes(monkeypatch):
    from int8flow.bench import kernels

    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    monkeypatch.setattr(kernels, "M_TOKENS", 64)
    torch.manual_seed(0)
    records = kernels.fallback_records([(64, 256)], timer=lambda fn: (fn(), 1.0)[1], fractions=(0.25,))
    assert len({r["mode"] for r in records}) == 4 and {r["op"] for r in records} == {"gemm_fwd_fallback", "fwd_fallback"}
    assert all(0 <= r["flagged"] <= 1 and r["shape"] == [64, 64, 256] and r["speedup"] == 1.0 for r in records)
    # coarse128 times the column-structured path: the GEMM over K + G x 128 and the whole forward, G = 1 of 2 groups
    column = [r for r in records if r["mode"].startswith("coarse128")]
    assert len(column) == 4 and all(r["G"] == 1 and r["groups"] == 2 for r in column)
    assert all(r["flagged"] > 0 for r in column if "channels" in r["mode"])
