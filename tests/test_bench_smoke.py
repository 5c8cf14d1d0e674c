"""The block, train and accuracy benchmarks run end to end on toy shapes (CPU) and write well-formed records.

Timings from these runs mean nothing; the point is that the GPU runs will not die on a code path.
"""
import json
import math

import pytest

from int8flow.bench.__main__ import main


def _records(path):
    return json.loads(path.read_text())["records"]


def test_blocks_smoke(tmp_path):
    out = tmp_path / "blocks.json"
    assert main(["blocks", "--cpu-smoke", "--no-compile", "--iters", "1", "--modes", "bf16,int8,int8-linear",
                 "--out", str(out)]) == 0
    recs = _records(out)
    assert {(r["shape"], r["mode"]) for r in recs} == {(s, m) for s in ("gpt2-tiny", "llama-tiny")
                                                        for m in ("bf16", "int8", "int8-linear")}
    by = {(r["shape"], r["mode"]): r for r in recs}
    for shape in ("gpt2-tiny", "llama-tiny"):
        # the INT8 data flow keeps INT8 copies for backward: fewer saved bytes than BF16 at the same shape
        assert by[(shape, "int8")]["saved_gib"] < by[(shape, "bf16")]["saved_gib"]
        assert by[(shape, "bf16")]["speedup_vs_bf16"] == 1.0


def test_train_and_accuracy_smoke(tmp_path):
    out = tmp_path / "train.json"
    assert main(["train", "--cpu-smoke", "--no-compile", "--modes", "int8,bf16", "--steps", "3", "--warmup", "1",
                 "--set", "batch_size=2", "--out", str(out)]) == 0
    recs = _records(out)
    assert [r["mode"] for r in recs] == ["int8", "bf16"]
    # BF16 ran last, and the INT8 record still gets its ratio; the --set setting is applied and recorded
    assert recs[0]["speedup_vs_bf16"] == recs[0]["tokens_per_s"] / recs[1]["tokens_per_s"]
    assert all(r["settings"][-1] == "batch_size=2" for r in recs)
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"]) for r in recs)

    acc = tmp_path / "acc.json"
    args = ["accuracy", "--cpu-smoke", "--models", "gpt-tiny", "--modes", "bf16,int8", "--out", str(acc), "--runs", str(tmp_path / "runs")]
    assert main(args) == 0
    recs = _records(acc)
    assert [r["mode"] for r in recs] == ["bf16", "int8"] and recs[0]["rel_gap_vs_bf16"] == 0.0
    assert all(math.isfinite(r["final_val_loss"]) for r in recs)
    assert (tmp_path / "acc_gpt-tiny.png").stat().st_size > 1000
    assert main(args) == 0  # a second call finds the finished records and does not train again
    assert len(_records(acc)) == 2


def test_train_refuses_an_unknown_setting_in_one_line(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["train", "--cpu-smoke", "--set", "batchsize=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batchsize" in err and "batch_size" in err
    assert not out.exists()


@pytest.mark.parametrize("sub", ["blocks", "train", "accuracy"])
def test_gpu_benchmarks_refuse_without_cuda(sub, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main([sub, "--out", "/nonexistent/x.json"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_train_records_the_compile_mode(tmp_path, monkeypatch):
    """--compile-mode reaches model.compile and every record; compilation itself is stubbed (CPU smoke)."""
    import torch

    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: modes.append(kw.get("mode")))
    out = tmp_path / "train.json"
    assert main(["train", "--cpu-smoke", "--compile-mode", "reduce-overhead", "--modes", "int8", "--steps", "2",
                 "--warmup", "1", "--set", "batch_size=2", "--out", str(out)]) == 0
    recs = _records(out)
    assert modes == ["reduce-overhead"]
    assert [(r["compile"], r["compile_mode"]) for r in recs] == [(True, "reduce-overhead")]

    assert main(["train", "--cpu-smoke", "--no-compile", "--modes", "bf16", "--steps", "2", "--warmup", "1",
                 "--out", str(out)]) == 0
    assert [(r["compile"], r["compile_mode"]) for r in _records(out)] == [(False, None)]


def test_train_refuses_a_compile_mode_without_compilation(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["train", "--cpu-smoke", "--no-compile", "--compile-mode", "reduce-overhead", "--out", str(out)]) == 2
    assert "--no-compile" in capsys.readouterr().err
    assert main(["train", "--cpu-smoke", "--no-compile", "--set", "compile_mode=reduce-overhead", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "compile=true" in err
    assert not out.exists()


def test_train_refuses_steps_not_above_warmup_before_training(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["train", "--cpu-smoke", "--no-compile", "--steps", "3", "--warmup", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--warmup < --steps" in err
    assert not out.exists()  # refused before any model trained


def test_blocks_compile_flags_and_iters_checked_like_train(tmp_path, capsys, monkeypatch):
    import torch

    out = tmp_path / "blocks.json"
    assert main(["blocks", "--cpu-smoke", "--no-compile", "--compile-mode", "reduce-overhead", "--out", str(out)]) == 2
    assert "--no-compile" in capsys.readouterr().err
    assert main(["blocks", "--cpu-smoke", "--no-compile", "--iters", "0", "--out", str(out)]) == 2
    assert "--iters 0" in capsys.readouterr().err
    assert not out.exists()
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    assert main(["blocks", "--cpu-smoke", "--compile-mode", "reduce-overhead", "--modes", "bf16", "--shapes",
                 "llama-tiny", "--iters", "1", "--out", str(out)]) == 0
    assert "need CUDA" in capsys.readouterr().out
    assert modes == ["reduce-overhead"]
    assert [(r["compile"], r["compile_mode"]) for r in _records(out)] == [(True, "reduce-overhead")]
