"""Run logs: one JSON object per step in ``log.jsonl`` (TensorBoard too when importable) and loss plots.

Records: ``{"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens", "time_s"}`` per optimizer
step, plus ``"val_loss"``/``"val_ppl"`` when evaluated, ``"skipped"`` (the reason) when the guard
dropped the step, ``"fallback"`` when it was recomputed in high precision and ``"fault"`` (where the
NaN/Inf was found) with either. Step 0 holds the validation loss of the initial model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["MetricsLog", "read_log", "plot_runs", "run_label"]

LOG_FILE = "log.jsonl"


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run folder (no {LOG_FILE})")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno}: not a JSON object") from None
    return records


class MetricsLog:
    """Appends records to ``log.jsonl``; on resume, drops records past the resumed step first."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / LOG_FILE
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [r for r in read_log(run_dir) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # optional: TensorBoard is not installed
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _smooth(values: list[float], weight: float) -> list[float]:
    out, ema = [], None
    for v in values:
        if math.isfinite(v):
            ema = v if ema is None else weight * ema + (1 - weight) * v
        out.append(ema if ema is not None else float("nan"))
    return out


def run_label(run_dir: str | Path) -> str:
    """``name (precision)`` of a run, the precision read from its newest checkpoint's state.json."""
    run_dir = Path(run_dir)
    name = run_dir.resolve().name
    for state in sorted(run_dir.glob("checkpoints/step_*/state.json"), reverse=True):
        try:
            precision = json.loads(state.read_text())["config"]["precision"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return f"{name} ({precision})"
    return name


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None,
              smooth: float = 0.9) -> Path:
    """Overlay train (EMA-smoothed) and val losses of runs against optimizer steps; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("plot needs at least one run folder")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, run_dir in enumerate(run_dirs):
        records = read_log(run_dir)
        label = labels[i] if labels else run_label(run_dir)
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        (line,) = ax.plot([r["step"] for r in train], _smooth([r["loss"] for r in train], smooth),
                          label=f"{label} train", linewidth=1.2)
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=line.get_color(),
                    label=f"{label} val", markersize=4, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
