"""Int8Linear as a drop-in nn.Linear, and the in-place converters."""
import copy

import pytest
import torch
from torch import nn

from int8flow.config import GEOMETRIES, Int8TrainingConfig
from int8flow.nn import Int8Linear, convert_to_int8_training, convert_to_linear

from _inputs import sample, sqnr_db


class HFLikeAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))


class HFLikeModel(nn.Module):
    """A module tree with Hugging Face names (model.layers.N.self_attn.q_proj, mlp.gate_proj, lm_head)."""

    def __init__(self, vocab=50, d=64, layers=2, tie=True):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = HFLikeAttention(d)
            layer.mlp = nn.Module()
            layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(d, 96, bias=False), nn.Linear(d, 96, bias=False)
            layer.mlp.down_proj = nn.Linear(96, d, bias=False)
            layer.router = nn.Linear(d, 4)  # too small to gain: skipped by the default filter
            self.model.layers.append(layer)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight


def test_matches_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(77, 50)
    q = Int8Linear.from_linear(copy.deepcopy(ref))
    x = sample((3, 10, 77), "heavy_tailed", seed=4)
    x_ref, x_q = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_q = ref(x_ref), q(x_q)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_q.backward(dy)
    # floors: see tests/test_ops_linear.py (measured >= 29.6 dB output, >= 22.5 dB gradients)
    assert sqnr_db(y_ref.detach(), y_q.detach()) >= 27
    for a, b in ((x_ref.grad, x_q.grad), (ref.weight.grad, q.weight.grad)):
        assert sqnr_db(a, b) >= 20
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)
    assert list(dict(q.named_parameters())) == ["weight", "bias"]
    assert q.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("geometry", ["jetfire", "1x128"])
def test_constructor_and_fallback_rate_buffer(geometry):
    """Which outliers fall back depends on the block geometry: in 32x32 blocks an outlier channel makes its
    column of blocks stand out (the median block has none); in 1x128 blocks every token's row block holds the
    channel (K = 64 < 128), so nothing stands out from the median - an outlier token's row block does."""
    layer = Int8Linear(64, 32, bias=False, config=Int8TrainingConfig(precision="int8+fallback", **GEOMETRIES[geometry]))
    assert layer.bias is None and "fallback_rate" not in layer.state_dict()
    x = torch.randn(64, 64)
    if geometry == "jetfire":
        x[:, 3] *= 300.0  # one outlier channel: its column of blocks falls back
    else:
        x[3, :] *= 300.0  # one outlier token: its row block falls back
    layer(x)
    assert 0 < float(layer.fallback_rate) <= layer.config.fallback_budget
    with pytest.raises(ValueError, match="bf16"):
        Int8Linear(8, 8, config="bf16")


def test_convert_hf_like_tree_and_back():
    torch.manual_seed(0)
    model = HFLikeModel()
    names_before = [n for n, _ in model.named_parameters()]
    params_before = [p for p in model.parameters()]
    convert_to_int8_training(model, Int8TrainingConfig(precision="int8-linear"))
    layer = model.model.layers[0]
    for m in (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(m, Int8Linear)
    assert type(model.lm_head) is nn.Linear and type(layer.router) is nn.Linear
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(a is b for a, b in zip(model.parameters(), params_before))  # optimizer state stays valid
    convert_to_linear(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == names_before


def test_default_filter_skips_untied_lm_head_and_custom_filter():
    model = HFLikeModel(tie=False)
    convert_to_int8_training(model)
    assert type(model.lm_head) is nn.Linear
    model = HFLikeModel(tie=False)
    convert_to_int8_training(model, module_filter_fn=lambda m, fqn: fqn.endswith("down_proj"))
    converted = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert converted == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_converted_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    convert_to_int8_training(model)
    assert all(isinstance(model[i], Int8Linear) for i in (0, 2))
    x = torch.randn(256, 32)
    target = torch.sin(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("precision", ["int8-linear", "int8+fallback"])
def test_meta_device_input_runs_on_the_fake_implementation(precision):
    """Shape-only tensors (FSDP2 deferred init, shape inference): forward and backward give meta results of the
    right shapes instead of an autocast 'unknown device type' error."""
    layer = Int8Linear(64, 33, config=precision, device="meta")
    x = torch.empty(2, 5, 64, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, 33) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == (33, 64) and layer.bias.grad.shape == (33,)
    assert Int8Linear(64, 32)(torch.randn(8, 64, device="meta")).shape == (8, 32)


def test_a_layer_registered_twice_becomes_one_int8_layer():
    """Issue 15 item 8: Sequential(shared, ReLU(), shared) -> the same Int8Linear at both places (it was
    [Int8Linear, ReLU, Linear]: the second use silently ran in float)."""
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    convert_to_int8_training(model)
    assert isinstance(model[0], Int8Linear) and model[0] is model[2]
    assert model[0].weight is shared.weight
    nested = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(nn.ReLU(), shared)})
    convert_to_int8_training(nested)
    assert isinstance(nested["a"][0], Int8Linear) and nested["a"][0] is nested["b"][1]
    convert_to_linear(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2]


def test_conversion_keeps_hooks_and_the_train_eval_flag():
    """Item 9: forward-pre, forward and full backward hooks fire on the converted layer (their handles still
    remove them); a model converted in eval() has eval layers; both hold for convert_to_linear too."""
    layer = nn.Linear(64, 64)
    calls = []
    pre = layer.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    layer.register_forward_hook(lambda m, args, out: calls.append("forward"))
    layer.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    layer.custom_flag = "kept"
    model = nn.Sequential(layer, nn.GELU()).eval()
    convert_to_int8_training(model)
    converted = model[0]
    assert isinstance(converted, Int8Linear) and converted.training is False and converted.custom_flag == "kept"
    x = torch.randn(4, 64, requires_grad=True)
    model(x).sum().backward()
    assert calls == ["pre", "forward", "backward"]
    pre.remove()
    calls.clear()
    model(x).sum().backward()
    assert calls == ["forward", "backward"]
    model.train()
    convert_to_linear(model)
    assert type(model[0]) is nn.Linear and model[0].training is True and "fallback_rate" not in model[0]._buffers
    calls.clear()
    model(x).sum().backward()
    assert calls == ["forward", "backward"]
