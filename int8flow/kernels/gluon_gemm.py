"""Warp-specialized per-block INT8 GEMM ``C = A @ B.T`` for Hopper (sm_90), written in Gluon.

The fast route of `int8flow.kernels.gemm.block_gemm` for promotion every G = 128 of K (issue 11);
the Triton kernel in ``gemm.py`` stays the fallback and the CPU reference the oracle.

Structure (one persistent CTA per SM, one warp-specialized region):

* producer (1 warp, 24-40 registers): TMA loads of the A tile (consumers x 64 rows, as 128- or 64-row
  boxes) and the B tile (128 x 128) per K group into a STAGES-deep shared-memory ring; ``full[s]`` says a
  stage landed, ``empty[s]`` that every consumer is done with it.
* 2 or 3 consumers (one warpgroup each, 64 rows of the tile): per K group an async int8 ``wgmma``
  (m64 n128 k32, four per group) into an int32 product, release the stage, then promote
  ``acc += float(p) * (sa[row] * sb)`` in float32 (sb a per-tile scalar for 128x128 weight blocks, a
  per-column vector otherwise). The scales must not keep the promotion waiting (ncu, docs/notes/gemm_h200.md):
  scalar-B GEMMs load each group's scales one group ahead (``PREFETCH``); per-column B scales (wgrad) come
  with the stage, a [1, BN] row of the transposed scale grid brought by the producer's TMA (``SB_SMEM``). The
  tensor cores serve one warpgroup at a time, so the warpgroups fall out of step and the others' wgmma runs
  while one promotes (DeepGEMM's overlap).
* epilogue in the consumers: bias, then float (fp32/bf16) or 1x128-block INT8 through shared memory and a TMA
  store, which overlaps the next tile's main loop. Nearest rounding: the numerics of
  ``_blockquant.quantize_tile``. Stochastic: the numerics and random stream of the memory-bound kernels
  (``_blockquant.noise3`` / ``quantize_by_scale``: one Philox4x32-7 per 8 elements of a row), so
  ``kernels.quantize.quantize(y, "1x128", rounding="stochastic", seed=s)`` of this kernel's float output gives
  its INT8 output; the Triton GEMM's epilogue draws another stream (``tl.rand`` per element), same distribution.

Promotion, measured on the H200 (docs/notes/gemm_h200.md): plain ``cvt.rn.f32.s32`` (SASS I2FP) + FFMA
beats the magic-number route (int32 product seeded with 0x4B400000, the bits of 1.5 * 2**23, so
``bits_as_float(p) - 12582912`` is exact for |p| < 2**22: MOV + FADD + FFMA per element) by 5-45%; ``magic``
keeps it as an option. Promotion is what separates us from the pipeline's ceiling: the same kernel with
one promotion at the end (``overlap=2``, a timing diagnostic with wrong numerics) runs 1.6-2.2x BF16 at
the large shapes, with promotion every 128 of K 1.25-1.5x.

Operands must be K-major (Hopper's 8-bit wgmma reads both operands K-major only); the wrapper refuses
anything else with the fix instead of running a slow path.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ..format import BlockShape, QTensor

try:  # Gluon ships with Triton >= 3.5; CPU-only installs may lack it or the NVIDIA backend.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    GLUON_IMPORT_ERROR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the installed triton
    gluon = None
    GLUON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

# --- tile and pipeline constants -----------------------------------------------------------------
G = 128  # promotion group along K = one pipeline stage (K blocks of both operands must be 128)
HALF = 64  # rows per consumer warpgroup (wgmma's M); a tile is consumers x HALF rows
BN = 128  # tile columns: int32 product + fp32 accumulator = 2 x 64 registers per thread
BK = G
SMEM_BUDGET = 220 * 1024  # of 227 KiB per CTA on sm_90, leaving room for barriers
MAX_STAGES = 6
GROUP_M = 8  # row tiles per band of the persistent walk (neighbouring CTAs share B tiles in L2)
# Registers per consumer count: (launch cap, consumer warpgroup, producer warpgroup) after setmaxnreg.
# 2 consumers: 12 warps (4 + 4 + producer 1, rounded to a warpgroup) x 168 = 64,512 of 65,536; producer
#   down to 40 gives each consumer 232 (enough for per-column B scales: +32 per thread, wgrad).
# 3 consumers (192-row tiles): 16 warps x 128 = 65,536; producer down to 24 gives each consumer 160 (the
#   int32 product and fp32 accumulator take 128; a few words spill outside the K loop).
REGS = {2: (168, 232, 40), 3: (128, 160, 24)}
CONSUMERS = 2  # with per-column B scales (wgrad); 3 otherwise (measured faster, docs/notes/gemm_h200.md)


def default_consumers(b_per_col: bool) -> int:
    """Consumer warpgroups per CTA: 3 (192-row tiles) unless B's scales vary per column (then 2, for registers).

    ``INT8FLOW_GLUON_CONSUMERS`` (2 or 3) overrides it for scalar B scales, for measurements."""
    env = os.environ.get("INT8FLOW_GLUON_CONSUMERS")
    if env and not b_per_col:
        return int(env)
    return CONSUMERS if b_per_col else 3


OUT_FLOAT, OUT_INT8 = 0, 1
# STOCHASTIC (the kernel's rounding switch): 0 nearest; 1 the default stochastic noise (``_noise16``: one Philox4x32-7
# per 8 elements, the memory-bound kernels' stream; ~10 SASS instructions per element on sm_90); 3 the same stream
# with each round's products as mul.wide.u32 (~8.5); 2 the previous noise, a Philox4x32-10 per element (~54, and
# spills with 3 consumers). 2 and 3 are for measurements (scripts/gpu/gemm_noise_probe.py).
NOISES = {"philox7x8": 1, "philox10": 2, "philox7x8w": 3}
_TORCH_TO_GL = {}


def available() -> bool:
    return gluon is not None


if gluon is not None:
    _TORCH_TO_GL = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
                    torch.int8: gl.int8}

    @gluon.jit
    def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """(pid_m, pid_n) of a linear tile index, walking GROUP_M-row bands column by column."""
        band = tile // (GROUP_M * num_pid_n)
        first_m = band * GROUP_M
        band_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % band_m
        pid_n = (tile % (GROUP_M * num_pid_n)) // band_m
        return pid_m, pid_n

    @gluon.jit
    def _producer(a_desc, b_desc, sb_desc, a_bufs, b_bufs, sb_bufs, full, empty, M, N, K,
                  BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, SB_SMEM: gl.constexpr):
        """One warp: fill the ring with (A tile, B tile) per K group, in the consumers' order.

        The A tile arrives in BM / A_ROWS boxes (one 128-row box, or three 64-row boxes for 192-row tiles:
        shared-memory shapes must be powers of two). With SB_SMEM the K group's per-column B scales (a [1, BN]
        row of the (K / 128, N) transposed scale grid) ride the same stage and barrier."""
        A_ROWS: gl.constexpr = a_desc.block_type.shape[0]
        A_PARTS: gl.constexpr = BM // A_ROWS
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        num_groups = gl.cdiv(K, BK)
        it = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            for g in range(num_groups):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
                if SB_SMEM:
                    mbarrier.expect(full.index(s), A_PARTS * a_desc.block_type.nbytes + b_desc.block_type.nbytes
                                    + sb_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(sb_desc, [g, pid_n * BN], full.index(s), sb_bufs.index(s))
                else:
                    mbarrier.expect(full.index(s), A_PARTS * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                for part in gl.static_range(A_PARTS):
                    tma.async_copy_global_to_shared(a_desc, [pid_m * BM + part * A_ROWS, g * BK], full.index(s),
                                                    a_bufs.index(s * A_PARTS + part))
                tma.async_copy_global_to_shared(b_desc, [pid_n * BN, g * BK], full.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _a_rows(a_bufs, s, WG: gl.constexpr, HALF: gl.constexpr, BM: gl.constexpr):
        """This warpgroup's HALF rows of stage s's A tile."""
        A_ROWS: gl.constexpr = a_bufs.type.shape[1]
        A_PARTS: gl.constexpr = BM // A_ROWS
        if A_ROWS == HALF:
            a = a_bufs.index(s * A_PARTS + WG)
        else:
            a = a_bufs.index(s * A_PARTS + (WG * HALF) // A_ROWS).slice((WG * HALF) % A_ROWS, HALF, dim=0)
        return a

    @gluon.jit
    def _product(a_bufs, b_bufs, full, s, phase, WG: gl.constexpr, HALF: gl.constexpr, MAGIC: gl.constexpr,
                 mma: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr):
        """Wait for stage s and start this warpgroup's async int8 wgmma over its HALF rows of it."""
        mbarrier.wait(full.index(s), phase)
        a = _a_rows(a_bufs, s, WG, HALF, BM)
        b = b_bufs.index(s).permute((1, 0))
        if MAGIC:
            p0 = gl.full([HALF, BN], 0x4B400000, gl.int32, mma)
        else:
            p0 = gl.zeros([HALF, BN], gl.int32, mma)
        return warpgroup_mma(a, b, p0, is_async=True)

    @gluon.jit
    def _promote(acc, p, sa, sb, MAGIC: gl.constexpr, B_PER_COL: gl.constexpr, SB2D: gl.constexpr = False):
        """acc + p * sa[:, None] * sb (sb a scalar, or a per-column vector with B_PER_COL)."""
        if MAGIC:
            pf = p.to(gl.float32, bitcast=True) - 12582912.0  # exact: both in [2**23, 2**24)
        else:
            pf = p.to(gl.float32)
        if B_PER_COL:
            if SB2D:  # sb [1, BN] from shared memory (SB_SMEM)
                out = acc + pf * (gl.expand_dims(sa, 1) * sb)
            else:
                out = acc + pf * (gl.expand_dims(sa, 1) * gl.expand_dims(sb, 0))
        else:
            out = acc + pf * gl.expand_dims(sa * sb, 1)
        return out

    @gluon.jit
    def _load_scales(sa_rows, row_in, sb_ptr, pid_n, cols, col_in, g, ok, stride_sak, stride_sbn, stride_sbk,
                     BN: gl.constexpr, B_BR: gl.constexpr, B_PER_COL: gl.constexpr):
        sa = gl.load(sa_rows + g * stride_sak, mask=row_in & ok, other=0.0)
        if B_PER_COL:
            sb = gl.load(sb_ptr + (cols // B_BR) * stride_sbn + g * stride_sbk, mask=col_in & ok, other=0.0)
        else:
            sb = gl.load(sb_ptr + ((pid_n * BN) // B_BR) * stride_sbn + g * stride_sbk)
        return sa, sb

    @gluon.jit
    def _mix64(z):
        """splitmix64's finalizer on a uint64: ``_blockquant._mix64`` (``format.seeds.mix64``), the same operations."""
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @gluon.jit
    def _derive_seed(base, salt):
        """The Gluon twin of ``_blockquant.derive_seed`` (a Gluon kernel calls Gluon functions): identical
        arithmetic, ``(mix64(base ^ mix64((salt + 1) * 0x9E3779B97F4A7C15)) >> 33) % (2**31 - 1)`` in 64-bit
        wrapping arithmetic, bit for bit ``_launch.derive_seed`` (the tests compare the GEMM's noise with
        ``kernels.quantize``'s, which uses the Triton helper)."""
        b = base.to(gl.uint64, bitcast=True)
        s = salt.to(gl.uint64)  # value cast of a salt >= 0, whatever width Triton gave the int (as the twin)
        z = _mix64(b ^ _mix64((s + 1) * 0x9E3779B97F4A7C15))
        return (z >> 33).to(gl.int32) % 0x7FFFFFFF

    @gluon.jit
    def _philox_uniform(seed, offsets):
        """``tl.rand(seed, offsets)`` for int32 offsets: Philox-4x32-10, first word, mapped to [0, 1).

        The epilogue's noise before ``_noise16`` (``noise="philox10"``), kept for measurements only."""
        c0, _, _, _ = _philox(offsets.to(gl.uint32, bitcast=True), seed, 10, False)
        x = c0.to(gl.int32, bitcast=True)
        x = gl.where(x < 0, -x - 1, x)
        return x.to(gl.float32) * 4.6566127342e-10

    @gluon.jit
    def _mul_wide(a, B: gl.constexpr):
        """(lo, hi) 32-bit words of a * 0xCD9E8D57 (B) or a * 0xD2511F53: one ``mul.wide.u32`` (IMAD.WIDE.U32)."""
        if B:
            asm: gl.constexpr = "{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$0, $1}, t; }"
        else:
            asm: gl.constexpr = "{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$0, $1}, t; }"
        return gl.inline_asm_elementwise(asm, "=r,=r,r", [a], dtype=(gl.uint32, gl.uint32), is_pure=True, pack=1)

    @gluon.jit
    def _philox(c0, seed, ROUNDS: gl.constexpr, WIDE: gl.constexpr):
        """Philox4x32-ROUNDS of counter (c0, 0, 0, 0) under key ``seed``: ``tl.randint4x(seed, c0, ROUNDS)``, four
        words.

        WIDE: each round's two products as ``mul.wide.u32`` (inline PTX), else ``umulhi`` and a multiply each."""
        seed64 = seed.to(gl.uint64)
        k0 = (seed64 & 0xFFFFFFFF).to(gl.uint32)
        k1 = ((seed64 >> 32) & 0xFFFFFFFF).to(gl.uint32)
        c1 = c0 * 0
        c2 = c1
        c3 = c1
        for _ in gl.static_range(ROUNDS):
            if WIDE:
                lo_b, hi_b = _mul_wide(c2, True)
                lo_a, hi_a = _mul_wide(c0, False)
                c0 = hi_b ^ c1 ^ k0
                c2 = hi_a ^ c3 ^ k1
                c1 = lo_b
                c3 = lo_a
            else:
                _c0 = c0
                _c2 = c2
                c0 = gl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
                c2 = gl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
                c1 = _c2 * 0xCD9E8D57
                c3 = _c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @gluon.jit
    def _noise16(seed, row0, col0, N, mma: gl.constexpr, HALF: gl.constexpr, BN: gl.constexpr,
                 WIDE: gl.constexpr):
        """Centred stochastic-rounding noise of the [HALF, BN] tile at (row0, col0), in the accumulator layout.

        The stream of ``_blockquant.noise3`` / ``uniform16`` (the memory-bound kernels'), keyed by (seed, row,
        column) only: one Philox4x32-7 per 8 consecutive elements of a row (counter row * cdiv(N, 8) + col // 8),
        its four words split into eight 16-bit uniforms k, noise c = (k - 32767.5) / 2**16 in (-1/2, 1/2), so
        that round-half-even(v + c) = floor(v + u) with u = c + 1/2 ~ U(0, 1), mean exactly 1/2.

        In the wgmma accumulator layout a group of 8 columns of a row lies on the 4 lanes of a quad, 2 each:
        lane t (= 2h + x) holds elements 2t, 2t + 1, which ``uniform16`` gives half h of words x and 2 + x.
        So each lane computes 8 of its quad's 32 groups (group n on lane n % 4: a [HALF, BN / 8] tensor in
        layout ``LG``), packs for every lane t of the quad the 32 bits it needs, and a quad transpose (a
        convert_layout within the warp: shuffles, no shared memory) hands them over. 1/8 Philox call per
        element instead of a Philox4x32-10 per element.
        """
        gl.static_assert(HALF == 64 and BN == 128, "noise layouts are written for 64 x 128 tiles on 4 warps")
        LG: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[8, 0], [0, 4], [0, 8]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 16])
        LD: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[8, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 8, 0]],
            lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 16, 4])
        r = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, LG))
        g = col0 // 8 + gl.arange(0, BN // 8, layout=gl.SliceLayout(0, LG))
        k = gl.expand_dims(r * gl.cdiv(N, 8), 1) + gl.expand_dims(g, 0)
        w0, w1, w2, w3 = _philox(k.to(gl.uint32, bitcast=True), seed, 7, WIDE)
        # lane t = 2h + x of the quad: low half = half h of word x (element 2t), high half = half h of word 2 + x
        p0 = (w0 & 0xFFFF) | (w2 << 16)
        p1 = (w1 & 0xFFFF) | (w3 << 16)
        p2 = (w0 >> 16) | (w2 & 0xFFFF0000)
        p3 = (w1 >> 16) | (w3 & 0xFFFF0000)
        p = gl.reshape(gl.join(gl.join(p0, p2), gl.join(p1, p3)), [HALF, BN // 8, 4])  # [..., t] = p_t
        p = gl.reshape(gl.convert_layout(p, LD), [HALF, BN // 2])  # element pair (row, col // 2)
        lo = (p & 0xFFFF) | 0x4B000000  # 2**23 + k as float bits
        hi = (p >> 16) | 0x4B000000
        k16 = gl.convert_layout(gl.reshape(gl.join(lo, hi), [HALF, BN]), mma, assert_trivial=True)
        return gl.fma(k16.to(gl.float32, bitcast=True), 1.0 / 65536.0, -(8388608.0 + 32767.5) / 65536.0)

    @gluon.jit
    def _rint(v):
        """Round to the nearest integer, ties to even: one ``cvt.rni`` (FRND) per element."""
        return gl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=r,r", [v], dtype=gl.float32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _quantize_rows(y, rows, cols, row0, col0, N, seed, STOCHASTIC: gl.constexpr, SCALE_MAX: gl.constexpr,
                       mma: gl.constexpr):
        """1 x BN blocks (one per row of the tile): int8 codes and per-row scales, as ``quantize_tile``.

        ``y / scale`` is one multiply by the row's reciprocal plus one Newton step on the exact residual
        (``fma(-v, scale, y)``): the correctly rounded quotient but in rare double-rounding cases, ~3 ops
        instead of a full IEEE division per element (the epilogue's cost decides the K = 768 shapes).
        """
        absmax = gl.max(gl.abs(y), axis=1)
        scale = gl.div_rn(absmax, gl.full(absmax.shape, 127.0, gl.float32, absmax.type.layout))
        scale = gl.where((scale > SCALE_MAX) & (scale < float("inf")), SCALE_MAX, scale)
        inv = gl.where(scale > 0.0, gl.div_rn(gl.full(scale.shape, 1.0, gl.float32, scale.type.layout),
                                              gl.where(scale > 0.0, scale, 1.0)), 0.0)
        s2 = gl.expand_dims(scale, 1)
        i2 = gl.expand_dims(inv, 1)
        v = y * i2
        v = gl.fma(gl.fma(-v, s2, y), i2, v)  # zero-scale rows: inv = 0 gives v = 0
        if STOCHASTIC == 2:  # "philox10", the old noise: one Philox4x32-10 per element (measurements only)
            offs = gl.expand_dims(rows, 1) * N + gl.expand_dims(cols, 0)
            q = gl.floor(v + _philox_uniform(seed, offs))
        elif STOCHASTIC:  # round-half-even(v + c) = floor(v + U(0, 1)), the memory-bound kernels' stream
            q = _rint(v + _noise16(seed, row0, col0, N, mma, y.shape[0], y.shape[1], STOCHASTIC == 3))
        else:
            q = _rint(v)
        q = gl.minimum(gl.maximum(q, -127.0), 127.0)
        return q.to(gl.int8), scale

    @gluon.jit
    def _consumer(a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                  M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                  WG: gl.constexpr, A_BR: gl.constexpr, B_BR: gl.constexpr, B_PER_COL: gl.constexpr,
                  HAS_BIAS: gl.constexpr, OUT_MODE: gl.constexpr, STOCHASTIC: gl.constexpr,
                  MAGIC: gl.constexpr, OVERLAP: gl.constexpr, SCALE_MAX: gl.constexpr,
                  BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, HALF: gl.constexpr,
                  STAGES: gl.constexpr, GROUP_M: gl.constexpr, SB_SMEM: gl.constexpr,
                  PREFETCH: gl.constexpr):
        """One warpgroup: rows [WG * HALF, (WG + 1) * HALF) of every tile, main loop and epilogue."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        col_l: gl.constexpr = gl.SliceLayout(0, mma)
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        num_groups = gl.cdiv(K, BK)
        c_smem = c_bufs.index(WG)
        seed = 0
        if OUT_MODE == 1 and STOCHASTIC:  # the Philox key from the device-resident base seed, once a warpgroup
            seed = _derive_seed(gl.load(seed_ptr), salt)
        it = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            row0 = pid_m * BM + WG * HALF
            rows = row0 + gl.arange(0, HALF, layout=row_l)
            cols = pid_n * BN + gl.arange(0, BN, layout=col_l)
            row_in = rows < M
            col_in = cols < N
            sa_rows = sa_ptr + (rows // A_BR) * stride_sam
            acc = gl.zeros([HALF, BN], gl.float32, mma)
            if OVERLAP == 2:
                # Diagnostic only (wrong numerics): one int32 product over all of K, promoted once. Times the
                # pipeline without the per-group promotion.
                p = gl.zeros([HALF, BN], gl.int32, mma)
                for g in range(num_groups):
                    s = it % STAGES
                    mbarrier.wait(full.index(s), (it // STAGES) & 1)
                    p = warpgroup_mma(_a_rows(a_bufs, s, WG, HALF, BM), b_bufs.index(s).permute((1, 0)), p,
                                      is_async=True)
                    p = warpgroup_mma_wait(0, deps=[p])
                    mbarrier.arrive(empty.index(s), count=1)
                    it += 1
                sa, sb = _load_scales(sa_rows, row_in, sb_ptr, pid_n, cols, col_in, 0, True, stride_sak,
                                      stride_sbn, stride_sbk, BN, B_BR, B_PER_COL)
                acc = _promote(acc, p, sa, sb, False, B_PER_COL)
            elif OVERLAP == 1:
                # Two products in flight per warpgroup: group g+1's wgmma runs while group g is promoted.
                s = it % STAGES
                p_prev = _product(a_bufs, b_bufs, full, s, (it // STAGES) & 1, WG, HALF, MAGIC, mma, BN, BM)
                s_prev = s
                it += 1
                for g in range(1, num_groups):
                    s = it % STAGES
                    p = _product(a_bufs, b_bufs, full, s, (it // STAGES) & 1, WG, HALF, MAGIC, mma, BN, BM)
                    sa, sb = _load_scales(sa_rows, row_in, sb_ptr, pid_n, cols, col_in, g - 1, True, stride_sak,
                                          stride_sbn, stride_sbk, BN, B_BR, B_PER_COL)
                    p_prev = warpgroup_mma_wait(1, deps=[p_prev])
                    mbarrier.arrive(empty.index(s_prev), count=1)
                    acc = _promote(acc, p_prev, sa, sb, MAGIC, B_PER_COL)
                    p_prev = p
                    s_prev = s
                    it += 1
                sa, sb = _load_scales(sa_rows, row_in, sb_ptr, pid_n, cols, col_in, num_groups - 1, True,
                                      stride_sak, stride_sbn, stride_sbk, BN, B_BR, B_PER_COL)
                p_prev = warpgroup_mma_wait(0, deps=[p_prev])
                mbarrier.arrive(empty.index(s_prev), count=1)
                acc = _promote(acc, p_prev, sa, sb, MAGIC, B_PER_COL)
            else:
                if PREFETCH:  # scales of group 0; the loop then loads group g + 1's while group g runs
                    if SB_SMEM:
                        sa_n = gl.load(sa_rows, mask=row_in, other=0.0)
                    else:
                        sa_n, sb_n = _load_scales(sa_rows, row_in, sb_ptr, pid_n, cols, col_in, 0, True, stride_sak,
                                                  stride_sbn, stride_sbk, BN, B_BR, B_PER_COL)
                for g in range(num_groups):
                    s = it % STAGES
                    p = _product(a_bufs, b_bufs, full, s, (it // STAGES) & 1, WG, HALF, MAGIC, mma, BN, BM)
                    if PREFETCH:
                        # The scale loads (L2 latency) get a whole iteration, not one wgmma: without this the
                        # promotion waited on them (ncu: ~20% of the consumers' stall samples, fwd 4096^2).
                        gn = gl.minimum(g + 1, num_groups - 1)  # the last iteration reloads its own (unused)
                        sa = sa_n
                        if SB_SMEM:
                            sb = sb_bufs.index(s).load(mma)
                            sa_n = gl.load(sa_rows + gn * stride_sak, mask=row_in, other=0.0)
                        else:
                            sb = sb_n
                            sa_n, sb_n = _load_scales(sa_rows, row_in, sb_ptr, pid_n, cols, col_in, gn, True,
                                                      stride_sak, stride_sbn, stride_sbk, BN, B_BR, B_PER_COL)
                    elif SB_SMEM:  # per-column B scales landed with the stage: shared-memory latency, not L2's
                        sa = gl.load(sa_rows + g * stride_sak, mask=row_in, other=0.0)
                        sb = sb_bufs.index(s).load(mma)  # [1, BN] in the accumulator's layout, broadcast over rows
                    else:  # this group's scales load while its wgmma runs
                        sa, sb = _load_scales(sa_rows, row_in, sb_ptr, pid_n, cols, col_in, g, True, stride_sak,
                                              stride_sbn, stride_sbk, BN, B_BR, B_PER_COL)
                    p = warpgroup_mma_wait(0, deps=[p])
                    mbarrier.arrive(empty.index(s), count=1)
                    acc = _promote(acc, p, sa, sb, MAGIC, B_PER_COL, SB_SMEM)
                    it += 1

            # --- epilogue: bias, then float or INT8 through shared memory and a TMA store -------------
            if HAS_BIAS:
                bias = gl.load(bias_ptr + cols, mask=col_in, other=0.0).to(gl.float32)
                acc = acc + gl.expand_dims(bias, 0)
            tma.store_wait(0)  # this warpgroup's previous tile has left c_smem
            if OUT_MODE == 1:
                q, scale = _quantize_rows(acc, rows, cols, row0, pid_n * BN, N, seed, STOCHASTIC, SCALE_MAX, mma)
                c_smem.store(q)
                gl.store(sc_ptr + rows * stride_scm + pid_n, scale, mask=row_in)
            else:
                c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [row0, pid_n * BN], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def _consumer_wg1(a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                      M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                      A_BR: gl.constexpr, B_BR: gl.constexpr, B_PER_COL: gl.constexpr,
                      HAS_BIAS: gl.constexpr, OUT_MODE: gl.constexpr, STOCHASTIC: gl.constexpr,
                      MAGIC: gl.constexpr, OVERLAP: gl.constexpr, SCALE_MAX: gl.constexpr,
                      BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, HALF: gl.constexpr,
                      STAGES: gl.constexpr, GROUP_M: gl.constexpr, SB_SMEM: gl.constexpr,
                      PREFETCH: gl.constexpr):
        _consumer(a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                  M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                  1, A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                  BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)

    @gluon.jit
    def _consumer_wg2(a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                      M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                      A_BR: gl.constexpr, B_BR: gl.constexpr, B_PER_COL: gl.constexpr,
                      HAS_BIAS: gl.constexpr, OUT_MODE: gl.constexpr, STOCHASTIC: gl.constexpr,
                      MAGIC: gl.constexpr, OVERLAP: gl.constexpr, SCALE_MAX: gl.constexpr,
                      BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, HALF: gl.constexpr,
                      STAGES: gl.constexpr, GROUP_M: gl.constexpr, SB_SMEM: gl.constexpr,
                      PREFETCH: gl.constexpr):
        _consumer(a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                  M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                  2, A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                  BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)

    @gluon.jit
    def _consumer_wg0(a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                      M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                      A_BR: gl.constexpr, B_BR: gl.constexpr, B_PER_COL: gl.constexpr,
                      HAS_BIAS: gl.constexpr, OUT_MODE: gl.constexpr, STOCHASTIC: gl.constexpr,
                      MAGIC: gl.constexpr, OVERLAP: gl.constexpr, SCALE_MAX: gl.constexpr,
                      BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, HALF: gl.constexpr,
                      STAGES: gl.constexpr, GROUP_M: gl.constexpr, SB_SMEM: gl.constexpr,
                      PREFETCH: gl.constexpr):
        _consumer(a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                  M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                  0, A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                  BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)

    @gluon.jit(do_not_specialize=['salt'])  # a new salt per call must not pick a new specialization
    def block_gemm_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                          M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                          A_BR: gl.constexpr, B_BR: gl.constexpr, B_PER_COL: gl.constexpr,
                          HAS_BIAS: gl.constexpr, OUT_MODE: gl.constexpr, STOCHASTIC: gl.constexpr,
                          MAGIC: gl.constexpr, OVERLAP: gl.constexpr, SCALE_MAX: gl.constexpr,
                          STAGES: gl.constexpr, GROUP_M: gl.constexpr, NC: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, SB_SMEM: gl.constexpr = False,
                          sb_desc=None, PREFETCH: gl.constexpr = True):
        # combinations the wrapper refuses, refused here too for direct launches (probes, _hopper_check)
        gl.static_assert(not (B_PER_COL and NC == 3), "per-column B scales run on 2 consumer warpgroups")
        gl.static_assert(not SB_SMEM or (B_PER_COL and OVERLAP == 0), "SB_SMEM needs per-column B scales, OVERLAP=0")
        HALF: gl.constexpr = c_desc.block_type.shape[0]
        BM: gl.constexpr = NC * HALF  # NC consumer warpgroups, HALF rows each
        A_ROWS: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES * (BM // A_ROWS), A_ROWS, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [NC, HALF, BN], c_desc.layout)
        if SB_SMEM:  # per-column B scales, one [1, BN] row per stage (wgrad)
            sb_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BN], sb_desc.layout)
        else:
            sb_bufs = c_bufs  # unused
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(full.index(i), count=1)  # the producer's expect + TMA bytes
            mbarrier.init(empty.index(i), count=NC)  # one arrive per consumer warpgroup
        fence_async_shared()
        # (Argument tuples are written out in place: a tuple built in a variable turns constexprs into tensors.)
        if NC == 3:
            gl.warp_specialize([
                (_consumer_wg0, (a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                              M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                              A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                              BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)),
                (_consumer_wg1, (a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                              M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                              A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                              BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)),
                (_consumer_wg2, (a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                              M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                              A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                              BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)),
                (_producer, (a_desc, b_desc, sb_desc, a_bufs, b_bufs, sb_bufs, full, empty, M, N, K, BM, BN, BK, STAGES, GROUP_M,
                              SB_SMEM)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer_wg0, (a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                              M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                              A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                              BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)),
                (_consumer_wg1, (a_bufs, b_bufs, c_bufs, sb_bufs, full, empty, c_desc, sa_ptr, sb_ptr, bias_ptr, sc_ptr,
                              M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_scm, seed_ptr, salt,
                              A_BR, B_BR, B_PER_COL, HAS_BIAS, OUT_MODE, STOCHASTIC, MAGIC, OVERLAP, SCALE_MAX,
                              BM, BN, BK, HALF, STAGES, GROUP_M, SB_SMEM, PREFETCH)),
                (_producer, (a_desc, b_desc, sb_desc, a_bufs, b_bufs, sb_bufs, full, empty, M, N, K, BM, BN, BK, STAGES, GROUP_M,
                              SB_SMEM)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# --- host side -------------------------------------------------------------------------------------
# Host overhead matters: a K = 768 GEMM runs ~0.1 ms, so the wrapper avoids per-call allocations and queries.
_ESIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int8: 1}


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple:
    return torch.cuda.get_device_capability(device_index)


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def stages_for(out_dtype: torch.dtype, consumers: int = CONSUMERS, sb_smem: bool = False) -> int:
    """Ring depth that fits beside the epilogue buffers (HALF x BN per consumer) in shared memory (``sb_smem``:
    each stage also holds BN float32 per-column B scales)."""
    c_bytes = consumers * HALF * BN * _ESIZE[out_dtype]
    stage = (consumers * HALF + BN) * BK + (4 * BN if sb_smem else 0)
    return max(2, min(MAX_STAGES, (SMEM_BUDGET - c_bytes) // stage))


def k_major_problem(t: torch.Tensor, name: str) -> Optional[str]:
    """Why ``t`` (R, K) int8 cannot be a TMA K-major operand, or None."""
    if t.dim() != 2 or t.stride(1) != 1:
        return (f"{name} is not K-major (strides {tuple(t.stride())}); Hopper's int8 wgmma reads K-major operands "
                f"only: pass a K-major copy, e.g. int8flow.kernels.quantize.quantize_transposed(x, block) for an "
                f"activation, or QTensor({name}.data.contiguous(), {name}.scale, {name}.block) for a square-block view")
    if t.data_ptr() % 16 or (t.shape[0] > 1 and t.stride(0) % 16):
        return (f"{name} needs a 16-byte aligned base and row stride for TMA (K a multiple of 16), got row stride "
                f"{t.stride(0)}; pad K to a multiple of 16 or use the Triton kernel (gemm.block_gemm routes there)")
    return None


def unsupported(a: QTensor, b: QTensor, out_dtype: torch.dtype, out_block: Optional[BlockShape],
                a_fallback=None) -> Optional[str]:
    """Why this call cannot take the Gluon kernel (None when it can): the route's decision, in words."""
    if gluon is None:
        return f"Gluon is not importable ({GLUON_IMPORT_ERROR})"
    if a.device.type != "cuda":
        return "operands are not on CUDA"
    cap = _capability(_device_index(a.data))
    if cap != (9, 0):
        return f"device capability {cap} is not sm_90"
    if a.block.cols != G or b.block.cols != G:
        return f"K blocks {a.block.cols}/{b.block.cols}; the Gluon kernel promotes every {G} of K"
    if a_fallback is not None:
        return "fallback term (a second INT8 term of a) is not in the Gluon kernel yet"
    if out_block is not None and (out_block.rows, out_block.cols) != (1, BN):
        return f"output block {out_block}; the Gluon epilogue writes 1x{BN} blocks"
    if out_block is None and out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"out_dtype {out_dtype}"
    for name, t in (("a", a.data), ("b", b.data)):
        why = k_major_problem(t, name + ".data")
        if why:
            return why
    M, N = a.shape[0], b.shape[0]
    esize = 1 if out_block is not None else _ESIZE[out_dtype]
    if (N * esize) % 16:
        return f"output rows of {N * esize} bytes are not a multiple of 16 (TMA store)"
    if M == 0 or N == 0 or a.shape[1] == 0:
        return "empty problem"
    return None


@functools.lru_cache(maxsize=None)
def _smem_layout(block: tuple, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), _TORCH_TO_GL[dtype])


def _desc(t: torch.Tensor, block: list[int]):
    return TensorDescriptor.from_tensor(t, block, _smem_layout(tuple(block), t.dtype))


def block_gemm(a: QTensor, b: QTensor, bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
               out_block=None, rounding: str = "nearest", seed=0, magic: bool = False,
               overlap: int = 0, consumers: Optional[int] = None, checked: bool = False, noise: str = "philox7x8w",
               sb_smem: Optional[bool] = None, prefetch: Optional[bool] = None, salt: int = 0):
    """``a @ b.T (+ bias)`` with the warp-specialized kernel; float ``out_dtype`` or 1x128-block INT8 QTensor.

    a (M, K) and b (N, K) must be K-major QTensors with K blocks of 128 (a: any rows per block, e.g. 1 or
    128; b: 128 rows per block reads one scale per tile, other block heights a scale per column). Raises
    ValueError naming the fix when the call cannot run here (``unsupported``); `gemm.block_gemm` checks
    first and routes such calls to the Triton kernel (and passes ``checked=True``). ``magic``, ``overlap``
    and ``consumers`` are measured variants (module docstring, docs/notes/gemm_h200.md); the defaults are
    the fastest measured. ``noise`` picks the stochastic-rounding noise (``NOISES``): "philox7x8w" (default: the
    memory-bound kernels' stream, ``_noise16``, its Philox products through mul.wide.u32; +5-10% over nearest
    rounding on the H200, the fastest measured), "philox7x8" (the same bits through umulhi) or "philox10"
    (the previous one, ``tl.rand`` per element, +27-70%); the last two for measurements. ``sb_smem``
    (per-column B scales, i.e. wgrad): the producer's TMA brings each K group's BN scales into the stage, so the
    consumers read them from shared memory instead of L2 (default: on where TMA can address the transposed scale
    grid, N a multiple of 4, and ``overlap`` is 0). ``prefetch``: each K group's scale loads are issued one group
    ahead (default for scalar B scales, fwd/dgrad: +14-16% on the H200; default off for per-column ones, where it
    measured 12% slower with the shared-memory scales: 2.23 vs 1.97 ms at 16384 x 11008 x 4096). ``seed``: an int or
    a 1-element int64 tensor on the operands' device (read by the kernel: graph-safe, ``_launch`` "seeds"), ``salt``
    an int in [0, 2**62]; the key is ``_derive_seed(base, salt)``, the memory-bound kernels' derivation.
    """
    from ._launch import alloc, check_salt, check_seed, num_sms, seed_ptr, stream_salt
    from ..format.blocks import _SCALE_MAX

    out_block = None if out_block is None else BlockShape.parse(out_block)
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {tuple(NOISES)}, got {noise!r}")
    why = None if checked else unsupported(a, b, out_dtype, out_block)
    if why:
        raise ValueError(f"gluon_gemm.block_gemm cannot run this call: {why}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gluon_gemm.block_gemm needs a (M, K), b (N, K); got {tuple(a.shape)}, {tuple(b.shape)}")
    check_seed(seed, a.device)
    check_salt(salt)
    M, K = a.shape
    N = b.shape[0]
    out_quant = out_block is not None
    c = alloc((M, N), torch.int8 if out_quant else out_dtype, a.device)
    sc = alloc(out_block.grid((M, N)) if out_quant else (1, 1), torch.float32, a.device)
    b_per_col = b.block.rows % BN != 0
    nc = consumers or default_consumers(b_per_col)
    if nc not in REGS:
        raise ValueError(f"consumers must be one of {tuple(REGS)}, got {consumers}")
    if b_per_col and nc != 2:
        # Measured on the H200 (scripts/gpu/gemm_wgrad_probe.py): 3 consumers with per-column B scales spill at 160
        # registers, run 0.75-0.87x BF16 against 0.95-1.06x on 2, and gave wrong results at K = 16384 (rel. error
        # 4-5e-2); refused rather than run.
        raise ValueError("per-column B scales (b blocks of 1 row, the wgrad operands) run on 2 consumer warpgroups; "
                         f"got consumers={nc} (leave consumers unset)")
    maxnreg, consumer_regs, producer_regs = REGS[nc]
    bm = nc * HALF
    a_desc = _desc(a.data, [bm if nc == 2 else HALF, BK])
    b_desc = _desc(b.data, [BN, BK])
    c_desc = _desc(c, [HALF, BN])
    b_scale = b.scale
    if b_per_col and b_scale.stride(0) != 1:
        # Per-column scales of one K group are then contiguous (coalesced, vectorized loads; the JIT
        # specializes the unit stride). A copy of N * K / 128 floats, ~1/128 of b's bytes.
        b_scale = b_scale.t().contiguous().t()
    # TMA over the transposed grid (K / 128, N): unit column stride, 16-byte aligned base and row stride
    sb_ok = (b_per_col and overlap == 0 and b_scale.stride(0) == 1 and (b_scale.stride(1) * 4) % 16 == 0
             and b_scale.data_ptr() % 16 == 0)
    if sb_smem is None:
        sb_smem = sb_ok
    elif sb_smem and not sb_ok:
        raise ValueError("sb_smem needs per-column B scales (b blocks of 1 row), overlap=0 and a TMA-addressable "
                         "transposed scale grid (unit column stride and 16-byte rows: N a multiple of 4, more than one "
                         "K group)")
    sb_desc = _desc(b_scale.t(), [1, BN]) if sb_smem else None
    if prefetch is None:
        prefetch = not b_per_col
    stages = stages_for(c.dtype, nc, sb_smem)
    tiles = triton_cdiv(M, bm) * triton_cdiv(N, BN)
    grid = (min(num_sms(_device_index(a.data)), tiles),)
    block_gemm_kernel[grid](
        a_desc, b_desc, c_desc, a.scale, b_scale, bias.contiguous() if bias is not None else sc, sc,
        M, N, K, a.scale.stride(0), a.scale.stride(1), b_scale.stride(0), b_scale.stride(1), sc.stride(0),
        seed_ptr(seed, a.device, out_quant and rounding == "stochastic", placeholder=sc), stream_salt(salt, 0),
        A_BR=a.block.rows, B_BR=b.block.rows, B_PER_COL=b_per_col,
        HAS_BIAS=bias is not None, OUT_MODE=OUT_INT8 if out_quant else OUT_FLOAT,
        STOCHASTIC=NOISES[noise] if rounding == "stochastic" else 0, MAGIC=magic, OVERLAP=int(overlap),
        SCALE_MAX=float(_SCALE_MAX),
        STAGES=stages, GROUP_M=GROUP_M, NC=nc, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
        SB_SMEM=bool(sb_smem), sb_desc=sb_desc, PREFETCH=bool(prefetch), num_warps=4, maxnreg=maxnreg)
    return QTensor(c, sc, out_block) if out_quant else c


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["available", "block_gemm", "k_major_problem", "stages_for", "unsupported"]
