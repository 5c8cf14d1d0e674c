"""Properties of quantize / dequantize over random shapes, block shapes, value distributions and dtypes.

Error bounds (float64 arithmetic on the float32 results):
* nearest: |dequant(q) - x| <= step/2 + 2^-21 |x| + SUBNORMAL_SLACK
* stochastic: |dequant(q) - x| <= step (1 + 2^-20) + 2^-21 |x| + SUBNORMAL_SLACK
where step = the block's scale. 2^-21 |x| covers the float32 roundings of x / scale and q * scale (2^-24 each,
with margin). SUBNORMAL_SLACK: when absmax / 127 is a float32 subnormal, the scale keeps only a few bits (or
underflows to 0, quantizing the block to 0); 127 * (scale's rounding error <= half the subnormal spacing 2^-149)
bounds the extra error, so 128 * 2^-149 (~1.8e-43) covers it. No other absolute slack is allowed.
"""
import torch
from hypothesis import given, settings, strategies as st

from int8flow.format import QMAX, BlockShape, dequantize, expand_scale, quantize, quantize_transposed
from _strategies import blocks, seeds, tensors

SUBNORMAL_SLACK = 128 * 2.0**-149
PROPS = settings(deadline=None, max_examples=60, derandomize=True)


def _errors(q, x):
    x64 = x.double()
    err = (q.dequantize(torch.float32).double() - x64).abs()
    step = expand_scale(q.scale, q.block, tuple(q.shape)).double()
    return err, step, x64.abs()


def _well_formed(q, x, block):
    assert q.data.dtype == torch.int8 and tuple(q.data.shape) == tuple(x.shape)
    assert tuple(q.scale.shape) == BlockShape.parse(block).grid(tuple(x.shape))
    assert int(q.data.min()) >= -QMAX, "-128 must never appear (symmetric range)"
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale >= 0).all())
    assert bool(torch.isfinite(q.dequantize(torch.float32)).all()), "finite input must dequantize finite"


@PROPS
@given(tensors(), blocks)
def test_nearest_error_at_most_half_step(x_kind, block):
    x, _ = x_kind
    q = quantize(x, block)
    _well_formed(q, x, block)
    err, step, ax = _errors(q, x)
    bad = err > step * 0.5 + ax * 2.0**-21 + SUBNORMAL_SLACK
    assert not bool(bad.any()), (float(err[bad].max()), float(step[bad].max()))


@PROPS
@given(tensors(), blocks, seeds)
def test_stochastic_error_below_one_step(x_kind, block, seed):
    x, _ = x_kind
    q = quantize(x, block, rounding="stochastic", generator=torch.Generator().manual_seed(seed))
    _well_formed(q, x, block)
    err, step, ax = _errors(q, x)
    bad = err > step * (1 + 2.0**-20) + ax * 2.0**-21 + SUBNORMAL_SLACK
    assert not bool(bad.any()), (float(err[bad].max()), float(step[bad].max()))


@PROPS
@given(tensors(), blocks, seeds)
def test_stochastic_rounding_is_reproducible_and_seed_dependent(x_kind, block, seed):
    x, _ = x_kind
    q1 = quantize(x, block, "stochastic", torch.Generator().manual_seed(seed))
    q2 = quantize(x, block, "stochastic", torch.Generator().manual_seed(seed))
    assert torch.equal(q1.data, q2.data) and torch.equal(q1.scale, q2.scale)


@PROPS
@given(tensors(), blocks)
def test_block_absmax_element_maps_to_plus_minus_127(x_kind, block):
    """The largest element of each nonzero-normal-scale block quantizes to +-127: the full INT8 range is used."""
    x, _ = x_kind
    q = quantize(x, block)
    normal = expand_scale(q.scale, q.block, tuple(q.shape)) >= torch.finfo(torch.float32).smallest_normal
    a = x.float().abs()
    absmax = expand_scale(q.scale * QMAX, q.block, tuple(q.shape))
    is_max = normal & (a >= absmax * (1 - 2.0**-22))
    assert bool((q.data[is_max].abs() == QMAX).all())


@PROPS
@given(tensors(), blocks)
def test_transpose_view_dequantizes_to_the_transpose(x_kind, block):
    x, _ = x_kind
    q = quantize(x, block)
    qt = q.t()
    assert qt.block == BlockShape.parse(block).t()
    assert torch.equal(qt.dequantize(torch.float32), q.dequantize(torch.float32).t())


@PROPS
@given(tensors(), blocks)
def test_quantize_transposed_equals_transposed_blocks(x_kind, block):
    """quantize_transposed(x, b) is the quantization of x.T in b blocks = quantize(x, b.t()).t(), bit for bit;
    for square blocks that is the forward pass's own QTensor viewed transposed (no re-quantization needed)."""
    x, _ = x_kind
    b = BlockShape.parse(block)
    qt = quantize_transposed(x, b)
    via_view = quantize(x, b.t()).t()
    assert qt.block == b and qt.data.is_contiguous()
    assert torch.equal(qt.data, via_view.data) and torch.equal(qt.scale, via_view.scale)
    if b.is_square:
        fwd = quantize(x, b).t()
        assert torch.equal(qt.data, fwd.data) and torch.equal(qt.scale, fwd.scale)


@PROPS
@given(tensors(kinds=("gaussian", "heavy_tailed", "outlier_channels")), blocks, st.sampled_from([0, 1]))
def test_non_contiguous_input_quantizes_like_contiguous(x_kind, block, step_dim):
    """A strided view (every other row/column of a larger tensor) gives the same QTensor as its contiguous copy."""
    x, _ = x_kind
    big = torch.repeat_interleave(x, 2, dim=step_dim)
    view = big[::2] if step_dim == 0 else big[:, ::2]
    assert not view.is_contiguous() or min(x.shape) == 1
    a, c = quantize(view, block), quantize(view.contiguous(), block)
    assert torch.equal(a.data, c.data) and torch.equal(a.scale, c.scale)


@PROPS
@given(tensors(), blocks, st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_dequantize_dtype_is_float32_result_rounded(x_kind, block, dtype):
    x, _ = x_kind
    q = quantize(x, block)
    y = dequantize(q, dtype)
    assert y.dtype == dtype
    assert torch.equal(y, q.dequantize(torch.float32).to(dtype))
