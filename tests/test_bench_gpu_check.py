"""gpu-check's report parsing and its refusal without CUDA (the GPU run itself happens on the GPU machine)."""
import subprocess
import sys

import pytest
import torch

from int8flow.bench.gpu_check import parse_junit

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
skipped="1" tests="5"><testcase classname="tests.test_a" name="test_ok" time="0.5"/><testcase classname="tests.test_a"
name="test_bad" time="12.25"><failure message="AssertionError: 3 != 4&#10;more">tb</failure></testcase><testcase
classname="tests.test_b" name="test_skip"><skipped message="needs a CUDA GPU"/></testcase><testcase
classname="tests.test_b" name="test_err"><error message="fixture broke">tb</error></testcase><testcase
classname="tests.test_b" name="test_ok2"/></testsuite></testsuites>"""


def test_parse_junit_counts_and_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    s = parse_junit(str(path))
    assert (s["tests"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (5, 2, 1, 1, 1)
    assert s["failures"] == [
        {"test": "tests.test_a::test_bad", "kind": "failure", "message": "AssertionError: 3 != 4"},
        {"test": "tests.test_b::test_err", "kind": "error", "message": "fixture broke"},
    ]
    assert s["slowest"][:2] == [{"test": "tests.test_a::test_bad", "seconds": 12.25},
                                {"test": "tests.test_a::test_ok", "seconds": 0.5}]
    assert len(s["slowest"]) == 5  # cases without a time count as 0 s


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_refuses_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "int8flow.bench", "gpu-check"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_result_files_are_named_by_device():
    import os

    from int8flow.bench.common import device_slug, result_path

    assert device_slug("NVIDIA H200") == "h200" and device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert result_path({"device": "NVIDIA H200"}, "train") == os.path.join("bench", "results", "h200_train.json")
    assert result_path({"device": "cpu (x86_64, 2 cores, 2 threads)"}, "blocks") == os.path.join(
        "bench", "results", "cpu_blocks.json")


SAMPLE = """
import time

def test_ok():
    pass

def test_bad():
    assert 1 == 2

def test_slow():
    time.sleep(300)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_log_names_failures_as_they_happen(tmp_path, workers):
    """The plugin writes each failing test once (under xdist only the controller writes) while pytest runs."""
    from int8flow.bench import failure_log

    (tmp_path / "test_sample.py").write_text(SAMPLE)
    log = tmp_path / "failures.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "int8flow.bench.failure_log",
           str(tmp_path / "test_sample.py"), "-k", "not slow"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    env = {**__import__("os").environ, failure_log.ENV: str(log)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert log.read_text().splitlines() == ["test_sample.py::test_bad\tcall"]
    assert failure_log.read(str(log)) == [{"test": "test_sample.py::test_bad", "phase": "call"}]


def test_gpu_check_cut_by_its_time_limit_keeps_counts_and_failure_names(tmp_path, monkeypatch):
    """--max-seconds interrupts pytest (a test sleeps 300 s); the record says incomplete and still names the
    failure seen before the cut. The limit, 45 s, leaves pytest's start (torch import, plugin) room on a loaded
    machine: at 15 s a run beside a busy suite was cut before any test ran."""
    import json
    import types

    from int8flow.bench import gpu_check

    (tmp_path / "test_sample.py").write_text(SAMPLE)
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    monkeypatch.setattr(gpu_check, "device_info", lambda: {"device": "test"})
    out = tmp_path / "out.json"
    args = types.SimpleNamespace(tests=str(tmp_path / "test_sample.py"), workers=1, out=str(out), no_bench=True,
                                 pytest_args="", max_seconds=45)
    assert gpu_check.main(args) == 1
    rec = json.loads(out.read_text())
    assert rec["incomplete"] is True and rec["ok"] is False
    assert any("test_bad" in t for t in rec["failures_seen"])
    assert rec["failed"] >= 1 and rec["passed"] >= 1
