"""GPU probe for issue 11: correctness and speed of the Gluon per-block INT8 GEMM vs cuBLAS BF16 (and Triton).

    python scripts/gpu/gemm_probe.py [--out DIR] [--budget-s 200] [--shapes all|quick] [--triton]

Two stages, each in a subprocess with a timeout (a deadlocked kernel must not eat the whole call):

1. ``check``: every variant (operand blocks, epilogue, bias, magic/cvt promotion, overlap, tails in M, N, K)
   on fresh Student-t inputs with an outlier column, outputs poisoned (NaN / -128) before the call,
   against a float64 reference: relative error max|y - ref| / max|ref|; INT8 outputs: code differences
   and scales against the float64 result quantized by the reference quantizer.
2. ``time``: M = 16384, the training epilogue of each GEMM (fwd/dgrad: 1x128 INT8 out, wgrad: BF16 out),
   Gluon variants and (with --triton) the Triton kernel, against cuBLAS BF16 ``torch.mm`` in the same run
   (triton.testing.do_bench medians, L2 flushed). Each shape's outputs are also checked against float64 on
   a subset of rows.

Prints a short table last and writes ``gemm_check.json`` / ``gemm_time.json`` under --out.
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

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (3072, 768), (768, 3072), (2304, 768)]
M_TOKENS = 16384


def student(rows, cols, seed, outlier=True, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((rows, cols), generator=g, device=device)
    x = x / torch.randn((3, rows, cols), generator=g, device=device).pow(2).mean(0).sqrt()
    if outlier and cols > 2:
        x[:, 1] *= 30.0
    return x


def deq64(q):
    from int8flow.format import BlockShape  # noqa: F401
    d = q.data.double()
    s = q.scale.double().repeat_interleave(q.block.rows, 0)[: d.shape[0]]
    s = s.repeat_interleave(q.block.cols, 1)[:, : d.shape[1]]
    return d * s


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def poison(monkey=True):
    from int8flow.kernels import _launch
    real = _launch.alloc

    def alloc(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-128)
    _launch.alloc = alloc


def int8_check(out, ref64, rounding):
    """Codes of an INT8 1x128 output vs the float64 result quantized by the reference quantizer."""
    from int8flow import format as fmt
    want = fmt.quantize(ref64.float(), "1x128", check_finite=False)
    d = (out.data.int() - want.data.int()).abs()
    poisoned = int((out.data == -128).sum())
    srel = float(((out.scale - want.scale).abs() / want.scale.abs().clamp_min(1e-30)).max())
    deq = deq64(out)
    return {"max_code_diff": int(d.max()), "frac_code_diff": float((d > 0).float().mean()),
            "poisoned": poisoned, "scale_rel": srel, "deq_rel_err": rel_err(deq, ref64),
            # stochastic rounding is unbiased: mean error in units of the scale
            "mean_err_codes": float(((deq - ref64) / deq64(type(out)(torch.ones_like(out.data), out.scale,
                                                                         out.block))).mean())}


def stage_check(out_dir):
    from int8flow import format as fmt
    from int8flow.kernels import gemm, gluon_gemm as gg
    poison()
    gemm._tuned_kernel.configs = gemm._INT8_CONFIGS[:2]  # Triton comparison: short autotuning
    results = []
    cases = []
    for (M, N, K) in [(300, 208, 400), (128, 128, 128), (1000, 384, 1152), (77, 16, 144)]:
        for ab, bb in [("1x128", "128x128"), ("1x128", "1x128"), ("128x128", "1x128"), ("128x128", "128x128")]:
            default = (ab, bb) == ("1x128", "128x128")
            cases.append((M, N, K, ab, bb, "fp32", False, 0, 3))
            if default:
                for out in ("bf16", "int8", "int8-sr"):
                    cases.append((M, N, K, ab, bb, out, False, 0, 3))
                cases.append((M, N, K, ab, bb, "fp32", True, 0, 3))
                cases.append((M, N, K, ab, bb, "fp32", False, 1, 3))
                cases.append((M, N, K, ab, bb, "fp32", False, 0, 2))
                cases.append((M, N, K, ab, bb, "int8", False, 0, 2))
            if (ab, bb) == ("1x128", "1x128"):  # per-column B scales (wgrad's geometry) on the 2-consumer kernel
                cases.append((M, N, K, ab, bb, "fp32", False, 0, 2))
    t0 = time.time()
    for i, (M, N, K, ab, bb, out, magic, overlap, nc) in enumerate(cases):
        a = fmt.quantize(student(M, K, 1000 + i), ab)
        b = fmt.quantize(student(N, K, 2000 + i) * 0.05, bb)
        bias = torch.randn(N, device="cuda") if out in ("fp32", "bf16") else None
        ref = deq64(a) @ deq64(b).t()
        if bias is not None:
            ref = ref + bias.double()
        kw = dict(bias=bias, magic=magic, overlap=overlap, consumers=nc)
        rec = {"M": M, "N": N, "K": K, "a": ab, "b": bb, "out": out, "magic": magic, "overlap": overlap,
               "consumers": nc}
        try:
            if out in ("fp32", "bf16"):
                y = gg.block_gemm(a, b, out_dtype=torch.float32 if out == "fp32" else torch.bfloat16, **kw)
                torch.cuda.synchronize()
                rec.update(nan=int(torch.isnan(y).sum()), rel_err=rel_err(y, ref))
                tol = 2e-6 if out == "fp32" else 8e-3
                rec["ok"] = rec["nan"] == 0 and rec["rel_err"] < tol
            else:
                rounding = "stochastic" if out == "int8-sr" else "nearest"
                y = gg.block_gemm(a, b, out_block="1x128", rounding=rounding, seed=7, **kw)
                torch.cuda.synchronize()
                rec.update(int8_check(y, ref, rounding))
                if rounding == "nearest":
                    rec["ok"] = rec["poisoned"] == 0 and rec["max_code_diff"] <= 1 and rec["frac_code_diff"] < 1e-3 \
                        and rec["scale_rel"] < 1e-5
                else:
                    # the epilogue draws the memory-bound kernels' stream: the same codes as the quantize kernel
                    # applied to this kernel's own float32 product with the same seed (but at fp32-order ties)
                    from int8flow.kernels import quantize as kq
                    yf = gg.block_gemm(a, b, out_dtype=torch.float32, **kw)
                    ys = kq.quantize(yf, "1x128", "stochastic", seed=7, check_finite=False)
                    dt = (y.data.int() - ys.data.int()).abs()
                    rec.update(vs_stream_max=int(dt.max()), vs_stream_frac=float((dt > 0).float().mean()))
                    rec["ok"] = rec["poisoned"] == 0 and rec["max_code_diff"] <= 1 and rec["vs_stream_frac"] < 1e-3 \
                        and abs(rec["mean_err_codes"]) < 0.05
        except Exception as e:  # keep going: the report lists every failing case
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        results.append(rec)
        if not rec["ok"]:
            print("FAIL", json.dumps(rec), flush=True)
        with open(os.path.join(out_dir, "gemm_check.json"), "w") as f:  # as it goes: a timeout keeps the rest
            json.dump(results, f, indent=1)
    # refusals
    a = fmt.quantize(student(256, 256, 5), "128x128")
    try:
        gg.block_gemm(a, fmt.QTensor(a.data.t(), a.scale.t(), a.block.t()))
        results.append({"refusal": "no error for a transposed view", "ok": False})
    except ValueError as e:
        results.append({"refusal": str(e)[:200], "ok": "K-major" in str(e)})
    n_ok = sum(r["ok"] for r in results)
    print(f"check: {n_ok}/{len(results)} ok in {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(out_dir, "gemm_check.json"), "w") as f:
        json.dump(results, f, indent=1)


def stage_time(out_dir, shapes, triton_too, budget_s):
    import triton.testing
    from int8flow.format import QTensor
    from int8flow.kernels import gemm, gluon_gemm as gg, quantize as kq
    if triton_too:  # two tile configs (128x128, 8 warps, with/without overlap) keep its autotuning short
        gemm._tuned_kernel.configs = gemm._INT8_CONFIGS[:2]
    t_start = time.time()
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))  # noqa: E731
    variants = {"gluon-c2": dict(consumers=2), "gluon-c3": dict(consumers=3),
                "gluon-c3-bf16out": dict(consumers=3), "gluon-c3-diag": dict(consumers=3, overlap=2)}
    rows = []
    for n, k in shapes:
        if time.time() - t_start > budget_s:
            print(f"time budget reached, skipping {n}x{k} and later", flush=True)
            break
        m = M_TOKENS
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        base = {"fwd": bench(lambda: torch.mm(x, w.t())), "dgrad": bench(lambda: torch.mm(dy, w)),
                "wgrad": bench(lambda: torch.mm(dy.t(), x))}
        x_q, w_q, dy_q = kq.quantize(x, "1x128"), kq.quantize(w, "128x128"), kq.quantize(dy, "1x128")
        w_t = QTensor(w_q.data.t().contiguous(), w_q.scale.t().contiguous(), w_q.block.t())
        dy_t, x_t = kq.quantize_transposed(dy, "1x128"), kq.quantize_transposed(x, "1x128")
        calls = {"fwd": (x_q, w_q, dict(out_block="1x128")), "dgrad": (dy_q, w_t, dict(out_block="1x128")),
                 "wgrad": (dy_t, x_t, dict(out_dtype=torch.bfloat16))}
        for op, (a, b, kw) in calls.items():
            ref_rows = torch.arange(0, a.shape[0], max(1, a.shape[0] // 128), device="cuda")
            ref = deq64(QTensor(a.data[ref_rows], a.scale[ref_rows // a.block.rows], a.block)) @ deq64(b).t()
            fns = {}
            for name, v in variants.items():
                if op == "wgrad" and name.startswith("gluon-c3"):  # per-column B scales run on 2 consumers only
                    continue
                kwv = dict(out_dtype=torch.bfloat16) if name.endswith("bf16out") else kw
                fns[name] = lambda v=v, kwv=kwv: gg.block_gemm(a, b, **kwv, **v)
            if triton_too:
                fns["triton"] = lambda: gemm.block_gemm(a, b, **kw, kernel="triton")
            for name, fn in fns.items():
                rec = {"op": f"gemm_{op}", "shape": [m, n, k], "variant": name, "baseline_ms": base[op]}
                try:
                    y = fn()
                    yd = deq64(y) if isinstance(y, QTensor) else y.double()
                    if not name.endswith("diag"):  # the diagnostic promotes once: wrong numerics by design
                        rec["rel_err_rows"] = rel_err(yd[ref_rows], ref)
                    ms = bench(fn)
                    rec.update(ours_ms=ms, speedup=base[op] / ms, tflops=2 * m * n * k / ms / 1e9)
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(rec)
                print(json.dumps(rec), flush=True)
        del x, w, dy, x_q, w_q, dy_q, w_t, dy_t, x_t
    with open(os.path.join(out_dir, "gemm_time.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)
    print(f"\n{'op':11s} {'N x K':12s} " + " ".join(f"{v:>14s}" for v in list(variants) + ["triton"]) + "  (x BF16)")
    keys = sorted({(r["op"], tuple(r["shape"])) for r in rows}, key=lambda t: (t[1][1:], t[0]))
    for op, shape in keys:
        cells = []
        for v in list(variants) + ["triton"]:
            r = next((r for r in rows if r["op"] == op and tuple(r["shape"]) == shape and r["variant"] == v), None)
            cells.append(f"{r['speedup']:5.2f} {r['tflops']:6.0f}T" if r and "speedup" in r else f"{'-':>14s}")
        print(f"{op:11s} {shape[1]:5d}x{shape[2]:<6d} " + " ".join(f"{c:>14s}" for c in cells))


def stage_ncu_target():
    """One fwd GEMM (16384 x 4096 x 4096, 1x128 INT8 out) for ncu to profile (compile happens first)."""
    from int8flow.kernels import gluon_gemm as gg, quantize as kq
    x = torch.randn(M_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 4096 ** -0.5
    x_q, w_q = kq.quantize(x, "1x128"), kq.quantize(w, "128x128")
    for nc in (3, 2):
        gg.block_gemm(x_q, w_q, out_block="1x128", consumers=nc)
    torch.cuda.synchronize()


def stage_records(out_dir, shapes):
    """`int8flow.bench.kernels.gemm_records` (the bench's own code path), coarse128 mode, as bench JSON."""
    from int8flow.bench import kernels as bk
    from int8flow.bench.common import device_info, print_table, write_json
    info = device_info()
    records = bk.gemm_records(shapes, modes=("coarse128",))
    tag = os.environ.get("INT8FLOW_GLUON_CONSUMERS", "default")
    write_json(os.path.join(out_dir, f"h200_gemm_records_{tag}.json"), records, info)
    print_table(records)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("stage", nargs="?", default="all", choices=["all", "check", "time", "ncu", "records"])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shapes", default="all")
    p.add_argument("--triton", action="store_true")
    p.add_argument("--budget-s", type=float, default=200)
    args = p.parse_args()
    shapes = SHAPES if args.shapes == "all" else SHAPES[:2]
    if args.stage == "check":
        return stage_check(args.out)
    if args.stage == "time":
        return stage_time(args.out, shapes, args.triton, args.budget_s)
    if args.stage == "ncu":
        return stage_ncu_target()
    if args.stage == "records":
        return stage_records(args.out, shapes)
    t0 = time.time()
    me = [sys.executable, os.path.abspath(__file__)]
    ncu = ["ncu", "--clock-control", "none", "--kernel-name", "regex:block_gemm_kernel", "--launch-skip", "0",
           "--launch-count", "2", "--section", "SpeedOfLight", "--section", "ComputeWorkloadAnalysis",
           "--section", "WarpStateStats", "--section", "InstructionStats", "--section", "MemoryWorkloadAnalysis"]
    plan = [("check", me + ["check"], 0.4), ("time", me + ["time", "--budget-s", str(args.budget_s * 0.2)], 0.3),
            ("records", me + ["records"], 0.16), ("records-c2", me + ["records"], 0.16), ("ncu", ncu + me + ["ncu"], 0.2)]
    for stage, cmd, share in plan:
        env = dict(os.environ, INT8FLOW_GLUON_CONSUMERS="2") if stage == "records-c2" else None
        left = args.budget_s - (time.time() - t0)
        if left < 15:
            print(f"no time left for stage {stage}", flush=True)
            continue
        extra = ["--out", args.out, "--shapes", args.shapes] + (["--triton"] if args.triton else [])
        log = open(os.path.join(args.out, f"{stage}.log"), "w") if stage == "ncu" else None
        try:
            subprocess.run(cmd + extra, timeout=min(left, max(20, args.budget_s * share)), check=False, stdout=log,
                           env=env)
        except subprocess.TimeoutExpired:
            print(f"stage {stage} timed out after {time.time() - t0:.0f}s", flush=True)
        except FileNotFoundError as e:
            print(f"stage {stage}: {e}", flush=True)


if __name__ == "__main__":
    main()
