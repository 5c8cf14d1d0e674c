"""Run configs: presets, TOML files, key=value overrides, and clear errors for bad values."""
import pytest

from int8flow.training.config import RUN_PRESETS, TrainConfig, load_toml, make_config, parse_overrides


def test_default_is_tiny_and_presets_build():
    cfg = make_config()
    assert cfg == TrainConfig(**RUN_PRESETS["tiny"]) and cfg.model == "gpt-tiny" and str(cfg.run_dir) == "runs/tiny"
    for name in RUN_PRESETS:
        assert make_config(name).name == name


def test_overrides_are_typed():
    got = parse_overrides(["lr=1e-3", "max_steps=7", "compile=true", "precision=int8+fallback",
                           "model.n_layer=2", "model.bias=false", "model.norm_eps=1e-5", "model.kind=x"])
    assert got == {"lr": 1e-3, "max_steps": 7, "compile": True, "precision": "int8+fallback",
                   "model_args": {"n_layer": 2, "bias": False, "norm_eps": 1e-5, "kind": "x"}}
    assert isinstance(got["lr"], float) and isinstance(got["max_steps"], int)
    assert parse_overrides(["lr=1"])["lr"] == 1.0 and isinstance(parse_overrides(["lr=1"])["lr"], float)


def test_precedence_preset_toml_cli(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "llama-60m"\nlr = 1\nmax_steps = 50\n[model]\nn_layers = 2\ndim = 64\n')
    cfg = make_config(toml_path=path, overrides=["max_steps=9", "model.dim=32"])
    assert (cfg.name, cfg.model, cfg.lr, cfg.max_steps) == ("llama-60m", "llama-60m", 1.0, 9)
    assert cfg.model_args == {"n_layers": 2, "dim": 32}
    assert cfg.seq_len == RUN_PRESETS["llama-60m"]["seq_len"]


@pytest.mark.parametrize("items, message", [
    (["precison=int8"], "unknown config key 'precison'; did you mean precision"),
    (["precision=fp8"], "precision='fp8': expected one of bf16"),
    (["lr=fast"], "lr='fast': expected a number"),
    (["max_steps=2.5"], "max_steps='2.5': expected an integer"),
    (["max_steps=0"], "max_steps=0: expected an integer >= 1"),
    (["compile=maybe"], "compile='maybe': expected true or false"),
    (["min_lr=1", "lr=0.1"], "min_lr=1.0: expected 0 <= min_lr <= lr"),
    (["parallel=tp"], "parallel='tp': expected one of none, ddp, fsdp2"),
    (["nonfinite=ignore"], "nonfinite='ignore': expected one of raise, skip, bf16"),
    (["spike_factor=0.5"], "spike_factor=0.5"),
    (["device=tpu"], "device='tpu'"),
    (["val_fraction=1"], "val_fraction=1.0"),
    (["lr"], "expected key=value"),
    (["preset=gpt5"], "unknown run preset 'gpt5'"),
    (["compile=true", "compile_mode=max-autotune"],
     "compile_mode='max-autotune': expected one of default, reduce-overhead, max-autotune-no-cudagraphs"),
    (["compile_mode=reduce-overhead"], "compile_mode=reduce-overhead needs compile=true"),
    (["compile=true", "compile_scope=layers"], "compile_scope='layers': expected one of model, blocks"),
    (["compile_scope=blocks"], "compile_scope=blocks needs compile=true"),
])
def test_bad_values_name_the_key(items, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        make_config(overrides=items)


def test_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("lr = \n")
    with pytest.raises(ValueError, match="bad.toml: invalid TOML"):
        load_toml(path)
    path.write_text('max_steps = "ten"\n')
    with pytest.raises(ValueError, match="max_steps = 'ten': expected int"):
        load_toml(path)
    path.write_text("learning_rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        load_toml(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_compile_mode_defaults_and_choices(tmp_path):
    assert make_config().compile_mode == "default"
    for mode in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
        assert make_config(overrides=["compile=true", f"compile_mode={mode}"]).compile_mode == mode
    assert make_config(overrides=["compile=false", "compile_mode=default"]).compile is False
    path = tmp_path / "run.toml"
    path.write_text('compile = true\ncompile_mode = "reduce-overhead"\n')
    cfg = make_config(toml_path=path)
    assert (cfg.compile, cfg.compile_mode) == (True, "reduce-overhead")
    assert cfg.to_dict()["compile_mode"] == "reduce-overhead"
