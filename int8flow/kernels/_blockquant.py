"""Device-side building blocks of every INT8 kernel: quantize-on-store, dequantize-on-load, bf16 casts.

Numerics equal ``int8flow.format.quantize`` bit for bit under nearest rounding: the absmax is exact,
``scale = absmax / 127`` and ``x / scale`` are IEEE round-to-nearest divisions (``tl.div_rn``, the
correctly rounded float32 division torch does), finite scales are clamped to the format's largest
(absmax = FLT_MAX would otherwise dequantize to Inf), zero-scale blocks give 0, and round half to even
is written with exact float32 operations (the Triton interpreter, the CPU test path, has no libdevice).
Stochastic rounding is ``floor(v + u)``, ``u ~ U[0, 1)`` from ``tl.rand(seed, element_index)``: a
counter-based RNG keyed by position, so a seed gives the same bits on any launch geometry. Kernels read
the base seed from device memory (``seed_ptr``, a 1-element int64 tensor) and derive the Philox key with
``derive_seed(base, salt)`` (``load_seed``): graph-safe seeds, see ``_launch`` ("seeds").

The host side (validation, allocation, seeds, launch geometry) lives in ``_launch``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..format.blocks import _SCALE_MAX, QMAX
from ._launch import interpreting

_QMAX_F = tl.constexpr(float(QMAX))
_SCALE_MAX_F = tl.constexpr(_SCALE_MAX)
# Triton itself picks the interpreter when a kernel is decorated, so reading the switch at import agrees with it.
_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def _mix64(z):
    """splitmix64's finalizer on a uint64 (64-bit wrapping multiplies, logical shifts): ``format.seeds.mix64``."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def derive_seed(base, salt):
    """31-bit Philox key (int32 in [0, 2**31 - 1)) of an int64 base seed and an integer salt; the one device-side
    derivation of every Triton kernel, bit for bit ``_launch.derive_seed`` (which documents the formula):
    ``(mix64(base ^ mix64((salt + 1) * 0x9E3779B97F4A7C15)) >> 33) % (2**31 - 1)``. Scalar work, once a program."""
    b = base.to(tl.uint64, bitcast=True)  # salt: a runtime int (kernels list it in do_not_specialize)
    s = salt.to(tl.uint64)  # a value cast: the salt is >= 0 (check_salt), and Triton types a Python int by its
    # value (i32, u32 for [2**31, 2**32), i64); a bitcast of the i64 form failed in the interpreter for u32 salts
    z = _mix64(b ^ _mix64((s + 1) * 0x9E3779B97F4A7C15))
    return (z >> 33).to(tl.int32) % 0x7FFFFFFF


@triton.jit
def load_seed(seed_ptr, salt):
    """``derive_seed`` of the base seed at ``seed_ptr`` (1-element int64 on the device): what kernels call where
    they need a stream's key (only under STOCHASTIC / a dropout mask, so nearest launches read nothing)."""
    return derive_seed(tl.load(seed_ptr), salt)


@triton.jit
def round_half_even(v):
    """Round float32 to the nearest integer, ties to even, for |v| < 2**22 (v + 0.5 is exact there).

    (The 1.5 * 2**23 add/subtract trick is shorter but costs the GEMM epilogue extra spills on sm_90.)
    """
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def scale_from_absmax(absmax):
    """absmax / 127 correctly rounded, finite scales clamped like ``int8flow.format`` (NaN/Inf stay visible)."""
    scale = tl.div_rn(absmax, _QMAX_F)
    return tl.where((scale > _SCALE_MAX_F) & (scale < float("inf")), _SCALE_MAX_F, scale)


@triton.jit
def quantize_values(x, scale, seed, offsets, STOCHASTIC: tl.constexpr):
    """int8 codes of float32 ``x`` under a broadcastable per-block ``scale`` (0 where the scale is 0)."""
    nonzero = scale > 0.0
    v = tl.where(nonzero, tl.div_rn(x, tl.where(nonzero, scale, 1.0)), 0.0)
    if STOCHASTIC:
        q = tl.floor(v + tl.rand(seed, offsets))
    else:
        q = round_half_even(v)
    return tl.minimum(tl.maximum(q, -_QMAX_F), _QMAX_F).to(tl.int8)


@triton.jit
def quantize_tile(y, offsets, seed, BM: tl.constexpr, BN: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr,
                  STOCHASTIC: tl.constexpr):
    """Quantize a float32 [BM, BN] tile of whole QR x QC blocks; returns (int8 [BM, BN], scales [BM//QR, BN//QC]).

    Elements outside the tensor must be 0 in ``y`` (they take part in their block's absmax).
    """
    y4 = tl.reshape(y, (BM // QR, QR, BN // QC, QC))
    scale4 = scale_from_absmax(tl.max(tl.max(tl.abs(y4), axis=3, keep_dims=True), axis=1, keep_dims=True))
    offs4 = tl.reshape(offsets, (BM // QR, QR, BN // QC, QC))
    q4 = quantize_values(y4, scale4, seed, offs4, STOCHASTIC)
    return tl.reshape(q4, (BM, BN)), tl.reshape(scale4, (BM // QR, BN // QC))


@triton.jit
def cast_rne(y, dtype: tl.constexpr):
    """float32 -> dtype, round half to even: the GPU's conversion; the interpreter would truncate to bfloat16."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = tl.where(y == y, bits.to(tl.float32, bitcast=True), y)  # NaN stays NaN
    return y.to(dtype)


@triton.jit
def tile_coords(BM: tl.constexpr, BN: tl.constexpr):
    """(row0, col0, rows, cols) of this program's [BM, BN] tile on a 2-D grid of tiles."""
    row0 = tl.program_id(0) * BM
    col0 = tl.program_id(1) * BN
    return row0, col0, row0 + tl.arange(0, BM), col0 + tl.arange(0, BN)


@triton.jit
def load_tile(ptr, scale_ptr, rows, cols, M, N, stride_r, stride_c, stride_sr, stride_sc,
              IS_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr):
    """Tile [len(rows), len(cols)] of an (M, N) operand as float32, zeros outside; INT8 (IS_Q) times its block scale."""
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    x = tl.load(ptr + rows64[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0).to(tl.float32)
    if IS_Q:
        s = tl.load(scale_ptr + (rows64[:, None] // QR) * stride_sr + (cols[None, :] // QC) * stride_sc,
                    mask=mask, other=0.0)
        x = x * s
    return x


@triton.jit
def load_operand(ptr, scale_ptr, rows, cols, M, N, IS_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr):
    """``load_tile`` of a row-major (M, N) operand with a row-major scale grid (``_launch.Operand``)."""
    return load_tile(ptr, scale_ptr, rows, cols, M, N, N, 1, tl.cdiv(N, QC), 1, IS_Q, QR, QC)


@triton.jit
def emit_tile(y, out_ptr, out_scale_ptr, row0, col0, M, N, seed, BM: tl.constexpr, BN: tl.constexpr,
              OUT_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Write the float32 tile y = out[row0:row0+BM, col0:col0+BN] (tails masked) as float or per-block INT8.

    For INT8 output (``_launch.Output``), row0/col0/BM/BN must be multiples of QR/QC; the tile's
    out-of-range elements are zeroed before the block absmax.
    """
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if OUT_Q:
        q, scale = quantize_tile(tl.where(mask, y, 0.0), offs, seed, BM, BN, QR, QC, STOCHASTIC)
        tl.store(out_ptr + offs, q, mask=mask)
        srows = row0 // QR + tl.arange(0, BM // QR)
        scols = col0 // QC + tl.arange(0, BN // QC)
        n_scale_cols = tl.cdiv(N, QC)
        smask = (srows[:, None] < tl.cdiv(M, QR)) & (scols[None, :] < n_scale_cols)
        tl.store(out_scale_ptr + srows.to(tl.int64)[:, None] * n_scale_cols + scols[None, :], scale, mask=smask)
    else:
        tl.store(out_ptr + offs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_stats_update(mean, m2, x, c0, N, BLOCK_D: tl.constexpr, RMS: tl.constexpr):
    """Fold chunk x = rows x columns [c0, c0 + BLOCK_D) (zeros past N) into running (mean, m2) per row.

    LayerNorm: Chan et al.'s merge of (count, mean, sum of squared deviations), stable for rows with a
    large mean; RMS: m2 is the plain sum of squares (mean stays 0). rstd = 1 / sqrt(m2 / N + eps).
    """
    if RMS:
        m2 += tl.sum(x * x, axis=1)
    else:
        cols = c0 + tl.arange(0, BLOCK_D)
        n_chunk = tl.minimum(N - c0, BLOCK_D).to(tl.float32)
        n_new = c0 + n_chunk
        mean_chunk = tl.sum(x, axis=1) / n_chunk
        dev = tl.where((cols < N)[None, :], x - mean_chunk[:, None], 0.0)
        delta = mean_chunk - mean
        mean += delta * (n_chunk / n_new)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (c0 * n_chunk / n_new)
    return mean, m2


__all__ = ["absmax_nan", "cast_rne", "derive_seed", "div_by_recip", "emit3", "emit3_t", "emit_tile", "flag_nonfinite", "i8_to_f32", "load3",
           "load_operand", "load_seed", "load_tile", "noise3", "quantize_by_scale", "quantize_tile", "quantize_values", "round_half_even",
           "row_stats3", "row_stats_update", "scale_from_absmax", "tile3", "tile_coords", "uniform16"]


# --- 3-D block tiles of the memory-bound kernels ------------------------------------------------------
#
# A memory-bound program holds its data as a [R, G, C] tile: R rows, G groups of C contiguous columns
# (column = gcol[g] + c, gcol[g] = first column of group g, a multiple of C). With C the quantization
# block's width, the per-block absmax is a reduction over axis 2 (and over QR rows for QR x C blocks),
# the block scales are a small [R, G] tensor broadcast along C, and every row segment is C contiguous
# values: 16-byte vector loads/stores of int8 and bf16. Arithmetic avoids the quarter-rate conversion
# and special-function units of sm_90 (I2F, F2I, MUFU) per element: int8 -> float by a magic-number
# add, float -> int8 round-half-even by the 1.5 * 2**23 add, and x / scale as one multiply by the
# block's correctly rounded reciprocal plus one fma correction (Markstein: the correctly rounded
# quotient, bit for bit what ``tl.div_rn`` and torch give).

_MAGIC_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: v + this rounds v to an integer (ties to even) in the low bits
_TINY_SCALE = tl.constexpr(2.0**-60)
_TINY_PRE = tl.constexpr(2.0**64)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def absmax_nan(x, axis: tl.constexpr):
    """max |x| along ``axis`` with NaN propagated (``tl.max`` drops NaN on the GPU): a NaN shows in the scale.

    (The interpreter's generic ``tl.reduce`` is a slow Python loop and its ``tl.max`` drops NaN too: there a
    NaN count puts the NaN back.)
    """
    a = tl.abs(x)
    if _INTERPRETING:
        return tl.where(tl.sum((a != a).to(tl.float32), axis) > 0, float("nan"), tl.max(a, axis))
    return tl.reduce(a, axis, _max_nan)


@triton.jit
def i8_to_f32(q):
    """int8 -> float32, exact, on the integer/FP32 pipes (0x4B000080 + q is the float 2**23 + 128 + q)."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def flag_nonfinite(amax, flag_ptr, flag_code):
    """Record NaN/Inf block maxima in the device flag: flag[1] += 1 per such block, and the block whose add
    found flag[1] == 0 (the first, device-wide) writes this op's code to flag[0].

    Masked atomics on the [R, G] block maxima themselves: no cross-warp reduction or barrier, and no memory
    operation at all while every block is finite (the predicate is off).
    """
    bad = (amax < float("inf")) == 0  # NaN or Inf (amax >= 0)
    zero = tl.zeros(amax.shape, tl.int32)
    old = tl.atomic_add(flag_ptr + 1 + zero, zero + 1, mask=bad, sem="relaxed")
    tl.store(flag_ptr + zero, zero + flag_code, mask=bad & (old == 0))


@triton.jit
def div_by_recip(a, b, r):
    """RN(a / b) given r = RN(1 / b) (both finite, b normal): one multiply and two fmas (Markstein's
    correction) instead of a division per element. The interpreter divides (numpy rounds correctly)."""
    if _INTERPRETING:
        return tl.div_rn(a, b)
    q0 = a * r
    return tl.fma(tl.fma(-q0, b, a), r, q0)


_NOISE_ROUNDS = tl.constexpr(7)  # Philox4x32-7 passes BigCrush (Salmon et al. 2011); tl.rand uses 10


@triton.jit
def uniform16(seed, rows, gcol, N, R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """16-bit uniforms (int32 in [0, 65536)) of an [R, G, C] tile, keyed by (seed, row, column) only.

    One Philox4x32-7 call per 8 elements (counter row * cdiv(N, 8) + col // 8; its four 32-bit outputs
    split into eight 16-bit values, element col % 8 taking the (col % 8)-th): an eighth of ``tl.rand``'s
    integer work, which would otherwise dominate the memory-bound kernels. Needs C % 8 == 0.
    """
    C8: tl.constexpr = C // 8
    k = rows[:, None, None] * tl.cdiv(N, 8) + (gcol[None, :, None] + tl.arange(0, C8)[None, None, :] * 8) // 8
    r0, r1, r2, r3 = tl.randint4x(seed, k.to(tl.uint32), _NOISE_ROUNDS)
    a = tl.join(r0 & 0xFFFF, r0 >> 16)
    b = tl.join(r1 & 0xFFFF, r1 >> 16)
    c = tl.join(r2 & 0xFFFF, r2 >> 16)
    d = tl.join(r3 & 0xFFFF, r3 >> 16)
    return tl.reshape(tl.join(tl.join(a, b), tl.join(c, d)), (R, G, C)).to(tl.int32)


@triton.jit
def noise3(seed, rows, gcol, N, R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """Centred stochastic-rounding noise c = (k - 32767.5) / 2**16 in (-1/2, 1/2) of an [R, G, C] tile, k a
    16-bit uniform: round-half-even(v + c) is floor(v + u) with u = c + 1/2 ~ U(0, 1) of mean exactly 1/2
    (unbiased to 2**-17 of a step). k -> float by the exponent trick (2**23 + k), not the quarter-rate I2F."""
    k = uniform16(seed, rows, gcol, N, R, G, C)
    return tl.fma((k | 0x4B000000).to(tl.float32, bitcast=True), 1.0 / 65536.0, -(8388608.0 + 32767.5) / 65536.0)


@triton.jit
def quantize_by_scale(y, scale, noise, STOCHASTIC: tl.constexpr):
    """int8 codes of float32 ``y`` under a broadcastable block ``scale``; equals ``quantize_values``
    under nearest rounding (bit for bit: RN(y / scale), ties to even); ``noise`` (``noise3``, centred in
    (-1/2, 1/2)) when STOCHASTIC: the code is floor(y / scale + U(0, 1)), clamped to +-127.

    0 where the scale is 0 or not finite (the format's zero-scale rule; a NaN/Inf block writes zeros).
    """
    ok = (scale > 0.0) & (scale < float("inf"))
    pre = tl.where(scale < _TINY_SCALE, _TINY_PRE, 1.0)  # exact power-of-two prescale keeps 1/b finite
    b = tl.where(ok, scale * pre, 1.0)
    r = tl.where(ok, tl.div_rn(b * 0.0 + 1.0, b), 0.0)  # per block: correctly rounded reciprocal
    v = tl.where(r != 0.0, div_by_recip(y * pre, b, r), 0.0)
    if STOCHASTIC:
        v = v + noise  # then rounded to nearest below: floor(v + noise + 1/2)
    v = tl.minimum(tl.maximum(v, -_QMAX_F), _QMAX_F)
    return (v + _MAGIC_RNE).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def tile3(rows, gcol, M, N, C: tl.constexpr):
    """(cols, mask, offsets) of the [R, G, C] tile at ``rows`` x groups ``gcol``; int32 row-major offsets."""
    cols = gcol[None, :, None] + tl.arange(0, C)[None, None, :]
    r3 = rows[:, None, None]
    return cols, (r3 < M) & (cols < N), r3 * N + cols


@triton.jit
def load3(ptr, scale_ptr, rows, gcol, M, N, IS_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr,
          C: tl.constexpr):
    """[R, G, C] float32 tile of a row-major (M, N) float or INT8 operand (times its block scale), 0 outside."""
    cols, mask, offs = tile3(rows, gcol, M, N, C)
    x = tl.load(ptr + offs, mask=mask, other=0)
    if IS_Q:
        ncs = tl.cdiv(N, QC)
        if QC % C == 0:  # one scale per (row, group): a small [R, G] load
            smask = (rows[:, None] < M) & (gcol[None, :] < N)
            s = tl.load(scale_ptr + (rows[:, None] // QR) * ncs + gcol[None, :] // QC, mask=smask, other=0.0)
            x = i8_to_f32(x) * s[:, :, None]
        else:  # blocks narrower than the tile's groups (mixed formats): per-element scale
            s = tl.load(scale_ptr + (rows[:, None, None] // QR) * ncs + cols // QC, mask=mask, other=0.0)
            x = i8_to_f32(x) * s
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _emit3_blocks(y, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code,
                  QR: tl.constexpr, QC: tl.constexpr, STOCHASTIC: tl.constexpr,
                  R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """INT8 store of an [R, G, C] tile whose groups are whole QR x C blocks (QC == C)."""
    cols, mask, offs = tile3(rows, gcol, M, N, C)
    y = tl.where(mask, y, 0.0)
    am = absmax_nan(y, 2)  # [R, G]
    if QR > 1:
        am = absmax_nan(tl.reshape(am, (R // QR, QR, G)), 1)
        am = tl.reshape(tl.broadcast_to(am[:, None, :], (R // QR, QR, G)), (R, G))
    flag_nonfinite(am, flag_ptr, flag_code)
    scale = scale_from_absmax(am)
    noise = 0.0
    if STOCHASTIC:
        noise = noise3(load_seed(seed_ptr, salt), rows, gcol, N, R, G, C)
    q = quantize_by_scale(y, scale[:, :, None], noise, STOCHASTIC)
    tl.store(out_ptr + offs, q, mask=mask)
    smask = (rows[:, None] < M) & (gcol[None, :] < N)
    if QR > 1:
        smask = smask & (rows[:, None] % QR == 0)
    tl.store(out_scale + (rows[:, None] // QR) * tl.cdiv(N, QC) + gcol[None, :] // QC, scale, mask=smask)


@triton.jit
def emit3(y, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code,
          OUT_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr, STOCHASTIC: tl.constexpr,
          R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """Write the float32 [R, G, C] tile as float (out dtype) or per-block INT8 (QC divides C, QR divides R).

    INT8: block absmax over the QC columns (and QR rows), scales stored once per block, non-finite
    blocks recorded in the device flag. Blocks narrower than C split each group (a register reshape), so
    every kernel keeps C = 128-wide groups whatever the output format and computes the same float values.
    Stochastic noise (``noise3``) is keyed by (seed, row, column), the seed ``load_seed(seed_ptr, salt)`` (read
    only when STOCHASTIC).
    """
    if OUT_Q:
        if QC == C:
            _emit3_blocks(y, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, QR, QC,
                          STOCHASTIC, R, G, C)
        else:
            K: tl.constexpr = C // QC
            gcol2 = tl.reshape(gcol[:, None] + tl.arange(0, K)[None, :] * QC, (G * K,))
            _emit3_blocks(tl.reshape(y, (R, G * K, QC)), out_ptr, out_scale, rows, gcol2, M, N, seed_ptr, salt,
                          flag_ptr, flag_code, QR, QC, STOCHASTIC, R, G * K, QC)
    else:
        _, mask, offs = tile3(rows, gcol, M, N, C)
        tl.store(out_ptr + offs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def emit3_t(y, outt_ptr, outt_scale, row0, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code,
            STOCHASTIC: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """Write the tile's transpose quantized with blocks of 1 x R along M: ``quantize(x.t(), '1xR')``.

    ``outt`` is (N, M) contiguous int8, ``outt_scale`` (N, cdiv(M, R)); R (= len(rows)) rows starting at
    ``row0`` (a multiple of R) form one block per column. The transpose goes through shared memory
    (Triton's layout conversion), so both stores are coalesced.
    """
    G: tl.constexpr = y.shape[1]
    cols, mask, _ = tile3(rows, gcol, M, N, C)
    y = tl.where(mask, y, 0.0)
    am = absmax_nan(y, 0)  # [G, C]: one block per column
    flag_nonfinite(am, flag_ptr, flag_code)
    scale = scale_from_absmax(am)
    noise = 0.0
    if STOCHASTIC:  # keyed by the element's (row, col) of x, with the copy's own salt
        noise = noise3(load_seed(seed_ptr, salt), rows, gcol, N, R, G, C)
    q = quantize_by_scale(y, scale[None, :, :], noise, STOCHASTIC)
    # a 2-D [G*C, R] transpose: Triton lowers it to one shared-memory round trip with both sides vectorized; the
    # 3-D permute of v1 stored at ~0.5 TB/s on the H200 (quantize_dual 252 us for 8192 x 4096 bf16)
    cols2 = gcol[:, None] + tl.arange(0, C)[None, :]  # [G, C]
    colf = tl.reshape(cols2, (G * C,))
    qt = tl.trans(tl.reshape(q, (R, G * C)))
    tl.store(outt_ptr + colf[:, None] * M + rows[None, :], qt, mask=(colf[:, None] < N) & (rows[None, :] < M))
    tl.store(outt_scale + cols2 * tl.cdiv(M, R) + row0 // R, scale, mask=cols2 < N)


@triton.jit
def row_stats3(mean, m2, x, c0, N, BD: tl.constexpr, RMS: tl.constexpr, C: tl.constexpr):
    """``row_stats_update`` on a [R, G, C] chunk covering columns [c0, c0 + BD) (zeros past N)."""
    if RMS:
        m2 += tl.sum(tl.sum(x * x, axis=2), axis=1)
    else:
        G: tl.constexpr = BD // C
        cols = c0 + tl.arange(0, G)[:, None] * C + tl.arange(0, C)[None, :]
        n_chunk = tl.minimum(N - c0, BD).to(tl.float32)
        n_new = c0 + n_chunk
        mean_chunk = tl.sum(tl.sum(x, axis=2), axis=1) / n_chunk
        dev = tl.where((cols < N)[None, :, :], x - mean_chunk[:, None, None], 0.0)
        delta = mean_chunk - mean
        mean += delta * (n_chunk / n_new)
        m2 += tl.sum(tl.sum(dev * dev, axis=2), axis=1) + delta * delta * (c0 * n_chunk / n_new)
    return mean, m2
