"""``python -m int8flow.bench blocks``: forward + backward of transformer-block stacks, every precision mode.

Same shapes and method as the anchors (`shared/probes/peer_blocks.py`): a stack of pre-norm blocks without bias,
BF16 parameters and input, ``torch.compile`` on every mode, loss = mean(y^2), median of timed iterations after
warm-up. Besides time and peak memory, each record has ``saved_gib``: the bytes autograd keeps for backward,
counted with ``saved_tensors_hooks`` (device-independent, so the CPU can measure it too). Modes: ``bf16`` and our
``int8``, ``int8+fallback``, ``int8-linear``, plus torchao float8 ``tensorwise`` / ``rowwise`` when torchao is
importable (it is not a dependency).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from ..models.gpt2 import Block as GPTBlock, GPTConfig
from ..models.llama import DecoderLayer, LlamaConfig, rope_tables
from ..training.config import COMPILE_MODES
from .common import compile_flags_error, device_info, parse_choices, require_cuda, result_path, write_json

SHAPES = {
    # name: (model config, layers, batch, tokens)
    "gpt2-medium-like": (GPTConfig(n_embd=1024, n_head=16, bias=False), 4, 8, 1024),
    "llama-7b-like": (LlamaConfig(dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=2048), 2, 4, 2048),
}
TINY_SHAPES = {  # the CPU smoke test: same code, toy sizes
    "gpt2-tiny": (GPTConfig(n_embd=64, n_head=2, bias=False), 2, 2, 64),
    "llama-tiny": (LlamaConfig(dim=64, n_heads=2, n_kv_heads=2, ffn_dim=160, max_seq_len=64), 2, 2, 64),
}
OUR_MODES = ("bf16", "int8", "int8+fallback", "int8-linear")
# Any recipe of int8flow.config.RECIPES runs too, e.g. the 1x128 geometry: int8-1x128, int8+fallback-1x128.
GEOMETRY_MODES = ("int8-1x128", "int8+fallback-1x128", "int8-linear-1x128", "jetfire")
TORCHAO_MODES = ("float8-tensorwise", "float8-rowwise")


class BlockStack(nn.Module):
    """``layers`` blocks of a model file, run in ``precision`` exactly as the full model runs them."""

    def __init__(self, config, layers: int, precision: str):
        super().__init__()
        from ..config import as_config
        from ..nn import convert_to_int8_training

        cfg = as_config(precision)
        flow = cfg if cfg.uses_data_flow else None
        self.llama = isinstance(config, LlamaConfig)
        block = DecoderLayer if self.llama else GPTBlock
        self.blocks = nn.ModuleList([block(config, flow) for _ in range(layers)])
        if self.llama:
            cos, sin = rope_tables(config)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        if cfg.precision == "int8-linear":
            convert_to_int8_training(self.blocks, cfg)

    def forward(self, x):
        for b in self.blocks:
            x = b(x, self.cos[: x.shape[1]], self.sin[: x.shape[1]]) if self.llama else b(x)
        return x


def _build(config, layers: int, mode: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if mode in TORCHAO_MODES:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        model = BlockStack(config, layers, "bf16")
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(mode.split("-")[1]))
    else:
        model = BlockStack(config, layers, mode)
    return model.to(device=device, dtype=torch.bfloat16)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward, each storage once, parameters excluded
    (they exist whether or not autograd saves them; quantized copies of weights do count)."""
    seen = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().square().mean().backward()
    return total


def _time_step(step, device: str, iters: int) -> float:
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(shape: str, config, layers: int, batch: int, tokens: int, mode: str, device: str, iters: int,
            compile: bool, compile_mode: str = "default") -> dict:
    model = _build(config, layers, mode, device)
    dim = config.dim if isinstance(config, LlamaConfig) else config.n_embd
    x = torch.randn(batch, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_bytes(model, x)  # eager: hooks see what autograd keeps
    if device == "cuda":  # the kernels' persistent flag in ordinary memory, not a CUDA graph's pool
        from ..kernels import nonfinite

        nonfinite.device_flag(device)
    run = torch.compile(model, mode=compile_mode) if compile else model
    graphs = compile and compile_mode == "reduce-overhead"

    def step():
        if graphs:  # cudagraph trees: a new iteration, the previous replay's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        run(x).float().square().mean().backward()

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = _time_step(step, device, iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"shape": shape, "mode": mode, "ms": ms, "peak_gib": peak, "saved_gib": saved / 2**30,
            "layers": layers, "batch": batch, "tokens": tokens,
            "compile": compile, "compile_mode": compile_mode if compile else None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="JSON file (default bench/results/<gpu>_blocks.json)")
    p.add_argument("--modes", default=",".join(OUR_MODES + GEOMETRY_MODES[:2] + TORCHAO_MODES),
                   help="comma-separated modes: bf16, recipes of int8flow.config.RECIPES, torchao float8-*")
    p.add_argument("--shapes", default=None, help=f"comma-separated subset of {sorted(SHAPES)}")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="eager mode (the anchors compile everything)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode for every mode (reduce-overhead: CUDA graphs, cudagraph trees)")
    p.add_argument("--cpu-smoke", action="store_true", help="toy shapes on the CPU (checks the code path only)")


def main(args) -> int:
    device = "cpu" if args.cpu_smoke else "cuda"
    if compile_flags_error(args, "blocks"):
        return 2
    if args.iters < 1:
        print(f"int8flow.bench blocks: --iters {args.iters}: give at least 1 timed iteration", file=sys.stderr)
        return 2
    if device == "cuda":
        require_cuda()
    elif args.compile_mode == "reduce-overhead":
        print("int8flow.bench blocks: note: --compile-mode reduce-overhead uses CUDA graphs, which need CUDA; on the "
              "CPU the stacks are compiled without them")
    from ..config import RECIPES

    modes = parse_choices(args.modes, tuple(RECIPES) + TORCHAO_MODES, "--modes")
    table = TINY_SHAPES if args.cpu_smoke else SHAPES
    names = parse_choices(args.shapes, table, "--shapes") if args.shapes else list(table)
    records = []
    info = device_info()
    out = args.out or result_path(info, "blocks")
    for shape in names:
        config, layers, batch, tokens = table[shape]
        base = None
        for mode in modes:
            try:
                torch._dynamo.reset()
                r = measure(shape, config, layers, batch, tokens, mode, device, args.iters, not args.no_compile,
                            args.compile_mode)
            except ImportError as e:  # torchao missing: say so, keep going
                print(f"{shape:18s} {mode:18s} skipped: {e}")
                continue
            base = r["ms"] if mode == "bf16" else base
            r["speedup_vs_bf16"] = base / r["ms"] if base else None
            records.append(r)
            sp = f"{r['speedup_vs_bf16']:.2f}x" if r["speedup_vs_bf16"] else "-"
            print(f"{shape:18s} {mode:18s} {r['ms']:9.2f} ms  {sp:>6s}  saved {r['saved_gib']:.3f} GiB"
                  + (f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""), flush=True)
            write_json(out, records, info)  # after every mode: a run cut by a time limit keeps what it measured
            if device == "cuda":
                torch.cuda.empty_cache()
    write_json(out, records, info)
    return 0
