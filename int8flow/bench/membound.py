"""Memory-bound operators of the INT8 data flow vs their BF16 PyTorch twins under torch.compile.

``membound_records(time_ms, copy_gbps)`` times each non-linear kernel (forward and backward) at
M = 16384 tokens, D in {4096, 11008}, INT8 in and out with 32x32 blocks, against the BF16 op compiled
by torch.compile, and returns one record per (op, shape). The caller supplies the timer
(``time_ms(fn) -> milliseconds``) and the device-to-device copy bandwidth it measured, so every
figure of a run comes from the same clock (``python -m int8flow.bench kernels``).

Bytes are the least each operator must move: activations read and written, INT8 at 1 B per element
plus 4 B per block scale, BF16 at 2 B per element, float32 row statistics at 4 B per row; weights
(D elements) are ignored. ``gbps`` is our bytes over our time: compare it with ``copy_gbps``.
Backward baselines are the reference formulas compiled on BF16 tensors (what inductor emits for the
ops' backward); forward baselines are the torch ops themselves. CUDA only; nothing runs at import.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

M_TOKENS = 16384
DIMS = (4096, 11008)
BLOCK = "32x32"


class _Case(NamedTuple):
    op: str
    ours: Callable[[], object]
    baseline: Callable[[], object]
    ours_bytes: int
    baseline_bytes: int


def _i8_bytes(m: int, d: int, block_elems: int = 32 * 32) -> int:
    return m * d + 4 * (-(-m * d // block_elems))


def _cases(m: int, d: int, dev: str = "cuda", compile_: Callable = partial(torch.compile, dynamic=False)) -> list[_Case]:
    """The timed pairs at (m, d); ``dev``/``compile_`` are parameters so the CPU tests can check the wiring."""
    from ..kernels import activations, dropout, norms, residual
    from ..reference import nonlinear as ref

    bf16 = torch.bfloat16
    q = dict(out_block=BLOCK)
    q_grad = dict(out_block=BLOCK, rounding="stochastic")
    ref_bf16 = dict(out_dtype=bf16)

    x_bf, dy_bf, u_bf = (torch.randn(m, d, device=dev, dtype=bf16) for _ in range(3))
    w, b = torch.ones(d, device=dev, dtype=bf16), torch.zeros(d, device=dev, dtype=bf16)
    x_q, dy_q, u_q = (residual.convert(t, **q) for t in (x_bf, dy_bf, u_bf))
    _, mean, rstd = norms.layer_norm_forward(x_q, w, b, **q)
    _, rms_rstd = norms.rms_norm_forward(x_q, w, **q)
    _, keep = dropout.dropout_forward(x_q, 0.1, **q)
    keep_bf = keep.materialize(dev)

    i8, bf, stats = _i8_bytes(m, d), 2 * m * d, 4 * m
    return [
        _Case("layernorm_fwd", lambda: norms.layer_norm_forward(x_q, w, b, **q),
              partial(compile_(F.layer_norm), x_bf, (d,), w, b), 2 * i8 + 2 * stats, 2 * bf),
        _Case("layernorm_bwd", lambda: norms.layer_norm_backward(dy_q, x_q, w, mean, rstd, **q_grad),
              partial(compile_(partial(ref.layer_norm_backward, **ref_bf16)), dy_bf, x_bf, w, mean, rstd),
              3 * i8 + 2 * stats, 3 * bf + 2 * stats),
        _Case("rmsnorm_fwd", lambda: norms.rms_norm_forward(x_q, w, **q),
              partial(compile_(F.rms_norm), x_bf, (d,), w), 2 * i8 + stats, 2 * bf),
        _Case("rmsnorm_bwd", lambda: norms.rms_norm_backward(dy_q, x_q, w, rms_rstd, **q_grad),
              partial(compile_(partial(ref.rms_norm_backward, **ref_bf16)), dy_bf, x_bf, w, rms_rstd),
              3 * i8 + stats, 3 * bf + stats),
        _Case("gelu_fwd", lambda: activations.gelu_forward(x_q, "tanh", **q),
              partial(compile_(partial(F.gelu, approximate="tanh")), x_bf), 2 * i8, 2 * bf),
        _Case("gelu_bwd", lambda: activations.gelu_backward(dy_q, x_q, "tanh", **q_grad),
              partial(compile_(partial(ref.gelu_backward, approximate="tanh", **ref_bf16)), dy_bf, x_bf),
              3 * i8, 3 * bf),
        _Case("swiglu_fwd", lambda: activations.swiglu_forward(x_q, u_q, **q),
              partial(compile_(lambda g, u: F.silu(g) * u), x_bf, u_bf), 3 * i8, 3 * bf),
        _Case("swiglu_bwd", lambda: activations.swiglu_backward(dy_q, x_q, u_q, **q_grad),
              partial(compile_(partial(ref.swiglu_backward, **ref_bf16)), dy_bf, x_bf, u_bf), 5 * i8, 5 * bf),
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


def membound_records(time_ms: Callable[[Callable[[], object]], float], copy_gbps: float) -> list[dict]:
    """One record per (op, shape): op, shape, mode, ours_ms, baseline_ms, speedup, gbps, baseline_gbps, copy_gbps."""
    if not torch.cuda.is_available():
        raise RuntimeError("membound_records needs a CUDA GPU (the Triton kernels are timed against torch.compile)")
    records = []
    for d in DIMS:
        for case in _cases(M_TOKENS, d):
            ours_ms, baseline_ms = time_ms(case.ours), time_ms(case.baseline)
            records.append(dict(
                op=case.op, shape=f"{M_TOKENS}x{d}", mode="int8", ours_ms=ours_ms, baseline_ms=baseline_ms,
                speedup=baseline_ms / ours_ms, gbps=case.ours_bytes / ours_ms / 1e6,
                baseline_gbps=case.baseline_bytes / baseline_ms / 1e6, copy_gbps=copy_gbps,
            ))
        torch.cuda.empty_cache()
    return records


def main() -> None:
    """Standalone run: ``python -m int8flow.bench.membound`` (triton's do_bench, median ms)."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() / triton.testing.do_bench(lambda: dst.copy_(src)) / 1e6
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s ({torch.cuda.get_device_name()})")
    for r in membound_records(lambda fn: triton.testing.do_bench(fn), copy_gbps):
        print(f"{r['op']:30s} {r['shape']:>11s}  ours {r['ours_ms']:7.3f} ms {r['gbps']:6.0f} GB/s  "
              f"bf16 compiled {r['baseline_ms']:7.3f} ms {r['baseline_gbps']:6.0f} GB/s  speedup {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()


__all__ = ["DIMS", "M_TOKENS", "main", "membound_records"]
