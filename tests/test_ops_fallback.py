"""Fallback quantization: outlier blocks get a second INT8 term; budget and threshold are honored."""
import math

import pytest
import torch

from int8flow.config import GEOMETRIES, Int8TrainingConfig
from int8flow.format import BlockShape, expand_scale, quantize
from int8flow.ops import int8_linear
from int8flow.ops.fallback import compact_term, expand_term, fallback_mask, fallback_sqnr_sweep, median_all, select_groups

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


@pytest.mark.parametrize("shape", [(7, 5), (8, 6), (1, 1), (2, 1)])
def test_median_all_equals_torch_median(shape):
    """median_all (kthvalue, one kernel on CUDA) is torch's median: the lower middle value for even counts."""
    x = torch.randn(shape).abs() * torch.rand(shape) * 100  # ties unlikely; odd and even counts
    assert median_all(x).item() == x.median().item()
    x = torch.randint(0, 3, shape).float()  # many ties
    assert median_all(x).item() == x.median().item()


@pytest.mark.parametrize("shape", [(0, 64), (64, 0), (0, 0)])
def test_fallback_mask_of_an_empty_activation_is_empty(shape):
    """As with torch's median (NaN for an empty tensor), not kthvalue's IndexError: an empty mask, nothing flagged."""
    assert math.isnan(median_all(torch.empty(shape)).item())
    mask = fallback_mask(torch.empty(shape), BLOCK, 8.0, 0.1)
    assert mask.shape == BLOCK.grid(shape) and not mask.any()


def test_select_groups_budget_keeps_exactly_k_blocks():
    """The budget keeps exactly floor(budget * M * groups) flagged blocks, the largest ratios (index_fill_ path)."""
    torch.manual_seed(3)
    scale = torch.rand(64, 8) + 0.5
    scale[:, 2] *= 50  # one outlier group: every block of it flagged
    groups, flags = select_groups(scale, threshold=8.0, budget=0.05, capacity=2)
    k = math.floor(0.05 * 64 * 8)
    assert groups.tolist() == sorted(groups.tolist()) and 2 in groups.tolist()
    assert int(flags.sum()) == k
    col = groups.tolist().index(2)
    kept = scale[:, 2][flags[:, col]]
    assert kept.min() >= scale[:, 2][~flags[:, col]].max()  # the k largest ratios


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


# --- column-structured fallback (1x128 geometry): one GEMM over K + G x 128 ----------------------------------


def _column_input(M, K, pattern, seed):
    """Gaussian (M, K) with outliers: ``channels`` (two channels x60 in every token: their K groups' blocks flag),
    ``scattered`` (single 1e3-2e3 elements in random blocks: flags spread over every K group) or ``both``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if pattern in ("channels", "both"):
        x[:, torch.randperm(K, generator=g)[:2]] *= 60.0
    if pattern in ("scattered", "both"):
        hits = torch.rand(M, -(-K // 128), generator=g) < 0.03
        rows, groups = hits.nonzero(as_tuple=True)
        # distinct magnitudes: no ties between groups' maxima (top-G ties may break differently on CPU and GPU)
        x[rows, (groups * 128 + 5).clamp_max(K - 1)] = 1e3 * (1 + torch.rand(len(rows), generator=g))
    return x


def _expected_term(x, x_q, cfg):
    """The column term's selection and dense values from first principles (float64 ratios of block absmax, not the
    scales; a loop over groups), as (dense QTensor of x's shape, number of blocks given a term)."""
    from int8flow.format import block_absmax

    M, K = x.shape
    amax = block_absmax(x, cfg.activation_block).double()  # (M, n_groups)
    ratio = amax / amax.flatten().median()
    n_groups = amax.shape[1]
    G = min(n_groups, max(1, math.ceil(cfg.fallback_groups * n_groups - 1e-9)))
    groups = sorted(torch.topk(ratio.max(dim=0).values, G).indices.tolist())
    mask = torch.zeros_like(ratio, dtype=torch.bool)
    for j in groups:
        mask[:, j] = ratio[:, j] > cfg.fallback_threshold
    budget = math.floor(cfg.fallback_budget * M * n_groups)
    if budget < M * G:  # the budget binds: the largest flagged ratios
        keep = torch.zeros(mask.numel(), dtype=torch.bool)
        keep[torch.topk(torch.where(mask, ratio, -1.0).flatten(), budget).indices] = True
        mask &= keep.view_as(mask)
    resid = torch.where(expand_scale(mask.float(), cfg.activation_block, (M, K)) > 0, x - x_q.dequantize(), 0.0)
    return quantize(resid, cfg.activation_block), int(mask.sum())


@pytest.mark.parametrize("pattern", ["channels", "scattered", "both"])
@pytest.mark.parametrize("K,groups,budget", [(1024, 0.25, 1.0), (1000, 0.25, 1.0), (200, 1.0, 1.0), (768, 0.34, 0.1),
                                             (640, 0.0625, 0.25)])
def test_column_fallback_gemm_equals_the_two_term_reference(pattern, K, groups, budget):
    """Selection + term + one concatenated GEMM == x_q @ w.T + x2 @ w.T of the reference, where x2 is the dense
    residual term of the blocks a first-principles selection flags: the term bit for bit, the GEMM to float32
    summation order. K tails (1000, 200: a partial last group, zero-padded in the extra columns), G >= the groups
    (200 -> 2 groups, fraction 1), a binding budget (768 at 10%: 38 blocks < 64 x 3 in the groups), the
    default capacity (640: G = 1 of 5)."""
    from int8flow.ops import primitives as P
    from int8flow.ops.fallback import ColumnTerm
    from int8flow.reference import block_gemm as ref_gemm

    cfg = Int8TrainingConfig(precision="int8+fallback", fallback_groups=groups, fallback_budget=budget)
    assert cfg.column_fallback
    M, N = 64, 48
    x = _column_input(M, K, pattern, seed=K + len(pattern))
    g = torch.Generator().manual_seed(K)
    w, bias = torch.randn(N, K, generator=g) / 16, torch.randn(N, generator=g)
    x_q, term, rate = P.quantize_activation(x, cfg, "x")
    assert isinstance(term, ColumnTerm) and term.q.shape == (M, len(term.groups) * 128)
    want_x2, flagged = _expected_term(x, x_q, cfg)
    assert flagged > 0
    got_x2 = term.dense(K)
    assert torch.equal(got_x2.data, want_x2.data) and torch.equal(got_x2.scale, want_x2.scale)
    assert rate.dtype == torch.float32 and rate.dim() == 0
    assert float(rate) == pytest.approx(flagged / x_q.scale.numel(), rel=1e-6)  # float32 of the exact fraction
    w_q = quantize(w, cfg.weight_block)
    want = ref_gemm(x_q, w_q, bias) + ref_gemm(want_x2, w_q)
    got = P.gemm([x_q, term], w_q, bias, cfg=cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the same through the extended operand built once (fc1 and gate share it)
    torch.testing.assert_close(P.gemm(P.operand(x_q, term), w_q, bias, cfg=cfg), got, rtol=0, atol=0)


def test_column_fallback_takes_one_plain_gemm_on_the_kernel_path(monkeypatch):
    """On the kernel path the term is K columns of the A operand, not an ``a_fallback`` operand (which forces the
    Triton kernel): one block_gemm call over K + G x 128 with no a_fallback, so `route` picks the Gluon kernel on
    sm_90 (the GPU test checks that). Runs the Triton kernel through the interpreter, against the reference."""
    pytest.importorskip("triton")
    from int8flow.ops import backend
    from int8flow.ops import primitives as P
    from int8flow.reference import block_gemm as ref_gemm

    from int8flow.kernels._launch import interpreting

    device = "cpu" if interpreting() else "cuda"  # the kernel's device: CPU tensors only under the interpreter
    cfg = Int8TrainingConfig(precision="int8+fallback", fallback_groups=0.25)
    x = _column_input(64, 384, "channels", seed=3)
    w_q = quantize(torch.randn(32, 384, generator=torch.Generator().manual_seed(4)) / 16, cfg.weight_block)
    x_q, term, _ = P.quantize_activation(x, cfg, "x")
    want = ref_gemm(x_q, w_q) + ref_gemm(term.dense(384), w_q)
    from int8flow.format import QTensor

    def dev(q):
        return QTensor(q.data.to(device), q.scale.to(device), q.block)

    x_q, w_q, term = dev(x_q), dev(w_q), type(term)(dev(term.q), term.groups.to(device))
    calls, real_call = [], backend.call

    def spy(name, *args, **kwargs):
        if name == "block_gemm":
            calls.append((tuple(args[0].shape), tuple(args[1].shape), kwargs.get("a_fallback")))
        return real_call(name, *args, **kwargs)

    monkeypatch.setattr(backend, "uses_kernel", lambda name, device: name == "block_gemm")
    monkeypatch.setattr(backend, "call", spy)
    got = P.gemm([x_q, term], w_q, cfg=cfg).cpu()
    assert calls == [((64, 384 + 128), (32, 384 + 128), None)], calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_column_fallback_beats_plain_int8_on_outlier_channels():
    """SQNR of int8_linear's output vs float64 on an outlier-channel input (two channels x100, in two of 8 K groups,
    G = 2): plain INT8 quantizes the other 254 channels of those groups with the outlier's step (~100 x 0.7 / 127
    in a typical row; 31.3 dB measured); the second term gives them back INT8 precision, leaving mostly the weight's
    INT8 error (40.3 dB measured, +9 dB). Floor: +6 dB (a no-op term gives +0; the inputs are seeded)."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(512, 1024, generator=g)
    x[:, [5, 700]] *= 100.0
    w = torch.randn(256, 1024, generator=g) / 32
    ref = x.double() @ w.double().t()
    y8 = int8_linear(x, w, None, Int8TrainingConfig(precision="int8"))
    y_fb, rate = int8_linear(x, w, None, Int8TrainingConfig(precision="int8+fallback", fallback_groups=0.25),
                             return_fallback_rate=True)
    assert 0 < float(rate) <= 0.25
    assert sqnr_db(ref, y_fb) > sqnr_db(ref, y8) + 6.0, (sqnr_db(ref, y_fb), sqnr_db(ref, y8))


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_column_fallback_flow_ops_compile_without_graph_breaks(activation):
    """norm -> fc1 -> act -> fc2 with the column term on the norm output and the fc2 input: fullgraph
    torch.compile (static shapes throughout: G is a function of the shape), the same output, rate and gradients as
    eager, and the rate (the fc2 input's) reports blocks given a term."""
    from int8flow.ops import NormSpec, mlp_residual

    torch._dynamo.reset()
    cfg = Int8TrainingConfig(precision="int8+fallback")
    D, F = 512, 640
    g = torch.Generator().manual_seed(5)
    norm_w = torch.ones(D)
    norm_w[7] = 60.0  # an outlier channel of the norm output (fc1's input)
    w_in = torch.randn(F, D, generator=g) / 16
    w_in[5] *= 40.0  # an outlier feature of fc1's output: the fc2 input's group 0 falls back (the rate reported)
    w_in.requires_grad_()
    w_out = (torch.randn(D, F, generator=g) / 16).requires_grad_()
    w_gate = (torch.randn(F, D, generator=g) / 16).requires_grad_() if activation == "swiglu" else None
    h = torch.randn(2, 32, D, generator=g)

    def fn(t):
        return mlp_residual(t, NormSpec("rmsnorm", norm_w, None, 1e-6), w_in, None, w_out, None, activation, cfg,
                            w_gate=w_gate)

    assert torch._dynamo.explain(fn)(h).graph_break_count == 0
    params = [p for p in (w_in, w_out, w_gate) if p is not None]
    results = []
    for f in (torch.compile(fn, backend="aot_eager", fullgraph=True), fn):
        torch.manual_seed(0)
        out, rate = f(h)
        out.square().sum().backward()
        results.append((out.detach(), rate, [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (out_c, rate_c, grads_c), (out_e, rate_e, grads_e) = results
    assert float(rate_e) > 0 and float(rate_c) == float(rate_e)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_column_fallback_bad_inputs_name_the_fix():
    from int8flow.ops import primitives as P
    from int8flow.ops.fallback import select_groups

    with pytest.raises(ValueError, match=r"fallback_groups must be a fraction in \(0, 1\]"):
        Int8TrainingConfig(precision="int8+fallback", fallback_groups=0.0)
    cfg = Int8TrainingConfig(precision="int8+fallback")
    x_q, term, _ = P.quantize_activation(_column_input(16, 256, "channels", 0), cfg, "x")
    with pytest.raises(ValueError, match="weight blocks 128 wide along K"):
        P.gemm([x_q, term], quantize(torch.randn(8, 256), "32x32"), cfg=cfg)
    with pytest.raises(ValueError, match="does not belong to the activation"):
        P.with_term(quantize(torch.randn(8, 256), "1x128"), term)
    with pytest.raises(ValueError, match="capacity must be in"):
        select_groups(x_q.scale, 8.0, 1.0, 3)
    # geometries the column path does not cover keep the dense term (32x32, and 1x128 with 32-wide weight blocks)
    for geo in (GEOMETRIES["jetfire"], dict(activation_block="1x128", weight_block="32x32")):
        assert not Int8TrainingConfig(precision="int8+fallback", **geo).column_fallback


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["channels", "scattered"])
def test_gpu_column_fallback_linear_takes_the_gluon_route(pattern):
    """H200: int8_linear with int8+fallback at a real shape: the forward GEMM runs on the Gluon kernel (one GEMM
    over K + G x 128), its output equals the two-term reference on the same INT8 operands (float64, relative 1e-5:
    the int8 tensor-core bound of tests/test_gpu_kernels.py), the term matches the CPU reference's selection, the
    INT8 epilogue (fc1's) holds every element within half a step of the float output, and backward equals int8's."""
    from int8flow.kernels import gemm as kg
    from int8flow.ops import primitives as P

    M, N, K = 8192, 4096, 4096
    cfg = Int8TrainingConfig(precision="int8+fallback")
    x = _column_input(M, K, pattern, seed=31).cuda()
    w = (torch.randn(N, K, generator=torch.Generator().manual_seed(32)) / 64).cuda()
    x_q, term, rate = P.quantize_activation(x, cfg, "x")
    w_q = P.quantize(w, cfg.weight_block, "nearest", 0, cfg, "w")
    y = P.gemm([x_q, term], w_q, cfg=cfg)
    assert kg.last_route[0] == "gluon", kg.last_route
    x2 = term.dense(K)
    ref = (x_q.dequantize().double() + x2.dequantize().double()) @ w_q.dequantize().double().t()
    assert float((y.double() - ref).norm() / ref.norm()) <= 1e-5
    cpu_q, cpu_term, cpu_rate = P.quantize_activation(x.cpu(), cfg, "x")
    assert torch.equal(term.groups.cpu(), cpu_term.groups) and float(rate) == float(cpu_rate) > 0
    torch.testing.assert_close(x2.dequantize().cpu(), cpu_term.dense(K).dequantize(), rtol=0,
                               atol=float(cpu_term.q.scale.max()))  # one step of the term at most
    y_q = P.gemm([x_q, term], w_q, out_block=cfg.activation_block, cfg=cfg)
    assert kg.last_route[0] == "gluon", kg.last_route
    step = y_q.scale.repeat_interleave(128, dim=1)[:, :N]
    assert bool(((y_q.dequantize() - y).abs() <= 0.5 * step + 1e-6 * y.abs()).all())
    grads = {}
    for precision in ("int8", "int8+fallback"):
        wp = w.clone().requires_grad_()
        torch.manual_seed(0)
        int8_linear(x, wp, None, Int8TrainingConfig(precision=precision)).sum().backward()
        assert precision == "int8" or kg.last_route[0] == "gluon"
        grads[precision] = wp.grad
    assert torch.equal(grads["int8"], grads["int8+fallback"])


def test_group_columns_is_one_launch_and_matches_the_arange_formula():
    """The column indices of a gather are one op (a cached (1, bk) arange plus bk * groups), not three."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from int8flow.ops.fallback import group_columns

    ops = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    groups = torch.tensor([1, 4, 6])
    group_columns(groups, 128, 1024)  # the arange is cached by the first call
    with Count():
        idx, valid = group_columns(groups, 128, 1024)
    assert ops == ["add"] and valid is None
    assert torch.equal(idx, (groups[:, None] * 128 + torch.arange(128)).flatten())
    idx, valid = group_columns(groups, 128, 6 * 128 + 5)  # a tail group: clamped, and masked past K
    assert int(valid.sum()) == 2 * 128 + 5 and int(idx.max()) == 6 * 128 + 4
