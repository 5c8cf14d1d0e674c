"""The trainer's non-finite policies (raise / skip / bf16) on the real INT8 data flow (gpt-tiny, 2 layers, CPU).

Faults are injected into the model the trainer builds: a weight set to Inf at a chosen training forward
(persistent: every later step is bad too), or an Inf in one activation on the INT8 path during one step only
(transient: the high-precision recompute of that step is clean). In both, the next INT8 operator refuses the
tensor (NonFiniteError) in the middle of the forward pass, which the trainer must turn into a bad step.
"""
import math

import pytest
import torch

from _training_fixtures import prepared_tokens, tiny_int8_config
from int8flow.config import Int8TrainingConfig
from int8flow.format import NonFiniteError
from int8flow.models import build_model
from int8flow.training import NonFiniteLossError, load_checkpoint, read_log, train

POISONED = "transformer.h.1.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_tokens(tmp_path_factory, docs=2, chars=40_000, vocab_size=320)


def _config(data_dir, out, **kw):
    return tiny_int8_config(data_dir, out, **{"ckpt_interval": 0, "eval_interval": 100, **kw})


def _inf_weight_at(call):
    """build_fn: at the ``call``-th training forward, c_fc.weight[3, 5] of block 1 becomes Inf and stays."""
    def build(name, precision, **kw):
        model, calls = build_model(name, precision, **kw), [0]

        def poison(module, args):
            calls[0] += module.training
            if calls[0] == call and module.training:
                with torch.no_grad():
                    module.get_parameter(POISONED)[3, 5] = math.inf
        model.register_forward_pre_hook(poison)
        return model
    return build


def _inf_activation_at(call):
    """build_fn: block 0's output gets one Inf at its ``call``-th training forward on the INT8 path only."""
    def build(name, precision, **kw):
        model, calls = build_model(name, precision, **kw), [0]

        def inject(block, args, out):
            if not (block.training and block.int8_flow is not None):
                return None  # eval, or the high-precision recompute: clean
            calls[0] += 1
            if calls[0] != call:
                return None
            bad = torch.zeros_like(out)
            bad[0, 0, 0] = math.inf
            return out + bad
        model.transformer.h[0].register_forward_hook(inject)
        return model
    return build


def test_raise_names_the_layer_and_the_weight(data_dir, tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        train(_config(data_dir, tmp_path / "r", max_steps=3, nonfinite="raise"), _inf_weight_at(2))
    msg = str(err.value)
    assert msg.startswith("step 2: loss nan, grad norm nan (nonfinite)"), msg
    assert f"parameter {POISONED}: value holds 1 Inf" in msg, msg
    # the data flow runs each block as fused ops, so the block is the finest layer the tracker can name;
    # the operator's own message names the op and the refused tensor
    assert ("first non-finite: layer transformer.h.1: forward pass: mlp_residual: fc1 weight holds 0 NaN and 1 Inf "
            "values of 36864") in msg, msg
    assert msg.endswith("nonfinite=raise; lower lr or check the data"), msg


def test_skip_leaves_weights_and_adamw_state_bitwise_unchanged(data_dir, tmp_path):
    bad = train(_config(data_dir, tmp_path / "bad", stop_at=4), _inf_weight_at(3))
    ref = train(_config(data_dir, tmp_path / "ref", stop_at=2), build_model)
    assert [math.isnan(x) for x in bad.losses] == [False, False, True, True]
    assert bad.losses[:2] == ref.losses
    records = [r for r in read_log(tmp_path / "bad") if "loss" in r]
    assert [r.get("skipped") for r in records] == [None, None, "nonfinite", "nonfinite"]
    assert all(f"parameter {POISONED}: value holds 1 Inf" in r["fault"] for r in records[2:])
    a, b = load_checkpoint(tmp_path / "bad"), load_checkpoint(tmp_path / "ref")
    b.model[POISONED][3, 5] = math.inf  # the fault itself; everything else as after the two good steps
    for name, value in b.model.items():
        assert torch.equal(a.model[name], value), name
    opt_a, opt_b = a.trainer["optimizer"]["state"], b.trainer["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_b
    for pid, state in opt_b.items():
        for key, value in state.items():
            assert torch.equal(opt_a[pid][key], value), (pid, key)


def test_bf16_recomputes_a_transient_int8_fault_and_training_goes_on(data_dir, tmp_path, capsys):
    run = tmp_path / "bf16"
    result = train(_config(data_dir, run, max_steps=6, nonfinite="bf16", ckpt_interval=1, keep_checkpoints=6),
                   _inf_activation_at(3))
    assert all(math.isfinite(x) for x in result.losses), result.losses
    records = [r for r in read_log(run) if "loss" in r]
    assert [r.get("fallback") for r in records] == [None, None, "bf16", None, None, None]
    assert not any("skipped" in r for r in records)
    assert "norm_linear: input holds 0 NaN and 1 Inf" in records[2]["fault"], records[2]["fault"]
    assert "step 3 recomputed in high precision (nonfinite=bf16)" in capsys.readouterr().out
    # the recomputed step 3 moved the weights and AdamW state, to finite values
    before, after = (load_checkpoint(run / "checkpoints" / f"step_00000{n}") for n in (2, 3))
    assert all(torch.isfinite(v).all() for v in after.model.values())
    assert any(not torch.equal(before.model[k], v) for k, v in after.model.items())
    assert {float(s["step"]) for s in after.trainer["optimizer"]["state"].values()} == {3.0}


def test_skip_drops_only_the_transient_fault_step(data_dir, tmp_path):
    """The same one-step fault under skip: the step is dropped, its re-run is clean (reported as transient),
    and the following steps train normally."""
    result = train(_config(data_dir, tmp_path / "s", max_steps=5), _inf_activation_at(2))
    assert math.isnan(result.losses[1]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 1)
    fault = read_log(tmp_path / "s")[2]["fault"]
    assert fault.startswith("INT8 quantization refused: norm_linear: input holds") and "not seen again" in fault, fault


@pytest.mark.parametrize("model_name, weight", [("gpt-tiny", "transformer.h.1.mlp.c_fc.weight"),
                                                ("llama-tiny", "model.layers.1.mlp.up_proj.weight")])
@pytest.mark.parametrize("precision", ["int8", "int8+fallback", "int8-linear"])
def test_propagate_turns_an_inf_weight_into_a_nan_loss(model_name, weight, precision):
    """nonfinite='propagate': no exception anywhere; the loss and the poisoned weight's gradient are not finite,
    while the same model under 'raise' refuses the weight."""
    depth = {"n_layer": 2} if model_name == "gpt-tiny" else {"n_layers": 2}
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    for policy in ("propagate", "raise"):
        torch.manual_seed(0)
        model = build_model(model_name, Int8TrainingConfig(precision=precision, nonfinite=policy), **depth)
        with torch.no_grad():
            model.get_parameter(weight)[3, 5] = math.inf
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="holds 0 NaN and 1 Inf"):
                model(idx, idx)[1].backward()
            continue
        _, loss = model(idx, idx)
        loss.backward()
        assert math.isnan(loss.item())
        assert not bool(torch.isfinite(model.get_parameter(weight).grad).all())


def test_data_parallel_run_propagates_faults_to_the_skip_policy(data_dir, tmp_path):
    """parallel=ddp (a process group of one): the model is built with nonfinite='propagate', so the Inf weight
    gives a NaN loss instead of an operator's exception, and skip drops the bad steps exactly as in one process."""
    seen = []

    def build(name, precision, **kw):
        seen.append(precision)
        return _inf_weight_at(3)(name, precision, **kw)

    result = train(_config(data_dir, tmp_path / "ddp", stop_at=4, parallel="ddp"), build)
    assert [p.nonfinite for p in seen] == ["propagate"] and seen[0].precision == "int8"
    assert [math.isnan(x) for x in result.losses] == [False, False, True, True]
    records = [r for r in read_log(tmp_path / "ddp") if "loss" in r]
    assert [r.get("skipped") for r in records] == [None, None, "nonfinite", "nonfinite"]
    assert all(f"parameter {POISONED}: value holds 1 Inf" in r["fault"] for r in records[2:])
    # propagated, not refused: the tracker sees the NaN the weight caused downstream
    assert "first non-finite: layer transformer.h.1" in records[2]["fault"] and "refused" not in records[2]["fault"]
    assert all(torch.isfinite(v).all() or k == POISONED for k, v in load_checkpoint(tmp_path / "ddp").model.items())
