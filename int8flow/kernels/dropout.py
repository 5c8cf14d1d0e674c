"""Inverted dropout, INT8 or float in and out, with the mask regenerated instead of stored.

The keep mask of element ``i`` (row-major index) is ``tl.rand(stream_seed(seed, 0), i) >= p``: a
counter-based RNG, so backward recomputes the forward's mask bit-exactly from the seed and writes no
mask tensor (saves M*D bytes written and read, as much as an INT8 activation). ``dropout_forward``
returns a ``DropoutMask`` handle (seed, p, shape) in the place where the reference returns its bool
mask; ``dropout_backward`` accepts either that handle or a bool mask tensor (the reference-compatible
path, e.g. a mask from ``int8flow.reference.dropout_forward`` or ``DropoutMask.materialize()``).
The kernel's mask is not the reference's (a different RNG); the tests compare its statistics and its
exact regeneration.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch
import triton
import triton.language as tl

from . import _launch
from ._blockquant import emit_tile, load_operand, tile_coords
from ._launch import Output, elementwise_launch, operand, stream_seed, tile_shape


@triton.jit
def _keep(mask_seed, offs, p):
    return tl.rand(mask_seed, offs) >= p


@triton.jit
def _dropout_kernel(x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                    keep_ptr, out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                    STOCHASTIC: tl.constexpr, M, N, p, keep_prob, mask_seed, seed,
                    KEEP_GIVEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out = x * keep / (1 - p); keep loaded from keep_ptr (bool, (M, N)) or regenerated from mask_seed."""
    row0, col0, rows, cols = tile_coords(BM, BN)
    x = load_operand(x_ptr, x_scale, rows, cols, M, N, X_Q, X_QR, X_QC)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if KEEP_GIVEN:
        in_bounds = (rows[:, None] < M) & (cols[None, :] < N)
        keep = tl.load(keep_ptr + offs, mask=in_bounds, other=0) != 0
    else:
        keep = _keep(mask_seed, offs, p)
    y = tl.div_rn(tl.where(keep, x, 0.0), keep_prob)
    emit_tile(y, out_ptr, out_scale, row0, col0, M, N, seed, BM, BN, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC)


@triton.jit
def _keep_mask_kernel(keep_ptr, M, N, p, mask_seed, BM: tl.constexpr, BN: tl.constexpr):
    _, _, rows, cols = tile_coords(BM, BN)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(keep_ptr + offs, _keep(mask_seed, offs, p), mask=(rows[:, None] < M) & (cols[None, :] < N))


class DropoutMask(NamedTuple):
    """What backward needs to regenerate the keep mask: the forward call's seed, p and shape."""

    seed: int
    p: float
    shape: tuple[int, int]

    def materialize(self, device: Union[str, torch.device]) -> torch.Tensor:
        """The keep mask as a bool tensor (the reference's form), from the same random stream."""
        keep = _launch.alloc(self.shape, torch.bool, torch.device(device))
        bm, bn = tile_shape(1, 1)
        grid = (triton.cdiv(self.shape[0], bm), triton.cdiv(self.shape[1], bn))
        _keep_mask_kernel[grid](keep, *self.shape, float(self.p), stream_seed(self.seed, 0), BM=bm, BN=bn)
        return keep


def _check_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")


def _run(x_op, shape, keep, mask_seed, p, out_dtype, out_block, rounding, seed):
    out = Output(shape, x_op.data.device, out_dtype, out_block, rounding)
    grid, meta = elementwise_launch(shape, out)
    _dropout_kernel[grid](*x_op.args, keep, *out.args, shape[0], shape[1], float(p), float(1.0 - p), mask_seed,
                          stream_seed(seed, 1), KEEP_GIVEN=keep is not None, **meta)
    return out.result()


def dropout_forward(x, p: float, seed: int = 0, out_dtype: torch.dtype = torch.float32, out_block=None,
                    rounding: str = "nearest"):
    """Returns (y, DropoutMask); the same seed gives the same mask (and the same stochastic rounding)."""
    _check_p(p)
    x_op = operand(x, "x")
    mask = DropoutMask(seed, float(p), x_op.shape)
    y = _run(x_op, x_op.shape, None, stream_seed(seed, 0), p, out_dtype, out_block, rounding, seed)
    return y, mask


def dropout_backward(dy, mask: Union[DropoutMask, torch.Tensor], p: float, out_dtype: torch.dtype = torch.float32,
                     out_block=None, rounding: str = "nearest", seed: int = 0):
    """dx = dy * keep / (1 - p); ``mask`` is the forward's DropoutMask (regenerated) or a bool keep mask."""
    _check_p(p)
    dy_op = operand(dy, "dy")
    if isinstance(mask, DropoutMask):
        if tuple(mask.shape) != dy_op.shape or mask.p != float(p):
            raise ValueError(f"mask is for shape {tuple(mask.shape)} and p={mask.p}, but dy has shape {dy_op.shape} "
                             f"and p={p}; pass the DropoutMask of the matching forward call")
        return _run(dy_op, dy_op.shape, None, stream_seed(mask.seed, 0), p, out_dtype, out_block, rounding, seed)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a DropoutMask or a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != dy_op.shape or mask.device != dy_op.data.device or not mask.is_contiguous():
        raise ValueError(f"mask must be a contiguous bool tensor of dy's shape {dy_op.shape} on {dy_op.data.device}, "
                         f"got shape {tuple(mask.shape)} on {mask.device}")
    return _run(dy_op, dy_op.shape, mask, 0, p, out_dtype, out_block, rounding, seed)


__all__ = ["DropoutMask", "dropout_backward", "dropout_forward"]
