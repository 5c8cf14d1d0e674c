"""Interrupted training, unsafe checkpoint files, determinism: the trainer as a user runs it.

Kills are real SIGKILLs of an `int8flow train` subprocess, at points named by the test-only
INT8FLOW_TEST_KILL_AT (int8flow/training/killpoints.py): inside checkpoint writes and after a training
step. After each kill the run resumes; the final log must equal an uninterrupted run's, step for step, bitwise.
"""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from _training_fixtures import TINY_INT8, prepared_tokens, tiny_int8_config
from int8flow.training import CheckpointError, load_checkpoint, read_log, train
from int8flow.training.checkpoint import MODEL_FILE, STATE_FILE, TRAINER_FILE, check_state_dict, load_weights
from int8flow.training.killpoints import KILL_ENV, kill_point

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("TRITON_INTERPRET", None)
ENV.pop(KILL_ENV, None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_tokens(tmp_path_factory, docs=2, chars=40_000, vocab_size=320)


def _run(data_dir, out, kill_at=None, **kw):
    """`python -m int8flow.train` on the tiny INT8 settings; SIGKILLed at ``kill_at`` when given."""
    settings = {**TINY_INT8, "data": data_dir, "out_dir": out, **kw}
    args = [f"{k}={v}" for k, v in settings.items() if k != "model_args"]
    args += [f"model.{k}={v}" for k, v in settings["model_args"].items()]
    env = {**ENV, KILL_ENV: kill_at} if kill_at else ENV
    return subprocess.run([sys.executable, "-m", "int8flow.train", *args], capture_output=True, text=True,
                          env=env, cwd=out.parent, timeout=300)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


def test_sigkill_during_training_and_checkpoint_writes_loses_nothing(data_dir, tmp_path):
    reference = tmp_path / "ref"
    assert _run(data_dir, reference).returncode == 0
    want = _losses(reference)
    assert sorted(want) == list(range(1, 9))

    run = tmp_path / "victim"
    # 1: killed inside the 2nd checkpoint write (step 4), after model.safetensors, before trainer.pt
    p = _run(data_dir, run, kill_at="ckpt:step_000004/trainer.pt")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert load_checkpoint(run).step == 2, "the finished checkpoint survives a kill inside the next write"
    # 2: resumed, then killed after a checkpoint folder was renamed into place but before `latest` moved
    p = _run(data_dir, run, kill_at="ckpt:latest", resume="true")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (run / "checkpoints" / "step_000004").is_dir() and load_checkpoint(run).step == 2
    # 3: resumed, then killed in training: step 5 updated the weights but was neither logged nor saved
    p = _run(data_dir, run, kill_at="step:5", resume="true")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert load_checkpoint(run).step == 4 and max(_losses(run)) == 4
    # 4: resumed to the end
    p = _run(data_dir, run, resume="true")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _losses(run) == want, "resumed losses equal the uninterrupted run's, bitwise"
    final, ref_final = load_checkpoint(run), load_checkpoint(reference)
    assert final.step == 8
    for name, value in ref_final.model.items():
        assert torch.equal(final.model[name], value), name


def test_kill_point_ignores_other_points_and_refuses_a_malformed_one(monkeypatch):
    monkeypatch.setenv(KILL_ENV, "step:5")
    kill_point("step:4", "ckpt:latest")  # not this point: returns, the process lives on
    monkeypatch.setenv(KILL_ENV, "after-step-3")
    with pytest.raises(ValueError, match=f"{KILL_ENV}='after-step-3': expected step:N or ckpt:FILE"):
        kill_point("step:3")


def test_two_runs_same_seed_are_identical_and_seed_matters(data_dir, tmp_path):
    """CPU determinism with stochastic rounding in the INT8 data flow: same seed, same losses bitwise."""
    def run(name, seed):
        return train(tiny_int8_config(data_dir, tmp_path / name, max_steps=3, ckpt_interval=0, seed=seed)).losses
    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    assert a == b
    assert a != c


def test_same_seed_in_another_process_is_bitwise_identical(data_dir, tmp_path):
    """The documented reproducibility claim, as stated (docs/training.md): same seed, torch build, thread count and
    machine -> bitwise the same losses, also in a second process (a fresh interpreter: nothing shared in memory)."""
    p = _run(data_dir, tmp_path / "other", max_steps=4, ckpt_interval=0)
    assert p.returncode == 0, p.stderr[-2000:]
    here = train(tiny_int8_config(data_dir, tmp_path / "here", max_steps=4, ckpt_interval=0))
    there = read_log(tmp_path / "other")
    assert [r["loss"] for r in there if "loss" in r] == here.losses
    assert [r["val_loss"] for r in there if "val_loss" in r][-1] == here.val_loss


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(tmp_path, data_dir):
    return train(tiny_int8_config(data_dir, tmp_path / "src", max_steps=1, ckpt_interval=0)).checkpoint


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
