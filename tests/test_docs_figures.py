"""Figures in README.md and docs/training.md that can drift (issue 15, item 13): each is produced by a command
the docs name; this checks that the copies agree with each other and recomputes the ones that are cheap to
recompute (parameter count, tokens per step, the initial model's validation loss)."""
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TRAINING = (ROOT / "docs" / "training.md").read_text()


def _val_table() -> dict[str, dict[int, float]]:
    """docs/training.md's `| step | 0 | 100 | ...` table -> {'bf16': {step: val}, 'int8': {...}}."""
    lines = [line for line in TRAINING.splitlines() if line.startswith("| step |") or " val loss |" in line]
    steps = [int(c) for c in lines[0].strip("|").split("|")[1:]]
    table = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0].split()[0]] = dict(zip(steps, map(float, cells[1:])))
    return table


def _cpu_seconds(label: str) -> float:
    """'<label> ... (N min M s of CPU time)' in docs/training.md's measurement paragraph."""
    m = re.search(re.escape(label) + r".*?(\d+) min (\d+) s\s+of\s+CPU\s+time", TRAINING, re.S)
    assert m, f"no CPU time for {label} in docs/training.md"
    return 60 * int(m.group(1)) + int(m.group(2))


def test_readme_and_training_doc_state_the_same_run():
    table = _val_table()
    assert set(table) == {"bf16", "int8"}
    last = max(table["bf16"])
    m = re.search(r"\(val loss (\d\.\d{4}) vs (\d\.\d{4})\)", README)
    assert m, "README states the INT8 vs bf16 val loss as '(val loss X vs Y)'"
    assert (float(m.group(1)), float(m.group(2))) == (table["int8"][last], table["bf16"][last])
    m = re.search(r"final val loss (\d\.\d{2}) \(perplexity ~(\d+)\) at step (\d+)", README)
    assert m and int(m.group(3)) == last
    assert float(m.group(1)) == round(table["bf16"][last], 2)
    assert int(m.group(2)) == round(math.exp(table["bf16"][last]))
    assert f"final val loss {table['bf16'][last]:.4f}" in TRAINING  # the printed output shown
    # the INT8 cost: README's ratio is the ratio of the CPU times measured in docs/training.md
    m = re.search(r"~(\d\.\d)x the CPU time", README)
    assert m, "README states INT8's cost as '~N.Nx the CPU time'"
    ratio = _cpu_seconds("precision=int8") / _cpu_seconds("bf16 run")
    assert float(m.group(1)) == round(ratio, 1), ratio


def test_default_run_header_figures():
    """'gpt-tiny (0.66M params, bf16) ... 2048 tokens/step' as the default run prints it."""
    from int8flow.models import MODEL_PRESETS, build_model
    from int8flow.training import make_config
    from int8flow.training.loop import model_kwargs

    cfg = make_config()
    model = build_model(cfg.model, precision=cfg.precision, **model_kwargs(cfg, cfg.vocab_size, MODEL_PRESETS))
    params = sum(p.numel() for p in model.parameters())
    assert f"gpt-tiny ({params / 1e6:.2f}M params, bf16)" in TRAINING
    assert f"{cfg.seq_len * cfg.batch_size * cfg.grad_accum} tokens/step, steps 0..{cfg.max_steps}" in TRAINING


@pytest.mark.slow
def test_initial_val_loss_matches_the_table(tmp_path):
    """Step 0 of the table (the initial model on the val windows, both precisions) recomputed with the default
    settings: prepare the embedded corpus (~10 s), evaluate, no training step kept. Within 5e-4: the last digit
    may differ on another CPU model (docs/training.md, 'Reproducibility')."""
    from int8flow.training import make_config, read_log, train

    table = _val_table()
    for precision in ("bf16", "int8"):
        cfg = make_config(None, None, [f"out_dir={tmp_path / precision}", f"precision={precision}", "max_steps=1",
                                       "warmup_steps=1", "progress=false", "tensorboard=false", "ckpt_interval=0",
                                       f"data_dir={tmp_path / 'data'}"])
        train(cfg)
        val0 = read_log(tmp_path / precision)[0]["val_loss"]
        assert abs(val0 - table[precision][0]) <= 5e-4, (precision, val0, table[precision][0])
