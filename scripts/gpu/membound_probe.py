"""GPU probe of the memory-bound kernels (issue 12), one device call, e.g. (the v1 measurement, 129 s):

    export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1; P=scripts/gpu/membound_probe.py
    (timeout 110 python $P --check > $OUT/check.log 2>&1) & (timeout 90 python $P --sync > $OUT/sync.log 2>&1) &
    for i in $(seq 0 11); do (timeout 100 python $P --warm $i 12 >> $OUT/warm.log 2>&1) & done; wait
    timeout $((192-SECONDS)) python $P --time $OUT/membound.json > $OUT/time.log 2>&1

Modes:

    python scripts/gpu/membound_probe.py --warm I N   # compile shard I of N (ours + torch.compile baselines)
    python scripts/gpu/membound_probe.py --check      # kernels vs the references at real shapes
    python scripts/gpu/membound_probe.py --sync       # host syncs / isfinite in an INT8 training step
    python scripts/gpu/membound_probe.py --time OUT   # time everything (caches warm), table last

Warm shards run in parallel processes so the many compilations share the CPU; they fill the on-disk Triton
and inductor caches that the timing process then reads.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.getcwd())


def warm(i: int, n: int) -> None:
    from int8flow.bench import membound

    k = 0
    for d in membound.DIMS:
        names = [c.op for c in membound._cases(64, 256, "cuda", compile_=lambda f: f)]
        mine = [op for j, op in enumerate(names) if (k + j) % n == i]
        k += len(names)
        if not mine:
            continue
        for case in membound._cases(membound.M_TOKENS, d, ops=mine):
            for fn in (case.ours, case.baseline):
                try:
                    fn()
                except Exception as e:  # reported by --time
                    print(f"warm {case.op} {d}: {type(e).__name__}: {e}", flush=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _stats(got, want):
    """(fraction of equal int8 codes, max |diff| / block step, scale rel err) or (0, max rel err, 0) for floats."""
    from int8flow.format import QTensor, expand_scale

    if isinstance(want, QTensor):
        step = expand_scale(torch.maximum(got.scale, want.scale), want.block, tuple(want.shape))
        diff = (got.dequantize() - want.dequantize()).abs()
        ratio = float((diff / step).nan_to_num().max())
        same = float((got.data == want.data).float().mean())
        srel = float(((got.scale - want.scale).abs() / want.scale.abs().clamp_min(1e-30)).max())
        return same, ratio, srel
    w = want.float()
    return 1.0, float((got.float() - w).abs().max() / w.abs().max().clamp_min(1e-30)), 0.0


def check() -> None:
    from int8flow import format as fmt
    from int8flow.kernels import activations, dropout, norms, nonfinite, quantize as kq, residual
    from int8flow.reference import nonlinear as ref

    torch.manual_seed(0)
    bad = 0

    def report(name, got, want, exact=False):
        nonlocal bad
        def flat(a, b):
            if isinstance(b, tuple):
                return [p for x, y in zip(a, b) for p in flat(x, y)]
            return [(a, b)]

        pairs = flat(got, want)
        for k, (g, w) in enumerate(pairs):
            same, ratio, srel = _stats(g, w)
            # one code off where kernel and reference float values differ by a few ulps (tests' rule)
            ok = (same == 1.0 and ratio == 0.0 and srel == 0.0) if exact else (same >= 0.99 and ratio <= 1.0 + 1e-3
                                                                             and srel < 1e-4)
            bad += not ok
            print(f"check {name}[{k}] same {same:.6f} max|d|/step {ratio:.3g} scale rel {srel:.2g} "
                  f"{'OK' if ok else 'FAIL'}", flush=True)

    m = 16384
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) * torch.rand(m, 1, device="cuda")
    x[:, 7] *= 60
    for blk in ("1x128", "32x32", "1x32"):
        report(f"quantize {blk}", kq.quantize(x, blk), fmt.quantize(x, blk, check_finite=False), exact=True)
        report(f"quantize_transposed {blk}", kq.quantize_transposed(x, blk),
               fmt.quantize_transposed(x, blk, check_finite=False), exact=True)
    report("quantize_dual 1x128", kq.quantize_dual(x, "1x128"),
           (fmt.quantize(x, "1x128", check_finite=False), fmt.quantize_transposed(x, "1x128", check_finite=False)),
           exact=True)
    del x
    for d in (768, 4096, 11008):
        xb = torch.randn(m, d, device="cuda", dtype=torch.bfloat16) * 2 + 0.5
        xb[:, 5] *= 30
        dyb = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        x_q, dy_q = fmt.quantize(xb, "1x128"), fmt.quantize(dyb, "1x128")
        w = (torch.randn(d, device="cuda") * 0.1 + 1).to(torch.bfloat16)
        b = (torch.randn(d, device="cuda") * 0.1).to(torch.bfloat16)
        for t in (False, True):
            kw = dict(out_block="1x128", with_t=t)
            y, mean, rstd = norms.layer_norm_forward(x_q, w, b, **kw)
            yr, mr, rr = ref.layer_norm_forward(x_q, w, b, **kw)
            report(f"D={d} t={t} layernorm_fwd", y, yr)
            report(f"D={d} t={t} rstd", rstd, rr)
            dx, dw, db = norms.layer_norm_backward(dy_q, x_q, w, mr, rr, **kw)
            dxr, dwr, dbr = ref.layer_norm_backward(dy_q, x_q, w, mr, rr, **kw)
            report(f"D={d} t={t} layernorm_bwd", dx, dxr)
            report(f"D={d} t={t} dweight", dw, dwr)
            report(f"D={d} t={t} dbias", db, dbr)
            y, rs = norms.rms_norm_forward(x_q, w, **kw)
            report(f"D={d} t={t} rmsnorm_fwd", y, ref.rms_norm_forward(x_q, w, **kw)[0])
            dx, dw = norms.rms_norm_backward(dy_q, x_q, w, rs, **kw)
            dxr, dwr = ref.rms_norm_backward(dy_q, x_q, w, rs, **kw)
            report(f"D={d} t={t} rmsnorm_bwd", dx, dxr)
            report(f"D={d} t={t} rms dweight", dw, dwr)
            report(f"D={d} t={t} gelu_fwd", activations.gelu_forward(x_q, "tanh", **kw),
                   ref.gelu_forward(x_q, "tanh", **kw))
            report(f"D={d} t={t} gelu_bwd", activations.gelu_backward(dy_q, x_q, "tanh", **kw),
                   ref.gelu_backward(dy_q, x_q, "tanh", **kw))
            report(f"D={d} t={t} swiglu_fwd", activations.swiglu_forward(x_q, dy_q, **kw),
                   ref.swiglu_forward(x_q, dy_q, **kw))
            report(f"D={d} t={t} swiglu_bwd", activations.swiglu_backward(dy_q, x_q, dy_q, **kw),
                   ref.swiglu_backward(dy_q, x_q, dy_q, **kw))
            yd, mask = dropout.dropout_forward(x_q, 0.1, seed=3, **kw)
            report(f"D={d} t={t} dropout", yd, ref.dropout_backward(x_q, mask.materialize("cuda"), 0.1, **kw))
            ra = residual.residual_add_forward(xb, dy_q, "layernorm", **kw)
            rb = ref.residual_add_forward(xb, dy_q, "layernorm", **kw)
            report(f"D={d} t={t} residual h_q", ra.h_q, rb.h_q)
            report(f"D={d} t={t} residual rstd", ra.rstd, rb.rstd)
        # stochastic rounding: unbiased (mean over many elements of q*s - y within noise)
        dx = norms.rms_norm_backward(dy_q, x_q, w, rs, out_block="1x128", rounding="stochastic", seed=1)[0]
        want = ref.rms_norm_backward(dy_q, x_q, w, rs, out_dtype=torch.float32)[0]
        err = (dx.dequantize() - want)
        print(f"check D={d} stochastic rms bwd: mean err / mean step {float(err.mean() / dx.scale.mean()):.2e} "
              f"max |err|/step {float((err.abs() / fmt.expand_scale(dx.scale, dx.block, tuple(dx.shape))).max()):.3f}")
        del xb, dyb, x_q, dy_q
        torch.cuda.empty_cache()
    nonfinite.take("cuda")
    xn = torch.randn(4096, 4096, device="cuda")
    xn[100, 200] = float("nan")
    norms.rms_norm_forward(xn, out_block="1x128")
    ev = nonfinite.take("cuda")
    print(f"check nonfinite flag: {ev}", flush=True)
    bad += ev is None or ev.op != "rms_norm_forward"
    print(f"CHECK SUMMARY: {bad} failures", flush=True)


def sync() -> None:
    """Host syncs and isfinite kernels in one INT8 training step (fwd + bwd + grad clip skipped)."""
    from int8flow import build_model
    from int8flow.bench.common import host_syncs

    for name, prec in (("gpt-tiny", "int8"), ("llama-tiny", "int8+fallback"), ("gpt2-124m", "int8")):
        try:
            model = build_model(name, prec).cuda()
            cfg = getattr(model, "config", None)
            vocab, block = getattr(cfg, "vocab_size", 256), getattr(cfg, "block_size", getattr(cfg, "max_seq_len", 128))
            idx = torch.randint(0, vocab, (8, min(block, 1024)), device="cuda")

            def step():
                _, loss = model(idx, idx)
                loss.backward()
                return loss

            step()  # warm up (compiles)
            syncs = [f"{os.path.relpath(w.filename)}:{w.lineno}" for w in host_syncs(step)]
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
                torch.cuda.synchronize()
            print(f"SYNC {name} {prec}: {len(syncs)} host syncs in fwd+bwd; sites {sorted(set(syncs))}; "
                  f"aten::isfinite calls: {sum(e.count for e in prof.key_averages() if e.key == 'aten::isfinite')}; "
                  f"item/_local_scalar_dense: {sum(e.count for e in prof.key_averages() if 'local_scalar' in e.key)}",
                  flush=True)
            del model
            torch.cuda.empty_cache()
        except Exception:
            print(f"SYNC {name}: failed\n{traceback.format_exc()[-1500:]}", flush=True)


def time_all(out: str) -> None:
    from int8flow.bench import membound
    from int8flow.bench.common import copy_gbps, device_info, print_table

    import triton.testing

    def time_ms(fn):
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))

    info = device_info()
    copy = copy_gbps(time_fn=time_ms)
    print(f"{info}  copy {copy:.0f} GB/s", flush=True)
    t0 = time.time()
    records = []
    names = [c.op for c in membound._cases(64, 256, "cuda", compile_=lambda f: f)]
    for d in (4096, 11008, 768, 1024):
        for op in names:
            try:
                for r in membound.membound_records(time_ms, copy, dims=[d], ops=[op]):
                    records.append(r)
                    print(f"ROW {r['op']:28s} D={d:>5d} {r['gbps']:6.0f} GB/s {r['frac_copy']:.2f} of copy "
                          f"{r['speedup']:.2f}x (ours {r['ours_ms']:.3f} ms, bf16 {r['baseline_ms']:.3f} ms)",
                          flush=True)
            except Exception:
                print(f"time {op} D={d} failed\n{traceback.format_exc()[-1500:]}", flush=True)
        print(f"  D={d} timed ({time.time() - t0:.0f} s)", flush=True)
        with open(out, "w") as f:
            json.dump({**info, "copy_gbps": copy, "records": [{**info, **r} for r in records]}, f, indent=1)
    print_table(records)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "--warm":
        warm(int(sys.argv[2]), int(sys.argv[3]))
    elif cmd == "--check":
        check()
    elif cmd == "--sync":
        sync()
    elif cmd == "--time":
        time_all(sys.argv[2])
