"""Per-layer fallback rates: `metrics.fallback_rates` finds the layers whose fallback is on and reads their
``fallback_rate`` buffers in one go; the training loop logs them at its evaluation steps only (the step itself
keeps its one read, `loop._read_step`) and names mean / max in its final summary; ``bench train`` records them.

Outliers are made as in tests/test_models_gpt_llama.py: one row of each MLP's first weight scaled x40 turns one
channel of the second linear's input into an outlier channel, whose blocks the fallback flags.
"""
import json
import math

import pytest
import torch
from torch import nn

from _training_fixtures import prepared_tokens, tiny_int8_config
from int8flow.models import build_model
from int8flow.nn import Int8Linear, convert_to_int8_training
from int8flow.training import read_log, train
from int8flow.training.metrics import fallback_rate_buffers, fallback_rates, fallback_summary

FALLBACK = ("int8+fallback", "jetfire+fallback")
# 384 = 3 activation blocks of 1x128 per row: the outlier channel's blocks stand out against the median block
LLAMA = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_tokens(tmp_path_factory, docs=2, chars=30_000, vocab_size=320)


def build_with_outliers(name, precision="bf16", **kwargs):
    """build_model with an outlier channel in every MLP's second-linear input (gpt: c_fc row 5, llama: up_proj)."""
    model = build_model(name, precision, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            first = getattr(module, "c_fc", None) or getattr(module, "up_proj", None)
            if first is not None:
                first.weight[5] *= 40.0
    return model


def _idx(B=2, T=32, vocab=64):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("precision", ["bf16", "int8", "int8-linear", *FALLBACK])
def test_buffers_only_where_fallback_is_on(precision):
    model = build_with_outliers("llama-tiny", precision, **LLAMA)
    buffers = fallback_rate_buffers(model)
    if precision not in FALLBACK:  # every model registers the buffer; only fallback modes write it
        assert buffers == {} and fallback_rates(model) == {} and fallback_summary({}) == {}
        return
    assert list(buffers) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    model(_idx())
    rates = fallback_rates(model)
    assert rates == {name: float(buf) for name, buf in buffers.items()}
    assert all(0 < r <= model.int8_config.fallback_budget for r in rates.values()), rates
    summary = fallback_summary(rates)
    assert summary["fallback_rate"] == rates and summary["fallback_rate_max"] == max(rates.values())
    assert summary["fallback_rate_mean"] == pytest.approx(sum(rates.values()) / 2)


def test_int8_linear_layers_with_fallback_are_found_by_name():
    net = nn.Sequential(nn.Linear(384, 64), nn.GELU(), nn.Linear(64, 64))
    convert_to_int8_training(net, "int8+fallback")
    assert isinstance(net[2], Int8Linear) and list(fallback_rate_buffers(net)) == ["0", "2"]
    x = torch.randn(32, 384)
    x[:, 3] *= 60.0  # an outlier channel in the first layer's input
    net(x)
    rates = fallback_rates(net)
    assert rates["0"] > 0 and all(0 <= r <= 1 for r in rates.values()), rates
    assert fallback_rate_buffers(convert_to_int8_training(nn.Sequential(nn.Linear(64, 64)), "int8")) == {}


@pytest.mark.parametrize("precision", FALLBACK)
def test_loop_logs_rates_at_eval_steps_only(data_dir, tmp_path, monkeypatch, capsys, precision):
    """Rates in [0, 1], not all zero, at steps 2 and 4 only (eval_interval=2); read once per eval step and
    before evaluate() (whose forwards overwrite the buffers); one `_read_step` per step, as without fallback."""
    import int8flow.training.loop as loop

    marks, reads, rate_reads = [], [], []
    real_read, real_rates, real_eval = loop._read_step, loop.fallback_rates, loop.evaluate

    def evaluate(model, *a, **kw):  # poison the buffers after evaluation: a read after it would log 2.0
        val = real_eval(model, *a, **kw)
        for buf in fallback_rate_buffers(model).values():
            buf.fill_(2.0)
        return val

    monkeypatch.setattr(loop, "kill_point", lambda name: marks.append(name))
    monkeypatch.setattr(loop, "_read_step", lambda *a: (reads.append(len(marks)), real_read(*a))[1])
    monkeypatch.setattr(loop, "fallback_rates", lambda *a: (rate_reads.append(len(marks)), real_rates(*a))[1])
    monkeypatch.setattr(loop, "evaluate", evaluate)
    cfg = tiny_int8_config(data_dir, tmp_path / "run", precision=precision, max_steps=4, eval_interval=2,
                           ckpt_interval=0)
    train(cfg, build_with_outliers)
    assert reads == [0, 1, 2, 3]  # one read per step, before its kill point
    assert rate_reads == [2, 4]   # after the kill points of steps 2 and 4: their records, not per step
    records = {r["step"]: r for r in read_log(cfg.run_dir)}
    assert [s for s, r in records.items() if "fallback_rate" in r] == [2, 4]
    for step in (2, 4):
        r = records[step]
        rates = r["fallback_rate"]
        assert list(rates) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
        assert all(0 <= x <= 1 for x in rates.values()) and max(rates.values()) > 0, rates
        assert r["fallback_rate_max"] == max(rates.values())
        assert r["fallback_rate_mean"] == pytest.approx(sum(rates.values()) / len(rates))
    out = capsys.readouterr().out
    last = records[4]["fallback_rate"]
    worst = max(last, key=last.get)
    assert (f"fallback rate at step 4 (activation blocks with the 16-bit term, 2 layers): mean "
            f"{sum(last.values()) / 2:.2%}, max {last[worst]:.2%} ({worst})") in out


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_no_rates_without_fallback(data_dir, tmp_path, monkeypatch, capsys, precision):
    import int8flow.training.loop as loop

    calls = []
    monkeypatch.setattr(loop, "fallback_rates", lambda *a: calls.append(a))
    cfg = tiny_int8_config(data_dir, tmp_path / "run", precision=precision, max_steps=2, eval_interval=1,
                           ckpt_interval=0)
    train(cfg, build_with_outliers)
    assert calls == []
    assert not any(key.startswith("fallback_rate") for r in read_log(cfg.run_dir) for key in r)
    assert "fallback rate" not in capsys.readouterr().out


def test_bench_train_records_the_last_steps_rates(tmp_path):
    from int8flow.bench.__main__ import main

    out = tmp_path / "train.json"
    assert main(["train", "--cpu-smoke", "--no-compile", "--modes", "int8+fallback,int8", "--steps", "2",
                 "--warmup", "1", "--set", "batch_size=2", "--set", "model.n_layer=2", "--out", str(out)]) == 0
    fb, plain = json.loads(out.read_text())["records"]
    assert fb["mode"] == "int8+fallback" and 0 <= fb["fallback_rate_mean"] <= fb["fallback_rate_max"] <= 1
    assert math.isfinite(fb["fallback_rate_mean"])
    assert plain["fallback_rate_mean"] is None and plain["fallback_rate_max"] is None
