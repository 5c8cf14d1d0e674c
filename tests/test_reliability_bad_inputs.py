"""Bad input to every public entry point: the error type, and a message naming the argument and the fix.

Each case is (callable, exception type, regex). The regex must match the argument's name and a hint of the
fix (the expected values, or what to do); wrong devices are simulated with 'meta' tensors on CPU.
"""
import pytest
import torch

from int8flow import reference as ref
from int8flow.config import Int8TrainingConfig
from int8flow.format import BlockShape, QTensor, dequantize, quantize, quantize_transposed
from int8flow.guards import NonFiniteTracker, check_finite, count_nonfinite
from int8flow.models import build_model
from int8flow.nn import Int8Linear
from int8flow.training import CheckpointError, TrainConfig, load_checkpoint, make_config
from int8flow.training.checkpoint import load_weights

X = torch.randn(8, 64)
Q = quantize(X)
I8 = Int8TrainingConfig(precision="int8-linear")

CASES = {
    # format
    "quantize: list": (lambda: quantize([[1.0]]), TypeError, r"x must be a torch\.Tensor"),
    "quantize: int dtype": (lambda: quantize(torch.ones(4, 4, dtype=torch.int32)), TypeError,
                            r"x must be a floating-point tensor \(float32/bfloat16/float16/float64\), got torch\.int32"),
    "quantize: 3-D": (lambda: quantize(torch.randn(2, 3, 4)), ValueError, r"x must be 2-D .*reshape"),
    "quantize: meta device": (lambda: quantize(torch.empty(4, 4, device="meta")), ValueError,
                              r"x is on the meta device .*cpu or cuda"),
    "quantize: block 0x32": (lambda: quantize(X, "0x32"), ValueError, r"BlockShape\.rows must be a positive int.*e\.g\."),
    "quantize: block '32by32'": (lambda: quantize(X, "32by32"), ValueError, r"not of the form 'ROWSxCOLS', e\.g\. '32x32'"),
    "quantize: block 3-tuple": (lambda: quantize(X, (1, 2, 3)), TypeError, r"block shape must be a BlockShape, a \(rows, cols\)"),
    "quantize: block -1": (lambda: quantize(X, (-1, 32)), ValueError, r"BlockShape\.rows must be a positive int, got -1"),
    "quantize: block float": (lambda: quantize(X, (1.5, 32)), ValueError, r"BlockShape\.rows must be a positive int"),
    "quantize: rounding": (lambda: quantize(X, rounding="up"), ValueError, r"rounding must be one of \('nearest', 'stochastic'\)"),
    "quantize: NaN": (lambda: quantize(torch.full((2, 2), float("nan"))), Exception, r"x holds 4 NaN.*check_finite=False"),
    "quantize: float64 overflow": (lambda: quantize(torch.full((1, 1), 1e300, dtype=torch.float64)), Exception,
                                   r"x \(float64\).*float32 range.*Rescale x"),
    "quantize_transposed: int": (lambda: quantize_transposed(torch.ones(4, 4, dtype=torch.int8)), TypeError,
                                 r"x must be a floating-point"),
    "dequantize: tensor": (lambda: dequantize(X), TypeError, r"dequantize expects a QTensor"),
    "QTensor: float data": (lambda: QTensor(X, Q.scale, Q.block), TypeError, r"QTensor\.data must be int8"),
    "QTensor: float64 scale": (lambda: QTensor(Q.data, Q.scale.double(), Q.block), TypeError, r"QTensor\.scale must be float32"),
    "QTensor: scale grid": (lambda: QTensor(Q.data, Q.scale[:, :1], Q.block), ValueError,
                            r"QTensor\.scale has shape \(1, 1\) but data \(8, 64\) with 32x32 blocks needs \(1, 2\)"),
    "QTensor: 1-D data": (lambda: QTensor(Q.data[0], Q.scale, Q.block), ValueError, r"QTensor\.data must be 2-D"),
    "QTensor: scale device": (lambda: QTensor(Q.data, Q.scale.to("meta"), Q.block), ValueError,
                              r"QTensor\.data is on cpu but scale on meta"),
    # reference GEMM
    "block_gemm: K mismatch": (lambda: ref.block_gemm(Q, quantize(torch.randn(4, 32))), ValueError,
                               r"needs a \(M, K\), b \(N, K\) with the same K; got a \(8, 64\), b \(4, 32\)"),
    "block_gemm: float a": (lambda: ref.block_gemm(X, Q), TypeError, r"a must be a QTensor \(use int8flow\.format\.quantize\)"),
    "block_gemm: float b": (lambda: ref.block_gemm(Q, X), TypeError, r"b must be a QTensor"),
    "block_gemm: bias shape": (lambda: ref.block_gemm(Q, Q, bias=torch.ones(3)), ValueError, r"bias must have shape \(8,\)"),
    "block_gemm: out_dtype int": (lambda: ref.block_gemm(Q, Q, out_dtype=torch.int32), TypeError,
                                  r"out_dtype must be a float dtype.*pass out_block"),
    "block_gemm: out_block": (lambda: ref.block_gemm(Q, Q, out_block="abc"), ValueError, r"'abc' is not of the form 'ROWSxCOLS'"),
    "block_gemm: rounding": (lambda: ref.block_gemm(Q, Q, out_block="32x32", rounding="up"), ValueError,
                             r"rounding must be one of"),
    # reference non-linear
    "layer_norm: weight shape": (lambda: ref.layer_norm_forward(X, torch.ones(3)), ValueError,
                                 r"weight must have shape \(64,\) to match the feature dimension"),
    "layer_norm: bias shape": (lambda: ref.layer_norm_forward(X, None, torch.ones(3)), ValueError, r"bias must have shape \(64,\)"),
    "layer_norm: 3-D": (lambda: ref.layer_norm_forward(torch.randn(2, 3, 4)), ValueError, r"x must be 2-D .*reshape"),
    "layer_norm: int": (lambda: ref.layer_norm_forward(torch.ones(4, 4, dtype=torch.int64)), TypeError,
                        r"x must be a float tensor or a QTensor"),
    "layer_norm_backward: dy shape": (lambda: ref.layer_norm_backward(torch.randn(8, 32), X, None, torch.zeros(8), torch.ones(8)),
                                      ValueError, r"shape mismatch: \{'dy': \(8, 32\), 'x': \(8, 64\)\}"),
    "rms_norm: weight shape": (lambda: ref.rms_norm_forward(X, torch.ones(5)), ValueError, r"weight must have shape \(64,\)"),
    "gelu: approximate": (lambda: ref.gelu_forward(X, "fast"), ValueError, r"approximate must be one of \('none', 'tanh'\)"),
    "gelu_backward: dy dtype": (lambda: ref.gelu_backward(torch.ones(8, 64, dtype=torch.int8), X), TypeError,
                                r"dy must be a float tensor or a QTensor"),
    "swiglu: shapes": (lambda: ref.swiglu_forward(X, torch.randn(8, 32)), ValueError, r"shape mismatch: \{'gate'.*'up'"),
    "dropout: p=1.5": (lambda: ref.dropout_forward(X, 1.5), ValueError, r"dropout probability p must be in \[0, 1\)"),
    "dropout: p=1": (lambda: ref.dropout_forward(X, 1.0), ValueError, r"p must be in \[0, 1\)"),
    "residual_add: stats": (lambda: ref.residual_add_forward(X, X, stats="batchnorm"), ValueError,
                            r"stats must be one of \(None, 'layernorm', 'rmsnorm'\)"),
    "residual_add: shapes": (lambda: ref.residual_add_forward(X, torch.randn(8, 32)), ValueError, r"'residual'.*'delta'"),
    # config
    "Int8TrainingConfig: precision": (lambda: Int8TrainingConfig(precision="int4"), ValueError,
                                      r"precision must be one of \('bf16', 'int8-linear', 'int8', 'int8\+fallback'\)"),
    "Int8TrainingConfig: block": (lambda: Int8TrainingConfig(activation_block="33"), ValueError, r"'33' is not of the form"),
    "Int8TrainingConfig: rounding": (lambda: Int8TrainingConfig(grad_rounding="up"), ValueError, r"grad_rounding must be one of"),
    "Int8TrainingConfig: toggle type": (lambda: Int8TrainingConfig(precision="int8-linear", quantize_fprop=1), TypeError,
                                        r"quantize_fprop must be a bool"),
    "Int8TrainingConfig: toggle in flow": (lambda: Int8TrainingConfig(quantize_dgrad=False), ValueError,
                                           r"per-GEMM toggles only apply to precision='int8-linear'"),
    "Int8TrainingConfig: threshold": (lambda: Int8TrainingConfig(fallback_threshold=0.5), ValueError,
                                      r"fallback_threshold must be > 1"),
    "Int8TrainingConfig: budget": (lambda: Int8TrainingConfig(fallback_budget=2.0), ValueError,
                                   r"fallback_budget must be a fraction in \[0, 1\]"),
    "Int8TrainingConfig: min_features": (lambda: Int8TrainingConfig(min_features=0), ValueError, r"min_features must be a positive int"),
    "Int8TrainingConfig: recipe": (lambda: Int8TrainingConfig.from_recipe_name("fp4"), ValueError, r"unknown recipe 'fp4'; known recipes"),
    # nn / models
    "Int8Linear: int input": (lambda: Int8Linear(64, 32)(torch.ones(8, 64, dtype=torch.int64)), TypeError,
                              r"x must be a floating-point tensor"),
    "Int8Linear: features": (lambda: Int8Linear(64, 32)(torch.randn(8, 48)), ValueError,
                             r"x has 48 features but weight expects 64 \(in_features\)"),
    "Int8Linear: bf16 config": (lambda: Int8Linear(64, 32, config="bf16"), ValueError, r"precision='bf16' means a plain nn\.Linear"),
    "build_model: preset": (lambda: build_model("gpt-huge"), ValueError, r"unknown model preset 'gpt-huge'; presets: \["),
    "build_model: field": (lambda: build_model("gpt-tiny", n_layers=3), ValueError, r"unknown GPTConfig fields \['n_layers'\]; known"),
    "build_model: precision": (lambda: build_model("gpt-tiny", "int4"), ValueError, r"unknown recipe 'int4'; known recipes"),
    "build_model: type": (lambda: build_model(3), TypeError, r"preset name or a GPTConfig/LlamaConfig"),
    "GPT: sequence too long": (lambda: build_model("gpt-tiny")(torch.zeros(1, 500, dtype=torch.long)), ValueError,
                               r"sequence length 500 exceeds block_size 128"),
    "GPT: token id >= vocab": (lambda: build_model("gpt-tiny", "int8")(torch.tensor([[3, 300, 7]])), ValueError,
                               r"largest token id, 300, is out of range for vocab_size=256 .*tokenizer.*vocab_size=320"),
    "GPT: float token ids": (lambda: build_model("gpt-tiny", "int8")(torch.randn(2, 8)), TypeError,
                             r"token ids must be an integer tensor \(torch\.long\), got torch\.float32"),
    "GPT: 1-D token ids": (lambda: build_model("gpt-tiny")(torch.zeros(8, dtype=torch.long)), ValueError,
                           r"token ids must be 2-D \(batch, sequence\), got shape \(8,\); for one sequence pass idx\[None\]"),
    "Llama: 3-D token ids": (lambda: build_model("llama-tiny")(torch.zeros(2, 3, 4, dtype=torch.long)), ValueError,
                             r"token ids must be 2-D \(batch, sequence\), got shape \(2, 3, 4\)"),
    "Llama: sequence too long": (lambda: build_model("llama-tiny")(torch.zeros(1, 500, dtype=torch.long)), ValueError,
                                 r"sequence length 500 exceeds max_seq_len \d+; pass at most \d+ tokens"),
    "Llama: negative token id": (lambda: build_model("llama-tiny")(torch.tensor([[3, -2]])), ValueError,
                                 r"token id -2 is negative \(ids must be in \[0, 256\)\)"),
    "Int8TrainingConfig: nonfinite": (lambda: Int8TrainingConfig(nonfinite="skip"), ValueError,
                                      r"nonfinite must be one of \('raise', 'propagate'\)"),
    # guards
    "check_finite: policy": (lambda: check_finite(X, "a", "b", "ignore"), ValueError,
                             r"policy must be one of \('raise', 'skip', 'bf16'\)"),
    "count_nonfinite: list": (lambda: count_nonfinite([1.0]), TypeError, r"expects a torch\.Tensor"),
    "NonFiniteTracker: function": (lambda: NonFiniteTracker(print), TypeError, r"needs an nn\.Module"),
    # training config / CLI settings / files
    "TrainConfig: lr": (lambda: TrainConfig(lr=-1), ValueError, r"lr=-1: expected a learning rate > 0"),
    "TrainConfig: device": (lambda: TrainConfig(device="tpu"), ValueError, r"device='tpu': expected auto, cpu, cuda or cuda:N"),
    "TrainConfig: nonfinite": (lambda: TrainConfig(nonfinite="ignore"), ValueError, r"nonfinite='ignore': expected one of"),
    "TrainConfig: batch_size": (lambda: TrainConfig(batch_size=0), ValueError, r"batch_size=0: expected an integer >= 1"),
    "TrainConfig: min_lr": (lambda: TrainConfig(min_lr=1.0), ValueError, r"min_lr=1\.0: expected 0 <= min_lr <= lr"),
    "TrainConfig: vocab": (lambda: TrainConfig(vocab_size=100), ValueError, r"vocab_size=100: expected 257\.\.65535"),
    "TrainConfig: spike": (lambda: TrainConfig(spike_factor=0.5), ValueError, r"spike_factor=0\.5: expected 0 \(off\) or a factor > 1"),
    "make_config: unknown key": (lambda: make_config(None, None, ["lrr=1"]), ValueError, r"unknown config key 'lrr'; did you mean lr\?"),
    "make_config: bad int": (lambda: make_config(None, None, ["max_steps=ten"]), ValueError, r"max_steps='ten': expected an integer"),
    "make_config: preset": (lambda: make_config("gpt5", None, []), ValueError, r"unknown run preset 'gpt5'; expected one of"),
    "make_config: missing toml": (lambda: make_config(None, "/nonexistent/run.toml", []), FileNotFoundError,
                                  r"config file /nonexistent/run\.toml does not exist"),
    "load_checkpoint: missing": (lambda: load_checkpoint("/nonexistent"), CheckpointError,
                                 r"/nonexistent does not exist; pass a run folder"),
    "load_weights: missing": (lambda: load_weights("/nonexistent/model.safetensors"), CheckpointError,
                              r"model\.safetensors: weights file missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_clear_error(case):
    fn, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_malformed_files(tmp_path):
    """Malformed data / config files name the file and the problem."""
    toml = tmp_path / "run.toml"
    toml.write_text("max_steps = [\n")
    with pytest.raises(ValueError, match=r"run\.toml"):
        make_config(None, toml, [])
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_weights(bad)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000004\n")
    with pytest.raises(CheckpointError, match=r"latest names step_000004, which does not exist"):
        load_checkpoint(run)


def test_bad_data_sources(tmp_path):
    from int8flow.data import prepare

    with pytest.raises(Exception, match=r"nonexistent"):
        prepare([str(tmp_path / "nonexistent")], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match=r"empty"):
        prepare([str(empty)], tmp_path / "out2")
