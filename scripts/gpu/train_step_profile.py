"""GPU probe for issue 13: one whole training step (forward, backward, clip, fused AdamW) of a model preset, per
mode, under a torch.compile mode and scope, against BF16: where the step's time goes once CUDA graphs remove the
host.

    python scripts/gpu/train_step_profile.py [--model llama-1b] [--modes bf16,int8] [--batch 4] [--seq 1024]
        [--compile-mode reduce-overhead] [--compile-scope model|blocks|none] [--steps 6] [--out DIR]

The step mirrors `int8flow.training.loop` (float32 parameters and AdamW state, bf16 autocast, grad clip 1.0,
`torch.compiler.cudagraph_mark_step_begin()` before each forward under reduce-overhead, the kernels' non-finite
flag allocated before compilation) on a fixed random batch, without data loading, logging or checkpoints. Per
mode: the seconds until the first steps are done (compilation, CUDA-graph warmup and recording), the median of
``--steps`` timed steps (CUDA events around the step; host ms = the Python time to issue it), tokens/s, then one
step under ``torch.profiler``: GPU busy (sum of kernel times), kernel launches, host syncs and the 15 kernels
with the most GPU time. Prints a table last; writes ``train_step_profile.json`` and the key-averages tables
under --out. ``--device cpu`` runs the same code on a tiny preset (checks the script, times nothing useful).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from int8flow.models import MODEL_PRESETS, build_model  # noqa: E402
from int8flow.training.config import COMPILE_MODES, COMPILE_SCOPES  # noqa: E402
from int8flow.training.parallelize import DistInfo, parallelize  # noqa: E402

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _vocab(model) -> int:
    return model.config.vocab_size


def run(a, mode: str) -> dict:
    cuda = a.device == "cuda"
    torch.manual_seed(0)
    model = build_model(a.model, mode).to(a.device)
    if cuda:
        from int8flow.kernels import nonfinite

        nonfinite.device_flag(a.device)  # outside any CUDA graph's pool, as the training loop does
    compile = a.compile_scope != "none"
    graphs = compile and a.compile_mode == "reduce-overhead"
    info = DistInfo(0, 1, 0, torch.device(a.device))  # the training loop's compile step, without a process group
    model = parallelize(model, "none", info, compile, a.compile_mode, a.compile_scope if compile else "model")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    g = torch.Generator(device=a.device).manual_seed(1)
    idx = torch.randint(0, _vocab(model), (a.batch, a.seq + 1), generator=g, device=a.device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=cuda):
            _, loss = model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone(), norm

    t0 = time.perf_counter()
    for _ in range(3):
        loss, _ = step()
    float(loss)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        if cuda:
            ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            h0 = time.perf_counter()
            ev[0].record()
            loss, _ = step()
            ev[1].record()
            host = (time.perf_counter() - h0) * 1e3
            torch.cuda.synchronize()
            times.append((ev[0].elapsed_time(ev[1]), host))
        else:
            h0 = time.perf_counter()
            loss, _ = step()
            float(loss)
            ms = (time.perf_counter() - h0) * 1e3
            times.append((ms, ms))
    ms = statistics.median(t for t, _ in times)
    host_ms = statistics.median(h for _, h in times)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    tag = f"{a.model}_{mode}".replace("+", "p")
    with open(os.path.join(a.out, f"train_step_{tag}.txt"), "w") as f:
        f.write(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=80))
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    rec = {"model": a.model, "mode": mode, "batch": a.batch, "seq": a.seq, "compile_mode": a.compile_mode,
           "compile_scope": a.compile_scope, "first_steps_s": first_s, "ms": ms, "host_ms": host_ms,
           "tokens_per_s": a.batch * a.seq / (ms / 1e3), "gpu_busy_ms": gpu_ms,
           "launches": sum(e.count for e in kernels), "syncs": sum(e.count for e in events if e.key in SYNC_NAMES),
           "final_loss": float(loss),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "top_kernels": [(e.key[:90], e.count, e.self_device_time_total / 1e3) for e in top]}
    return rec


def _release(device: str) -> None:
    """After a mode's frame is gone: compiled code, cudagraph pools and cached blocks freed, peak memory reset."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b", choices=sorted(MODEL_PRESETS))
    p.add_argument("--modes", default="bf16,int8")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--compile-mode", default="reduce-overhead", choices=COMPILE_MODES)
    p.add_argument("--compile-scope", default="model", choices=(*COMPILE_SCOPES, "none"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    recs = []
    path = os.path.join(a.out, "train_step_profile.json")
    for mode in a.modes.split(","):
        try:
            recs.append(run(a, mode))
        except Exception as e:  # a probe: report and go on with the next mode
            print(f"{mode}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        finally:
            _release(a.device)
        r = recs[-1]
        print(f"\n== {a.model} {mode}: step {r['ms']:.2f} ms ({r['tokens_per_s']:,.0f} tok/s), gpu busy "
              f"{r['gpu_busy_ms']:.2f} ms, host {r['host_ms']:.2f} ms, {r['launches']} launches, {r['syncs']} syncs, "
              f"first 3 steps {r['first_steps_s']:.1f} s", flush=True)
        for k, n, t in r["top_kernels"]:
            print(f"   {t:8.3f} ms  x{n:<4d} {k}")
        with open(path, "w") as f:  # after every mode: a cut run keeps what it measured
            json.dump({"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                       "torch": torch.__version__, "records": recs}, f, indent=1)
    base = next((r["ms"] for r in recs if r["mode"] == "bf16"), None)
    print(f"\n{a.model}, {a.batch}x{a.seq} tokens, compile {a.compile_mode} / {a.compile_scope}")
    print("mode              step ms  vs bf16   gpu ms  host ms  launches  first s  peak GiB")
    for r in recs:
        peak = f"{r['peak_gib']:8.2f}" if r["peak_gib"] is not None else "       -"
        sp = f"{base / r['ms']:6.2f}x" if base else "      -"
        print(f"{r['mode']:16s} {r['ms']:8.2f}  {sp} {r['gpu_busy_ms']:8.2f} {r['host_ms']:8.2f} {r['launches']:9d}"
              f" {r['first_steps_s']:8.1f} {peak}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
