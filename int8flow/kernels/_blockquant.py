"""Shared pieces of the non-linear INT8 kernels: dequantize-on-load and quantize-on-store.

Device side (``@triton.jit``): ``load_operand`` reads a tile of a float or per-block INT8 operand as
float32; ``emit_tile`` writes a float32 tile either cast to the output's float dtype or quantized per
block (absmax -> scale -> round -> int8, plus the block scales). A tile must cover whole output blocks
(its origin and sizes are multiples of the block), so every block's absmax is computed in registers
and the output is written once.

Host side: ``Operand`` (kernel arguments of one input), ``Output`` (allocation, kernel arguments and
result of one output), ``check_*`` validators shared by the wrappers in this package.

Numerics match ``int8flow.format.quantize``: scale = absmax / 127 (float32, correctly rounded, clamped to
the format's largest finite scale), value /
scale correctly rounded, nearest = round half to even, stochastic = floor(v + u) with u ~ U[0, 1) drawn
by ``tl.rand(seed, element_index)`` (a counter-based RNG: the same seed gives the same bits on any
launch geometry), clamp to [-127, 127], zero-scale blocks give 0.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..format import QTensor
from ..format.blocks import _SCALE_MAX, QMAX, ROUNDING_MODES, BlockShape

# Block sides the kernels accept: powers of two (the in-register absmax reshapes the tile by them).
MAX_BLOCK_SIDE = 128
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# 1.5 * 2**23. Adding and subtracting it leaves v rounded to an integer by the FPU's own
# round-half-to-even (exact for |v| < 2**22; quantized values are within [-127, 127]). libdevice's
# rint would do the same but the Triton interpreter (the CPU test path) has no libdevice.
_RNE_MAGIC = tl.constexpr(12582912.0)
_QMAX_F = tl.constexpr(float(QMAX))
# The format's largest finite scale (absmax = FLT_MAX would round absmax / 127 up and dequantize to Inf).
_SCALE_MAX_F = tl.constexpr(_SCALE_MAX)


@triton.jit
def round_half_even(v):
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def cast_rne(y, dtype: tl.constexpr):
    """float32 -> dtype, round half to even (the GPU's default; the interpreter would truncate to bfloat16)."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def load_operand(ptr, scale_ptr, rows, cols, M, N, IS_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr):
    """Tile [len(rows), len(cols)] of a row-major (M, N) operand as float32; zeros outside the tensor.

    INT8 operands (IS_Q) are multiplied by their block scale (scale grid row-major, cdiv(N, QC) wide).
    """
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    x = tl.load(ptr + rows64[:, None] * N + cols[None, :], mask=mask, other=0).to(tl.float32)
    if IS_Q:
        n_scale_cols = tl.cdiv(N, QC)
        s = tl.load(scale_ptr + (rows64[:, None] // QR) * n_scale_cols + (cols[None, :] // QC), mask=mask, other=0.0)
        x = x * s
    return x


@triton.jit
def quantize_tile(y, offs, seed, BM: tl.constexpr, BN: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr,
                  STOCHASTIC: tl.constexpr):
    """Quantize a float32 [BM, BN] tile made of whole QR x QC blocks; returns (int8 tile, scales [BM//QR, BN//QC])."""
    y4 = tl.reshape(y, (BM // QR, QR, BN // QC, QC))
    absmax = tl.max(tl.max(tl.abs(y4), axis=3), axis=1)
    scale = tl.div_rn(absmax, _QMAX_F)
    scale = tl.where((scale > _SCALE_MAX_F) & (scale < float("inf")), _SCALE_MAX_F, scale)
    s4 = scale[:, None, :, None]
    nonzero = s4 > 0
    v4 = tl.where(nonzero, tl.div_rn(y4, tl.where(nonzero, s4, 1.0)), 0.0)
    v = tl.reshape(v4, (BM, BN))
    if STOCHASTIC:
        q = tl.floor(v + tl.rand(seed, offs))
    else:
        q = round_half_even(v)
    q = tl.minimum(tl.maximum(q, -_QMAX_F), _QMAX_F)
    return q.to(tl.int8), scale


@triton.jit
def emit_tile(y, out_ptr, out_scale_ptr, row0, col0, M, N, seed, BM: tl.constexpr, BN: tl.constexpr,
              OUT_Q: tl.constexpr, QR: tl.constexpr, QC: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Write the float32 tile y = out[row0:row0+BM, col0:col0+BN] (tails masked) as float or per-block INT8.

    For INT8 output, row0/col0/BM/BN must be multiples of QR/QC; masked-out elements must be 0 in y
    (``load_operand`` guarantees it for values computed elementwise from loaded zeros, callers that
    produce non-zero values there pass them through ``tl.where`` first).
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


# --- host side ---------------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialized output buffer; every kernel output goes through here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the "
            "CPU interpreter). Use int8flow.reference for CPU tensors."
        )


class Operand(NamedTuple):
    """Kernel arguments of one (M, N) input: ``ptr, scale_ptr, IS_Q, QR, QC`` (see ``load_operand``)."""

    data: torch.Tensor
    scale: torch.Tensor
    is_q: bool
    qr: int
    qc: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def args(self) -> tuple:
        return (self.data, self.scale, self.is_q, self.qr, self.qc)


def operand(x, name: str) -> Operand:
    """Validate a float tensor or QTensor input (2-D, row-major contiguous, on the kernel device)."""
    if isinstance(x, QTensor):
        data = x.data
        if not (data.is_contiguous() and x.scale.is_contiguous()):
            raise ValueError(
                f"{name} is a QTensor whose data or scale is not row-major contiguous (a .t() view?); the kernels "
                f"read (rows, features) row-major: pass QTensor(q.data.contiguous(), q.scale.contiguous(), q.block)"
            )
        check_device(data, name)
        return Operand(data, x.scale, True, x.block.rows, x.block.cols)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor or a QTensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/bfloat16/float16 or a QTensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}; use x.reshape(-1, x.shape[-1])")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be row-major contiguous; call {name}.contiguous() first")
    check_device(x, name)
    return Operand(x, x, False, 1, 1)


def check_same_shape(*ops: tuple[str, Operand]) -> tuple[int, int]:
    shapes = {name: op.shape for name, op in ops}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}; these operands must have the same (rows, features) shape")
    devices = {str(op.data.device) for _, op in ops}
    if len(devices) != 1:
        raise ValueError(f"operands are on different devices {devices}; move them to one device")
    return ops[0][1].shape


def check_vector(v: Optional[torch.Tensor], name: str, d: int, device: torch.device) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    if tuple(v.shape) != (d,):
        raise ValueError(f"{name} must have shape ({d},) to match the feature dimension, got {tuple(v.shape)}")
    if not v.is_contiguous() or v.device != device:
        raise ValueError(f"{name} must be contiguous and on {device}, got device {v.device}")


def check_stats(v: torch.Tensor, name: str, m: int, device: torch.device) -> None:
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or tuple(v.shape) != (m,):
        raise ValueError(f"{name} must be a float32 tensor of shape ({m},) (the forward pass's row statistic), "
                         f"got {getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
    if not v.is_contiguous() or v.device != device:
        raise ValueError(f"{name} must be contiguous and on {device}, got device {v.device}")


def stream_seed(seed: int, stream: int) -> int:
    """Independent 31-bit Philox seed for random stream ``stream`` of a call seeded with ``seed``.

    One call may draw several streams (a dropout mask and the rounding noise of each output); a
    multiplicative hash keeps ``stream_seed(s, 1)`` from colliding with ``stream_seed(s + 1, 0)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return ((seed * 0x9E3779B1) ^ (stream * 0x85EBCA77 + 0x165667B1)) % (2**31 - 1)


class Output:
    """One kernel output: a float tensor of ``out_dtype`` or INT8 data + block scales (``out_block``).

    ``args`` are the kernel arguments ``out_ptr, out_scale_ptr, OUT_Q, QR, QC, STOCHASTIC``;
    ``result()`` is what the wrapper returns (a Tensor or a QTensor).
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, out_dtype: torch.dtype = torch.float32,
                 out_block=None, rounding: str = "nearest"):
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
        self.block = None if out_block is None else BlockShape.parse(out_block)
        if self.block is None:
            if out_dtype not in FLOAT_DTYPES:
                raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES} (or pass out_block for INT8), got {out_dtype}")
            self.data = alloc(shape, out_dtype, device)
            self.scale = self.data
        else:
            check_block(self.block, "out_block")
            self.data = alloc(shape, torch.int8, device)
            self.scale = alloc(self.block.grid(shape), torch.float32, device)
        self.stochastic = rounding == "stochastic"

    @property
    def qr(self) -> int:
        return 1 if self.block is None else self.block.rows

    @property
    def qc(self) -> int:
        return 1 if self.block is None else self.block.cols

    @property
    def args(self) -> tuple:
        return (self.data, self.scale, self.block is not None, self.qr, self.qc, self.stochastic)

    def result(self):
        return self.data if self.block is None else QTensor(self.data, self.scale, self.block)


def check_block(block: BlockShape, name: str) -> None:
    for side in (block.rows, block.cols):
        if side & (side - 1) or side > MAX_BLOCK_SIDE:
            raise ValueError(
                f"{name} {block} is not supported by the Triton kernels: block sides must be powers of two up to "
                f"{MAX_BLOCK_SIDE} (e.g. 32x32, 1x32, 1x128); use int8flow.reference for other shapes"
            )


def tile_shape(qr: int, qc: int, elements: int = 4096) -> tuple[int, int]:
    """(BM, BN) of an elementwise tile: whole blocks of qr x qc, about ``elements`` values."""
    bn = max(qc, 128)
    bm = max(qr, elements // bn)
    return bm, bn


def elementwise_launch(shape: tuple[int, int], out: Output) -> tuple[tuple[int, int], dict]:
    """Grid and tile constexprs (BM, BN) of an elementwise kernel writing ``out``."""
    bm, bn = tile_shape(out.qr, out.qc)
    grid = (triton.cdiv(shape[0], bm), triton.cdiv(shape[1], bn))
    return grid, dict(BM=bm, BN=bn, num_warps=4 if bm * bn <= 4096 else 8)


__all__ = [
    "Operand", "Output", "alloc", "cast_rne", "check_block", "check_device", "check_same_shape", "check_stats", "check_vector",
    "elementwise_launch", "emit_tile", "interpreting", "load_operand", "operand", "quantize_tile", "round_half_even", "row_stats_update", "stream_seed",
    "tile_shape",
]
