"""The kernel benchmark command: a clear failure without CUDA, and its record-building logic on the interpreter."""
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_command_fails_clearly_without_cuda(tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "int8flow.bench", "kernels", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test through the Triton interpreter")
def test_records_on_tiny_shapes(monkeypatch, capsys):
    pytest.importorskip("triton", reason="the kernels need triton")
    from int8flow.bench import common, kernels

    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    monkeypatch.setattr(kernels, "M_TOKENS", 64)
    calls = []

    def timer(fn):  # runs the callable once (it must work) and reports a fixed time
        fn()
        calls.append(fn)
        return 1.0

    records = kernels.gemm_records([(96, 128)], timer=timer)
    assert len(records) == 3 * len(kernels.MODES)
    assert {r["op"] for r in records} == {"gemm_fwd", "gemm_dgrad", "gemm_wgrad"}
    for r in records:
        assert set(r) >= {"op", "shape", "mode", "ours_ms", "baseline_ms", "speedup"} and r["shape"] == [64, 96, 128]
    q = kernels.quantize_records(copy=1.0, timer=timer)
    assert {r["op"] for r in q} == {"quantize", "quantize_transposed"} and all(r["gbps"] > 0 for r in q)
    common.print_table(records + q)
    assert "gemm_wgrad" in capsys.readouterr().out


def test_shape_and_subset_options_parse_or_name_the_fix():
    from int8flow.bench import kernels

    assert kernels.parse_shapes("2560x2048, 256X2048") == [(2560, 2048), (256, 2048)]
    for bad in ("12x", "0x64", "axb", "64x64x64"):
        with pytest.raises(ValueError, match="N_out x K_in"):
            kernels.parse_shapes(bad)
    assert kernels._subset("gemm,membound", kernels.PARTS, "--parts") == ["gemm", "membound"]
    with pytest.raises(ValueError, match="--parts: foo not among"):
        kernels._subset("gemm,foo", kernels.PARTS, "--parts")


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "12x"], "--shapes: '12x'"),
    (["--parts", "gemm,foo"], "--parts: foo"),
    (["--gemm-modes", "fast"], "--gemm-modes: fast"),
    (["--tokens", "0"], "--tokens must be a positive"),
])
def test_bad_options_fail_in_one_line_before_needing_a_gpu(argv, message):
    run = subprocess.run([sys.executable, "-m", "int8flow.bench", "kernels", *argv], capture_output=True, text=True)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
