"""Triton quantize / dequantize kernels vs `int8flow.format` (CPU: Triton interpreter; GPU: compiled)."""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install int8flow[test])")

from int8flow import format as fmt  # noqa: E402
from int8flow.kernels import quantize as kq  # noqa: E402
from int8flow.kernels._launch import interpreting  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
# The triton 3.6 interpreter converts 0-d arrays to int in loop bounds, which numpy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
BLOCKS = ["1x32", "32x32", "1x128", "32x128", "128x128", "3x5"]
SHAPES = [(1, 1), (33, 70), (100, 130)]


def heavy_tailed(shape, seed, dtype=torch.float32):
    """Student-t(3) values, one outlier column x50, and an all-zero leading block of rows (zero-scale blocks)."""
    g = torch.Generator().manual_seed(seed)
    x = _student_t(shape, g)
    if shape[1] > 1:
        x[:, shape[1] // 2] *= 50.0
    x[: min(2, shape[0]), :] = 0.0
    return x.to(dtype).to(DEVICE)


def _student_t(shape, g):
    # t(3) = N / sqrt(chi2(3) / 3), drawn from one generator so every test sees fresh but reproducible data
    n = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    return n / (chi2 / 3).sqrt()


def assert_same_qtensor(got: fmt.QTensor, want: fmt.QTensor):
    assert got.block == want.block
    assert got.data.is_contiguous()
    torch.testing.assert_close(got.scale.cpu(), want.scale.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(got.data.cpu(), want.data.cpu(), rtol=0, atol=0)


# Exact equality is expected: absmax is exact, scale = absmax / 127 and x / scale are correctly rounded
# float32 divisions in both, and round-half-even is computed exactly (|v| <= 127 < 2**22).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_quantize_equals_reference(block, shape, dtype):
    x = heavy_tailed(shape, seed=BLOCKS.index(block) * 1000 + shape[0] + shape[1], dtype=dtype)
    assert_same_qtensor(kq.quantize(x, block), fmt.quantize(x, block))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_quantize_transposed_equals_reference(block, shape):
    x = heavy_tailed(shape, seed=7 + len(block) + shape[0])
    got = kq.quantize_transposed(x, block)
    assert got.shape == (shape[1], shape[0])
    assert_same_qtensor(got, fmt.quantize_transposed(x, block))


def test_quantize_strided_input_and_exact_halves():
    # A transposed view (stride (1, R)) as input, and values v = k + 0.5 exactly to exercise ties-to-even.
    base = torch.arange(-127, 128, dtype=torch.float32)
    x = (base[torch.randperm(255)[:64]] + 0.5).reshape(2, 32).clamp(-126.5, 126.5)
    x[:, 0] = 127.0  # scale = 1 per row block, so x / scale = x exactly
    x = x.repeat(16, 1).to(DEVICE).t()  # (32, 32) view with strides (1, 32)
    got, want = kq.quantize(x, "32x1"), fmt.quantize(x, "32x1")
    assert_same_qtensor(got, want)


def test_float32_max_block_scale_is_clamped_like_the_format():
    x = heavy_tailed((40, 70), seed=4)
    x[5, 7] = torch.finfo(torch.float32).max
    got = kq.quantize(x, "32x32")
    assert_same_qtensor(got, fmt.quantize(x, "32x32"))
    assert torch.isfinite(got.dequantize()).all()


def test_all_zero_tensor():
    q = kq.quantize(torch.zeros(40, 70, device=DEVICE), "32x32")
    assert torch.count_nonzero(q.data) == 0 and torch.count_nonzero(q.scale) == 0


@pytest.mark.parametrize("block", ["32x32", "1x128"])
def test_dequantize_equals_reference(block):
    q = fmt.quantize(heavy_tailed((70, 130), seed=3), block)
    torch.testing.assert_close(kq.dequantize(q), q.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(kq.dequantize(q.t()), q.t().dequantize(), rtol=0, atol=0)
    # bf16: the interpreter truncates float32 -> bf16 (triton 3.6), the GPU rounds: allow one bf16 ulp (2**-7).
    torch.testing.assert_close(kq.dequantize(q, torch.bfloat16).float(), q.dequantize(), rtol=2**-7, atol=0)


def test_stochastic_rounding_unbiased_and_seeded():
    # Every 128-wide block holds one 127 (scale 1) and values k + 0.3: q must be k or k+1, k+1 with p = 0.3.
    frac = 0.3
    x = torch.full((64, 128), frac, device=DEVICE) + torch.randint(-100, 100, (64, 128), device=DEVICE)
    x[:, 0] = 127.0
    q1 = kq.quantize(x, "1x128", "stochastic", seed=11)
    up = (q1.data[:, 1:].float() - torch.floor(x[:, 1:])).cpu()
    assert set(up.unique().tolist()) <= {0.0, 1.0}
    n = up.numel()
    # Binomial(n, 0.3): 5 standard deviations keeps false failures below 1e-6.
    assert abs(up.mean().item() - frac) < 5 * (frac * (1 - frac) / n) ** 0.5
    assert torch.equal(q1.data, kq.quantize(x, "1x128", "stochastic", seed=11).data)
    assert not torch.equal(q1.data, kq.quantize(x, "1x128", "stochastic", seed=12).data)


def test_rejects_bad_input():
    x = torch.randn(8, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float32, bfloat16"):
        kq.quantize(x.to(torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        kq.quantize(x[None])
    with pytest.raises(ValueError, match="rounding"):
        kq.quantize(x, rounding="up")
    with pytest.raises(ValueError, match="seed"):
        kq.quantize(x, seed=-1)
    with pytest.raises(fmt.NonFiniteError):
        kq.quantize(torch.full((4, 4), float("nan"), device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("block", ["32x32", "1x128", "128x128"])
def test_quantize_large_on_gpu(block):
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    assert_same_qtensor(kq.quantize(x, block), fmt.quantize(x, block))
    assert_same_qtensor(kq.quantize_transposed(x, block), fmt.quantize_transposed(x, block))


# --- both layouts from one pass, and the device non-finite flag ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (100, 130)])
@pytest.mark.parametrize("block", ["1x128", "1x32"])
def test_quantize_dual_equals_reference(block, shape, dtype):
    # x_q == quantize(x), x_t_q == quantize(x.t().contiguous()) bit for bit, both contiguous, tails included.
    x = heavy_tailed(shape, seed=300 + shape[0] + len(block), dtype=dtype)
    x_q, x_t_q = kq.quantize_dual(x, block)
    assert_same_qtensor(x_q, fmt.quantize(x, block))
    assert_same_qtensor(x_t_q, fmt.quantize(x.t().contiguous(), block))
    assert x_t_q.shape == (shape[1], shape[0])


def test_quantize_dual_refuses_square_blocks():
    with pytest.raises(ValueError, match="1xK"):
        kq.quantize_dual(torch.randn(8, 8, device=DEVICE), "32x32")


def test_nonfinite_input_sets_the_device_flag_without_a_check():
    # check_finite=False (the training path): no host check, the kernel records the block in the device flag;
    # the NaN block is written like the format writes it (scale NaN, codes 0), the Inf block likewise.
    from int8flow.kernels import nonfinite

    nonfinite.take(DEVICE)
    x = heavy_tailed((40, 256), seed=9)
    assert nonfinite.take(DEVICE) is None
    kq.quantize(x, "1x128", check_finite=False)
    assert nonfinite.take(DEVICE) is None  # finite input leaves it clear
    x[3, 5], x[30, 200] = float("nan"), float("inf")
    got, want = kq.quantize(x, "1x128", check_finite=False, flag_op="fc1 input"), fmt.quantize(x, "1x128",
                                                                                                check_finite=False)
    assert torch.equal(got.data.cpu(), want.data.cpu())
    assert torch.equal(got.scale.isnan().cpu(), want.scale.isnan().cpu())
    assert torch.equal(got.scale.nan_to_num().cpu(), want.scale.nan_to_num().cpu())
    event = nonfinite.take(DEVICE)
    assert event is not None and event.op == "fc1 input" and event.blocks >= 2  # the NaN and the Inf block
    assert nonfinite.take(DEVICE) is None  # take() cleared it


@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (100, 130), (130, 257)])
@pytest.mark.parametrize("block", ["128x128", "32x32", "1x128"])
def test_transpose_qtensor_is_the_transposed_copy(block, shape):
    # the K-major copy of a transposed view: data and scales equal q.t() element for element, contiguous, blocks
    # transposed; tails of both tiles (64 x 128) included; the source a strided view as the GEMM path passes it
    q = fmt.quantize(heavy_tailed(shape, seed=400 + shape[1]), block)
    got = kq.transpose_qtensor(q)
    want = q.t().k_major()
    assert got.block == want.block and got.shape == (shape[1], shape[0])
    assert_same_qtensor(got, want)
    back = kq.transpose_qtensor(q.t())  # a transposed view in (primitives.k_major's case): q itself out
    assert_same_qtensor(back, q)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape,block,strided", [((300, 77), "1x128", False), ((130, 200), "1x128", True),
                                                 ((70, 40), "1x32", False)])
def test_transposed_one_warp_tiles_write_session4s_bits(shape, block, strided, rounding, monkeypatch):
    """The transposed copy on one-warp [K, G, 16] programs (``_launch.T_ONE_WARP``) is bit for bit what session 4's
    [K, 1, 64] x 8-warp launch wrote, stochastic noise included (keyed by (seed, row, col)); tails in M and N
    (neither a multiple of 128 / 16), a strided input, K < 128 (G > 1)."""
    x = heavy_tailed(shape[::-1] if strided else shape, seed=500 + shape[0], dtype=torch.bfloat16)
    x = x.t() if strided else x
    new = (kq.quantize_transposed(x, block, rounding, seed=9), *kq.quantize_dual(x, block, rounding, seed=9))
    monkeypatch.setattr(kq._launch, "T_ONE_WARP", False)
    old = (kq.quantize_transposed(x, block, rounding, seed=9), *kq.quantize_dual(x, block, rounding, seed=9))
    for a, b in zip(new, old):
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    if rounding == "nearest":
        assert_same_qtensor(new[0], fmt.quantize_transposed(x, block))
