"""The training loop on a small model defined here: loss goes down, resume is exact, the guard skips
bad steps, checkpoints are atomic and verified, logs and plots are written."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _training_fixtures import prepared_tokens
from int8flow.training import (CheckpointError, NonFiniteLossError, TrainConfig, latest_checkpoint, load_checkpoint,
                               lr_at, plot_runs, read_log, save_checkpoint, train)
from int8flow.training.checkpoint import MODEL_FILE, TRAINER_FILE, check_state_dict, load_weights, save_weights


class ToyLM(nn.Module):
    """Embedding -> residual MLP blocks with dropout -> head; dropout makes RNG handling matter."""

    def __init__(self, vocab_size, n_embd=32, n_layer=2, dropout=0.1, poison_steps=(), poison=float("nan")):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, 2 * n_embd), nn.GELU(),
                          nn.Linear(2 * n_embd, n_embd), nn.Dropout(dropout)) for _ in range(n_layer))
        self.head = nn.Linear(n_embd, vocab_size)
        self.poison_steps, self.poison, self.train_calls = set(poison_steps), poison, 0

    def forward(self, idx, targets=None):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        if self.training:
            self.train_calls += 1
            if self.train_calls in self.poison_steps:
                loss = loss * self.poison
        return logits, loss


def build_toy(name, precision="bf16", vocab_size=256, **kwargs):
    return ToyLM(vocab_size, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_tokens(tmp_path_factory, docs=3, chars=60_000, vocab_size=384)


def config(data_dir, out, **kw):
    base = dict(data=str(data_dir), out_dir=str(out), seq_len=32, batch_size=8, max_steps=8, warmup_steps=2,
                lr=3e-3, min_lr=3e-4, eval_interval=4, eval_batches=2, ckpt_interval=4, progress=False,
                tensorboard=False, device="cpu", threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine: non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_loss_goes_down_and_run_dir_is_complete(data_dir, tmp_path, capsys):
    result = train(config(data_dir, tmp_path / "run", max_steps=40, eval_interval=20, grad_accum=2), build_toy)
    records = read_log(tmp_path / "run")
    assert records[0]["step"] == 0 and "val_loss" in records[0]  # initial model evaluated
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val  # from ~ln(384)=5.95 down by > 0.5 nats
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["grad_norm"] >= 0 for r in steps)
    assert result.val_loss == val[-1]
    for name in ("loss.png", "tokenizer.json", "checkpoints/latest"):
        assert (tmp_path / "run" / name).is_file()
    out = capsys.readouterr().out
    assert "final val loss" in out and "loss.png" in out


def test_resume_is_exact(data_dir, tmp_path):
    full = train(config(data_dir, tmp_path / "a", grad_accum=2, ckpt_interval=0), build_toy)
    first = train(config(data_dir, tmp_path / "b", grad_accum=2, ckpt_interval=0, stop_at=3), build_toy)
    assert first.steps == 3 and latest_checkpoint(tmp_path / "b").name == "step_000003"
    rest = train(config(data_dir, tmp_path / "b", grad_accum=2, ckpt_interval=0, resume=True), build_toy)
    assert first.losses + rest.losses == full.losses  # bitwise: same floats in the same order
    assert rest.val_loss == full.val_loss
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for name in a.model:
        torch.testing.assert_close(a.model[name], b.model[name], rtol=0, atol=0)
    assert [r["step"] for r in read_log(tmp_path / "b")] == [r["step"] for r in read_log(tmp_path / "a")]


def test_resume_mismatch_is_refused(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "r", max_steps=2), build_toy)
    with pytest.raises(CheckpointError, match="precision='bf16'.*int8"):
        train(config(data_dir, tmp_path / "r", max_steps=4, resume=True, precision="int8"), build_toy)
    with pytest.raises(CheckpointError, match="model.safetensors.*shape mismatch"):
        train(config(data_dir, tmp_path / "r", max_steps=4, resume=True),
              lambda name, precision, **kw: build_toy(name, precision, **{**kw, "n_embd": 16}))


def test_guard_skips_nonfinite_steps_without_touching_optimizer(data_dir, tmp_path):
    poisoned = lambda name, precision, **kw: build_toy(name, precision, poison_steps={3}, dropout=0.0, **kw)
    clean = lambda name, precision, **kw: build_toy(name, precision, dropout=0.0, **kw)
    bad = train(config(data_dir, tmp_path / "bad", max_steps=4, ckpt_interval=0, stop_at=3), poisoned)
    ref = train(config(data_dir, tmp_path / "ref", max_steps=4, ckpt_interval=0, stop_at=2), clean)
    records = read_log(tmp_path / "bad")
    assert records[3]["skipped"] == "nonfinite" and math.isnan(bad.losses[2])
    # the skipped step changed neither weights nor AdamW moments: state equals the clean run after step 2
    a, b = load_checkpoint(tmp_path / "bad"), load_checkpoint(tmp_path / "ref")
    for name in a.model:
        torch.testing.assert_close(a.model[name], b.model[name], rtol=0, atol=0)
    for pid, state in b.trainer["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(a.trainer["optimizer"]["state"][pid][key], value, rtol=0, atol=0)
    with pytest.raises(NonFiniteLossError, match="step 3.*nonfinite=raise"):
        train(config(data_dir, tmp_path / "raise", max_steps=4, nonfinite="raise"), poisoned)


def test_guard_skips_spikes(data_dir, tmp_path):
    spiky = lambda name, precision, **kw: build_toy(name, precision, poison_steps={4}, poison=10.0, **kw)
    result = train(config(data_dir, tmp_path / "s", max_steps=5, spike_factor=3.0), spiky)
    assert [r.get("skipped") for r in read_log(tmp_path / "s")[1:]] == [None, None, None, "spike", None]
    assert math.isnan(result.losses[3]) and all(math.isfinite(x) for x in result.losses[4:])
    # without the guard the spike is an ordinary (finite) step
    assert "skipped" not in json.dumps(read_log(train(config(data_dir, tmp_path / "n", max_steps=5), spiky).run_dir))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = ToyLM(50)
    save_checkpoint(tmp_path, 1, model.state_dict(), {"optimizer": {}}, {"config": {}})
    before = load_checkpoint(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, ToyLM(50).state_dict(), {"optimizer": {}}, {"config": {}})
    monkeypatch.undo()
    after = load_checkpoint(tmp_path)
    assert after.path == before.path and after.step == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    for name in before.model:
        torch.testing.assert_close(after.model[name], before.model[name], rtol=0, atol=0)


def test_checkpoint_keeps_newest(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, ToyLM(20).state_dict(), {"optimizer": {}}, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]


def test_corrupt_checkpoints_name_the_file(tmp_path):
    path = save_checkpoint(tmp_path, 5, ToyLM(20).state_dict(), {"optimizer": {}}, {})
    data = bytearray((path / MODEL_FILE).read_bytes())
    data[-3] ^= 0xFF
    (path / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path, 6, ToyLM(20).state_dict(), {"optimizer": {}}, {})
    with open(path / TRAINER_FILE, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"trainer\.pt: 10 bytes.*truncated"):
        load_checkpoint(tmp_path)
    (path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"state\.json: unreadable"):
        load_checkpoint(path)
    (tmp_path / "checkpoints" / "latest").write_text("step_999999\n")
    with pytest.raises(CheckpointError, match="step_999999"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        load_checkpoint(tmp_path / "empty")


def test_tied_weights_stored_once(tmp_path):
    model = ToyLM(20, n_embd=8)
    model.head.weight = model.wte.weight
    save_weights(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    assert loaded["head.weight"] is loaded["wte.weight"]
    check_state_dict(loaded, model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*missing 1 \(extra\)"):
        check_state_dict(loaded, {**model.state_dict(), "extra": torch.zeros(1)}, tmp_path / "w.safetensors")


def test_plot_overlays_runs(data_dir, tmp_path):
    for name in ("x", "y"):
        train(config(data_dir, tmp_path / name, max_steps=3, seed=len(name) + ord(name)), build_toy)
    out = plot_runs([tmp_path / "x", tmp_path / "y"], tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "no.png")
