"""Numerical faults at the edges of float32: overflow of the scale, float64 inputs beyond float32, non-finite propagation."""
import pytest
import torch

from int8flow.format import NonFiniteError, QMAX, dequantize, quantize
from int8flow import reference as ref

F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_block_at_float32_max_dequantizes_finite(sign):
    """absmax = FLT_MAX rounds absmax/127 up; without the scale clamp 127 * scale dequantizes to Inf."""
    x = torch.full((3, 5), sign * F32_MAX)
    x[0, 0] = 1.0
    q = quantize(x, "1x32")
    y = dequantize(q).double()
    assert bool(torch.isfinite(y).all())
    step = q.scale.double().max()
    assert float((y - x.double()).abs().max()) <= float(step) / 2


def test_float64_beyond_float32_range_is_refused():
    x = torch.tensor([[1e300, 1.0], [2.0, 3.0]], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"x \(float64\).*float32 range.*Rescale x"):
        quantize(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_with_check_disabled_stays_visible(bad):
    """check_finite=False must not hide a fault: the block holding it dequantizes to NaN, other blocks are exact."""
    x = torch.randn(4, 64)
    x[1, 3] = bad
    q = quantize(x, "1x32", check_finite=False)
    y = dequantize(q)
    assert bool(torch.isnan(y[1, :32]).all())
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :32] = False
    assert bool(torch.isfinite(y[mask]).all())
    assert int(q.data.min()) >= -QMAX
    # ...and a GEMM consuming it yields non-finite output rows, where a guard can see them.
    w = quantize(torch.randn(8, 64))
    out = ref.block_gemm(q, w)
    assert not bool(torch.isfinite(out[1]).any()) and bool(torch.isfinite(out[[0, 2, 3]]).all())


def test_meta_device_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"x is on the meta device .*cpu or cuda"):
        quantize(torch.empty(4, 32, device="meta"))


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int8, "float32"])
def test_reference_gemm_refuses_non_float_out_dtype(out_dtype):
    """Before the fix, out_dtype=torch.int32 silently truncated the float32 result."""
    a = quantize(torch.randn(4, 32))
    with pytest.raises(TypeError, match=r"out_dtype must be a float dtype .*pass out_block"):
        ref.block_gemm(a, a, out_dtype=out_dtype)
