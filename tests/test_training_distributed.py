"""torchrun with 2 Gloo processes on CPU: DDP and FSDP2 reproduce the 1-process loss at the same global batch
(1 process x 2 micro-batches of 4 == 2 processes x 1 micro-batch of 4: same sequences, same mean gradient)."""
import os
import subprocess
import sys

import pytest

from int8flow.data import prepare, read_embedded
from int8flow.training import make_config, read_log, train

pytestmark = pytest.mark.slow

STEPS = 4
# Only the order of float32 sums differs (all-reduce vs accumulation, sharded reductions). Measured on
# 2 CPU cores: DDP bitwise equal, FSDP2 within 4.8e-7 over 4 steps; 1e-5 leaves room for other CPUs
# and still fails for any real difference (a different batch moves the loss by ~1e-1).
ATOL = 1e-5


COMMON = ["model=gpt-tiny", "model.n_layer=2", "seq_len=32", "batch_size=4", f"max_steps={STEPS}", "warmup_steps=1",
          "eval_interval=2", "eval_batches=1", "progress=false", "tensorboard=false", "device=cpu", "threads=1"]


def torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "int8flow.train"]
    proc = subprocess.run(cmd + COMMON + args, capture_output=True, text=True, timeout=240, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def in_process(args):
    return train(make_config(overrides=COMMON + args))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    (folder / "t.txt").write_text(read_embedded()[7].text[:40_000])
    prepare([str(folder / "t.txt")], folder / "tok", vocab_size=320)
    return folder


@pytest.fixture(scope="module")
def single(data):
    in_process([f"data={data / 'tok'}", f"out_dir={data / 'one'}", "grad_accum=2"])
    return read_log(data / "one")


@pytest.mark.parametrize("parallel, stop_at", [("ddp", 0), ("fsdp2", 2)])
def test_two_processes_match_one(data, single, parallel, stop_at):
    """FSDP2 also stops half way: its (unsharded) checkpoint resumes in one process, still matching."""
    out = data / parallel
    proc = torchrun([f"data={data / 'tok'}", f"out_dir={out}", "grad_accum=1", f"parallel={parallel}",
                     f"stop_at={stop_at}"], data)
    assert f"x2 {parallel}" in proc.stdout
    if stop_at:
        assert (out / "checkpoints" / f"step_{stop_at:06d}" / "model.safetensors").is_file()
        in_process([f"data={data / 'tok'}", f"out_dir={out}", "grad_accum=2", "resume=true"])
    multi = read_log(out)
    assert [r["step"] for r in multi] == [r["step"] for r in single]
    for a, b in zip(single, multi):
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= ATOL, (parallel, a["step"], key, a[key], b[key])


# A run script whose rank 1 alone gets an Inf weight at its 2nd training forward (persistent on that rank).
FAULTY_RUN = '''
import math, os, sys
import torch
from int8flow.models import build_model
from int8flow.training import make_config, train

def build(name, precision, **kw):
    model, calls = build_model(name, precision, **kw), [0]
    def poison(module, args):
        calls[0] += module.training
        if calls[0] == 2 and module.training and os.environ["RANK"] == "1":
            weight = module.get_parameter("transformer.h.1.mlp.c_fc.weight")
            with torch.no_grad():  # FSDP2: into this rank's shard, not through the (collective) DTensor
                (weight.to_local() if hasattr(weight, "to_local") else weight)[3, 5] = math.inf
    model.register_forward_pre_hook(poison)
    return model

train(make_config(overrides=sys.argv[1:]), build)
'''


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_fault_on_one_rank_is_skipped_by_all_without_a_hang(data, tmp_path, parallel):
    """An Inf weight on rank 1 only, INT8 data flow: the operators propagate it (no exception on rank 1 while
    rank 0 waits in a collective), both ranks see the NaN loss and skip; the fault is located on rank 1."""
    script = tmp_path / "faulty_run.py"
    script.write_text(FAULTY_RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *COMMON, f"data={data / 'tok'}", f"out_dir={tmp_path / 'out'}", f"parallel={parallel}",
           "precision=int8", "max_steps=3", "eval_interval=100", "ckpt_interval=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [r for r in read_log(tmp_path / "out") if "loss" in r]
    assert [r.get("skipped") for r in records] == [None, "nonfinite", "nonfinite"]
    fault = records[1]["fault"]
    assert "rank 1: non-finite weights: parameter transformer.h.1.mlp.c_fc.weight: value holds 1 Inf" in fault, fault
    assert proc.stdout.count("step 2 skipped (nonfinite)") == 1, proc.stdout  # reported once, by rank 0


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(data, tmp_path):
    """SIGTERM reaches rank 1 only, after step 2's update: its vote rides step 3's loss all-reduce (no collective
    or host read of its own), so both ranks finish step 3, write its checkpoint and stop; nothing hangs."""
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "int8flow.train"]
    args = [a for a in COMMON if not a.startswith("max_steps=")] + [
        "max_steps=40", "parallel=ddp", f"data={data / 'tok'}", f"out_dir={out}"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "INT8FLOW_TEST_SIGNAL_AT": "step:2@1"})
    assert "stopped at step 3;" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    assert max(r["step"] for r in read_log(out)) == 3
