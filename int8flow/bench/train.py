"""``python -m int8flow.bench train``: end-to-end training throughput and peak memory, BF16 vs our modes.

Each (model, mode) pair runs the real training loop (`int8flow.training.train`) for a fixed number of steps on
the same data, seed and batch; tokens/s is the median over the steps after the first ``warmup`` (compilation and
autotuning happen there). Writes ``bench/results/<gpu>_train.json``.

Models are compiled (``torch.compile``, mode ``--compile-mode``: default, reduce-overhead = CUDA graphs, or
max-autotune-no-cudagraphs) unless ``--no-compile``; each record says ``compile`` and ``compile_mode``.
Per-step tokens/s come from the training log, timed between the loop's once-per-step loss reads (no
synchronize per step, which would hide the CPU/GPU overlap CUDA graphs give).
Fallback modes (``int8+fallback``, ``jetfire+fallback``) also record ``fallback_rate_mean`` / ``fallback_rate_max``:
over the layers, the fraction of activation blocks quantized with the 16-bit fallback term in the last step, read
by the loop after that step's timing (its final evaluation) and taken from the log here; null in other modes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

from ..config import RECIPES
from ..training.config import COMPILE_MODES
from .common import compile_flags_error, device_info, parse_choices, require_cuda, result_path, write_json

MODELS = {"gpt2-124m": ["batch_size=16", "grad_accum=1"], "llama-1b": ["batch_size=4", "grad_accum=1", "parallel=none"]}
MODES = ("bf16", "int8", "int8+fallback", "int8-linear")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="JSON file (default bench/results/<gpu>_train.json, <gpu> from the device name)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; --cpu-smoke: 4)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps left out of the tokens/s median (default 10; --cpu-smoke: 1); must be < --steps")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled runs (reduce-overhead = CUDA graphs); recorded in each "
                        "record as compile_mode (null with --no-compile)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (checks the code path only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training setting for every run, after the model's defaults (repeatable), e.g. --set batch_size=16; "
                        "recorded in each record")


def compile_settings(compile: bool, compile_mode: str) -> list[str]:
    """--no-compile / --compile-mode as training settings; they come before --set, so a --set compile... wins."""
    return [f"compile={str(compile).lower()}", *([f"compile_mode={compile_mode}"] if compile else [])]


def run_one(preset: str, extra: list[str], mode: str, steps: int, warmup: int, compile: bool, device: str,
            compile_mode: str = "default") -> dict:
    from ..training import make_config, train
    from ..training.metrics import read_log

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = make_config(preset, overrides=[*compile_settings(compile, compile_mode), *extra, f"precision={mode}",
                                             f"max_steps={steps}", f"eval_interval={steps}", "eval_batches=1",
                                             "ckpt_interval=0", "keep_checkpoints=1", "progress=false",
                                             "tensorboard=false", f"device={device}", f"out_dir={out_dir}"])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = train(cfg)
        records = read_log(out_dir)
    log = [r for r in records if r.get("tokens_per_s") and r["step"] > warmup]
    last = next((r for r in reversed(records) if r["step"] == steps), {})  # the fallback rates of the last step
    if not log:
        raise RuntimeError(f"{preset}/{mode}: no timed steps (steps={steps} must exceed warmup={warmup})")
    return {"model": preset, "mode": mode, "steps": steps, "settings": list(extra),
            "compile": cfg.compile, "compile_mode": cfg.compile_mode if cfg.compile else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in log),
            "final_loss": result.losses[-1],
            "fallback_rate_mean": last.get("fallback_rate_mean"), "fallback_rate_max": last.get("fallback_rate_max"),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def main(args) -> int:
    device = "cpu" if args.cpu_smoke else "cuda"
    if compile_flags_error(args, "train"):
        return 2
    steps = args.steps if args.steps is not None else (4 if args.cpu_smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 10)
    if not 0 <= warmup < steps:
        print(f"int8flow.bench train: --steps {steps} --warmup {warmup}: tokens/s is the median of the steps after "
              "the warmup, so give 0 <= --warmup < --steps (e.g. --steps 14 --warmup 6)", file=sys.stderr)
        return 2
    if device == "cuda":
        require_cuda()
    models = {"tiny": []} if args.cpu_smoke else {m: MODELS[m] for m in parse_choices(args.models, MODELS, "--models")}
    from ..training import make_config

    for preset, extra in models.items():  # a bad --set fails here, in one line, before any model trains
        try:
            make_config(preset, overrides=[*compile_settings(not args.no_compile, args.compile_mode), *extra, *args.set])
        except ValueError as e:
            print(f"int8flow.bench train: --set: {e}", file=sys.stderr)
            return 2
    records = []
    info = device_info()
    out = args.out or result_path(info, "train")
    for preset, extra in models.items():
        extra = [*extra, *args.set]  # the command line's settings win (make_config applies overrides in order)
        for mode in parse_choices(args.modes, RECIPES, "--modes"):  # any recipe: int8-1x128, jetfire, ...
            r = run_one(preset, extra, mode, steps, warmup, not args.no_compile, device, args.compile_mode)
            records.append(r)
            base = {x["mode"]: x["tokens_per_s"] for x in records if x["model"] == preset}.get("bf16")
            for x in records:  # BF16 may come after the INT8 modes: every record of the model gets its ratio
                if x["model"] == preset:
                    x["speedup_vs_bf16"] = x["tokens_per_s"] / base if base else None
            print(f"{preset:10s} {mode:14s} {r['tokens_per_s']:12,.0f} tok/s"
                  + (f"  {r['speedup_vs_bf16']:.2f}x" if base else "")
                  + (f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "")
                  + (f"  fallback {r['fallback_rate_mean']:.2%} mean, {r['fallback_rate_max']:.2%} max"
                     if r["fallback_rate_mean"] is not None else ""), flush=True)
            # written after every run: a long compile that hits a time limit keeps the records before it
            write_json(out, records, info)
            if device == "cuda":
                torch.cuda.empty_cache()
    return 0
