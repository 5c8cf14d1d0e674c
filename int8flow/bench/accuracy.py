"""``python -m int8flow.bench accuracy``: pretrain from scratch in each mode, compare final validation loss.

Protocol: for each model, BF16 first; its measured tokens/s sets the token budget (``--minutes`` of BF16
training), then every other mode trains on the same data, seed, batch order and number of steps. Runs live in
``--runs`` (one folder per model/mode, with JSONL logs and checkpoints), finished records are appended to the JSON
as they complete and skipped on the next call, so the whole table can be built over several calls. The loss curves
of each model are overlaid in ``bench/results/<gpu>_accuracy_<model>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..config import RECIPES
from .common import device_info, parse_choices, require_cuda, result_path, write_json

# name -> (run preset, overrides)
MODELS = {"gpt2-124m": ("gpt2-124m", []), "llama-60m": ("llama-60m", [])}
CPU_MODELS = {"gpt-tiny": ("tiny", []), "llama-tiny": ("tiny", ["model=llama-tiny", "name=tiny-llama"])}
MODES = ("bf16", "int8", "int8+fallback")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="JSON file (default bench/results/<gpu>_accuracy.json, <gpu> from the device name)")
    p.add_argument("--runs", default="runs/accuracy", help="folder of the training runs")
    p.add_argument("--models", default="", help=f"comma-separated; default: all of {list(MODELS)} "
                   f"(with --cpu: {list(CPU_MODELS)})")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--minutes", type=float, default=10.0, help="BF16 wall-clock budget that fixes the token budget")
    p.add_argument("--steps", type=int, default=0, help="fix the step count instead of deriving it from --minutes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra training overrides (data=...)")
    p.add_argument("--cpu", action="store_true", help="the tiny models on the CPU (needs --steps)")
    p.add_argument("--cpu-smoke", action="store_true", help="--cpu with 4 steps: checks the code path only")


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

    cpu = args.cpu or args.cpu_smoke
    device = "cpu" if cpu else "cuda"
    if cpu and not (args.steps or args.cpu_smoke):
        raise SystemExit("--cpu needs --steps N (there is no BF16 GPU run to derive a budget from)")
    if not cpu:
        require_cuda()
    table = CPU_MODELS if cpu else MODELS
    names = parse_choices(args.models, table, "--models") or list(table)
    modes = parse_choices(args.modes, RECIPES, "--modes")
    if modes[0] != "bf16":
        raise SystemExit("--modes must start with bf16: the other modes are compared with it")
    info = device_info()
    out, runs = Path(args.out or result_path(info, "accuracy")), Path(args.runs)
    records = _load(out)
    for name in names:
        preset, extra = table[name]
        extra = [*extra, *args.set, f"device={device}", "progress=false"]
        steps = 4 if args.cpu_smoke else args.steps or _steps_for_budget(preset, extra, args.minutes)
        done = {r["mode"]: r for r in records if r["model"] == name and r["steps"] == steps}
        for mode in modes:
            if mode in done:
                print(f"{name} {mode}: done earlier, val loss {done[mode]['final_val_loss']:.4f}")
                continue
            run_dir = runs / f"{name}-{mode.replace('+', '-')}"
            cfg = make_config(preset, overrides=[*extra, f"precision={mode}", f"max_steps={steps}",
                                                 f"out_dir={run_dir}", f"resume={str(run_dir.exists()).lower()}"])
            result = train(cfg)
            tokens = steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len
            base = done.get("bf16", {}).get("final_val_loss", result.val_loss if mode == "bf16" else math.nan)
            rec = {"model": name, "mode": mode, "steps": steps, "tokens": tokens,
                   "final_val_loss": result.val_loss, "rel_gap_vs_bf16": (result.val_loss - base) / base,
                   "run_dir": str(run_dir)}
            done[mode] = rec
            records.append(rec)
            write_json(str(out), [{k: v for k, v in r.items() if k not in info} for r in records], info)
            print(f"{name} {mode}: val loss {result.val_loss:.4f} ({100 * rec['rel_gap_vs_bf16']:+.2f}% vs bf16)",
                  flush=True)
        plot_runs([done[m]["run_dir"] for m in modes if m in done], out.with_name(f"{out.stem}_{name}.png"),
                  labels=[m for m in modes if m in done])
    return 0
