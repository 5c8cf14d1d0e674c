"""int8flow.guards: non-finite detection, naming the layer and tensor, and the high-precision recompute."""
import math

import pytest
import torch

from int8flow.format import NonFiniteError
from int8flow.guards import (NonFiniteTracker, check_finite, count_nonfinite, grads_are_finite, high_precision,
                             locate_nonfinite, nonfinite_grads, nonfinite_params, recompute_high_precision)
from int8flow.models import build_model

SMALL = dict(n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=64)


def _model(precision, seed=0):
    torch.manual_seed(seed)
    return build_model("gpt-tiny", precision, **SMALL)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 32), generator=g), torch.randint(0, 64, (2, 32), generator=g)


def _closure(model, x, y):
    def run():
        _, loss = model(x, y)
        loss.backward()
        return loss
    return run


def test_count_and_check_finite_messages():
    t = torch.ones(4, 8)
    t[0, :3] = float("nan")
    t[1, 0] = -float("inf")
    assert count_nonfinite(t) == (3, 1)
    assert count_nonfinite(torch.ones(3, dtype=torch.int64)) == (0, 0)
    assert check_finite(torch.ones(3), "layer a", "output")
    events = []
    assert not check_finite(t, "layer transformer.h.3.mlp.c_fc", "input gradient", "skip", events)
    assert str(events[0]) == "layer transformer.h.3.mlp.c_fc: input gradient holds 3 NaN and 1 Inf of 32 values"
    with pytest.raises(NonFiniteError, match=r"^layer transformer\.h\.3\.mlp\.c_fc: input gradient holds 3 NaN "
                                             r"and 1 Inf of 32 values; .*'skip' or 'bf16'"):
        check_finite(t, "layer transformer.h.3.mlp.c_fc", "input gradient", "raise")
    with pytest.raises(ValueError, match=r"policy must be one of \('raise', 'skip', 'bf16'\), got 'ignore'"):
        check_finite(t, "x", "y", "ignore")
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        count_nonfinite([1.0])


def _poison(model):
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = float("inf")


def test_tracker_names_the_layer_whose_weight_is_poisoned():
    """bf16: an Inf weight makes its layer's output non-finite; the first event is that layer."""
    model = _model("bf16")
    _poison(model)
    x, y = _batch()
    with NonFiniteTracker(model) as tr:
        _, loss = model(x, y)
    assert tr.first is not None and (tr.first.where, tr.first.what) == ("layer transformer.h.1.mlp.c_fc", "output")
    assert not math.isfinite(float(loss))
    w = model.transformer.h[1].mlp.c_fc.weight
    assert [str(e) for e in nonfinite_params(model)] == [
        f"parameter transformer.h.1.mlp.c_fc.weight: value holds 1 Inf of {w.numel()} values"]
    with pytest.raises(NonFiniteError, match=r"^layer transformer\.h\.1\.mlp\.c_fc: output holds 0 NaN|"
                                             r"^layer transformer\.h\.1\.mlp\.c_fc: output holds \d+ (NaN|Inf)"):
        tr.raise_if_any()
    x, y = _batch()
    # hooks are removed on exit: a clean model afterwards records nothing
    clean = _model("bf16")
    with NonFiniteTracker(clean) as tr2:
        clean(x, y)[1].backward()
    assert tr2.events == [] and grads_are_finite(clean) and nonfinite_grads(clean) == nonfinite_params(clean) == []


@pytest.mark.parametrize("precision,where", [("int8-linear", "layer transformer.h.1.mlp.c_fc"),
                                             ("int8", "layer transformer.h.1")])
def test_tracker_names_the_layer_when_int8_quantization_refuses(precision, where):
    """INT8 layers refuse NaN/Inf (nonfinite="raise"); their error names the op and tensor, not the layer.
    Under the tracker it is re-raised prefixed with the running layer (in the data flow the block runs fused
    ops, so the block is the finest module the hooks see)."""
    model = _model(precision)
    _poison(model)
    x, y = _batch()
    refused = "int8_linear: weight" if precision == "int8-linear" else "mlp_residual: fc1 weight"
    with pytest.raises(NonFiniteError, match=rf"^{where.replace('.', '[.]')} \(forward pass\): {refused} holds 0 NaN and 1 Inf"):
        with NonFiniteTracker(model):
            model(x, y)
    events = locate_nonfinite(model, _closure(model, x, y))
    assert events[-1].where == where and events[-1].what == "forward pass"


class _NaNGrad(torch.autograd.Function):
    """Identity forward; backward returns NaN: a fault that only the backward pass shows."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


@pytest.mark.parametrize("precision", ["bf16", "int8-linear"])
def test_tracker_names_the_first_backward_fault_and_parameters(precision):
    """NaN appears only in backward, at c_fc's output. bf16: the gradient hooks see it reach c_fc's input
    (and the same tensor as ln_2's output gradient); int8-linear: c_fc's backward refuses to quantize it and
    the re-raised error names c_fc. Layers after the fault (h.1, run earlier in backward) stay clean."""
    model = _model(precision)
    fc = model.transformer.h[0].mlp.c_fc
    fc.register_forward_hook(lambda m, a, out: _NaNGrad.apply(out))
    x, y = _batch()
    events = locate_nonfinite(model, _closure(model, x, y))
    assert events and not any("transformer.h.1" in e.where for e in events), [str(e) for e in events]
    if precision == "bf16":
        assert all("gradient" in e.what for e in events), "the forward pass is clean"
        assert ("layer transformer.h.0.mlp.c_fc", "input gradient") in [(e.where, e.what) for e in events]
        assert not grads_are_finite(model)
        bad = {e.where for e in nonfinite_grads(model)}
        assert "parameter transformer.h.0.mlp.c_fc.weight" in bad
        assert "parameter transformer.h.1.mlp.c_fc.weight" not in bad
    else:
        assert (events[0].where, events[0].what) == ("layer transformer.h.0.mlp.c_fc", "backward pass")
        assert "NaN" in events[0].note


@pytest.mark.parametrize("precision", ["int8-linear", "int8"])
def test_high_precision_matches_the_bf16_model_and_restores(precision):
    """Inside high_precision the INT8 model computes exactly what the same weights do in the bf16 model
    (CPU: float32 both), with the same parameters; on exit it is INT8 again."""
    x, y = _batch()
    model, ref = _model(precision), _model("bf16")
    ref.load_state_dict(model.state_dict())
    loss_q = float(model(x, y)[1])
    loss_hp = recompute_high_precision(model, _closure(model, x, y))
    ref_loss = ref(x, y)[1]
    ref_loss.backward()
    torch.testing.assert_close(loss_hp.detach(), ref_loss.detach(), rtol=0, atol=0)
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7, msg=n)
    assert float(model(x, y)[1]) == loss_q, "restored: INT8 math again, bit for bit"
    assert loss_q != float(ref_loss)


def test_bf16_policy_rescues_an_int8_only_fault():
    """A fault injected only on the INT8 path (the Int8Linear forward): the step recomputed in high
    precision is finite, so the bf16 policy can take it; skip/raise would lose it."""
    model = _model("int8-linear")
    fc = model.transformer.h[1].mlp.c_fc
    fc.forward = lambda inp: type(fc).forward(fc, inp) * float("inf")
    x, y = _batch()
    events = locate_nonfinite(model, _closure(model, x, y))
    assert events and (events[0].where, events[0].what) == ("layer transformer.h.1.mlp.c_fc", "output")
    loss = recompute_high_precision(model, _closure(model, x, y))
    assert math.isfinite(float(loss)) and grads_are_finite(model)
    assert "forward" in fc.__dict__, "high_precision restores instance overrides it replaced"
    assert locate_nonfinite(model, _closure(model, x, y)), "the INT8 path is faulty again after the context"


def test_tracker_rejects_non_modules():
    with pytest.raises(TypeError, match="needs an nn.Module"):
        NonFiniteTracker(lambda x: x)
