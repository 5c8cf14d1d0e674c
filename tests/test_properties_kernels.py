"""Triton kernels vs the reference over random tiny shapes, blocks and value distributions (interpreter on CPU).

Few examples: the interpreter runs a kernel ~1000x slower than the compiled one.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install int8flow[test])")

from hypothesis import assume, given, settings, strategies as st  # noqa: E402

from int8flow import reference as ref  # noqa: E402
from int8flow.format import quantize  # noqa: E402
from int8flow.kernels import gemm as kg  # noqa: E402
from int8flow.kernels import quantize as kq  # noqa: E402
from _strategies import VALUE_KINDS, blocks, make_values, seeds  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cpu" if not torch.cuda.is_available() else "cuda"
FEW = settings(deadline=None, max_examples=15, derandomize=True)
small = st.integers(1, 40)
kinds = st.sampled_from(VALUE_KINDS)


@FEW
@given(small, small, kinds, blocks, seeds, st.sampled_from([torch.float32, torch.bfloat16]))
def test_quantize_kernel_equals_format_bit_for_bit(r, c, kind, block, seed, dtype):
    """Nearest rounding is specified exactly (correctly rounded division, round half to even): bit equality.
    bf16 subnormals are excluded here: a known kernel bug, pinned by the xfail test below."""
    assume(not (kind == "subnormal" and dtype == torch.bfloat16))
    x = make_values((r, c), kind, seed, dtype).to(DEVICE)
    got, want = kq.quantize(x, block), quantize(x, block)
    assert torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)
    got_t, want_t = kq.quantize_transposed(x, block), quantize(x.t().contiguous(), block)
    assert torch.equal(got_t.data, want_t.data) and torch.equal(got_t.scale, want_t.scale)


@FEW
@given(small, small, st.integers(1, 300), kinds, kinds, seeds, st.sampled_from([("1x128", "128x128"), ("32x32", "32x32")]))
def test_gemm_kernel_matches_reference(m, n, k, kind_a, kind_b, seed, geometry):
    """int8 impl: exact int32 group products promoted in float32; differs from the reference only in float32
    summation order, bounded by (|A| @ |B|.T) * K * 2^-23 (as in test_properties_reference). When a scale is
    float32-subnormal, the kernel's scale_a * scale_b (rounded to the subnormal grid, spacing 2^-149) multiplies
    an int32 group product of up to 127^2 per element: K * 127^2 * 2^-149 more."""
    big = (torch.finfo(torch.float32).max / (2 * k)) ** 0.5
    a = quantize(make_values((m, k), kind_a, seed, max_abs=big).to(DEVICE), geometry[0])
    b = quantize(make_values((n, k), kind_b, seed + 1, max_abs=big).to(DEVICE), geometry[1])
    y = kg.block_gemm(a, b, impl="int8").double().cpu()
    want = ref.block_gemm(a, b).double().cpu()
    A, B = a.dequantize(torch.float64).cpu(), b.dequantize(torch.float64).cpu()
    bound = (A.abs() @ B.abs().t()) * (k * 2.0**-23) * 2 + k * 127**2 * 2.0**-149
    assert bool(torch.isfinite(y).all())
    assert bool(((y - want).abs() <= bound).all())


@pytest.mark.xfail(DEVICE == "cpu", strict=True,
                   reason="Triton interpreter defect: bf16 subnormal input gives a wrong scale/values in the "
                          "interpreter only (the compiled kernel on the H200 is bit-exact); remove when fixed")
def test_quantize_kernel_bf16_subnormal_equals_format():
    x = torch.tensor([[1.8367e-40, 0.0, -2.7551e-40, 9.1835e-41]], dtype=torch.bfloat16, device=DEVICE)
    got, want = kq.quantize(x, "1x32"), quantize(x, "1x32")
    assert torch.equal(got.scale, want.scale) and torch.equal(got.data, want.data)
