"""Every option of every verb is checked up front: one line naming the option, the value and the fix, exit
status 2, no traceback (issue 15, items 6, 7 and 14); `train --help` lists every setting; `--version`."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from int8flow.cli import build_parser, main
from int8flow.training import TrainConfig


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("argv, needles", [
    (["train", "device=cuda"], ["device=cuda", "CUDA is not available", "device=cpu"]),
    (["train", "device=cuda:1"], ["device=cuda:1", "device=cpu"]),
    (["sample", ".", "--device", "cuda"], ["--device=cuda", "CUDA is not available", "--device=cpu"]),
])
def test_cuda_on_a_machine_without_it(argv, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, needles", [
    (["sample", ".", "--top-k", "-3"], ["--top-k -3", ">= 0"]),
    (["sample", ".", "--tokens", "-1"], ["--tokens -1"]),
    (["sample", ".", "--temperature", "0"], ["--temperature 0", "> 0"]),
    (["sample", ".", "--device", "tpu"], ["--device='tpu'", "cpu, cuda"]),
    (["sample", ".", "--precision", "int4"], ["--precision 'int4'", "int8+fallback"]),
    (["sample", "/nonexistent"], ["/nonexistent", "does not exist"]),
    (["export", "/nonexistent", "--format", "hf", "--out", "x.safetensors"], ["/nonexistent", "does not exist"]),
    (["export", ".", "--format", "hf", "--out", "x.bin"], ["--out x.bin", ".safetensors"]),
    (["plot", "/nonexistent", "--out", "p.png"], ["/nonexistent", "does not exist"]),
    (["plot", ".", "--out", "p.jpg"], ["--out p.jpg", ".png"]),
    (["prepare", "/nonexistent", "--out", "d"], ["/nonexistent", "does not exist"]),
    (["prepare", ".", "--out", "d", "--vocab-size", "10"], ["--vocab-size 10", "257..65535"]),
    (["prepare", ".", "--out", "d", "--val-fraction", "1.5"], ["--val-fraction 1.5", "(0, 1)"]),
    (["train", "max_steps=-5"], ["max_steps=-5", ">= 1"]),
    (["train", "max_steps=ten"], ["max_steps='ten'", "integer"]),
    (["train", "precision=int4"], ["precision='int4'", "int8+fallback"]),
    (["train", "tiny", "gpt2-124m"], ["at most one preset"]),
    (["train", "nopreset"], ["unknown run preset 'nopreset'"]),
    (["train", "--config", "/nonexistent.toml"], ["/nonexistent.toml", "does not exist"]),
    (["train", "resume=true", "overwrite=true"], ["resume=true and overwrite=true"]),
    (["train", "data=/nonexistent"], ["data=/nonexistent", "does not exist"]),
    (["train", "tokenizer=/nope.json"], ["tokenizer=/nope.json", "does not exist"]),
    (["train", "model=gpt-nope"], ["unknown model preset 'gpt-nope'"]),
    (["train", "model.n_layer=0"], ["n_layer", "positive"]),
])
def test_bad_options_give_one_line_and_status_2(argv, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv, needles", [
    (["sample", ".", "--top-k", "x"], ["--top-k", "invalid int value: 'x'"]),
    (["export", ".", "--format", "onnx", "--out", "x.safetensors"], ["--format", "'onnx'"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
])
def test_argparse_errors_are_one_line_too(argv, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    _one_line_error(capsys, *needles)


def test_train_help_lists_every_setting_with_default_and_meaning():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_args":
            continue
        assert f"  {f.name} = " in text, f.name
        assert f.metadata.get("help"), f"{f.name} has no help text"
    for needle in ("max_steps = 800", "precision = 'bf16'", "resume = false", "stop_at = 0", "data = 'shakespeare'",
                   "threads = 0 (tiny: 1)", "resume_from", "overwrite", "model.X"):
        assert needle in text, needle


def test_version():
    proc = subprocess.run([sys.executable, "-m", "int8flow.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("int8flow 0."), proc.stdout + proc.stderr


def test_unwritable_out_dir_is_refused_before_any_data_work(capsys, tmp_path, monkeypatch):
    """out_dir under a regular file: one line naming out_dir and the fix, before the tokenizer is trained."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    assert main(["train", f"out_dir={tmp_path / 'afile' / 'sub' / 'run'}", "max_steps=1"]) == 2
    _one_line_error(capsys, "out_dir", "cannot create", "pick a writable folder")
    assert not (tmp_path / "afile" / "_data").exists() and (tmp_path / "afile").is_file()


def test_run_banner_names_the_block_geometry():
    """The start line says which blocks an INT8 run uses: `int8` (1x128 / 128x128 by default) and `jetfire` (32x32)
    differ only there."""
    from int8flow.training.loop import _precision_label
    assert _precision_label("bf16") == "bf16"
    assert _precision_label("int8") == "int8 1x128/128x128"
    assert _precision_label("jetfire") == "jetfire 32x32/32x32"
    assert _precision_label("int8-linear") == "int8-linear 1x128/128x128"
