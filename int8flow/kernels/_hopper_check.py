"""Compile the GEMM and quantize kernels for sm_90 without a GPU and report resources.

``python -m int8flow.kernels._hopper_check`` prints one JSON line per variant: registers, stack bytes
(spills), shared memory, and the wgmma instruction in the PTX. It catches what the CPU interpreter cannot
(Triton front-end errors on the compiled path, a missing tensor-core path, spills) before any GPU time is
spent. Needs triton's bundled ptxas/cuobjdump; must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import gemm, quantize

HOPPER = GPUTarget("cuda", 90, 32)
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout


def _resources(cubin: bytes) -> dict:
    m = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(cubin, "-res-usage"))
    return {"regs": int(m.group(1)), "stack_bytes": int(m.group(2))} if m else {}


def _sass_count(cubin: bytes) -> int:
    """Number of SASS instructions in a cubin (every kernel in it)."""
    out = _cuobjdump(cubin, "-sass")
    return len(re.findall(r"/\*[0-9a-f]{4,6}\*/\s+\S", out))


def compile_for_hopper(fn, pointer_types: dict, constexprs: dict, num_warps: int, num_stages: int,
                       divisible: tuple = (), enable_fp_fusion: bool = True) -> dict:
    """Compile ``fn`` (a @triton.jit kernel) for sm_90; other int arguments are i32.

    Specialized as a real launch would be: pointers 16-byte aligned, the ints named in ``divisible`` multiples
    of 16 (pass a unit stride as a constexpr 1). Without these Triton cannot vectorize the memory accesses, and
    the register and instruction counts of the memory-bound kernels come out 2-3x too high."""
    names = list(inspect.signature(fn.fn).parameters)
    # seed pointers (``seed_ptr``, ``mask_seed_ptr``): the 1-element int64 base seed every seeded kernel reads
    sig = {n: pointer_types.get(n, "constexpr" if n in constexprs else "*i64" if n.endswith("seed_ptr") else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n in divisible}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    kernel = triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages,
                                                         "enable_fp_fusion": enable_fp_fusion})
    ptx = kernel.asm["ptx"]
    return {**_resources(kernel.asm["cubin"]), "shared_bytes": kernel.metadata.shared,
            "sass": _sass_count(kernel.asm["cubin"]),
            "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.\S+", ptx))),
            "f32_mul_rn": len(re.findall(r"\bmul\.rn\.f32", ptx)), "f32_fma": len(re.findall(r"\bfma\.rn\.f32", ptx))}


def _warps_per_sm(r: dict, num_warps: int) -> int:
    """Resident warps per SM on sm_90: registers (64K), shared memory (228 KB), 64 warps and 32 CTAs per SM."""
    ctas = min(65536 // max(1, r["regs"] * 32 * num_warps), 64 // num_warps, 32,
               (228 * 1024) // max(1, r["shared_bytes"]))
    return ctas * num_warps


def quant3_variant(rowq: bool, trans: bool, stochastic: bool, R: int, G: int, C: int, num_warps: int) -> dict:
    """The one-pass quantizer (`quantize._quant3_kernel`) on a bf16 input: row-quantized 1x128 copy (``rowq``)
    and/or the transposed 1xR copy (``trans``), an [R, G, C] tile per program. Adds SASS instructions per
    element and resident warps per SM (registers, shared memory and the 64-warp cap): the two numbers that
    decided the memory-bound kernels' speed on the H200 (docs/notes/membound_h200.md)."""
    consts = dict(stride_xc=1, QR=1, QC=128 if rowq else 1, ROWQ=rowq, TRANS=trans, STOCHASTIC=stochastic,
                  R=R, G=G, C=C)
    ptrs = {"x_ptr": "*bf16", "q_ptr": "*i8", "q_scale": "*fp32", "qt_ptr": "*i8", "qt_scale": "*fp32",
            "flag_ptr": "*i32"}
    r = compile_for_hopper(quantize._quant3_kernel, ptrs, consts, num_warps, 1, divisible=("M", "N", "stride_xr"))
    return {"kernel": "quant3", "rowq": rowq, "trans": trans, "stochastic": stochastic, "tile": [R, G, C],
            "warps": num_warps, **r, "sass_per_element": round(r["sass"] * 32 * num_warps / (R * G * C), 1),
            "warps_per_sm": _warps_per_sm(r, num_warps)}


def swiglu_variant(backward: bool, row_out: bool, with_t: bool, stochastic: bool, R: int, G: int, C: int,
                   num_warps: int, kernel=None, **extra) -> dict:
    """A launch of the SwiGLU kernel (`activations._swiglu_kernel`, or ``kernel``: `activations._gelu_kernel` takes the
    same constants, tanh) on 1x128 INT8 inputs and 1x128 INT8 outputs (the Llama MLP's backward: dy, gate, up in;
    dgate, dup out, row and/or transposed copies), reported like ``quant3_variant``."""
    from . import activations
    fn = kernel or activations._swiglu_kernel
    names = set(inspect.signature(fn.fn).parameters)
    consts = dict(DY_Q=True, DY_QR=1, DY_QC=128, G_Q=True, G_QR=1, G_QC=128, U_Q=True, U_QR=1, U_QC=128, X_Q=True,
                  X_QR=1, X_QC=128, TANH=True, OUT_Q=True,
                  OUT_QR=1, OUT_QC=128, STOCHASTIC=stochastic, WITH_T=with_t, BACKWARD=backward, R=R, G=G, C=C,
                  ROW_OUT=row_out, **extra)
    consts = {k: v for k, v in consts.items() if k in names}
    ptrs = {n: ("*i8" if n.endswith("_ptr") and n != "flag_ptr" else "*fp32") for n in names
            if n.endswith("_ptr") or n.endswith("_scale")}
    ptrs["flag_ptr"] = "*i32"
    ptrs.pop("seed_ptr", None)  # *i64 (compile_for_hopper's default for seed pointers)
    r = compile_for_hopper(fn, ptrs, consts, num_warps, 1, divisible=("M", "N"))
    return {"kernel": getattr(fn, "__name__", str(fn)), "backward": backward, "row_out": row_out, "with_t": with_t,
            "stochastic": stochastic, "tile": [R, G, C], "warps": num_warps, **extra, **r,
            "sass_per_element": round(r["sass"] * 32 * num_warps / (R * G * C), 1),
            "warps_per_sm": _warps_per_sm(r, num_warps)}


def norm_t_variant(stochastic: bool, R: int, G: int, C: int, num_warps: int) -> dict:
    """RMSNorm forward's transposed copy alone with the statistics given (`norms._norm_fwd_kernel`, ``with_t='only'``),
    1x128 INT8 in and out, bf16 weight; reported like ``quant3_variant``."""
    from . import norms
    consts = dict(X_Q=True, X_QR=1, X_QC=128, Y_Q=True, Y_QR=1, Y_QC=128, STOCHASTIC=stochastic, WITH_T=True, RMS=True,
                  HAS_W=True, HAS_B=False, STATS_GIVEN=True, R=R, G=G, C=C, ONE=False, ROW_OUT=False, b_ptr=None,
                  mean_ptr=None, eps=1e-6)
    ptrs = {"x_ptr": "*i8", "x_scale": "*fp32", "w_ptr": "*bf16", "rstd_ptr": "*fp32", "y_ptr": "*i8", "y_scale": "*fp32",
            "yt_ptr": "*i8", "yt_scale": "*fp32", "flag_ptr": "*i32"}
    r = compile_for_hopper(norms._norm_fwd_kernel, ptrs, consts, num_warps, 1, divisible=("M", "N"))
    return {"kernel": "norm_fwd_t_only", "stochastic": stochastic, "tile": [R, G, C], "warps": num_warps, **r,
            "sass_per_element": round(r["sass"] * 32 * num_warps / (R * G * C), 1),
            "warps_per_sm": _warps_per_sm(r, num_warps)}


def transposed_variants() -> list[dict]:
    """The producers of the transposed 1x128 copy alone, session 4's launches beside session 5's one-warp
    ``_launch.transposed_tile`` (docs/notes/membound_h200.md, "Session 5"): sm_90 resources per launch."""
    from . import _launch, activations
    cf, ci = _launch.T_COLS_FLOAT_IN, _launch.T_COLS_INT8_IN
    out = []
    for st in (False, True):
        out += [dict(quant3_variant(False, True, st, 128, 1, 64, 8), session=4),
                dict(quant3_variant(False, True, st, 128, 1, cf, 1), session=5)]
    for st in (False, True):
        out += [dict(swiglu_variant(False, False, True, st, 128, 1, 64, 8), session=4),
                dict(swiglu_variant(False, False, True, st, 128, 1, ci, 1), session=5),
                dict(swiglu_variant(False, False, True, st, 128, 1, 64, 8, kernel=activations._gelu_kernel), session=4),
                dict(swiglu_variant(False, False, True, st, 128, 1, ci, 1, kernel=activations._gelu_kernel), session=5),
                dict(norm_t_variant(st, 128, 1, 128, 32), session=4), dict(norm_t_variant(st, 128, 1, ci, 1), session=5)]
    for st in (False, True):
        out += [dict(swiglu_variant(True, False, True, st, 128, 1, 32, 4), session=4),
                dict(swiglu_variant(True, False, True, st, 128, 1, ci, 1), session=5)]
    return out


def fallback_term_variant(G: int = 2, n_groups: int = 32, gathered: bool = False, x_dtype: str = "bf16") -> dict:
    """The fused column fallback term (`fallback_term._column_term_kernel`: residual of G term groups quantized
    1x128 + the copy of x_q behind it, one launch), as launched for K = 128 * n_groups; compiled without fp
    fusion as the launch does (``f32_mul_rn``: the dequantize multiplies stay rounded, not contracted into fma).
    SASS per element counts the larger (copy) tile: an upper bound of the copy programs' issue cost."""
    from . import fallback_term
    t = fallback_term.tiling(128, n_groups, G)
    consts = dict(stride_xc=1, stride_qc=1, stride_sc=1, stride_fc=1, GATHERED=gathered, BK=128, **t)
    ptrs = {"x_ptr": f"*{x_dtype}", "q_ptr": "*i8", "s_ptr": "*fp32", "groups_ptr": "*i64", "f_ptr": "*u8",
            "out_ptr": "*i8", "out_scale_ptr": "*fp32", "flag_ptr": "*i32"}
    r = compile_for_hopper(fallback_term._column_term_kernel, ptrs, consts, fallback_term.NUM_WARPS, 1,
                           divisible=("stride_xr", "stride_qr", "K"), enable_fp_fusion=False)
    return {"kernel": "fallback_column_term", "G": G, "n_groups": n_groups, "gathered": gathered, "x": x_dtype,
            "tile": [t["R"], t["GT"], t["GC"], t["BK_P"]], "warps": fallback_term.NUM_WARPS, **r,
            "sass_per_element": round(r["sass"] * 32 * fallback_term.NUM_WARPS / (t["R"] * t["GC"] * t["BK_P"]), 1),
            "warps_per_sm": _warps_per_sm(r, fallback_term.NUM_WARPS)}


def gemm_variant(dequant: bool, out_quant: bool, group: int, a_br: int, b_br: int, cfg, layout: int = 0,
                 fallback: bool = False) -> dict:
    consts = dict(A_LAYOUT=layout, B_LAYOUT=layout, A_BR=a_br, A_BK=group, B_BR=b_br, B_BK=group, G=group,
                  FALLBACK=fallback, A2_LAYOUT=layout, FLAG_ROWS=gemm.FLAG_ROWS,
                  HAS_BIAS=True, OUT_QUANT=out_quant, OBR=a_br if out_quant else 1, OBC=group if out_quant else 1,
                  STOCHASTIC=False, DEQUANT=dequant, DOT_DTYPE=tl.bfloat16, BK=min(group, 128), **cfg.kwargs)
    ptrs = {"a_ptr": "*i8", "b_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*fp32",
            "c_ptr": "*i8" if out_quant else "*bf16", "sc_ptr": "*fp32",
            "a2_ptr": "*i8", "sa2_ptr": "*fp32", "flag_ptr": "*u8"}
    report = compile_for_hopper(gemm._block_gemm_kernel, ptrs, consts, cfg.num_warps, cfg.num_stages)
    return {"kernel": "block_gemm", "impl": "dequant" if dequant else "int8", "G": group, "out_quant": out_quant,
            "layout": layout, "fallback": fallback, "config": {**cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages}, **report}


def quantize_variant(block: str, transpose: bool) -> dict:
    from ..format import BlockShape
    b = BlockShape.parse(block)
    br_p, bc_p, rb, cb, warps = quantize._tiling(b)
    consts = dict(BR=b.rows, BC=b.cols, BR_P=br_p, BC_P=bc_p, RB=rb, CB=cb, TRANSPOSE=transpose, STOCHASTIC=False)
    ptrs = {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32"}
    report = compile_for_hopper(quantize._quantize_kernel, ptrs, consts, warps, 1)
    return {"kernel": "quantize", "block": block, "transpose": transpose, **report}


def gluon_variant(out: str = "bf16", bias: bool = True, magic: bool = False, overlap: int = 0,
                  b_per_col: bool = False, stochastic: bool = False, consumers: int = 2, sb_smem: bool = False,
                  prefetch: bool = True) -> dict:
    """Compile the warp-specialized Gluon GEMM (`gluon_gemm.block_gemm_kernel`) for sm_90 on the CPU.

    ``out``: "bf16" | "fp32" | "int8" (1x128 blocks). Reports registers per partition as ptxas sees the
    kernel (the entry cap, ``maxnreg``), spills, shared memory, the wgmma and setmaxnreg instructions.
    """
    from triton.experimental.gluon._runtime import GluonASTSource
    from . import gluon_gemm as gg
    gl = gg.gl
    dt = {"bf16": ("bf16", gl.bfloat16, __import__("torch").bfloat16), "fp32": ("fp32", gl.float32,
          __import__("torch").float32), "int8": ("i8", gl.int8, __import__("torch").int8)}[out]

    def desc(ty, gty, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gty)
        return f"tensordesc<{ty}[{', '.join(map(str, block))}],{layout!r}>"

    stages = gg.stages_for(dt[2], consumers, sb_smem)
    maxnreg, consumer_regs, producer_regs = gg.REGS[consumers]
    bm = consumers * gg.HALF
    consts = dict(A_BR=1, B_BR=1 if b_per_col else 128, B_PER_COL=b_per_col, HAS_BIAS=bias,
                  OUT_MODE=gg.OUT_INT8 if out == "int8" else gg.OUT_FLOAT, STOCHASTIC=stochastic, MAGIC=magic,
                  OVERLAP=int(overlap), SCALE_MAX=3.0e38, STAGES=stages, GROUP_M=gg.GROUP_M, NC=consumers,
                  CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, SB_SMEM=sb_smem, PREFETCH=prefetch)
    if not sb_smem:
        consts["sb_desc"] = None
    fn = gg.block_gemm_kernel
    names = list(inspect.signature(fn.fn).parameters)
    types = {"a_desc": desc("i8", gl.int8, [bm if consumers == 2 else gg.HALF, gg.BK]), "b_desc": desc("i8", gl.int8, [gg.BN, gg.BK]),
             "c_desc": desc(dt[0], dt[1], [gg.HALF, gg.BN]), "sa_ptr": "*fp32", "sb_ptr": "*fp32",
             "bias_ptr": "*fp32", "sc_ptr": "*fp32", "sb_desc": desc("fp32", gl.float32, [1, gg.BN]), "seed_ptr": "*i64"}
    sig = {n: types.get(n, "constexpr" if n in consts else "i32") for n in names}
    src = GluonASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=HOPPER, options={"num_warps": 4, "maxnreg": maxnreg})
    ptx = kernel.asm["ptx"]
    return {"kernel": "gluon_block_gemm", "out": out, "bias": bias, "magic": magic, "overlap": overlap,
            "b_per_col": b_per_col, "sb_smem": sb_smem, "prefetch": prefetch, "stochastic": stochastic, "consumers": consumers, "stages": stages,
            **_resources(kernel.asm["cubin"]), "shared_bytes": kernel.metadata.shared,
            "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.\S+", ptx))),
            "setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.\S+\s+\d+", ptx))),
            "local_ld_st": len(re.findall(r"\b(?:ld|st)\.local", ptx))}


def gluon_variants(quick: bool = False) -> list[dict]:
    if quick:
        return [gluon_variant("bf16", b_per_col=True, sb_smem=True), gluon_variant("int8", consumers=3)]
    return [gluon_variant(o, magic=m, overlap=ov) for o in ("bf16", "fp32", "int8") for m in (True, False)
            for ov in (0, 1)] + [gluon_variant("bf16", b_per_col=True), gluon_variant("bf16", b_per_col=True, sb_smem=True),
                                 gluon_variant("int8", stochastic=True),
                                 gluon_variant("int8", overlap=2)] + \
        [gluon_variant(o, consumers=3) for o in ("bf16", "fp32", "int8")] + [gluon_variant("int8", consumers=3, stochastic=True)]


def main(quick: bool = False) -> list[dict]:
    int8_cfgs = gemm._INT8_CONFIGS[:2] if quick else gemm._INT8_CONFIGS
    deq_cfgs = gemm._DEQUANT_CONFIGS[:1] if quick else gemm._DEQUANT_CONFIGS
    # Output blocks as the variant writes them (a_br x G); the autotuner prunes tiles that cannot hold one.
    reports = [gemm_variant(False, oq, 128, 1, 128, c) for c in int8_cfgs for oq in (False, True)
               if gemm._fits(c.kwargs, 1, 128, oq)]
    reports += [gemm_variant(True, oq, 32, 32, 32, c) for c in deq_cfgs for oq in (False, True)
                if gemm._fits(c.kwargs, 32, 32, oq)]
    reports += [gemm_variant(False, False, 32, 32, 32, int8_cfgs[0], layout) for layout in (1, 2)]
    # The fallback-term switch: coarse-K int8 (with and without overlap) and 32x32 dequant, TMA operands.
    reports += [gemm_variant(False, True, 128, 1, 128, c, fallback=True) for c in int8_cfgs[:2]]
    reports += [gemm_variant(True, True, 32, 32, 32, deq_cfgs[0], fallback=True)]
    reports += [quantize_variant(b, t) for b in ("32x32", "1x128", "128x128") for t in (False, True)]
    # the launches of quantize / quantize_transposed (quantize_dual is one of each; kernels.quantize._launch_quant3)
    reports += [quant3_variant(True, False, False, 8, 8, 128, 16)]
    reports += transposed_variants()
    # the fused column fallback term (K = 4096: G = 2 of 32 groups; the gathered producer re-run; fp32 x)
    reports += [fallback_term_variant(2, 32), fallback_term_variant(2, 32, gathered=True, x_dtype="fp32"),
                fallback_term_variant(6, 86)]
    # SwiGLU backward, stochastic, 1x128 INT8 in/out: v3's fused with_t launch and row launch, v4's row launch (its
    # transposed launch is in transposed_variants)
    reports += [swiglu_variant(True, True, True, True, 128, 1, 128, 32), swiglu_variant(True, True, False, True, 4, 8, 128, 32),
                swiglu_variant(True, True, False, True, 4, 8, 128, 8)]
    from . import gluon_gemm
    if gluon_gemm.available():
        reports += gluon_variants(quick)
    for r in reports:
        print(json.dumps(r), flush=True)
    return reports


if __name__ == "__main__":
    import sys
    main(quick="--quick" in sys.argv)
