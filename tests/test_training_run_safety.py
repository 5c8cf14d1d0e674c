"""Nothing a user made is lost (issue 15, items 1-5 and 14): a re-run refuses to overwrite a run, a failing
run changes nothing on disk, SIGINT/SIGTERM stop after a step with a checkpoint, a corrupt latest checkpoint
names the newest intact one (and resume_from= uses it), resuming a finished run says so; plot legends name
the precision; output to a file has no progress bar."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _training_fixtures import TINY_INT8, prepared_tokens
from int8flow.cli import main
from int8flow.training import CheckpointError, TrainConfig, load_checkpoint, read_log, train
from int8flow.training.loop import RunExistsError
from int8flow.training.metrics import run_label

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("TRITON_INTERPRET", None)
ENV.pop("INT8FLOW_TEST_KILL_AT", None)

# bf16 gpt-tiny with 1 layer: hundredths of a second a step
FAST = {**TINY_INT8, "precision": "bf16", "model_args": {"n_layer": 1}, "max_steps": 4, "ckpt_interval": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_tokens(tmp_path_factory, docs=2, chars=30_000, vocab_size=300)


def cfg(data_dir, out, **kw) -> TrainConfig:
    return TrainConfig(**{**FAST, "data": str(data_dir), "out_dir": str(out), **kw})


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def args(data_dir, out, **kw):
    settings = {**FAST, "data": str(data_dir), "out_dir": str(out), **kw}
    items = [f"{k}={v}" for k, v in settings.items() if k != "model_args"]
    return items + [f"model.{k}={v}" for k, v in settings["model_args"].items()]


def test_rerun_of_a_run_refuses_and_changes_nothing(data_dir, tmp_path, capsys, monkeypatch):
    """Item 1: a second `train` into the same run folder stops, naming resume=true, a new name and overwrite."""
    run = tmp_path / "run"
    train(cfg(data_dir, run))
    before = snapshot(run)
    assert main(["train", *args(data_dir, run, max_steps=2)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "already holds a run" in err and "resume=true" in err and "overwrite=true" in err and "out_dir=" in err
    assert snapshot(run) == before
    # a run placed by name (runs/<name>): the message suggests name=
    monkeypatch.chdir(tmp_path)
    named = dict(FAST, data=str(data_dir), name="named", max_steps=2)
    train(TrainConfig(**named))
    with pytest.raises(RunExistsError, match="runs/named already holds a run.*name=<new name>"):
        train(TrainConfig(**named))
    # overwrite=true replaces the run: a fresh log of the new length, old checkpoints gone
    train(cfg(data_dir, run, max_steps=2, overwrite=True))
    assert [r["step"] for r in read_log(run)] == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000002"]


def test_failed_run_writes_nothing(data_dir, tmp_path, capsys):
    """Item 2: a bad model= (or model.*) stops before the run folder is made or touched; a run's tokenizer never
    changes under its checkpoints."""
    fresh = tmp_path / "fresh"
    assert main(["train", *args(data_dir, fresh, model="gpt-nope")]) == 2
    assert "unknown model preset 'gpt-nope'" in capsys.readouterr().err
    assert not fresh.exists()
    assert main(["train", *args(data_dir, fresh), "model.n_embd=97"]) == 2  # not divisible by n_head
    assert "n_embd" in capsys.readouterr().err and not fresh.exists()

    run = tmp_path / "run"
    train(cfg(data_dir, run))
    before = snapshot(run)
    assert main(["train", *args(data_dir, run, model="gpt-nope", resume="true")]) == 2
    assert main(["train", *args(data_dir, run, model="gpt-nope", overwrite="true")]) == 2
    capsys.readouterr()
    # another corpus (another tokenizer) under the run's checkpoints: refused, tokenizer.json unchanged
    other = tmp_path / "other.txt"
    other.write_text("a different corpus entirely. " * 400)
    assert main(["train", *args(data_dir, run, data=str(other), max_steps=6, resume="true")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "differs" in err
    assert snapshot(run) == before
    assert not (tmp_path / "nope").exists()


def _wait_for(path, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_after_the_step_with_a_checkpoint(data_dir, tmp_path, sig):
    """Item 3: Ctrl-C / SIGTERM finish the running step, write its checkpoint, print how to continue, exit
    128+signal without a traceback; resume=true then continues to the same losses as an uninterrupted run."""
    run = tmp_path / "run"
    long = dict(max_steps=400, ckpt_interval=0, eval_interval=1000)
    proc = subprocess.Popen([sys.executable, "-m", "int8flow.train", *args(data_dir, run, **long)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    log = run / "log.jsonl"
    _wait_for(log)
    t0 = time.time()
    while len(log.read_text().splitlines()) < 4:  # step 0 (eval) + 3 steps
        assert time.time() - t0 < 120
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    stopped = [line for line in out.splitlines() if "stopped at step" in line]
    assert stopped, out
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert "continue with resume=true" in stopped[0]
    assert 3 <= step < 400
    assert load_checkpoint(run).step == step, "the step that was running when the signal came is saved"
    assert max(r["step"] for r in read_log(run)) == step
    # nothing lost: resuming to step+2 gives the losses of an uninterrupted run
    end = step + 2
    rest = train(cfg(data_dir, run, **{**long, "max_steps": 400, "stop_at": end, "resume": True}))
    ref = train(cfg(data_dir, tmp_path / "ref", **{**long, "max_steps": 400, "stop_at": end}))
    assert rest.losses == ref.losses[step:]


def test_corrupt_latest_names_the_newest_intact_checkpoint(data_dir, tmp_path, capsys):
    """Item 4: a damaged latest checkpoint: sample, export and resume name the newest intact one and how to use
    it; resume_from=<step> continues from it."""
    run = tmp_path / "run"
    train(cfg(data_dir, run, max_steps=4, ckpt_interval=2, keep_checkpoints=3))
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"newest intact checkpoint is .*step_000002 \(step 2\).*resume_from=2"):
        load_checkpoint(run)
    for argv in (["sample", str(run), "--tokens", "4"],
                 ["export", str(run), "--format", "nanogpt", "--out", str(tmp_path / "x.safetensors")],
                 ["train", *args(data_dir, run, max_steps=6, resume="true")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "step_000002" in err and "resume_from=2" in err and len(err.strip().splitlines()) == 1, err
    # resume_from=2 continues from the intact checkpoint and rewrites the damaged step
    result = train(cfg(data_dir, run, max_steps=4, ckpt_interval=2, keep_checkpoints=3, resume_from="2"))
    assert result.steps == 4 and load_checkpoint(run).step == 4
    ref = train(cfg(data_dir, tmp_path / "ref", max_steps=4, ckpt_interval=2))
    assert result.losses == ref.losses[2:]
    with pytest.raises(FileNotFoundError, match="resume_from=7.*step_000002"):
        train(cfg(data_dir, run, max_steps=8, resume_from="7"))
    # a checkpoint folder given directly works for sample too
    assert main(["sample", str(run / "checkpoints" / "step_000002"), "--tokens", "4"]) == 0


def test_resume_of_a_finished_run_says_it_is_complete(data_dir, tmp_path, capsys):
    """Item 5."""
    run = tmp_path / "run"
    train(cfg(data_dir, run))
    before = snapshot(run)
    capsys.readouterr()
    result = train(cfg(data_dir, run, resume=True))
    out = capsys.readouterr().out
    assert "run complete at step 4; raise max_steps to continue" in out
    assert "None" not in out and "0 steps" not in out
    assert result.steps == 4 and result.checkpoint.name == "step_000004"
    assert snapshot(run) == before
    assert main(["train", *args(data_dir, run, resume="true")]) == 0


def test_plot_legend_names_the_precision(data_dir, tmp_path):
    """Item 14: legends read 'name (precision)'."""
    run = tmp_path / "run"
    train(cfg(data_dir, run, max_steps=2, precision="int8"))
    assert run_label(run) == "run (int8)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from int8flow.training import plot_runs
    captured = {}
    original = plt.Figure.savefig

    def spy(fig, *a, **k):
        captured["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return original(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        plot_runs([run], tmp_path / "p.png")
    finally:
        plt.Figure.savefig = original
    assert captured["labels"] == ["run (int8) train", "run (int8) val"]


def test_output_to_a_file_has_no_progress_bar(data_dir, tmp_path, capsys):
    """Item 14: not a terminal -> plain lines, no '\\r' bar; the state of each evaluation is printed."""
    train(cfg(data_dir, tmp_path / "run", progress=True, eval_interval=2))
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("int8flow: step ")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"] and all(" val " in line for line in lines)


def test_state_json_records_the_new_settings(data_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg(data_dir, run, max_steps=2))
    state = json.loads((run / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["config"]["overwrite"] is False and state["config"]["resume_from"] == ""
