"""``python -m int8flow.bench accuracy``: pretrain from scratch in each mode, compare final validation loss.

Protocol: for each model, BF16 first; its measured tokens/s sets the token budget (``--minutes`` of BF16
training), then every other mode trains on the same data, seed, batch order and number of steps. Runs live in
``--runs`` (one folder per model/mode, with JSONL logs and checkpoints), finished records are appended to the JSON
as they complete and skipped on the next call, so the whole table can be built over several calls. The loss curves
of each model are overlaid in ``bench/results/h100_accuracy_<model>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .common import device_info, require_cuda, write_json

MODELS = {"gpt2-124m": [], "llama-60m": []}
MODES = ("bf16", "int8", "int8+fallback")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench/results/h100_accuracy.json")
    p.add_argument("--runs", default="runs/accuracy", help="folder of the training runs")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--minutes", type=float, default=10.0, help="BF16 wall-clock budget that fixes the token budget")
    p.add_argument("--steps", type=int, default=0, help="fix the step count instead of deriving it from --minutes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra training overrides (data=...)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models, a few steps, on the CPU")


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["records"] if path.is_file() else []


def _steps_for_budget(preset: str, extra: list[str], minutes: float) -> int:
    """BF16 tokens/s on a short probe -> the number of steps BF16 covers in ``minutes``."""
    from ..training import make_config
    from .train import run_one

    probe = run_one(preset, extra, "bf16", steps=30, warmup=10, compile=True, device="cuda")
    cfg = make_config(preset, overrides=extra)
    return max(1, int(minutes * 60 * probe["tokens_per_s"] / (cfg.batch_size * cfg.grad_accum * cfg.seq_len)))


def main(args) -> int:
    from ..training import make_config, plot_runs, train

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda":
        require_cuda()
    models = {"tiny": ["max_steps=4"]} if args.cpu_smoke else {m: MODELS[m] for m in args.models.split(",") if m}
    modes = [m for m in args.modes.split(",") if m]
    if modes[0] != "bf16":
        raise SystemExit("--modes must start with bf16: the other modes are compared with it")
    out, runs = Path(args.out), Path(args.runs)
    records = _load(out)
    info = device_info() if device == "cuda" else {"device": "cpu (smoke)"}
    for preset, extra in models.items():
        extra = [*extra, *args.set, f"device={device}", "progress=false"]
        steps = args.steps or (4 if args.cpu_smoke else _steps_for_budget(preset, extra, args.minutes))
        done = {r["mode"]: r for r in records if r["model"] == preset and r["steps"] == steps}
        for mode in modes:
            if mode in done:
                print(f"{preset} {mode}: done earlier, val loss {done[mode]['final_val_loss']:.4f}")
                continue
            run_dir = runs / f"{preset}-{mode.replace('+', '-')}"
            cfg = make_config(preset, overrides=[*extra, f"precision={mode}", f"max_steps={steps}",
                                                 f"out_dir={run_dir}", f"resume={str(run_dir.exists()).lower()}"])
            result = train(cfg)
            tokens = steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len
            base = done.get("bf16", {}).get("final_val_loss", result.val_loss if mode == "bf16" else math.nan)
            rec = {"model": preset, "mode": mode, "steps": steps, "tokens": tokens,
                   "final_val_loss": result.val_loss, "rel_gap_vs_bf16": (result.val_loss - base) / base,
                   "run_dir": str(run_dir)}
            done[mode] = rec
            records.append(rec)
            write_json(str(out), [{k: v for k, v in r.items() if k not in info} for r in records], info)
            print(f"{preset} {mode}: val loss {result.val_loss:.4f} ({100 * rec['rel_gap_vs_bf16']:+.2f}% vs bf16)",
                  flush=True)
        plot_runs([done[m]["run_dir"] for m in modes if m in done], out.with_name(f"{out.stem}_{preset}.png"),
                  labels=[m for m in modes if m in done])
    return 0
