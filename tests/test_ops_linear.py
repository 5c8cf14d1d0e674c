"""Int8 linear op (reference path): forward and both gradients vs float64 autograd, config, seeds."""
import pytest
import torch

from int8flow.config import GEOMETRIES, Int8TrainingConfig
from int8flow.format import NonFiniteError
from int8flow.ops import Int8LinearFunction, int8_linear

from _inputs import DISTRIBUTIONS, sample, sqnr_db

# Measured over these inputs and many rounding seeds (dy Student-t(3)): output >= 29.6 dB; gradients
# >= 22.5 dB (stochastic rounding against 50x outlier columns of x; 26-40 dB otherwise). The output
# floor sits ~3 dB under the worst case; the gradient floor is the peers' 20 dB gate (also what
# non-square blocks need: their wgrad re-quantizes the saved INT8 x, measured >= 22.8 dB).
OUT_FLOOR_DB = 27.0
GRAD_FLOOR_DB = 20.0


def _run(cfg, shape, n_out, dist, bias=True):
    x = sample(shape, dist, seed=1).requires_grad_()
    w = (sample((n_out, shape[-1]), "gaussian", seed=2) / shape[-1] ** 0.5).requires_grad_()
    b = torch.randn(n_out).requires_grad_() if bias else None
    y = int8_linear(x, w, b, cfg)
    dy = sample(y.shape, "heavy_tailed", seed=3)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y_ref = torch.nn.functional.linear(*ref)
    y_ref.backward(dy.double())
    return (y, x.grad, w.grad, b.grad if bias else None), (y_ref, ref[0].grad, ref[1].grad, ref[2].grad if bias else None)


@pytest.mark.parametrize("shape,n_out", [((1, 33), 100), ((2, 50, 77), 64), ((3, 5, 7, 32), 40)])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("block", ["32x32", "1x32", "16x64"])
def test_linear_matches_float64(shape, n_out, dist, block):
    cfg = Int8TrainingConfig(precision="int8-linear", activation_block=block, weight_block=block, grad_block=block)
    (y, dx, dw, db), (y_ref, dx_ref, dw_ref, db_ref) = _run(cfg, shape, n_out, dist)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert sqnr_db(y_ref, y.detach()) >= OUT_FLOOR_DB
    assert sqnr_db(dx_ref, dx) >= GRAD_FLOOR_DB
    assert sqnr_db(dw_ref, dw) >= GRAD_FLOOR_DB
    torch.testing.assert_close(db, db_ref.float(), rtol=1e-5, atol=1e-5)  # bias grad is not quantized


@pytest.mark.parametrize("toggle", ["quantize_fprop", "quantize_dgrad", "quantize_wgrad"])
def test_unquantized_gemm_is_exact(toggle):
    """Turning one GEMM off makes exactly that result float32-exact (and leaves the others quantized)."""
    cfg = Int8TrainingConfig(precision="int8-linear", **{toggle: False})
    outs, refs = _run(cfg, (2, 40, 64), 48, "gaussian", bias=False)
    exact = {"quantize_fprop": 0, "quantize_dgrad": 1, "quantize_wgrad": 2}[toggle]
    for i in range(3):
        s = sqnr_db(refs[i], outs[i].detach())
        assert (s > 100) if i == exact else (25 < s < 60), (i, s)


def test_same_seed_same_gradients_and_different_seed_differs():
    cfg = Int8TrainingConfig(precision="int8-linear")

    def grads(seed):
        torch.manual_seed(seed)
        return _run(cfg, (64, 64), 64, "gaussian")[0][1]

    torch.testing.assert_close(grads(0), grads(0), rtol=0, atol=0)
    assert not torch.equal(grads(0), grads(1))


@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
def test_saves_int8_input_not_float(geometry):
    """One INT8 copy of x is saved, nothing of x's size in float: x_q (M, K) for square blocks (wgrad reads its
    transpose as a view); for 1x128 blocks x's transposed copy (K, M), the only form wgrad reads."""
    cfg = Int8TrainingConfig(precision="int8-linear", **GEOMETRIES[geometry])
    x = torch.randn(64, 96, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(32, 96))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        int8_linear(x, w, None, cfg)
    acts = [(tuple(t.shape), t.dtype) for t in saved if t is not w and t.numel() == x.numel()]
    expected_shape = tuple(x.shape) if geometry == "jetfire" else tuple(x.shape)[::-1]
    assert acts == [(expected_shape, torch.int8)], acts


@pytest.mark.parametrize("precision", ["int8-linear", "int8+fallback"])
def test_save_input_keeps_a_reference_and_gives_the_same_gradients(precision):
    """save_input: x itself (its storage, no copy) instead of an INT8 copy; backward re-quantizes it to the
    same INT8 numbers (and fallback term), so gradients are bit-identical."""
    cfg = Int8TrainingConfig(precision=precision)
    base = torch.randn(2, 33, 96)
    base[0, 5, :] = 300.0  # an outlier row: fallback flags its blocks
    w = torch.nn.Parameter(torch.randn(40, 96) / 10)
    grads = []
    for save_input in (False, True):
        x = base.clone().requires_grad_()
        saved = []
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = int8_linear(x, w, None, cfg, save_input=save_input)
        y.backward(torch.ones_like(y))
        grads.append((x.grad, w.grad.clone()))
        w.grad = None
        acts = [t for t in saved if t is not w and t.numel() >= x.numel()]
        assert len(acts) == 1 and acts[0].dtype == (x.dtype if save_input else torch.int8), acts
        assert (acts[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()) == save_input
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_function_apply_and_errors():
    cfg = Int8TrainingConfig(precision="int8-linear")
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    torch.testing.assert_close(Int8LinearFunction.apply(x, w, None, cfg), int8_linear(x, w, None, cfg))
    with pytest.raises(ValueError, match="in_features"):
        int8_linear(torch.randn(4, 31), w, None, cfg)
    with pytest.raises(ValueError, match="bias"):
        int8_linear(x, w, torch.randn(7), cfg)
    with pytest.raises(NonFiniteError, match=r"^int8_linear: input holds 128 NaN and 0 Inf values of 128"):
        int8_linear(torch.full((4, 32), float("nan")), w, None, cfg)
    x.requires_grad_()
    with pytest.raises(NonFiniteError, match=r"^int8_linear: output gradient holds 0 NaN and 1 Inf values of 32"):
        int8_linear(x, w, None, cfg).backward(torch.zeros(4, 8).index_put_((torch.tensor(1), torch.tensor(2)),
                                                                           torch.tensor(float("inf"))))


def test_config_validation_and_recipes():
    assert Int8TrainingConfig.from_recipe_name("jetfire").precision == "int8"
    assert str(Int8TrainingConfig(activation_block=(1, 128)).activation_block) == "1x128"
    assert Int8TrainingConfig.from_recipe_name("int8+fallback").uses_fallback
    for bad, match in [(dict(precision="fp8"), "precision"), (dict(grad_rounding="up"), "grad_rounding"),
                       (dict(quantize_wgrad=False), "int8-linear"), (dict(fallback_threshold=0.5), "fallback_threshold"),
                       (dict(fallback_budget=2.0), "fallback_budget"), (dict(nonfinite="skip"), "nonfinite"),
                       (dict(activation_block="32"), "ROWSxCOLS")]:
        with pytest.raises(ValueError, match=match):
            Int8TrainingConfig(**bad)
    with pytest.raises(ValueError, match="known recipes"):
        Int8TrainingConfig.from_recipe_name("int4")
    cfg = Int8TrainingConfig()
    with pytest.raises(Exception):
        cfg.precision = "bf16"  # frozen


@pytest.mark.parametrize("act_block,weight_block", [("32x32", "32x32"), ("32x32", "128x128"), ("1x128", "128x128")])
def test_backward_keeps_int8_input_and_no_int8_weight(act_block, weight_block):
    """Saved for backward: the INT8 input (M*K bytes + scales) and the weight parameter itself, never an INT8
    copy of the weight (backward re-quantizes w.T straight into the K-major layout: bit-equal for square blocks).
    The INT8 input is x_q (M, K) for square activation blocks, x's transposed copy (K, M) for 1x128 ones."""
    M, K, N = 256, 192, 320
    cfg = Int8TrainingConfig(precision="int8-linear", activation_block=act_block, weight_block=weight_block,
                             grad_block=act_block)
    x = sample((M, K), "outlier_channels", seed=4).requires_grad_()
    w = (torch.randn(N, K) / K**0.5).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = int8_linear(x, w, None, cfg)
    int8 = [t for t in saved if t.dtype == torch.int8 and t.numel() > 0]
    assert [tuple(t.shape) for t in int8] == [(M, K) if cfg.activation_block.is_square else (K, M)]  # x only
    assert any(t is w for t in saved) and not any(t is x for t in saved)
    y.backward(torch.randn(M, N))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    # what backward quantizes (w.T) is the forward's INT8 weight transposed, bit for bit (square blocks)
    from int8flow.format import quantize

    w_q = quantize(w.detach(), weight_block)
    w_t_q = quantize(w.detach().t(), weight_block)
    assert torch.equal(w_t_q.data, w_q.t().data) and torch.equal(w_t_q.scale, w_q.t().scale)


def test_transposed_operand_on_the_kernel_path_equals_the_reference(monkeypatch):
    """A 1x128 operand's transposed copy for wgrad: the kernel path (one-pass quantize_transposed of the kernel's
    dequantized values, here through the Triton interpreter) gives the reference's numbers bit for bit."""
    pytest.importorskip("triton")
    from int8flow.format import quantize
    from int8flow.ops import backend, primitives as P

    if torch.cuda.is_available():
        pytest.skip("the interpreter route is for CPU machines; the GPU tier covers the compiled kernels")
    cfg = Int8TrainingConfig(precision="int8", activation_block="1x128", grad_block="1x128", weight_block="128x128")
    x = sample((200, 300), "outlier_channels", seed=9)
    q = quantize(x, "1x128")
    want = P.transposed(q, None, "nearest", 0, cfg, "x")  # reference path on CPU
    monkeypatch.setattr(backend, "uses_kernel", lambda name, device: name in ("quantize_transposed", "dequantize"))
    got = P.transposed(q, None, "nearest", 0, cfg, "x")
    assert got.data.is_contiguous() and tuple(got.shape) == (300, 200)
    assert torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)
    w = torch.randn(256, 130)  # the weight's K-major transposed copy for dgrad, from the parameter
    assert torch.equal(P.quantize_transposed(w, cfg.weight_block, "nearest", 0, cfg, "w").data,
                       quantize(w, "128x128").t().data)
