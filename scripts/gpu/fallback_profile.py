"""GPU probe (issue 13): where the forward of a column-fallback activation spends its time, eager.

    python scripts/gpu/fallback_profile.py [--out DIR]

For K in (4096, 11008), M = 16384, N = 4096, the outlier-channel input of ``bench kernels`` (5% of blocks): the
forward the data flow runs per activation (quantize + group selection + term + concatenations + GEMM, as
``bench.kernels._column_fallback_records``'s ``fwd``) against quantize + the plain GEMM. Prints per variant: the
time per call (CUDA events, median of 20), GPU busy time per call (sum of kernel times under torch.profiler),
host time per call, kernel launches per call and the 12 kernels with the most GPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from int8flow.bench.kernels import M_TOKENS, _fallback_input  # noqa: E402
from int8flow.config import Int8TrainingConfig  # noqa: E402
from int8flow.ops import primitives as P  # noqa: E402


def measure(fn, iters: int = 5) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host = (time.perf_counter() - t0) * 1e3 / iters
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / iters
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
    return {"ms": statistics.median(times), "gpu_busy_ms": busy, "host_ms": host,
            "launches": sum(e.count for e in kernels) / iters,
            "top": [(e.key[:90], e.self_device_time_total / 1e3 / iters, e.count / iters) for e in top]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = Int8TrainingConfig(precision="int8+fallback")
    blk = cfg.activation_block
    results = {}
    for k in (4096, 11008):
        xf = _fallback_input(k, 0.05, "channels", "cuda")
        w_q = P.quantize(torch.randn(4096, k, device="cuda", dtype=torch.bfloat16) * k**-0.5, cfg.weight_block,
                         "nearest", 0, cfg, "weight")

        def fwd():
            a_q, a2_q, _ = P.quantize_activation(xf, cfg, "input")
            return P.gemm([a_q, a2_q], w_q, out_block=blk, cfg=cfg)

        def plain():
            return P.gemm([P.quantize(xf, blk, "nearest", 0, cfg, "input")], w_q, out_block=blk, cfg=cfg)

        for name, fn in (("fallback", fwd), ("plain", plain)):
            r = measure(fn)
            results[f"{name} {M_TOKENS}x4096x{k}"] = r
            print(f"\n== {name} M={M_TOKENS} N=4096 K={k}: {r['ms']:.3f} ms/call, GPU busy {r['gpu_busy_ms']:.3f}, "
                  f"host {r['host_ms']:.3f}, {r['launches']:.0f} launches", flush=True)
            for key, ms, n in r["top"]:
                print(f"   {ms:8.3f} ms  x{n:<4.0f} {key}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fallback_profile.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
