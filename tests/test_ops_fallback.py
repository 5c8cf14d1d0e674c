"""Fallback quantization: outlier blocks get a second INT8 term; budget and threshold are honored."""
import math

import pytest
import torch

from int8flow.config import GEOMETRIES, Int8TrainingConfig
from int8flow.format import BlockShape, expand_scale, quantize
from int8flow.ops import int8_linear
from int8flow.ops.fallback import compact_term, expand_term, fallback_mask, fallback_sqnr_sweep

from _inputs import sqnr_db

BLOCK = BlockShape(32, 32)


def _outlier_blocks(M=96, K=256, seed=0):
    """Gaussian x with one 1e4 element in every block of the first column band ("massive activations")."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    outlier_rows = torch.arange(0, M, 32) + 7
    x[outlier_rows, 3] = 1e4
    return x, outlier_rows


@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
def test_outlier_blocks_lose_accuracy_and_fallback_recovers_it(geometry):
    """Who loses accuracy to an outlier depends on the block geometry; fallback recovers it in both.

    32x32 blocks: the 31 other tokens of each outlier's block lose its 32 columns (checked on the ordinary tokens).
    1x128 blocks: a block is one token's 128 features, so the other tokens keep the Gaussian INT8 level and the
    outlier's own token loses the other 127 features of its block - measured on those tokens against the INT8
    weight's product (x @ w_q.T), since the 1e4 outlier times the weight's own rounding error would swamp the
    other features' contribution, which is the signal here."""
    geo = GEOMETRIES[geometry]
    x, outlier_rows = _outlier_blocks()
    w = torch.randn(64, x.shape[1]) / 16
    ref = x.double() @ w.double().t()
    normal = torch.ones(x.shape[0], dtype=torch.bool)
    normal[outlier_rows] = False  # ordinary tokens (in 32x32: sharing a block with an outlier)
    y_int8 = int8_linear(x, w, None, Int8TrainingConfig(precision="int8-linear", **geo))
    y_fb = int8_linear(x, w, None, Int8TrainingConfig(precision="int8+fallback", **geo))
    if geometry == "jetfire":
        # Plain INT8: the 32 columns of each outlier block are crushed to 0 for the other 31 rows
        # (step 1e4/127 >> 1), i.e. 1/8 of K lost: ~9 dB. Floor for "lost": 15 dB.
        assert sqnr_db(ref[normal], y_int8[normal]) < 15.0
        # Fallback adds the residual term for exactly those blocks: back to the per-block INT8 level of a
        # Gaussian GEMM (~40 dB measured); floor 30 dB.
        assert sqnr_db(ref[normal], y_fb[normal]) > 30.0
        return
    # 1x128: ordinary tokens share no block with an outlier: the Gaussian INT8 level (~39 dB measured) without
    # fallback, and fallback leaves them alone (their blocks are not flagged: zero blocks in the extra K columns,
    # so equal up to float32 summation order); floor 30 dB as above.
    assert sqnr_db(ref[normal], y_int8[normal]) > 30.0
    torch.testing.assert_close(y_fb[normal], y_int8[normal], rtol=0, atol=1e-5 * float(y_int8.abs().max()))
    w_q = quantize(w, Int8TrainingConfig(**geo).weight_block).dequantize(torch.float64)
    others = x.double().clone()
    others[outlier_rows, 3] = 0.0
    signal = others[outlier_rows] @ w_q.t()  # what the outlier token's other 255 features contribute
    exact = (x.double() @ w_q.t())[outlier_rows]

    def db(y):
        return float(10 * torch.log10(signal.pow(2).sum() / (y.double()[outlier_rows] - exact).pow(2).sum()))

    # Plain INT8: the outlier's block crushes its 127 other features to 0 (step 1e4/127 >> 1): about half of the
    # 255 features' signal lost, 10 log10(255/128) = 3 dB (3.3 measured). Floor for "lost": 15 dB, as above.
    assert db(y_int8) < 15.0
    # Fallback: the residual term of that block gives them back INT8 precision (44.6 dB measured); floor 30 dB.
    assert db(y_fb) > 30.0


def test_mask_flags_outlier_blocks_only_and_respects_budget():
    x, _ = _outlier_blocks()
    mask = fallback_mask(x, BLOCK, threshold=8.0, budget=1.0)
    expected = torch.zeros(BLOCK.grid(tuple(x.shape)), dtype=torch.bool)
    expected[:, 0] = True
    torch.testing.assert_close(mask, expected, rtol=0, atol=0)
    assert int(fallback_mask(x, BLOCK, 8.0, budget=1 / 24).sum()) == 1  # 24 blocks: budget of one
    assert not fallback_mask(x, BLOCK, 8.0, budget=0.0).any()
    assert not fallback_mask(torch.randn(96, 256), BLOCK, 8.0, 1.0).any()  # Gaussian: no block is 8x the median
    assert not fallback_mask(torch.zeros(64, 64), BLOCK, 8.0, 1.0).any()


def test_sweep_improves_monotonically_as_threshold_drops():
    x, _ = _outlier_blocks()
    rows = fallback_sqnr_sweep(x, torch.randn(64, 256), [math.inf, 32.0, 8.0], BLOCK)
    medians = [r[2] for r in rows]
    rates = [r[3] for r in rows]
    assert rates[0] == 0 and rates[-1] > 0
    assert medians[-1] > medians[0] + 15  # the per-token SQNR recovers (measured +30 dB)


# --- compact storage of the second INT8 term ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 40), (33, 77), (100, 64), (77, 100)])
@pytest.mark.parametrize("block", ["32x32", "16x64", "1x32"])
def test_compact_term_round_trips_with_tail_blocks(shape, block):
    block = BlockShape.parse(block)
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    keep = torch.rand(block.grid(shape), generator=g) < 0.3  # a random subset of blocks, tails included
    x2_q = quantize(x * expand_scale(keep.float(), block, shape), block)
    index, blocks, scale = compact_term(x2_q)
    assert blocks.shape == (int(keep.sum()), block.rows, block.cols) and index.dtype == torch.int32
    spare = keep.numel() - int(keep.sum())  # static capacity (torch.compile): zero blocks pad the store
    for stored in (compact_term(x2_q), compact_term(x2_q, capacity=int(keep.sum()) + min(spare, 3))):
        back = expand_term(*stored, shape, block)
        torch.testing.assert_close(back.data, x2_q.data, rtol=0, atol=0)
        torch.testing.assert_close(back.scale, x2_q.scale, rtol=0, atol=0)


def _flagged_input(M=256, K=512, rate=0.07, seed=0, block=BLOCK):
    """Gaussian x with one 1e3 element in a random ~rate of its ``block`` blocks (outlier blocks to fall back)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    grid = block.grid((M, K))
    hit = (torch.rand(grid, generator=g) < rate).nonzero()
    x[hit[:, 0] * block.rows + 5 % block.rows, hit[:, 1] * block.cols + 7] = 1e3
    return x, len(hit) / (grid[0] * grid[1])


@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
def test_int8_linear_stores_fallback_blocks_compactly_and_uses_them_exactly(geometry):
    """32x32: at a ~7% fallback rate the saved activation bytes stay within 10% of plain INT8 (dense storage of the
    second term would double them), and with nearest-rounded gradients dW equals dy_q.T @ (x_q + x2_q).

    1x128 (column-structured fallback): the term only enters the forward GEMM, so backward is plain INT8's: the
    same saved bytes (x's transposed copy (K, M), no x_q, no term) and the same dW bit for bit, and the rate is
    the blocks given a term (here scattered outliers: only those in the one chosen K group of four, G = 1)."""
    from int8flow.ops.primitives import quantize_activation

    geo = GEOMETRIES[geometry]
    x, rate = _flagged_input(block=Int8TrainingConfig(**geo).activation_block)
    w = (torch.randn(64, x.shape[1]) / 16).requires_grad_()
    saved, grads = {}, {}
    for precision in ("int8-linear", "int8+fallback"):
        cfg = Int8TrainingConfig(precision=precision, grad_rounding="nearest", **geo)
        acts = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: acts.append(t) or t, lambda t: t):
            y, fb_rate = int8_linear(x, w, None, cfg, return_fallback_rate=True)
        saved[precision] = sum(t.numel() * t.element_size() for t in acts if t is not w)  # INT8 w in both
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        w.grad = None
        y.backward(dy)
        grads[precision] = w.grad
    x_q, x2_q, expected_rate = quantize_activation(x, cfg, "x")
    if not cfg.activation_block.is_square:
        assert saved["int8+fallback"] == saved["int8-linear"], saved
        assert torch.equal(grads["int8+fallback"], grads["int8-linear"])
        assert 0 < float(fb_rate) == float(expected_rate) < rate / 2, (float(fb_rate), rate)
        return
    assert 0.04 < float(fb_rate) <= rate + 1e-9, (float(fb_rate), rate)
    assert saved["int8+fallback"] <= 1.1 * saved["int8-linear"], saved
    expected = quantize(dy, cfg.grad_block).dequantize(torch.float64).t() @ (x_q.dequantize(torch.float64)
                                                                            + x2_q.dequantize(torch.float64))
    torch.testing.assert_close(w.grad.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_int8_linear_with_fallback_compiles_without_graph_breaks():
    """The number of stored fallback blocks is data-dependent: an unbacked size in the fake implementation."""
    torch._dynamo.reset()
    cfg = Int8TrainingConfig(precision="int8+fallback")
    x, _ = _flagged_input(M=64, K=128)
    w = (torch.randn(32, 128) / 16).requires_grad_()
    fn = lambda t: int8_linear(t, w, None, cfg)  # noqa: E731
    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    torch.manual_seed(0)
    torch.compile(fn, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    g_compiled, w.grad = w.grad, None
    torch.manual_seed(0)
    fn(x).square().sum().backward()
    torch.testing.assert_close(g_compiled, w.grad, rtol=1e-5, atol=1e-5)


def test_fallback_gemm_uses_the_fused_kernel_term(monkeypatch):
    """On the kernel path the fallback term goes into the GEMM kernel (one pass); it must equal the reference's
    sum of two GEMMs. Runs the Triton kernel through the interpreter by routing block_gemm to it on CPU."""
    pytest.importorskip("triton")
    import torch
    from int8flow.format import quantize
    from int8flow.ops import backend, primitives

    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels take CUDA tensors, the interpreter CPU
    x, w = torch.randn(64, 96, generator=g).to(dev), torch.randn(40, 96, generator=g).to(dev)
    x[:, 5] *= 300.0  # an outlier channel: its blocks get a fallback term
    a_q = quantize(x)
    r_q = quantize(x - a_q.dequantize())
    r_q.scale[:, 1:] = 0  # only the first K block column keeps its term (tests the skipping of unflagged blocks)
    r_q.data[:, 32:] = 0
    w_q = quantize(w)
    from int8flow.reference import block_gemm as ref_gemm

    want = ref_gemm(a_q, w_q) + ref_gemm(r_q, w_q)  # reference: two GEMMs summed
    calls = []
    real_call = backend.call

    def spy(name, *args, **kwargs):
        calls.append(kwargs.get("a_fallback") is not None)
        return real_call(name, *args, **kwargs)

    monkeypatch.setattr(backend, "uses_kernel", lambda name, device: name == "block_gemm")
    monkeypatch.setattr(backend, "call", spy)
    got = primitives.gemm([a_q, r_q], w_q)
    assert calls == [True]  # one kernel call carrying the term
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
