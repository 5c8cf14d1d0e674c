"""Run logs: one JSON object per step in ``log.jsonl`` (TensorBoard too when importable) and loss plots.

Records: ``{"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens", "time_s"}`` per optimizer
step, plus ``"val_loss"``/``"val_ppl"`` when evaluated, ``"skipped"`` (the reason) when the guard
dropped the step, ``"fallback"`` when it was recomputed in high precision and ``"fault"`` (where the
NaN/Inf was found) with either. Step 0 holds the validation loss of the initial model.

In ``int8+fallback`` / ``jetfire+fallback`` runs the evaluated records (every ``eval_interval`` steps and the
last step) also hold ``"fallback_rate"`` (``{module name: rate}``), ``"fallback_rate_mean"`` and
``"fallback_rate_max"``: per layer, the fraction of activation blocks quantized with the 16-bit fallback term
in the step's last forward (`fallback_rates`). Runs without fallback have none of these keys.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..config import Int8TrainingConfig
from .parallelize import DistInfo, all_reduce_mean, unwrap

__all__ = ["MetricsLog", "read_log", "plot_runs", "run_label", "fallback_rate_buffers", "fallback_rates",
           "fallback_summary"]

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


def _fallback_config(module: nn.Module) -> Int8TrainingConfig | None:
    """The INT8 config a module runs under: an INT8 data-flow block's ``int8_flow`` or an ``Int8Linear``'s
    ``config`` (None for any other module)."""
    for attr in ("int8_flow", "config"):
        cfg = getattr(module, attr, None)
        if isinstance(cfg, Int8TrainingConfig):
            return cfg
    return None


def fallback_rate_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> its ``fallback_rate`` buffer (a 0-d float32 tensor on the model's device), for the modules
    that write one: every module under an INT8 data-flow block or ``Int8Linear`` whose config uses fallback
    (``int8+fallback``, ``jetfire+fallback``). The models register the buffer in every precision (it stays 0 where
    fallback is off), so the config, not the buffer, decides. Names as in the unwrapped model's
    ``named_modules`` (torch.compile and FSDP2 work in place; a DDP wrapper is looked through). Empty for a model
    without fallback."""
    found: dict[str, torch.Tensor] = {}
    for name, module in unwrap(model).named_modules():
        cfg = _fallback_config(module)
        if cfg is None or not cfg.uses_fallback:
            continue
        for sub_name, sub in module.named_modules(prefix=name):
            buf = sub._buffers.get("fallback_rate")
            if buf is not None:
                found[sub_name] = buf
    return found


def fallback_rates(model: nn.Module, info: DistInfo | None = None) -> dict[str, float]:
    """Per-layer fallback rate of the last forward: module name -> fraction in [0, 1] of its activation blocks
    quantized with the 16-bit fallback term (`fallback_rate_buffers`); ``{}`` for a model without fallback.

    The buffers are stacked on the device (a copy taken here, in eager code, outside any compiled graph; under CUDA
    graphs the replays update them in place with ``copy_``) and read in ONE ``.tolist()``: a host sync, so the
    training loop calls this only at its evaluation steps, never every step. Under ddp/fsdp2 (``info``
    distributed) the rates are averaged over the ranks, a collective: every rank must call it at the same step.
    """
    buffers = fallback_rate_buffers(model)
    if not buffers:
        return {}
    stacked = torch.stack([b.detach().float() for b in buffers.values()])
    if info is not None:
        stacked = all_reduce_mean(stacked, info)
    return dict(zip(buffers, stacked.tolist()))


def fallback_summary(rates: dict[str, float]) -> dict:
    """Log fields of per-layer rates (`fallback_rates`): ``fallback_rate`` (the dict), ``fallback_rate_mean`` (over
    layers) and ``fallback_rate_max``; ``{}`` when ``rates`` is empty."""
    if not rates:
        return {}
    return {"fallback_rate": dict(rates), "fallback_rate_mean": sum(rates.values()) / len(rates),
            "fallback_rate_max": max(rates.values())}


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
