"""GPU probe for issue 13: where the time of an INT8 block step goes (eager), against BF16.

    python scripts/gpu/block_profile.py [--out DIR] [--shape llama-7b-like] [--modes bf16,int8-1x128,int8]
                                        [--layers 1]

For each mode: the block stack of ``int8flow.bench.blocks`` (same shapes), eager, forward + backward; median of
5 timed steps (CUDA events), then one step under ``torch.profiler``. Prints per mode: step ms, GPU busy ms (sum of
kernel times), host ms, kernel launches, host syncs (cudaStreamSynchronize / cudaDeviceSynchronize / DtoH
copies), and the 15 kernels with the most GPU time; writes the full key-averages table and a Chrome trace under
--out. About 20 s per mode on an H200.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from int8flow.bench.blocks import SHAPES, _build  # noqa: E402
from int8flow.models.llama import LlamaConfig  # noqa: E402

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def run(mode: str, shape: str, layers: int, out: str) -> dict:
    config, _, batch, tokens = SHAPES[shape]
    model = _build(config, layers, mode, "cuda")
    dim = config.dim if isinstance(config, LlamaConfig) else config.n_embd
    x = torch.randn(batch, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        model(x).float().square().mean().backward()

    t0 = time.time()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        a.record()
        step()
        b.record()
        host = (time.perf_counter() - h0) * 1e3
        torch.cuda.synchronize()
        times.append((a.elapsed_time(b), host))
    times.sort()
    ms, host_ms = times[len(times) // 2]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    syncs = sum(e.count for e in events if e.key in SYNC_NAMES)
    dtoh = sum(e.count for e in events if "DtoH" in e.key)
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    tag = f"{shape}_{mode}".replace("+", "p")
    with open(os.path.join(out, f"profile_{tag}.txt"), "w") as f:
        f.write(events.table(sort_by="self_cuda_time_total", row_limit=80))
        f.write("\n\nCPU\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=60))
    prof.export_chrome_trace(os.path.join(out, f"trace_{tag}.json"))
    cpu_top = sorted([e for e in events if e.device_type == torch.autograd.DeviceType.CPU],
                     key=lambda e: -e.self_cpu_time_total)[:12]
    rec = {"mode": mode, "shape": shape, "layers": layers, "ms": ms, "host_ms": host_ms, "gpu_busy_ms": gpu_us / 1e3,
           "launches": launches, "syncs": syncs, "dtoh": dtoh, "warmup_s": warm_s,
           "top_kernels": [(e.key[:90], e.count, e.self_device_time_total / 1e3) for e in top],
           "top_cpu": [(e.key[:90], e.count, e.self_cpu_time_total / 1e3) for e in cpu_top]}
    torch.cuda.empty_cache()
    return rec


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shape", default="llama-7b-like", choices=sorted(SHAPES))
    p.add_argument("--modes", default="bf16,int8-1x128,int8")
    p.add_argument("--layers", type=int, default=1)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    recs = []
    for mode in a.modes.split(","):
        try:
            recs.append(run(mode, a.shape, a.layers, a.out))
        except Exception as e:  # a probe: report and go on with the next mode
            print(f"{mode}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        r = recs[-1]
        print(f"\n== {mode}: step {r['ms']:.2f} ms, gpu busy {r['gpu_busy_ms']:.2f} ms, host {r['host_ms']:.2f} ms, "
              f"{r['launches']} launches, {r['syncs']} syncs, {r['dtoh']} DtoH, warm-up {r['warmup_s']:.1f} s")
        for k, n, t in r["top_kernels"]:
            print(f"   {t:8.3f} ms  x{n:<4d} {k}")
        print("   -- host (self cpu)")
        for k, n, t in r["top_cpu"]:
            print(f"   {t:8.3f} ms  x{n:<4d} {k}")
    with open(os.path.join(a.out, "block_profile.json"), "w") as f:
        json.dump(recs, f, indent=1)
    print("\nmode                 step ms   gpu ms  host ms  launches syncs")
    for r in recs:
        print(f"{r['mode']:20s} {r['ms']:8.2f} {r['gpu_busy_ms']:8.2f} {r['host_ms']:8.2f} {r['launches']:8d} {r['syncs']:5d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
