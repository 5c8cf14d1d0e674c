"""Memory-bound operators of the INT8 data flow vs their BF16 twins compiled by torch.compile.

``membound_records(time_ms, copy_gbps)`` times each memory-bound kernel at M = 16384 tokens, D in
{768, 1024, 4096, 11008}: quantize (row 1x128, transposed, both layouts in one pass), LayerNorm / RMSNorm /
GELU / SwiGLU / dropout forward and backward, the residual add with the next norm's statistics, INT8 in
and out with 1x128 blocks (the geometry the GEMMs read), and the producers' dual-layout variants
(``with_t``: the output and its K-major transposed copy for the weight-gradient GEMM, from one pass).
The baseline of each is its BF16 twin compiled by torch.compile in the same run (for the quantizers, the
reference quantizer compiled on a BF16 input), so ``speedup = baseline_ms / ours_ms``.

Bytes are the least each operator must move: every input read once, every output written once, INT8 at
1 B per element plus 4 B per block scale, BF16 at 2 B, float32 row statistics at 4 B per row; weights
(D elements) ignored. ``gbps`` = our bytes / our time: compare it with ``copy_gbps`` (a device-to-device
copy, bytes read + written, same run). The caller supplies the timer and copy bandwidth so every figure
of a run comes from one clock (``python -m int8flow.bench kernels``). CUDA only; nothing runs at import.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

M_TOKENS = 16384
DIMS = (768, 1024, 4096, 11008)
BLOCK = "1x128"


class _Case(NamedTuple):
    op: str
    ours: Callable[[], object]
    baseline: Callable[[], object]
    ours_bytes: int
    baseline_bytes: int
    mode: str = "int8 1x128"


def _i8_bytes(m: int, d: int, block_elems: int = 128) -> int:
    return m * d + 4 * (-(-m * d // block_elems))


def _cases(m: int, d: int, dev: str = "cuda", compile_: Callable = partial(torch.compile, dynamic=False),
           ops: Optional[Sequence[str]] = None) -> list[_Case]:
    """The timed pairs at (m, d); ``dev``/``compile_`` are parameters so the CPU tests can check the wiring;
    ``ops`` keeps only the named cases (all by default)."""
    from .. import format as fmt
    from ..kernels import activations, dropout, norms, quantize as kq, residual
    from ..reference import nonlinear as ref

    bf16 = torch.bfloat16
    q = dict(out_block=BLOCK)
    q_t = dict(out_block=BLOCK, with_t=True)
    q_grad = dict(out_block=BLOCK, rounding="stochastic")
    q_grad_t = dict(q_grad, with_t=True)
    ref_bf16 = dict(out_dtype=bf16)

    x_bf, dy_bf, u_bf = (torch.randn(m, d, device=dev, dtype=bf16) for _ in range(3))
    x_bf[:, 3] *= 40  # an outlier channel, as real activations have
    w, b = torch.randn(d, device=dev, dtype=bf16) * 0.1 + 1, torch.randn(d, device=dev, dtype=bf16) * 0.1
    x_q, dy_q, u_q = (residual.convert(t, **q) for t in (x_bf, dy_bf, u_bf))
    _, mean, rstd = norms.layer_norm_forward(x_q, w, b, **q)
    _, rms_rstd = norms.rms_norm_forward(x_q, w, **q)
    _, keep = dropout.dropout_forward(x_q, 0.1, **q)
    keep_bf = keep.materialize(dev)

    i8, bf, stats = _i8_bytes(m, d), 2 * m * d, 4 * m
    quant = compile_(partial(fmt.quantize, block=BLOCK, check_finite=False))
    quant_t = compile_(partial(fmt.quantize_transposed, block=BLOCK, check_finite=False))
    cases = [
        _Case("quantize", lambda: kq.quantize(x_bf, BLOCK, check_finite=False), partial(quant, x_bf), bf + i8, bf + i8),
        _Case("quantize_transposed", lambda: kq.quantize_transposed(x_bf, BLOCK, check_finite=False),
              partial(quant_t, x_bf), bf + i8, bf + i8),
        _Case("quantize_dual", lambda: kq.quantize_dual(x_bf, BLOCK, check_finite=False),
              lambda: (quant(x_bf), quant_t(x_bf)), bf + 2 * i8, bf + 2 * i8),
        _Case("layernorm_fwd", lambda: norms.layer_norm_forward(x_q, w, b, **q),
              partial(compile_(F.layer_norm), x_bf, (d,), w, b), 2 * i8 + 2 * stats, 2 * bf),
        _Case("layernorm_fwd_dual", lambda: norms.layer_norm_forward(x_q, w, b, mean=mean, rstd=rstd, **q_t),
              partial(compile_(F.layer_norm), x_bf, (d,), w, b), 3 * i8 + 2 * stats, 2 * bf,
              mode="int8 1x128 + transposed, stats given"),
        _Case("layernorm_bwd", lambda: norms.layer_norm_backward(dy_q, x_q, w, mean, rstd, **q_grad),
              partial(compile_(partial(ref.layer_norm_backward, **ref_bf16)), dy_bf, x_bf, w, mean, rstd),
              3 * i8 + 2 * stats, 3 * bf + 2 * stats),
        _Case("rmsnorm_fwd", lambda: norms.rms_norm_forward(x_q, w, **q),
              partial(compile_(F.rms_norm), x_bf, (d,), w), 2 * i8 + stats, 2 * bf),
        _Case("rmsnorm_bwd", lambda: norms.rms_norm_backward(dy_q, x_q, w, rms_rstd, **q_grad),
              partial(compile_(partial(ref.rms_norm_backward, **ref_bf16)), dy_bf, x_bf, w, rms_rstd),
              3 * i8 + stats, 3 * bf + stats),
        _Case("rmsnorm_bwd_dual", lambda: norms.rms_norm_backward(dy_q, x_q, w, rms_rstd, **q_grad_t),
              partial(compile_(partial(ref.rms_norm_backward, **ref_bf16)), dy_bf, x_bf, w, rms_rstd),
              4 * i8 + stats, 3 * bf + stats, mode="int8 1x128 + transposed"),
        _Case("gelu_fwd", lambda: activations.gelu_forward(x_q, "tanh", **q),
              partial(compile_(partial(F.gelu, approximate="tanh")), x_bf), 2 * i8, 2 * bf),
        _Case("gelu_fwd_dual", lambda: activations.gelu_forward(x_q, "tanh", **q_t),
              partial(compile_(partial(F.gelu, approximate="tanh")), x_bf), 3 * i8, 2 * bf,
              mode="int8 1x128 + transposed"),
        _Case("gelu_bwd", lambda: activations.gelu_backward(dy_q, x_q, "tanh", **q_grad),
              partial(compile_(partial(ref.gelu_backward, approximate="tanh", **ref_bf16)), dy_bf, x_bf),
              3 * i8, 3 * bf),
        _Case("swiglu_fwd", lambda: activations.swiglu_forward(x_q, u_q, **q),
              partial(compile_(lambda g, u: F.silu(g) * u), x_bf, u_bf), 3 * i8, 3 * bf),
        _Case("swiglu_bwd", lambda: activations.swiglu_backward(dy_q, x_q, u_q, **q_grad),
              partial(compile_(partial(ref.swiglu_backward, **ref_bf16)), dy_bf, x_bf, u_bf), 5 * i8, 5 * bf),
        _Case("swiglu_bwd_dual", lambda: activations.swiglu_backward(dy_q, x_q, u_q, **q_grad_t),
              partial(compile_(partial(ref.swiglu_backward, **ref_bf16)), dy_bf, x_bf, u_bf), 7 * i8, 5 * bf,
              mode="int8 1x128 + transposed"),
        _Case("dropout_fwd", lambda: dropout.dropout_forward(x_q, 0.1, **q),
              partial(compile_(partial(F.dropout, p=0.1, training=True)), x_bf), 2 * i8, 2 * bf),
        # Ours regenerates the mask; the baseline reads the bool mask PyTorch's dropout saved (1 B/element).
        _Case("dropout_bwd", lambda: dropout.dropout_backward(dy_q, keep, 0.1, **q_grad),
              partial(compile_(partial(ref.dropout_backward, p=0.1, **ref_bf16)), dy_bf, keep_bf), 2 * i8,
              2 * bf + m * d),
        # h = residual + delta: residual and h stay BF16 (the high-precision stream), delta and h_q INT8.
        _Case("residual_add_layernorm_stats", lambda: residual.residual_add_forward(x_bf, dy_q, "layernorm", **q),
              partial(compile_(partial(ref.residual_add_forward, stats="layernorm")), x_bf, dy_bf),
              2 * bf + 2 * i8 + 2 * stats, 3 * bf + 2 * stats),
    ]
    return [c for c in cases if ops is None or c.op in ops]


def _raise_recompile_limit(limit: int = 512) -> None:
    """Dynamo caches compiled graphs per code object (8 by default): the baselines compile the same reference
    functions at every D and layout, and past the limit dynamo silently runs them eagerly (seen on the H200,
    2026-12-01: 5-8 ms 'compiled' baselines). Raise it so every baseline is really compiled."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def membound_records(time_ms: Callable[[Callable[[], object]], float], copy_gbps: float,
                     dims: Sequence[int] = DIMS, ops: Optional[Sequence[str]] = None) -> list[dict]:
    """One record per (op, shape): op, shape, mode, ours_ms, baseline_ms, speedup, gbps, baseline_gbps,
    copy_gbps, frac_copy."""
    if not torch.cuda.is_available():
        raise RuntimeError("membound_records needs a CUDA GPU (the Triton kernels are timed against torch.compile)")
    _raise_recompile_limit()
    records = []
    for d in dims:
        for case in _cases(M_TOKENS, d, ops=ops):
            case.ours(), case.baseline()  # compile / autotune outside the timed region
            ours_ms, baseline_ms = time_ms(case.ours), time_ms(case.baseline)
            gbps = case.ours_bytes / ours_ms / 1e6
            records.append(dict(
                op=case.op, shape=[M_TOKENS, d], mode=case.mode, ours_ms=ours_ms, baseline_ms=baseline_ms,
                speedup=baseline_ms / ours_ms, gbps=gbps, frac_copy=gbps / copy_gbps,
                baseline_gbps=case.baseline_bytes / baseline_ms / 1e6, copy_gbps=copy_gbps,
            ))
        torch.cuda.empty_cache()
    return records


def merge_records(path: str, records: list[dict], info: dict) -> None:
    """Replace the memory-bound records (ops named here) of the result file ``path``, keeping the others
    (the GEMM records another run wrote), and write it back in ``common.write_json``'s format."""
    import json
    import os

    from .common import write_json

    ours = {r["op"] for r in records}
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [r for r in json.load(f).get("records", []) if r.get("op") not in ours]
    write_json(path, kept + records, info)


def main(argv=None) -> None:
    """Standalone run: ``python -m int8flow.bench.membound [--out FILE] [--dims 768,4096] [--ops a,b]``."""
    import argparse

    from .common import copy_gbps, device_info, print_table, require_cuda, result_path, time_ms

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="JSON file (default bench/results/<gpu>_kernels.json, <gpu> from the device name)")
    p.add_argument("--dims", default=",".join(map(str, DIMS)))
    p.add_argument("--ops", default="")
    args = p.parse_args(argv)
    require_cuda()
    info = device_info()
    copy = copy_gbps()
    print(f"{info['device']}  copy {copy:.0f} GB/s", flush=True)
    records = membound_records(time_ms, copy, [int(x) for x in args.dims.split(",")],
                               [o for o in args.ops.split(",") if o] or None)
    merge_records(args.out or result_path(info, "kernels"), records, info)
    print_table(records)


if __name__ == "__main__":
    main()


__all__ = ["DIMS", "M_TOKENS", "main", "membound_records", "merge_records"]
