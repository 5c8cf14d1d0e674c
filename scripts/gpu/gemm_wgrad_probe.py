"""GPU probe (issue 11): wgrad with the per-column B scales staged through shared memory, and where the Gluon
GEMM's warps stall.

    python scripts/gpu/gemm_wgrad_probe.py --out DIR [--ncu]

1. ``time``: M = 16384 tokens, cuBLAS BF16 ``torch.mm(dy.t(), x)`` against the Gluon wgrad (both operands
   ``quantize_transposed`` 1x128 along M, BF16 out) with the scales from L2 (``sb_smem=False``, the previous
   route) and from shared memory (``sb_smem=True``), 2 and 3 consumers; fwd (3 consumers, 1x128 INT8 out) in the
   same run for reference. Outputs of the two scale routes compared bit for bit, and against float64 on every
   128th row. triton.testing.do_bench medians, L2 flushed.
2. ``--ncu``: one fwd and one wgrad launch under Nsight Compute (``--clock-control none``): speed of light,
   warp-state (stall reasons), scheduler, and the source-level stall counters, as text under DIR.
Prints a short table last; JSON in DIR/gemm_wgrad.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
M = 16384


def operands(n, k, seed=0):
    from int8flow.kernels import quantize as kq
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, k, device="cuda", generator=g).to(torch.bfloat16)
    dy = torch.randn(M, n, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
    return x, dy, w, kq


def stage_time(out_dir):
    import triton.testing
    from int8flow.kernels import gluon_gemm as gg
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))  # noqa: E731
    rows = []
    for n, k in SHAPES:
        x, dy, w, kq = operands(n, k)
        base_w = bench(lambda: torch.mm(dy.t(), x))
        base_f = bench(lambda: torch.mm(x, w.t()))
        dy_t, x_t = kq.quantize_transposed(dy, "1x128"), kq.quantize_transposed(x, "1x128")
        x_q, w_q = kq.quantize(x, "1x128"), kq.quantize(w, "128x128")
        ref_rows = torch.arange(0, n, 128, device="cuda")
        from int8flow.format import QTensor
        deq = lambda q: q.data.double() * q.scale.double().repeat_interleave(128, 1)[:, : q.data.shape[1]]  # noqa
        ref = deq(QTensor(dy_t.data[ref_rows], dy_t.scale[ref_rows], dy_t.block)) @ deq(x_t).t()
        variants = {"wgrad-l2-c2": dict(sb_smem=False, prefetch=False), "wgrad-smem": dict(sb_smem=True, prefetch=False),
                    "wgrad-smem-pf": dict(sb_smem=True, prefetch=True)}
        outs = {}
        for name, kw in variants.items():
            rec = {"op": "gemm_wgrad", "shape": [M, n, k], "variant": name, "baseline_ms": base_w}
            try:
                y = gg.block_gemm(dy_t, x_t, out_dtype=torch.bfloat16, **kw)
                outs[name] = y
                rec["rel_err_rows"] = float((y[ref_rows].double() - ref).abs().max() / ref.abs().max())
                ms = bench(lambda: gg.block_gemm(dy_t, x_t, out_dtype=torch.bfloat16, **kw))
                rec.update(ours_ms=ms, speedup=base_w / ms, tflops=2 * M * n * k / ms / 1e9)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        if len(outs) == 3:
            rows.append({"op": "check", "shape": [M, n, k], "smem_equals_l2_bits": bool(
                torch.equal(outs["wgrad-l2-c2"], outs["wgrad-smem"]) and torch.equal(outs["wgrad-l2-c2"], outs["wgrad-smem-pf"]))})
            print(json.dumps(rows[-1]), flush=True)
        dy_q = kq.quantize(dy, "1x128")
        w_t = kq.transpose_qtensor(w_q)  # (K, N): w.T's K-major copy
        base_d = bench(lambda: torch.mm(dy, w))
        gemms = {"fwd": (x_q, w_q, base_f), "dgrad": (dy_q, w_t, base_d)}
        for op, (a, b, base) in gemms.items():
            ys = {}
            for pf in (False, True):
                name = f"{op}-c3" + ("-pf" if pf else "")
                rec = {"op": f"gemm_{op}", "shape": [M, n if op == "fwd" else k, k if op == "fwd" else n],
                       "variant": name, "baseline_ms": base}
                fn = lambda pf=pf: gg.block_gemm(a, b, out_block="1x128", rounding="stochastic", seed=7, prefetch=pf)  # noqa
                ys[pf] = fn()
                ms = bench(fn)
                mm, nn, kk = rec["shape"]
                rec.update(ours_ms=ms, speedup=base / ms, tflops=2 * mm * nn * kk / ms / 1e9)
                rows.append(rec)
                print(json.dumps(rec), flush=True)
            rows.append({"op": "check", "shape": rec["shape"], "smem_equals_l2_bits": bool(
                torch.equal(ys[True].data, ys[False].data) and torch.equal(ys[True].scale, ys[False].scale))})
        outs.clear()
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "gemm_wgrad.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "rows": rows}, f, indent=1)
    print(f"\n{'variant':16s} {'N x K':12s} {'ours ms':>8s} {'bf16 ms':>8s} {'x BF16':>7s} {'TOPS':>6s}")
    for r in rows:
        if "ours_ms" in r:
            print(f"{r['variant']:16s} {r['shape'][1]:5d}x{r['shape'][2]:<6d} {r['ours_ms']:8.3f} "
                  f"{r['baseline_ms']:8.3f} {r['speedup']:7.2f} {r['tflops']:6.0f}")
        elif r.get("op") == "check":
            print(f"{'check':16s} {r['shape'][1]:5d}x{r['shape'][2]:<6d} same bits: {r['smem_equals_l2_bits']}")
        else:
            print(f"{r['variant']:16s} error {r.get('error')}")


def stage_ncu_target():
    from int8flow.kernels import gluon_gemm as gg
    x, dy, w, kq = operands(4096, 4096)
    x_q, w_q = kq.quantize(x, "1x128"), kq.quantize(w, "128x128")
    dy_t, x_t = kq.quantize_transposed(dy, "1x128"), kq.quantize_transposed(x, "1x128")
    gg.block_gemm(x_q, w_q, out_block="1x128")  # fwd, 3 consumers
    gg.block_gemm(dy_t, x_t, out_dtype=torch.bfloat16)  # wgrad, per-column scales through shared memory
    torch.cuda.synchronize()


def stage_ncu(out_dir):
    rep = os.path.join(out_dir, "gemm_ncu")
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", "regex:block_gemm_kernel", "--launch-count", "2",
           "--section", "SpeedOfLight", "--section", "WarpStateStats", "--section", "SchedulerStats",
           "--section", "ComputeWorkloadAnalysis", "--section", "MemoryWorkloadAnalysis", "--section", "SourceCounters",
           "--import-source", "no", "-f", "-o", rep, sys.executable, os.path.abspath(__file__), "ncu-target"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    open(os.path.join(out_dir, "ncu_run.log"), "w").write(r.stdout[-20000:] + r.stderr[-20000:])
    for page, extra, name in (("details", [], "ncu_details.txt"),
                              ("source", ["--csv", "--print-source", "sass"], "ncu_source_sass.csv")):
        r = subprocess.run(["ncu", "-i", rep + ".ncu-rep", "--page", page, *extra], capture_output=True, text=True,
                           timeout=120)
        open(os.path.join(out_dir, name), "w").write(r.stdout + ("\n# stderr\n" + r.stderr if r.stderr else ""))
    os.remove(rep + ".ncu-rep") if os.path.exists(rep + ".ncu-rep") else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("stage", nargs="?", default="all", choices=["all", "time", "ncu-target"])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--ncu", action="store_true")
    args = p.parse_args()
    if args.stage == "ncu-target":
        return stage_ncu_target()
    os.makedirs(args.out, exist_ok=True)
    if args.ncu:
        try:
            stage_ncu(args.out)
        except Exception as e:  # noqa: BLE001
            print(f"ncu stage failed: {type(e).__name__}: {e}", flush=True)
    stage_time(args.out)


if __name__ == "__main__":
    main()
