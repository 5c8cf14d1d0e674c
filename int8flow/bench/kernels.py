"""``python -m int8flow.bench kernels``: the three GEMMs of a linear layer, quantize, and the memory-bound kernels.

GEMM modes (our kernel; baseline = cuBLAS BF16 ``torch.matmul`` on the same logical shapes, same run):

* ``coarse128``: activations/gradients 1x128, weights 128x128, promotion every 128 of K, int8 tensor
  cores, every operand K-major: fwd and dgrad write re-quantized 1x128 INT8 (the data flow; dgrad reads
  the weight's K-major transposed copy, exact for square blocks), wgrad writes BF16 and reads
  ``quantize_transposed`` copies (a 1x128 tensor's transpose has K blocks of 1). ``block_gemm``'s route
  (Gluon warp-specialized kernel on sm_90, else Triton) is recorded as ``route``.
* ``coarse128-triton``: the same calls forced onto the Triton kernel (the comparison for issue 11).
* ``exact32-int8``: every operand 32x32 (paper numerics), int8 tensor cores, promotion every 32 of K;
  fwd/dgrad write 32x32 INT8, wgrad BF16; backward operands are ``.t()`` views (no copies).
* ``exact32-dequant``: the same operands, dequantize-on-load into BF16 tensor cores.

Every time is a median of repeats with CUDA events and the L2 flushed (`common.time_ms`).
"""
from __future__ import annotations

import argparse
import sys

import torch

from .common import copy_gbps, device_info, print_table, require_cuda, result_path, time_ms, write_json

M_TOKENS = 16384
DEVICE = "cuda"  # the CPU smoke test points it at the interpreter
LINEAR_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (3072, 768), (768, 3072), (2304, 768)]  # (N out, K in)
MODES = {
    # mode: (activation block, weight block, impl)
    "coarse128": ("1x128", "128x128", "int8"),
    "coarse128-triton": ("1x128", "128x128", "int8"),
    "exact32-int8": ("32x32", "32x32", "int8"),
    "exact32-dequant": ("32x32", "32x32", "dequant"),
}


PARTS = ("quantize", "gemm", "fallback", "membound")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="two linear shapes instead of six (about a minute)")
    p.add_argument("--shapes", default=None,
                   help="linear shapes N_out x K_in for the GEMM and fallback records, e.g. 2560x2048,11264x2048 "
                        f"(default: {','.join(f'{n}x{k}' for n, k in LINEAR_SHAPES)})")
    p.add_argument("--tokens", type=int, default=M_TOKENS,
                   help=f"M, the tokens of every record (default {M_TOKENS}; recorded in each record's shape)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--gemm-modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--out", default=None, help="JSON file (default bench/results/<gpu>_kernels.json, <gpu> from the device name)")


def parse_shapes(text: str) -> list:
    """``"2560x2048,11264x2048"`` -> [(2560, 2048), (11264, 2048)] (N out, K in); ValueError with the fix."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: {item.strip()!r} is not N_out x K_in with positive integers; "
                             "write e.g. --shapes 2560x2048,11264x2048")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _subset(text: str, allowed, flag: str) -> list:
    got = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in got if t not in allowed]
    if bad or not got:
        raise ValueError(f"{flag}: {', '.join(bad) or 'nothing given'} not among {', '.join(allowed)}; "
                         f"choose a comma-separated subset, e.g. {flag} {list(allowed)[0]}")
    return got


def k_major_t(q):
    """K-major copy of a square-block QTensor's transpose (same codes and scales; what dgrad reads)."""
    from ..format import QTensor

    return QTensor(q.data.t().contiguous(), q.scale.t().contiguous(), q.block.t())


def _gemm_calls(mode: str, x, w, dy):
    """The three GEMMs of y = x @ w.T in ``mode`` as zero-argument callables, operands quantized once up front."""
    from ..kernels import gemm, quantize as kq

    act, wgt, impl = MODES[mode]
    kernel = "triton" if mode.endswith("-triton") else "auto"
    x_q, w_q, dy_q = kq.quantize(x, act), kq.quantize(w, wgt), kq.quantize(dy, act)
    if act == "32x32":
        dy_t, x_t, w_t = dy_q.t(), x_q.t(), w_q.t()
    else:
        dy_t, x_t, w_t = kq.quantize_transposed(dy, act), kq.quantize_transposed(x, act), k_major_t(w_q)
    return {
        "gemm_fwd": lambda: gemm.block_gemm(x_q, w_q, out_block=act, impl=impl, kernel=kernel),
        "gemm_dgrad": lambda: gemm.block_gemm(dy_q, w_t, out_block=act, impl=impl, kernel=kernel),
        "gemm_wgrad": lambda: gemm.block_gemm(dy_t, x_t, out_dtype=torch.bfloat16, impl=impl, kernel=kernel),
    }


def gemm_records(shapes, timer=time_ms, modes=tuple(MODES)) -> list[dict]:
    from ..kernels import gemm

    records = []
    for n, k in shapes:
        m = M_TOKENS
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
        dy = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
        baseline = {
            "gemm_fwd": timer(lambda: x @ w.t()),
            "gemm_dgrad": timer(lambda: dy @ w),
            "gemm_wgrad": timer(lambda: dy.t() @ x),
        }
        for mode in modes:
            for op, fn in _gemm_calls(mode, x, w, dy).items():
                fn()  # autotune + compile outside the timed region
                ours = timer(fn)
                records.append({"op": op, "shape": [m, n, k], "mode": mode, "route": gemm.last_route[0], "ours_ms": ours,
                                "baseline_ms": baseline[op], "speedup": baseline[op] / ours,
                                "tflops": 2 * m * n * k / ours / 1e9})
            print(f"  gemm {m}x{n}x{k} done", flush=True)
    return records


def _fallback_input(k: int, frac: float, pattern: str, device) -> torch.Tensor:
    """BF16 (M_TOKENS, k) Gaussian with outliers on ~``frac`` of its 1x128 blocks: ``channels`` puts one 1e3
    channel in ``max(1, round(frac x groups))`` K groups (every block of those groups flags, the outlier-channel
    pattern of LLM activations), ``scattered`` one 1e3 element in each block drawn with probability ``frac``."""
    x = torch.randn(M_TOKENS, k, device=device)
    groups = -(-k // 128)
    if pattern == "channels":
        chosen = torch.randperm(groups, device=device)[: max(1, round(frac * groups))]
        x[:, (chosen * 128 + 5).clamp_max(k - 1)] = 1e3
    else:
        rows, cols = (torch.rand((M_TOKENS, groups), device=device) < frac).nonzero(as_tuple=True)
        x[rows, (cols * 128 + 5).clamp_max(k - 1)] = 1e3
    return x.to(torch.bfloat16)


def fallback_records(shapes, timer=time_ms, fractions=(0.05, 0.25)) -> list[dict]:
    """Forward GEMM with a fallback term on ``fraction`` of the activation blocks.

    ``coarse128`` (the default 1x128 geometry, column-structured fallback, `int8flow.ops.fallback`): inputs with
    real outliers (`_fallback_input`); ``gemm_fwd_fallback`` times the one GEMM over K + G x 128 (the term's
    columns concatenated, 1x128 INT8 epilogue) against the plain INT8 GEMM of the same mode (speedup < 1 is the
    overhead; about K / (K + G x 128)); ``fwd_fallback`` the whole forward of the activation: quantize, group
    selection, the term on the chosen columns, the concatenations and the GEMM, against quantize + the plain GEMM
    (the target: <= 10% over int8 at 5% flagged blocks in the channel pattern). ``G`` is the config's capacity,
    ``flagged`` the fraction of blocks that got a term (the scattered pattern's outside the G groups get none).
    ``exact32-int8`` (32x32, the dense term in the Triton kernel): flags either mark whole K blocks
    (``channels``) or blocks at random (``scattered``); ``two_gemm_est_ms`` (twice the plain GEMM) is a lower
    bound of the unfused alternative, a second full GEMM for the term.
    """
    from ..config import Int8TrainingConfig
    from ..format import QTensor
    from ..kernels import gemm, quantize as kq
    cfg = Int8TrainingConfig(precision="int8+fallback")
    records = []
    for n, k in shapes:
        x = torch.randn(M_TOKENS, k, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
        for mode in ("coarse128", "exact32-int8"):
            act, wgt, impl = MODES[mode]
            x_q, w_q = kq.quantize(x, act), kq.quantize(w, wgt)
            plain_fn = lambda: gemm.block_gemm(x_q, w_q, out_block=act, impl=impl)  # noqa: E731
            plain_fn()  # tuned by gemm_records in a full run; autotune + compile outside the timed region
            plain = timer(plain_fn)
            for frac in fractions:
                for pattern in ("channels", "scattered"):
                    common = {"shape": [M_TOKENS, n, k], "mode": f"{mode} {pattern} {frac:.0%}"}
                    if mode == "coarse128":
                        records += _column_fallback_records(_fallback_input(k, frac, pattern, DEVICE), w, cfg,
                                                            plain, timer, common)
                        continue
                    rows = 1 if pattern == "channels" else x_q.scale.shape[0]
                    flags = (torch.rand((rows, x_q.scale.shape[1]), device=DEVICE) < frac).expand_as(x_q.scale)
                    x2_q = QTensor(x_q.data, x_q.scale * flags, x_q.block)  # timing only needs the flagged layout
                    fn = lambda: gemm.block_gemm(x_q, w_q, out_block=act, impl=impl,  # noqa: E731
                                                 a_fallback=x2_q, a_fallback_flags=flags)
                    fn()  # autotune + compile outside the timed region
                    ms = timer(fn)
                    records.append({"op": "gemm_fwd_fallback", **common, "route": gemm.last_route[0], "ours_ms": ms,
                                    "baseline_ms": plain, "speedup": plain / ms, "two_gemm_est_ms": 2 * plain,
                                    "flagged": float(flags.float().mean())})
    return records


def _column_fallback_records(xf, w, cfg, plain_gemm_ms, timer, common) -> list[dict]:
    """The two coarse128 fallback records of one input (`fallback_records`)."""
    from ..kernels import gemm
    from ..ops import primitives as P

    blk = cfg.activation_block
    w_q = P.quantize(w, cfg.weight_block, "nearest", 0, cfg, "weight")
    x_q, term, rate = P.quantize_activation(xf, cfg, "input")
    ext = P.with_term(x_q, term)
    b_ext = P.extend_b(w_q, ext.groups, blk.cols)
    gemm_fn = lambda: P.gemm([ext.a], b_ext, out_block=blk, cfg=cfg)  # noqa: E731
    gemm_fn()  # autotune + compile outside the timed region
    gemm_ms = timer(gemm_fn)
    route = gemm.last_route[0]
    extra = {"G": len(ext.groups), "groups": -(-xf.shape[1] // blk.cols), "flagged": float(rate)}

    def fwd():  # what the data flow runs per activation and weight: quantize (+ term, concatenations) + GEMM
        a_q, a2_q, _ = P.quantize_activation(xf, cfg, "input")
        return P.gemm([a_q, a2_q], w_q, out_block=blk, cfg=cfg)

    def fwd_plain():
        return P.gemm([P.quantize(xf, blk, "nearest", 0, cfg, "input")], w_q, out_block=blk, cfg=cfg)

    fwd(), fwd_plain()
    fwd_ms, plain_ms = timer(fwd), timer(fwd_plain)
    return [{"op": "gemm_fwd_fallback", **common, "route": route, "ours_ms": gemm_ms, "baseline_ms": plain_gemm_ms,
             "speedup": plain_gemm_ms / gemm_ms, **extra},
            {"op": "fwd_fallback", **common, "route": gemm.last_route[0], "ours_ms": fwd_ms, "baseline_ms": plain_ms,
             "speedup": plain_ms / fwd_ms, **extra}]


def quantize_records(copy: float, timer=time_ms) -> list[dict]:
    """Quantize a BF16 (16384, 4096) tensor (and its fused transpose) vs a BF16 device copy of it."""
    from ..kernels import quantize as kq

    x = torch.randn(M_TOKENS, 4096, device=DEVICE, dtype=torch.bfloat16)
    copy_ms = timer(lambda: x.clone())
    records = []
    for block in ("32x32", "1x128"):
        for op, fn in (("quantize", kq.quantize), ("quantize_transposed", kq.quantize_transposed)):
            ms = timer(lambda: fn(x, block, check_finite=False))
            r, c = x.shape
            nbytes = x.numel() * 2 + x.numel() + 4 * (r * c) // (int(block.split("x")[0]) * int(block.split("x")[1]))
            records.append({"op": op, "shape": [r, c], "mode": block, "ours_ms": ms, "baseline_ms": copy_ms,
                            "speedup": copy_ms / ms, "gbps": nbytes / ms / 1e6, "copy_gbps": copy})
    return records


def membound(copy: float) -> list[dict]:
    try:
        from . import membound as mb
    except ImportError as e:
        print(f"  int8flow.bench.membound is not available ({e}); memory-bound kernels skipped")
        return []
    mb.M_TOKENS = M_TOKENS  # --tokens
    membound_records = mb.membound_records
    return [{**r, "copy_gbps": copy} for r in membound_records(time_ms, copy)]


def main(args) -> int:
    global M_TOKENS
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else LINEAR_SHAPES
        parts = _subset(args.parts, PARTS, "--parts")
        modes = _subset(args.gemm_modes, MODES, "--gemm-modes")
        if args.tokens < 1:
            raise ValueError(f"--tokens must be a positive number of tokens (M), got {args.tokens}")
    except ValueError as e:
        print(f"int8flow bench kernels: {e}", file=sys.stderr)
        return 2
    require_cuda()
    M_TOKENS = args.tokens
    info = device_info()
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}  M = {M_TOKENS}",
          flush=True)
    shapes = shapes[:2] if args.quick else shapes
    copy = copy_gbps()
    print(f"  device-to-device copy: {copy:.0f} GB/s", flush=True)
    records = ((quantize_records(copy) if "quantize" in parts else [])
               + (gemm_records(shapes, modes=tuple(modes)) if "gemm" in parts else [])
               + (fallback_records(shapes) if "fallback" in parts else [])
               + (membound(copy) if "membound" in parts else []))
    out = args.out or result_path(info, "kernels")
    write_json(out, records, info)
    print(f"wrote {len(records)} records to {out}")
    print_table(records)
    return 0
