"""GPU probe: cost and correctness of the Gluon GEMM's stochastic-rounding noise (INT8 1x128 output).

    PYTHONPATH=$PWD python scripts/gpu/gemm_noise_probe.py [--out DIR] [--budget-s 80] [--ms 8192,16384]

For M in --ms and (N, K) in (11008, 4096), (4096, 11008), (4096, 4096) (a: M x K 1x128 activations, b: N x K
128x128 weights, both K-major, 3 consumer warpgroups: the fwd/dgrad kernel), ``gluon_gemm.block_gemm`` with
INT8 1x128 output, timed with ``triton.testing.do_bench`` (median, L2 flushed) against cuBLAS BF16 ``torch.mm``
in the same run:

* ``nearest``     round half to even (no noise)
* ``sr``          stochastic, the default noise ``philox7x8`` (one Philox4x32-7 per 8 elements, quad transpose)
* ``sr-wide``     the same bits with mul.wide.u32 in the Philox rounds (``philox7x8w``)
* ``sr-old``      the previous noise, one Philox4x32-10 per element (``philox10``)

Correctness of every stochastic variant, against the float32 product y of the dequantized operands (cuBLAS,
TF32 off): errors e = q * scale - y; ``z`` = sum(e) / sqrt(sum(step^2) / 4) (each element's error has mean 0
and variance <= step^2 / 4, so a correct kernel gives |z| < 5 but with p < 6e-7); ``max_err_steps`` =
max |e| / step (< 1: every element on one of its two neighbouring codes; y's float32 summation order differs
from the kernel's by ~1e-6 relative, hence the 1e-3 slack); ``corr_z``: the largest |correlation| x sqrt(n) of
the rounding errors of neighbours (columns +1, +2, +8, rows +1), ~N(0, 1) each when independent. ``sr-wide``
must equal ``sr`` bit for bit. On the first shape ``stream_eq``: the fraction of ``sr`` codes equal to
``kernels.quantize.quantize(y_gluon_fp32, "1x128", rounding="stochastic")`` with the same seed (the
memory-bound kernels' stream; 1.0 expected).

Compiles: 2 specializations (N = 11008 / 4096) x 4 variants, plus one float32-output kernel; scale
tensors are padded to 16-aligned row strides so that K does not add specializations. Prints a table last,
writes ``gemm_noise.json`` under --out (default $OUT or .).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

SHAPES = [(11008, 4096), (4096, 11008), (4096, 4096)]
VARIANTS = {"nearest": dict(rounding="nearest"), "sr": dict(rounding="stochastic", noise="philox7x8"),
            "sr-wide": dict(rounding="stochastic", noise="philox7x8w"),
            "sr-old": dict(rounding="stochastic", noise="philox10")}
SEED = 1234


def padded_scale(q):
    """The same QTensor with its scale grid in a buffer of 16-aligned row stride (one JIT specialization)."""
    from int8flow.format import QTensor
    r, c = q.scale.shape
    buf = torch.zeros(r, -(-c // 16) * 16, dtype=q.scale.dtype, device=q.scale.device)
    buf[:, :c] = q.scale
    return QTensor(q.data, buf[:, :c], q.block)


def checks(q, y):
    """Errors of the INT8 1x128 output q against float32 y: z, max |e| / step, neighbour correlations."""
    M, N = y.shape
    step = q.scale.double().repeat_interleave(128, 1)[:, :N]
    e = (q.data.double() * step - y.double())
    n = e.numel()
    z = float(e.sum() / ((step ** 2).sum() / 4).sqrt())
    max_steps = float((e.abs() / step.clamp_min(1e-38)).max())
    ec = e / step.clamp_min(1e-38)  # error in codes
    corr = {}
    for name, (dr, dc) in {"col+1": (0, 1), "col+2": (0, 2), "col+8": (0, 8), "row+1": (1, 0)}.items():
        a, b = ec[: M - dr, : N - dc], ec[dr:, dc:]
        c = float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt())
        corr[name] = c * math.sqrt(a.numel())
    return {"z": z, "max_err_steps": max_steps, "n": n, "corr_z": corr,
            "ok": abs(z) < 5 and max_steps < 1 + 1e-3 and max(abs(v) for v in corr.values()) < 5}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--budget-s", type=float, default=80.0)
    p.add_argument("--ms", default="8192,16384")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    t0 = time.time()
    import triton
    import triton.testing
    from int8flow import format as fmt
    from int8flow.kernels import gluon_gemm as gg
    from int8flow.kernels import quantize as kq
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    variants = {k: VARIANTS[k] for k in args.variants.split(",")}
    bench = lambda fn: 1e3 * float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))  # noqa: E731
    rows, notes, compile_s = [], [], {}
    for M in [int(m) for m in args.ms.split(",")]:
        for N, K in SHAPES:
            if time.time() - t0 > args.budget_s:
                notes.append(f"budget reached: skipped M={M} {N}x{K}")
                continue
            g = torch.Generator(device="cuda").manual_seed(M + N + K)
            x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
            w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(torch.bfloat16)
            x[:, 1] *= 30.0  # an outlier column, as activations have
            a = padded_scale(fmt.quantize(x.float(), "1x128"))
            b = padded_scale(fmt.quantize(w.float(), "128x128"))
            y = a.dequantize() @ b.dequantize().t()  # float32 reference (cuBLAS, no TF32)
            rec = {"M": M, "N": N, "K": K, "bf16_us": bench(lambda x=x, w=w: torch.mm(x, w.t()))}
            outs = {}
            for name, kw in variants.items():
                if time.time() - t0 > args.budget_s:
                    notes.append(f"budget reached: skipped M={M} {N}x{K} {name}")
                    continue
                def fn(kw=kw, a=a, b=b):
                    return gg.block_gemm(a, b, out_block="1x128", seed=SEED, consumers=3, **kw)
                try:
                    tc = time.time()
                    q = fn()
                    torch.cuda.synchronize()
                    compile_s.setdefault(f"{name}/N={N}", time.time() - tc)
                    rec[f"{name}_us"] = bench(fn)
                    if kw["rounding"] == "stochastic":
                        rec[name] = checks(q, y)
                        outs[name] = q.data
                    else:
                        step_codes = (q.data.int() - fmt.quantize(y, "1x128").data.int()).abs()
                        rec[name] = {"max_code_diff_vs_ref": int(step_codes.max()),
                                     "frac_code_diff_vs_ref": float((step_codes > 0).float().mean())}
                except Exception as e:  # keep going: the table shows what ran
                    rec[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}
                    print(json.dumps({"M": M, "N": N, "K": K, name: rec[name]}), flush=True)
            if "sr" in outs and "sr-wide" in outs:
                rec["wide_equal"] = bool(torch.equal(outs["sr"], outs["sr-wide"]))
            if "sr" in outs and not any("stream_eq" in r for r in rows) and time.time() - t0 < args.budget_s:
                yg = gg.block_gemm(a, b, out_dtype=torch.float32, consumers=3)  # the kernel's own float32 result
                ref = kq.quantize(yg, "1x128", rounding="stochastic", seed=SEED)
                rec["stream_eq"] = float((ref.data == outs["sr"]).float().mean())
                rec["stream_max_code_diff"] = int((ref.data.int() - outs["sr"].int()).abs().max())
                del yg, ref
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            del x, w, a, b, y, outs
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "wall_s": time.time() - t0, "compile_s": compile_s, "notes": notes, "rows": rows}
    with open(os.path.join(args.out, "gemm_noise.json"), "w") as f:
        json.dump(result, f, indent=1)
    for n in notes:
        print(n)
    print(f"\nGluon INT8-1x128-out GEMM, us (do_bench median); sr%: over nearest; z / max|e|/step / max|corr z|"
          f" of the stochastic output vs float32 (wall {time.time() - t0:.0f}s)")
    hdr = f"{'M':>6s} {'N':>6s} {'K':>6s} {'bf16':>7s} {'nearest':>8s} {'sr':>8s} {'sr%':>6s} {'sr-wide':>8s} " \
          f"{'sr-old':>8s} {'old%':>6s}  {'z':>6s} {'err':>6s} {'corr':>5s} ok"
    print(hdr)
    for r in rows:
        def us(k):
            return f"{r[k]:8.1f}" if k in r else f"{'-':>8s}"

        def pct(k):
            return f"{100 * (r[k] / r['nearest_us'] - 1):+5.1f}%" if k in r and "nearest_us" in r else f"{'-':>6s}"
        c = r.get("sr", {})
        ok = all(r.get(v, {}).get("ok", True) for v in ("sr", "sr-wide", "sr-old")) and r.get("wide_equal", True) \
            and r.get("stream_eq", 1.0) >= 0.999
        stats = (f"{c['z']:6.2f} {c['max_err_steps']:6.3f} {max(abs(v) for v in c['corr_z'].values()):5.1f}"
                 if "z" in c else f"{'-':>6s} {'-':>6s} {'-':>5s}")
        print(f"{r['M']:6d} {r['N']:6d} {r['K']:6d} {r['bf16_us']:7.1f} {us('nearest_us')} {us('sr_us')} "
              f"{pct('sr_us')} {us('sr-wide_us')} {us('sr-old_us')} {pct('sr-old_us')}  {stats} {'yes' if ok else 'NO'}")
    if any("stream_eq" in r for r in rows):
        r = next(r for r in rows if "stream_eq" in r)
        print(f"stream vs kernels.quantize (memory-bound stream) at M={r['M']} {r['N']}x{r['K']}: "
              f"{r['stream_eq']:.6f} codes equal, max diff {r['stream_max_code_diff']}")


if __name__ == "__main__":
    main()
