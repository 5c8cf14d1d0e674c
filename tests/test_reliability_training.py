"""Interrupted training, unsafe checkpoint files, determinism: the trainer as a user runs it.

Kills are real SIGKILLs of a `int8flow train` subprocess: at chosen points inside a checkpoint write (a
driver script wraps the checkpoint module's fsync / pointer functions to kill the process there) and at
a random moment from outside. After each kill the run resumes; the final log must equal an uninterrupted
run's, step for step, bitwise.
"""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from int8flow.data import prepare, read_embedded
from int8flow.training import CheckpointError, load_checkpoint, make_config, read_log, train
from int8flow.training.checkpoint import MODEL_FILE, STATE_FILE, TRAINER_FILE, check_state_dict, load_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("TRITON_INTERPRET", None)

DRIVER = r'''
import os, signal, sys
from int8flow.training import checkpoint as ck
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def wrap(name):
    orig = getattr(ck, name)
    def f(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **k)
    setattr(ck, name, f)
if mode != "none":
    wrap(mode)
from int8flow.cli import main
main(["train", *sys.argv[3:]])
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rel-data")
    texts = folder / "texts"
    texts.mkdir()
    for doc in read_embedded()[:2]:
        (texts / f"{doc.name}.txt").write_text(doc.text[:40_000])
    prepare([str(texts)], folder / "tokens", tokenizer="bpe", vocab_size=320)
    return folder / "tokens"


def _overrides(data_dir, out, **kw):
    base = dict(model="gpt-tiny", precision="int8", data=str(data_dir), out_dir=str(out), seq_len=32, batch_size=4,
                max_steps=8, warmup_steps=2, eval_interval=4, eval_batches=1, ckpt_interval=2, progress="false",
                tensorboard="false", device="cpu", threads=1, seed=7)
    base.update(kw)
    base["model.n_layer"] = 2
    return [f"{k}={v}" for k, v in base.items()]


def _run(tmp_path, data_dir, out, mode="none", n=0, wait=True, **kw):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), mode, str(n), *_overrides(data_dir, out, **kw)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    if wait:
        proc.communicate(timeout=300)
    return proc


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


def test_sigkill_during_training_and_checkpoint_writes_loses_nothing(data_dir, tmp_path):
    reference = tmp_path / "ref"
    _run(tmp_path, data_dir, reference)
    want = _losses(reference)
    assert sorted(want) == list(range(1, 9))

    run = tmp_path / "victim"
    kills = 0
    # 1: killed inside the 2nd checkpoint write, after model.safetensors (each write fsyncs 3 files)
    p = _run(tmp_path, data_dir, run, mode="_fsync_file", n=5)
    assert p.returncode == -signal.SIGKILL
    kills += 1
    assert load_checkpoint(run).step == 2, "the finished checkpoint survives a kill inside the next write"
    # 2: resumed, then killed after a checkpoint folder was renamed into place but before `latest` moved
    p = _run(tmp_path, data_dir, run, mode="write_text_atomic", n=1, resume="true")
    assert p.returncode == -signal.SIGKILL
    kills += 1
    assert load_checkpoint(run).step == 2
    # 3: resumed, then killed from outside at a random moment once step 5 is logged
    p = _run(tmp_path, data_dir, run, wait=False, resume="true")
    deadline = time.time() + 120
    while time.time() < deadline and max(_losses(run) if (run / "log.jsonl").exists() else {0: 0}) < 5:
        time.sleep(0.01)
    time.sleep(torch.rand(()).item() * 0.2)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    if p.returncode == -signal.SIGKILL:
        kills += 1
    # 4: resumed to the end
    p = _run(tmp_path, data_dir, run, resume="true")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _losses(run) == want, "resumed losses equal the uninterrupted run's, bitwise"
    final, ref_final = load_checkpoint(run), load_checkpoint(reference)
    assert final.step == 8
    for name, value in ref_final.model.items():
        assert torch.equal(final.model[name], value), name
    assert kills >= 2


def test_two_runs_same_seed_are_identical_and_seed_matters(data_dir, tmp_path):
    """CPU determinism with stochastic rounding in the INT8 data flow: same seed, same losses bitwise."""
    def run(name, seed):
        cfg = make_config(None, None, _overrides(data_dir, tmp_path / name, max_steps=3, ckpt_interval=0, seed=seed))
        return train(cfg).losses
    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    assert a == b
    assert a != c


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(tmp_path, data_dir):
    cfg = make_config(None, None, _overrides(data_dir, tmp_path / "src", max_steps=1, ckpt_interval=0))
    return train(cfg).checkpoint


def test_unsafe_and_damaged_checkpoints(data_dir, tmp_path):
    path = _checkpoint(tmp_path, data_dir)
    good = load_checkpoint(path)
    marker = tmp_path / "pwned"
    # a malicious trainer.pt (pickle that runs a shell command), with state.json updated to match it,
    # as an attacker who controls the folder would do: loading must refuse it without executing it
    with open(path / TRAINER_FILE, "wb") as f:
        pickle.dump({"optimizer": _Boom(marker)}, f)
    state = json.loads((path / STATE_FILE).read_text())
    data = (path / TRAINER_FILE).read_bytes()
    state["files"][TRAINER_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer\.pt: unreadable"):
        load_checkpoint(path)
    assert not marker.exists(), "loading executed pickled code"
    # model weights are safetensors: a pickle renamed to model.safetensors is refused, not executed
    bad_weights = tmp_path / "evil.safetensors"
    with open(bad_weights, "wb") as f:
        pickle.dump(_Boom(marker), f)
    with pytest.raises(CheckpointError, match=r"evil\.safetensors: not a readable safetensors file"):
        load_weights(bad_weights)
    assert not marker.exists()
    # truncated weights file (state.json not updated): size check names the file
    w = path / MODEL_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \d+ bytes, state\.json records \d+"):
        load_checkpoint(path)
    # truncated weights loaded directly (no state.json): still a clear error naming the file
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_weights(w)
    # mismatched shapes: names the file and the tensor
    sd = dict(good.model)
    name = next(k for k in sd if k.endswith("c_fc.weight"))
    sd[name] = sd[name][:, :5]
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE} does not fit this model: .*shape mismatch 1 "
                                              rf"\({name.replace('.', '[.]')}: file"):
        check_state_dict(sd, good.model, path / MODEL_FILE)
