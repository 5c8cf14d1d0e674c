"""Fused INT8 data-flow ops (reference path) vs float64 autograd; what they save; determinism."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from int8flow.config import GEOMETRIES, Int8TrainingConfig
from int8flow.format import NonFiniteError, quantize
from int8flow.ops import primitives as P
from int8flow.ops import NormSpec, linear_residual, mlp_residual, norm_linear

from _inputs import sample, sqnr_db

D, FF, N = 96, 200, 70  # feature sizes with tail blocks (200 = 6*32 + 8, 70 = 2*32 + 6)
SHAPE = (2, 33, D)      # 66 rows: a tail row block


def _params(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {"norm_w": 1 + 0.1 * torch.randn(D, generator=g), "w": torch.randn(N, D, generator=g) / D**0.5,
         "w_in": torch.randn(FF, D, generator=g) / D**0.5, "w_out": torch.randn(D, FF, generator=g) / FF**0.5}
    if kind == "layernorm":
        p.update(norm_b=0.1 * torch.randn(D, generator=g), b=torch.randn(N, generator=g),
                 b_in=0.1 * torch.randn(FF, generator=g), b_out=0.1 * torch.randn(D, generator=g))
    else:
        p["w_gate"] = torch.randn(FF, D, generator=g) / D**0.5
    return {k: v.requires_grad_() for k, v in p.items()}


def _norm_ref(kind, x, p):
    if kind == "layernorm":
        return F.layer_norm(x, (D,), p["norm_w"], p["norm_b"], 1e-5)
    return F.rms_norm(x, (D,), p["norm_w"], 1e-6)


def _spec(kind, p):
    return NormSpec(kind, p["norm_w"], p.get("norm_b"), 1e-5 if kind == "layernorm" else 1e-6)


def _mlp_ref(kind, h, p):
    n = _norm_ref(kind, h, p)
    if kind == "layernorm":
        a = F.gelu(F.linear(n, p["w_in"], p["b_in"]), approximate="tanh")
    else:
        a = F.silu(F.linear(n, p["w_gate"])) * F.linear(n, p["w_in"])
    return h + F.linear(a, p["w_out"], p.get("b_out"))


def _mlp_int8(kind, h, p, cfg):
    act = "gelu_tanh" if kind == "layernorm" else "swiglu"
    return mlp_residual(h, _spec(kind, p), p["w_in"], p.get("b_in"), p["w_out"], p.get("b_out"), act, cfg,
                        w_gate=p.get("w_gate"))[0]


def _compare(fn_int8, fn_ref, x, p, dy_seed=5):
    """Run both on the same inputs and the same output gradient; return SQNR of output and each gradient."""
    leaves = {"x": x, **p}
    y = fn_int8({k: v.detach().clone().requires_grad_() for k, v in leaves.items()})
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y_ref = fn_ref(ref_leaves)
    dy = sample(tuple(y_ref.shape), "gaussian", seed=dy_seed)
    torch.autograd.backward(y[0], dy)
    y_ref.backward(dy.double())
    sq = {"out": sqnr_db(y_ref.detach(), y[0].detach())}
    sq.update({k: sqnr_db(ref_leaves[k].grad, y[1][k].grad) for k in leaves})
    return sq


# Measured over 3 rounding seeds (gaussian / Student-t inputs, 32x32 blocks, stochastic gradients):
# outputs >= 30.8 dB; input gradients >= 30.9; weight / norm-parameter / fc1-bias gradients >= 23.8
# (several INT8 gradient quantizations in a row inside the MLP). Floors: outputs 3 dB under the
# worst case, gradients at the peers' 20 dB gate; un-quantized bias gradients must be float-exact.
# In 1x128 blocks (same inputs and seeds) every value is higher - outputs >= 35.3 dB, input gradients >= 33.4,
# weight / norm / fc1-bias gradients >= 28.4 - so the 32x32 floors (the lower worst case) apply to both.
FLOORS = {"out": 27.0, "x": 27.0, "w": 20.0, "w_in": 20.0, "w_out": 20.0, "w_gate": 20.0, "b": 100.0,
          "b_in": 20.0, "b_out": 100.0, "norm_w": 20.0, "norm_b": 20.0}


@pytest.mark.parametrize("precision", ["int8", "int8+fallback"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dist", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
def test_norm_linear_matches_float64(precision, kind, dist, geometry):
    cfg = Int8TrainingConfig(precision=precision, **GEOMETRIES[geometry])
    p = {k: v for k, v in _params(kind).items() if k in ("norm_w", "norm_b", "w", "b")}

    def run(leaves):
        return norm_linear(leaves["x"], _spec(kind, leaves), leaves["w"], leaves.get("b"), cfg), leaves

    sq = _compare(run, lambda l: F.linear(_norm_ref(kind, l["x"], l), l["w"], l.get("b")), sample(SHAPE, dist, 1), p)
    for k, v in sq.items():
        assert v >= FLOORS[k], (k, v)


@pytest.mark.parametrize("precision", ["int8", "int8+fallback"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dist", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
def test_mlp_residual_matches_float64(precision, kind, dist, geometry):
    cfg = Int8TrainingConfig(precision=precision, **GEOMETRIES[geometry])
    p = {k: v for k, v in _params(kind).items() if k not in ("w", "b")}
    sq = _compare(lambda l: (_mlp_int8(kind, l["x"], l, cfg), l), lambda l: _mlp_ref(kind, l["x"], l),
                  sample(SHAPE, dist, 2), p)
    for k, v in sq.items():
        assert v >= FLOORS[k], (k, v)


@pytest.mark.parametrize("recipe,ff", [("jetfire", 192), ("int8-1x128", 256)])
def test_swiglu_dgrad_as_one_k_concatenated_gemm_matches_float64(recipe, ff):
    """ffn a multiple of the blocks along K: the norm-output gradient df @ w_in + dg @ w_gate runs as one GEMM over
    [df | dg] and [w_in.T | w_gate.T] (`primitives.concat_k`), INT8 from its epilogue; same floors as above."""
    cfg = Int8TrainingConfig.from_recipe_name(recipe)
    g = torch.Generator().manual_seed(7)
    p = {"norm_w": 1 + 0.1 * torch.randn(D, generator=g), "w_in": torch.randn(ff, D, generator=g) / D**0.5,
         "w_gate": torch.randn(ff, D, generator=g) / D**0.5, "w_out": torch.randn(D, ff, generator=g) / ff**0.5}
    p = {k: v.requires_grad_() for k, v in p.items()}
    assert P.concat_k([quantize(torch.randn(8, ff), cfg.grad_block)] * 2) is not None  # the path under test
    sq = _compare(lambda l: (_mlp_int8("rmsnorm", l["x"], l, cfg), l), lambda l: _mlp_ref("rmsnorm", l["x"], l),
                  sample(SHAPE, "heavy_tailed", 8), p)
    for k, v in sq.items():
        assert v >= FLOORS[k], (k, v)


def test_concat_k_refuses_a_block_straddling_two_operands():
    a, b = quantize(torch.randn(8, 200), "32x32"), quantize(torch.randn(8, 64), "32x32")
    assert P.concat_k([a, b]) is None  # 200 = 6 x 32 + 8: the 7th block would mix a and b
    both = P.concat_k([b, a])
    assert both.shape == (8, 264) and torch.equal(both.dequantize(), torch.cat([b.dequantize(), a.dequantize()], 1))


def test_linear_residual_matches_float64():
    cfg = Int8TrainingConfig(precision="int8")
    p = {"w": torch.randn(D, 64).div(8).requires_grad_(), "r": sample(SHAPE, "heavy_tailed", 3).requires_grad_()}

    def run(l):
        return linear_residual(l["x"], l["w"], None, l["r"], cfg) - l["r"].detach(), l

    def ref(l):
        return l["r"] + F.linear(l["x"], l["w"]) - l["r"].detach()

    sq = _compare(run, ref, sample((2, 33, 64), "gaussian", 4), p)
    assert sq["out"] >= FLOORS["out"] and sq["x"] >= FLOORS["x"] and sq["w"] >= FLOORS["w"], sq
    assert sq["r"] > 100  # the residual branch passes the gradient through exactly


def _saved_bytes(fn):
    params = set()
    total = [0]

    def pack(t):
        if not isinstance(t, nn.Parameter) and t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(params)
    return total[0]


def test_mlp_saves_int8_and_less_than_float():
    kind = "rmsnorm"
    p = {k: nn.Parameter(v.detach()) for k, v in _params(kind).items()}
    h = sample((4, 64, D), "gaussian", 6).requires_grad_()

    def int8(params):
        params.update(t.data_ptr() for t in p.values())
        _mlp_int8(kind, h, p, Int8TrainingConfig(precision="int8"))

    def fp(params):
        params.update(t.data_ptr() for t in p.values())
        _mlp_ref(kind, h, p)

    b_int8, b_fp = _saved_bytes(int8), _saved_bytes(fp)
    # float32 autograd saves h, n, gate, up, silu(gate), a (4 bytes each); INT8 saves 1 byte + scales
    # + row stats, plus the INT8 weights: well under a third.
    assert b_int8 < b_fp / 3, (b_int8, b_fp)


def test_same_seed_same_grads_and_checkpoint_matches():
    cfg = Int8TrainingConfig(precision="int8")
    p = {k: v for k, v in _params("layernorm").items() if k not in ("w", "b")}

    def grads(seed, checkpoint=False):
        torch.manual_seed(seed)
        h = sample(SHAPE, "gaussian", 7).requires_grad_()
        fn = lambda t: _mlp_int8("layernorm", t, p, cfg)  # noqa: E731
        out = torch.utils.checkpoint.checkpoint(fn, h, use_reentrant=False) if checkpoint else fn(h)
        out.sum().backward()
        gs = [h.grad] + [v.grad.clone() for v in p.values()]
        for v in p.values():
            v.grad = None
        return gs

    a, b, c, d = grads(0), grads(0), grads(0, checkpoint=True), grads(1)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, z, rtol=0, atol=0)
    assert not torch.equal(a[0], d[0])


def test_argument_errors():
    cfg = Int8TrainingConfig(precision="int8")
    p = _params("layernorm")
    h = torch.randn(4, D)
    with pytest.raises(ValueError, match="w_gate"):
        mlp_residual(h, _spec("layernorm", p), p["w_in"], None, p["w_out"], None, "swiglu", cfg)
    with pytest.raises(ValueError, match="activation"):
        mlp_residual(h, _spec("layernorm", p), p["w_in"], None, p["w_out"], None, "relu", cfg)
    with pytest.raises(ValueError, match="norm kind"):
        norm_linear(h, NormSpec("batchnorm", None, None, 1e-5), p["w"], None, cfg)
    with pytest.raises(TypeError, match="LayerNorm"):
        norm_linear(h, nn.BatchNorm1d(4), p["w"], None, cfg)
    with pytest.raises(TypeError, match="LayerNorm"):
        NormSpec.of(nn.BatchNorm1d(4))


# --- what the data-flow ops save, and that backward recomputes the forward's operands exactly ----------


def _saved(fn, params):
    """Tensors autograd saves while running fn(), parameters excluded."""
    ids = {id(p) for p in params}
    saved = []

    def pack(t):
        if id(t) not in ids:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
@pytest.mark.parametrize("precision", ["int8", "int8+fallback"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_ops_save_only_int8_inputs_and_row_stats(precision, kind, geometry):
    """norm_linear keeps the INT8 normalized x; mlp_residual the INT8 normalized h and the fc1 (gate) outputs; everything else of
    activation size (norm output, fc2 input, fallback terms) is recomputed, and no float tensor larger
    than a per-row statistic (or the block scales) is kept. An outlier channel makes fallback flag blocks (32x32).
    In 1x128 the scale grids of (M, D) / (M, FF) are (M, 1) / (M, 2): per-row, so INT8 activations are told apart
    from scales by dtype, not by their leading dimension."""
    cfg = Int8TrainingConfig(precision=precision, **GEOMETRIES[geometry])
    p = _outlier_norm_gain(_params(kind))
    x = sample(SHAPE, "heavy_tailed", 8).requires_grad_()
    M = x.numel() // D
    nl = _saved(lambda: norm_linear(x, _spec(kind, p), p["w"], p.get("b"), cfg), p.values())
    mlp = _saved(lambda: _mlp_int8(kind, x, p, cfg), p.values())
    for saved, expect in ((nl, [(M, D)]), (mlp, [(M, D), (M, FF)] + ([(M, FF)] if kind == "rmsnorm" else []))):
        acts = sorted(tuple(t.shape) for t in saved if t.dtype == torch.int8 and t.dim() == 2 and t.shape[0] == M)
        assert acts == sorted(expect), acts
        # floats: row statistics, block-scale grids, scalars (seed, placeholders) - nothing per element
        grids = {cfg.activation_block.grid(shape) for shape in ((M, D), (M, FF))}
        grids |= {cfg.weight_block.grid(shape) for shape in ((N, D), (FF, D), (D, FF))}
        floats = {tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() > 1}
        assert floats <= grids | {(M,)}, floats


def _outlier_norm_gain(p):
    """Norm gain of feature 3 scaled 50x (LLM-style outlier channel after the norm): its block column is far
    above 8x the median block absmax, so fallback flags it. (An outlier in x alone would not do: the norm
    divides each row by its own RMS.)"""
    with torch.no_grad():
        p["norm_w"][3] *= 50.0
    return p


def _hat(q):
    return q.dequantize(torch.float64) if q is not None else 0.0


def _wgrad_operand(terms, block):
    """The activation operand wgrad multiplies, as (K, M) float64, from the forward's INT8 term(s) (QTensors) or a
    float output: square blocks read the INT8 terms transposed (views); 1xK blocks re-quantize each term along M -
    the float output when its producer writes the transposed copy in the same pass (no fallback), else each INT8
    term's values (`primitives.transposed`)."""
    terms = [t for t in terms if t is not None]
    if block.is_square:
        return sum(_hat(q) for q in terms).t()
    return sum(quantize((t if isinstance(t, torch.Tensor) else t.dequantize()).t(), block).dequantize(torch.float64)
               for t in terms)


@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
@pytest.mark.parametrize("precision", ["int8", "int8+fallback"])
def test_backward_recomputes_norm_output_and_fc2_input_exactly(precision, geometry):
    """With nearest-rounded gradients, dW of the QKV GEMM and of fc2 must equal dy_q.T @ (the forward's
    INT8 operand [+ its fallback term]) computed independently from the reference ops: any drift in the
    recomputation (missing norm bias, other statistics, another fallback mask) shows up here.

    1x128: wgrad reads dy and the operand transposed, quantized along M: Q(dy.T) @ Q(n.T).T with n the float norm
    output (its producer writes the transposed copy from the same pass), with or without fallback (the column
    fallback term only enters the forward GEMM; backward recomputes none). The outlier norm-gain channel sits in every token's row block there (D = 96 < 128),
    so it flags nothing; one token with a 1e3 value in that channel makes its norm-output block ~12x the median
    block absmax (sqrt(D) x gain 50 against ~50 x |N(0, 1)|), which does."""
    from int8flow.ops.primitives import gemm, quantize_activation
    from int8flow.reference import nonlinear as R

    cfg = Int8TrainingConfig(precision=precision, grad_rounding="nearest", **GEOMETRIES[geometry])
    blk, gblk = cfg.activation_block, cfg.grad_block
    p = _outlier_norm_gain(_params("layernorm"))
    with torch.no_grad():
        p["w_in"][5] *= 40.0  # an outlier fc1 feature: its fc2-input blocks fall back
    x = sample(SHAPE, "gaussian", 9)
    if not blk.is_square:
        x[0, 4, 3] = 1e3  # an outlier token in the outlier channel: its norm-output row block falls back
    x.requires_grad_()
    x2d = x.detach().reshape(-1, D)

    def norm_out(t):
        # the norm reads x in high precision; the INT8 operand is the normalized input (unit statistics after)
        x_q = quantize(R.layer_norm_forward(t, None, None, 1e-5)[0], blk)
        unit = dict(mean=torch.zeros(t.shape[0]), rstd=torch.ones(t.shape[0]))
        n = R.layer_norm_forward(x_q, p["norm_w"].detach(), p["norm_b"].detach(), 1e-5, **unit)[0]
        if not cfg.uses_fallback:
            return quantize(n, blk), None, n
        n_q, n2_q, rate = quantize_activation(n, cfg, "n")
        assert float(rate) > 0  # the outlier channel (token) does flag blocks
        return n_q, n2_q, n

    def dw_expected(grad, terms):
        if blk.is_square:
            return quantize(grad, gblk).dequantize(torch.float64).t() @ _wgrad_operand(terms, blk).t()
        return quantize(grad.t(), gblk).dequantize(torch.float64) @ _wgrad_operand(terms, blk).t()

    # norm -> QKV
    y = norm_linear(x, _spec("layernorm", p), p["w"], p["b"], cfg)
    dy = sample(tuple(y.shape), "gaussian", 10)
    y.backward(dy)
    n_q, n2_q, n = norm_out(x2d)
    # 1xK blocks: the transposed copy comes from the float output, with the (column-structured) fallback as well -
    # its term only enters the forward GEMM; square blocks: the INT8 terms' views
    expected = dw_expected(dy.reshape(-1, N), [n] if not blk.is_square else [n_q, n2_q])
    torch.testing.assert_close(p["w"].grad.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    # MLP: fc2's weight gradient sees act(fc1(norm(h))) as the forward did
    out = _mlp_int8("layernorm", x, p, cfg)
    dout = sample(tuple(out.shape), "gaussian", 11)
    out.backward(dout)
    w_in_q = quantize(p["w_in"].detach(), cfg.weight_block)
    f_q = gemm([n_q, n2_q], w_in_q, p["b_in"].detach(), out_block=blk, cfg=cfg)
    if cfg.uses_fallback:
        a = R.gelu_forward(f_q, "tanh")
        a_q, a2_q, rate = quantize_activation(a, cfg, "a")
        assert float(rate) > 0
        terms = [a_q, a2_q] if blk.is_square else [a]
    else:
        a = R.gelu_forward(f_q, "tanh")
        terms = [quantize(a, blk)] if blk.is_square else [a]
    expected = dw_expected(dout.reshape(-1, D), terms)
    torch.testing.assert_close(p["w_out"].grad.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


# block-aligned (one GEMM) / not (one per weight): aligned means on weight-block rows and gradient-block columns,
# multiples of 32 in 32x32, of 128 in 1x128 (whose (64, 32, 32) takes one GEMM per weight)
@pytest.mark.parametrize("geometry,rows,aligned", [("jetfire", (64, 32, 32), True), ("jetfire", (40, 30, 30), False),
                                                   ("1x128", (256, 128, 128), True), ("1x128", (64, 32, 32), False)])
def test_norm_linear_takes_stacked_weights_without_a_float_copy(geometry, rows, aligned):
    """q|k|v as a list: no stacked float weight is saved. Block-aligned: bit for bit one stacked weight.
    Otherwise one GEMM per weight (no block mixes two weights): the output equals separate calls bit for
    bit, and each weight's gradient stays accurate even when the output segments' gradients differ by
    1000x (as k's and v's do; a block straddling both would bury the small one: measured 13 dB)."""
    cfg = Int8TrainingConfig(precision="int8", **GEOMETRIES[geometry])
    g = torch.Generator().manual_seed(12)
    ws = [(torch.randn(r, D, generator=g) / D**0.5).requires_grad_() for r in rows]
    spec = NormSpec("rmsnorm", None, None, 1e-6)
    x = sample(SHAPE, "heavy_tailed", 13)
    dy = sample((*SHAPE[:2], sum(rows)), "gaussian", 14)
    dy[..., rows[0]:rows[0] + rows[1]] /= 1000.0
    torch.manual_seed(0)
    saved = _saved(lambda: norm_linear(x, spec, ws, None, cfg).backward(dy), ws)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= D * min(rows)]
    y_list = norm_linear(x, spec, ws, None, cfg)
    assert P.stackable(ws, cfg) == aligned
    if aligned:
        torch.manual_seed(0)
        stacked = torch.cat(ws).detach().requires_grad_()
        y_one = norm_linear(x, spec, stacked, None, cfg)
        y_one.backward(dy)
        torch.testing.assert_close(y_list, y_one, rtol=0, atol=0)
        for w, g_ref in zip(ws, stacked.grad.split(list(rows))):
            torch.testing.assert_close(w.grad, g_ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(y_list, torch.cat([norm_linear(x, spec, w, None, cfg) for w in ws], -1), rtol=0,
                                   atol=0)
        x64 = x.double()
        n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
        for w, dy_w in zip(ws, dy.double().split(list(rows), dim=-1)):
            assert sqnr_db(dy_w.reshape(-1, dy_w.shape[-1]).t() @ n.reshape(-1, D), w.grad) >= FLOORS["w"]
    with pytest.raises(ValueError, match="each weight"):
        norm_linear(x, spec, [ws[0], torch.randn(4, D + 1)], None, cfg)


def _poison(t, index, value):
    with torch.no_grad():
        t.view(-1)[index] = value
    return t


# (case, how the fault is injected, expected message): one Inf/NaN in a named tensor of each op
_NAMED_FAULTS = {
    "mlp fc1 weight": ("layernorm", "w_in", float("inf"), rf"^mlp_residual: fc1 weight holds 0 NaN and 1 Inf values of {FF * D}"),
    "mlp gate weight": ("rmsnorm", "w_gate", float("nan"), rf"^mlp_residual: gate weight holds 1 NaN and 0 Inf values of {FF * D}"),
    "mlp fc2 weight": ("layernorm", "w_out", -float("inf"), rf"^mlp_residual: fc2 weight holds 0 NaN and 1 Inf values of {D * FF}"),
    "mlp input": ("rmsnorm", "x", float("inf"), rf"^mlp_residual: input holds 0 NaN and 1 Inf values of {66 * D}"),
    "mlp output gradient": ("layernorm", "dy", float("nan"), rf"^mlp_residual: output gradient holds 1 NaN and 0 Inf values of {66 * D}"),
}


@pytest.mark.parametrize("case", sorted(_NAMED_FAULTS))
def test_nonfinite_error_names_the_op_and_the_tensor(case):
    """Under nonfinite='raise' the refusal says which op and which of its tensors, and the op-level fix."""
    kind, target, value, message = _NAMED_FAULTS[case]
    cfg = Int8TrainingConfig(precision="int8")
    p = _params(kind)
    x = sample(SHAPE, "gaussian", 3).requires_grad_()
    dy = sample(SHAPE, "gaussian", 4)
    if target == "x":
        _poison(x, 7, value)
    elif target == "dy":
        _poison(dy, 7, value)
    else:
        _poison(p[target], 7, value)
    with pytest.raises(NonFiniteError, match=message) as err:
        _mlp_int8(kind, x, p, cfg).backward(dy)
    assert "nonfinite='propagate'" in str(err.value) and "check_finite" not in str(err.value)


def test_nonfinite_error_names_the_stacked_weight_and_norm_linear():
    """q|k|v stacked by rows: the refused weight is named by its position; the input by its role."""
    cfg = Int8TrainingConfig(precision="int8")
    p = _params("rmsnorm")
    ws = [p["w"][:32].detach().clone(), p["w"][32:64].detach().clone(), p["w"][64:].detach().clone()]
    x = sample(SHAPE, "gaussian", 3)
    with pytest.raises(NonFiniteError, match=r"^norm_linear: weight 1 of 3 \(stacked by rows\) holds 0 NaN and 1 Inf"):
        norm_linear(x, _spec("rmsnorm", p), [ws[0], _poison(ws[1], 3, float("inf")), ws[2]], None, cfg)
    with pytest.raises(NonFiniteError, match=rf"^norm_linear: input holds 1 NaN and 0 Inf values of {66 * D}"):
        norm_linear(_poison(x.clone(), 0, float("nan")), _spec("rmsnorm", p), ws, None, cfg)
    with pytest.raises(NonFiniteError, match=r"^int8_linear: weight holds 0 NaN and 1 Inf"):
        linear_residual(x, _poison(torch.randn(D, D), 5, float("inf")), None, x, cfg)
    # propagate: no refusal; the fault (ws[1] still holds the Inf) flows on to the output
    y = norm_linear(x, _spec("rmsnorm", p), ws, None, cfg.with_(nonfinite="propagate"))
    assert not bool(torch.isfinite(y).all())


def _outlier_input(seed, scale, offset):
    """Gaussian x with one input channel `scale` x the rest, plus a common offset: what residual streams of real
    LLMs carry (massive-activation channels, non-zero row means)."""
    x = sample(SHAPE, "gaussian", seed)
    col = int(torch.randint(0, D, (1,), generator=torch.Generator().manual_seed(seed + 100)))
    x[..., col] *= scale
    return x + offset


# The norm reads the high-precision residual stream (statistics from x, INT8 copy of the normalized input), so
# the documented output floors hold for these inputs too: measured (6 rounding seeds) norm_linear output >= 33.9
# dB (was 18.3 with the norm reading an INT8 copy of x), mlp_residual output >= 52.7, the other gradients
# >= 22. The norm-gain gradient sum(dy * xhat) is the one below the 20 dB gate: the 31 channels sharing blocks
# with a 100x channel keep few bits of xhat (>= 18.2 dB measured; documented limit, floor 17).
# These floors were measured in 32x32 blocks, so the test runs in the jetfire geometry. In 1x128 blocks every
# channel shares its token's block with the outlier channel (D = 96 < 128: one block per row), not 31 of them, so
# the 32x32 derivation does not carry over; measured there (this seed): norm_linear output 30.65-30.72 dB at
# 100x-1000x (under 30.8) and the norm-gain gradient 16.9 dB at 1000x (under 17). No 1x128 floor is claimed here.
OUTLIER_FLOORS = {**FLOORS, "norm_w": 17.0}
@pytest.mark.parametrize("precision", ["int8", "int8+fallback"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("scale, offset", [(100.0, 0.0), (100.0, 5.0), (1.0, 20.0), (1000.0, 0.0)])
def test_norm_input_with_outlier_channels_and_offsets_keeps_the_floors(precision, kind, scale, offset):
    torch.manual_seed(0)  # the stochastic-rounding seeds
    cfg = Int8TrainingConfig(precision=precision, **GEOMETRIES["jetfire"])  # the floors' geometry (see above)
    x = _outlier_input(1, scale, offset)
    p = {k: v for k, v in _params(kind).items() if k in ("norm_w", "norm_b", "w", "b")}
    sq = _compare(lambda l: (norm_linear(l["x"], _spec(kind, l), l["w"], l.get("b"), cfg), l),
                  lambda l: F.linear(_norm_ref(kind, l["x"], l), l["w"], l.get("b")), x, p)
    assert sq["out"] >= 30.8, sq  # the documented norm_linear output floor (docs/models.md)
    assert all(v >= OUTLIER_FLOORS[k] for k, v in sq.items()), sq
    p = {k: v for k, v in _params(kind).items() if k not in ("w", "b")}
    sq = _compare(lambda l: (_mlp_int8(kind, l["x"], l, cfg), l), lambda l: _mlp_ref(kind, l["x"], l), x, p)
    assert sq["out"] >= 33.9, sq  # the documented mlp_residual output floor
    assert all(v >= OUTLIER_FLOORS[k] for k, v in sq.items()), sq


@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
def test_norm_reads_the_high_precision_input(geometry):
    """An INT8 copy of x before the norm loses a 100x channel's neighbours (20.8 dB in issue 15); the op must be
    as accurate as a float norm followed by the same INT8 GEMM (same blocks). The 3 dB bound is geometry-free:
    the op rounds twice (normalized input, norm output), each in blocks holding the outlier channel, whose step
    (its value / 127, about sqrt(D) / 127 before the gain, the same times the gain ~1 after) sets the noise of
    both, so the noise power at most doubles (measured: 2.8 dB jetfire, 2.9 dB 1x128 on this input)."""
    from int8flow.reference import block_gemm

    cfg = Int8TrainingConfig(precision="int8", **GEOMETRIES[geometry])
    p = {k: v.detach() for k, v in _params("layernorm").items()}
    x = _outlier_input(2, 100.0, 5.0)
    ref = F.linear(F.layer_norm(x.double(), (D,), p["norm_w"].double(), p["norm_b"].double(), 1e-5),
                   p["w"].double(), p["b"].double())
    float_norm = F.layer_norm(x, (D,), p["norm_w"], p["norm_b"], 1e-5).reshape(-1, D)
    float_norm_int8_gemm = block_gemm(quantize(float_norm, cfg.activation_block),
                                      quantize(p["w"], cfg.weight_block)) + p["b"]
    y = norm_linear(x, _spec("layernorm", p), p["w"], p["b"], cfg)
    # two roundings (normalized input, norm output) instead of one: at most double the noise power (3 dB)
    assert sqnr_db(ref, y) >= sqnr_db(ref.reshape(-1, N), float_norm_int8_gemm) - 3.0
