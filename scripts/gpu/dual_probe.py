"""GPU probe: the producers of transposed wgrad operands (issue 12/13), alone, at the Llama-7B block's shapes.

    python scripts/gpu/dual_probe.py [--out DIR] [--warps 0]

Times (triton.testing.do_bench medians) at M = 8192 tokens, N in {4096, 11008}: quantize (row 1x128; and
128x128, the weights' blocks),
quantize_transposed, quantize_dual, the INT8 transpose kernel, RMSNorm forward with given statistics with and
without the transposed copy, SwiGLU forward/backward with and without it (backward also
with v3's launch choices, 'v3' rows); GB/s by the least bytes each must move,
and the fraction of a same-run bf16 copy's bandwidth. The transposed-copy producers run twice: session 5's one-warp
programs (``_launch.transposed_tile``) and, rows marked 's4', session 4's launches (``_launch.T_ONE_WARP = False``);
a table of both closes the run. ``--warps W`` overrides the warps of the [128, G, 128] tiles
of the transposed copy (0: the library's choice), to see whether occupancy or spills decide. Table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402


# ops whose transposed launch changed in session 5 (timed again with session 4's launches: 's4' rows)
_S5_ROWS = ("quantize_transposed", "quantize_dual", "quantize_dual stochastic", "rmsnorm fwd with_t='only'",
            "swiglu fwd with_t='only'", "swiglu bwd with_t")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--warps", type=int, default=0)
    a = p.parse_args()
    from int8flow.kernels import _launch, activations, norms, quantize as kq
    if a.warps:
        real = _launch.warps_for_tile
        _launch.warps_for_tile = lambda tile, per: a.warps if tile >= 16384 else real(tile, per)
        kq._launch.warps_for_tile = _launch.warps_for_tile
    M = 8192
    rows = []

    def _s4(fn):
        _launch.T_ONE_WARP = False
        try:
            return fn()
        finally:
            _launch.T_ONE_WARP = True

    def _v3(fn):
        saved = activations.BACKWARD_PER_THREAD, activations.SPLIT_BACKWARD_T
        activations.BACKWARD_PER_THREAD, activations.SPLIT_BACKWARD_T = 4, False
        try:
            return fn()
        finally:
            activations.BACKWARD_PER_THREAD, activations.SPLIT_BACKWARD_T = saved

    for N in (4096, 11008):
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        x[:, 7] *= 30
        copy_ms = do_bench(lambda: x.clone())
        copy_bw = 2 * x.numel() * 2 / copy_ms / 1e6  # GB/s
        q = kq.quantize(x, "1x128", check_finite=False)
        u = kq.quantize(torch.randn_like(x), "1x128", check_finite=False)
        dy = kq.quantize(torch.randn_like(x), "1x128", check_finite=False)
        rstd = torch.ones(M, device="cuda")
        w = torch.ones(N, device="cuda", dtype=torch.bfloat16)
        e = M * N
        sc = e // 128 * 4  # bytes of one 1x128 scale grid
        cases = [
            ("quantize bf16->1x128", lambda: kq.quantize(x, "1x128", check_finite=False), 3 * e + sc),
            ("quantize bf16->128x128", lambda: kq.quantize(x, "128x128", check_finite=False), 3 * e + e // 16384 * 4),
            ("quantize_transposed", lambda: kq.quantize_transposed(x, "1x128", check_finite=False), 3 * e + sc),
            ("quantize_dual", lambda: kq.quantize_dual(x, "1x128", check_finite=False), 4 * e + 2 * sc),
            ("quantize_dual stochastic", lambda: kq.quantize_dual(x, "1x128", "stochastic", 5, check_finite=False),
             4 * e + 2 * sc),
            ("transpose_qtensor", lambda: kq.transpose_qtensor(q), 2 * e + 2 * sc),
            ("rmsnorm fwd (stats given)", lambda: norms.rms_norm_forward(q, w, rstd=rstd, out_block="1x128"),
             2 * e + 2 * sc),
            ("rmsnorm fwd with_t", lambda: norms.rms_norm_forward(q, w, rstd=rstd, out_block="1x128", with_t=True),
             3 * e + 3 * sc),
            ("swiglu fwd", lambda: activations.swiglu_forward(q, u, out_block="1x128"), 3 * e + 3 * sc),
            ("swiglu fwd with_t", lambda: activations.swiglu_forward(q, u, out_block="1x128", with_t=True),
             4 * e + 4 * sc),
            ("swiglu fwd with_t='only'", lambda: activations.swiglu_forward(q, u, out_block="1x128", with_t="only"),
             3 * e + 3 * sc),
            ("rmsnorm fwd with_t='only'", lambda: norms.rms_norm_forward(q, w, rstd=rstd, out_block="1x128",
                                                                         with_t="only"), 2 * e + 2 * sc),
            ("swiglu bwd (stochastic)", lambda: activations.swiglu_backward(dy, q, u, out_block="1x128",
                                                                           rounding="stochastic", seed=3),
             5 * e + 5 * sc),
            ("swiglu bwd with_t", lambda: activations.swiglu_backward(dy, q, u, out_block="1x128",
                                                                     rounding="stochastic", seed=3, with_t=True),
             7 * e + 7 * sc),
            # v3's choices in the same run (module switches of activations._swiglu): 4 values a thread, one fused launch
            ("swiglu bwd (stochastic) v3", lambda: _v3(lambda: activations.swiglu_backward(
                dy, q, u, out_block="1x128", rounding="stochastic", seed=3)), 5 * e + 5 * sc),
            ("swiglu bwd with_t v3 fused", lambda: _v3(lambda: activations.swiglu_backward(
                dy, q, u, out_block="1x128", rounding="stochastic", seed=3, with_t=True)), 7 * e + 7 * sc),
        ]
        # session 4's transposed-copy launches in the same run
        cases += [(name + " s4", lambda fn=fn: _s4(fn), nbytes) for name, fn, nbytes in cases if name in _S5_ROWS]
        for name, fn, nbytes in cases:
            try:
                ms = do_bench(fn)
            except Exception as err:  # a probe: report and go on
                print(f"{name}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            gbps = nbytes / ms / 1e6
            rows.append(dict(op=name, shape=[M, N], ms=ms, gbps=gbps, copy_gbps=copy_bw, frac=gbps / copy_bw,
                             warps=a.warps))
            print(f"{name:28s} {M}x{N:<6d} {ms * 1e3:8.1f} us {gbps:7.0f} GB/s {gbps / copy_bw:5.2f} of copy",
                  flush=True)
    by = {(r["op"], r["shape"][1]): r for r in rows}
    print("\nsession 5 (one-warp transposed programs) vs session 4, us (fraction of copy):")
    print(f"{'op':30s} {'N':>6s} {'session 4':>16s} {'session 5':>16s} {'s4/s5':>6s}")
    for (op, n), r in by.items():
        old = by.get((op + " s4", n))
        if old:
            print(f"{op:30s} {n:6d} {old['ms'] * 1e3:8.1f} ({old['frac']:.2f}) {r['ms'] * 1e3:8.1f} ({r['frac']:.2f}) "
                  f"{old['ms'] / r['ms']:6.2f}")
    with open(os.path.join(a.out, f"dual_probe_w{a.warps}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
