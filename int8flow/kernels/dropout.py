"""Inverted dropout, INT8 or float in and out, with the mask regenerated instead of stored.

The keep mask of element (row, col) is a 16-bit uniform from Philox4x32-7 keyed by
``derive_seed(seed, salt)`` (stream 0 of the call; ``_launch`` "seeds") and the element's position (``_keep3``),
kept when >= round(p * 65536): a
counter-based RNG, so backward recomputes the forward's mask bit-exactly from the seed and writes no
mask tensor (saves M*D bytes written and read, as much as an INT8 activation). ``dropout_forward``
returns a ``DropoutMask`` handle (seed, p, shape, salt) in the place where the reference returns its bool
mask; ``dropout_backward`` accepts either that handle or a bool mask tensor (the reference-compatible
path, e.g. a mask from ``int8flow.reference.dropout_forward`` or ``DropoutMask.materialize()``).
The kernel's mask is not the reference's (a different RNG); the tests compare its statistics and its
exact regeneration.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np

import torch
import triton
import triton.language as tl

from . import _launch, nonfinite
from ._blockquant import div_by_recip, emit3, emit3_t, load3, load_seed, tile3, uniform16
from ._launch import Output, check_int32_addressable, check_salt, check_seed, operand, seed_args, tile3_launch


@triton.jit
def _keep3(seed_ptr, mask_salt, rows, gcol, N, thresh, R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """Keep mask of an [R, G, C] tile: element (row, col) keeps when its 16-bit uniform
    (``_blockquant.uniform16``: position-keyed, geometry-independent) is >= ``thresh``."""
    return uniform16(load_seed(seed_ptr, mask_salt), rows, gcol, N, R, G, C) >= thresh


@triton.jit(do_not_specialize=['mask_salt', 'salt', 'salt_t'])
def _dropout_kernel(x_ptr, x_scale, X_Q: tl.constexpr, X_QR: tl.constexpr, X_QC: tl.constexpr,
                    keep_ptr, out_ptr, out_scale, OUT_Q: tl.constexpr, OUT_QR: tl.constexpr, OUT_QC: tl.constexpr,
                    STOCHASTIC: tl.constexpr, outt_ptr, outt_scale, WITH_T: tl.constexpr,
                    M, N, thresh, keep_prob, inv_keep, mask_seed_ptr, mask_salt, seed_ptr, salt, salt_t, flag_ptr,
                    flag_code,
                    KEEP_GIVEN: tl.constexpr, R: tl.constexpr, G: tl.constexpr, C: tl.constexpr):
    """out = x * keep / (1 - p) (``inv_keep`` = RN(1 / keep_prob)); keep loaded from keep_ptr (bool, (M, N)) or
    regenerated from the base seed at mask_seed_ptr with mask_salt (16-bit uniforms >= thresh); the rounding noise
    from the base seed at seed_ptr (salt: the row-major output, salt_t: the transposed copy)."""
    row0 = tl.program_id(0) * R
    rows = row0 + tl.arange(0, R)
    gcol = tl.program_id(1) * (G * C) + tl.arange(0, G) * C
    x = load3(x_ptr, x_scale, rows, gcol, M, N, X_Q, X_QR, X_QC, C)
    _, in_bounds, offs = tile3(rows, gcol, M, N, C)
    if KEEP_GIVEN:
        keep = tl.load(keep_ptr + offs, mask=in_bounds, other=0) != 0
    else:
        keep = _keep3(mask_seed_ptr, mask_salt, rows, gcol, N, thresh, R, G, C)
    y = div_by_recip(tl.where(keep, x, 0.0), keep_prob, inv_keep)
    emit3(y, out_ptr, out_scale, rows, gcol, M, N, seed_ptr, salt, flag_ptr, flag_code, OUT_Q, OUT_QR, OUT_QC, STOCHASTIC,
          R, G, C)
    if WITH_T:
        emit3_t(y, outt_ptr, outt_scale, row0, rows, gcol, M, N, seed_ptr, salt_t, flag_ptr, flag_code, STOCHASTIC, R, C)


@triton.jit(do_not_specialize=['mask_salt'])
def _keep_mask_kernel(keep_ptr, M, N, thresh, seed_ptr, mask_salt, R: tl.constexpr, G: tl.constexpr,
                      C: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    gcol = tl.program_id(1) * (G * C) + tl.arange(0, G) * C
    _, in_bounds, offs = tile3(rows, gcol, M, N, C)
    tl.store(keep_ptr + offs, _keep3(seed_ptr, mask_salt, rows, gcol, N, thresh, R, G, C), mask=in_bounds)


def _threshold(p: float) -> int:
    """16-bit drop threshold: P(u16 < t) = t / 65536, the nearest to p."""
    return int(round(float(p) * 65536))


class DropoutMask(NamedTuple):
    """What backward needs to regenerate the keep mask: the forward call's seed (an int or the 1-element int64
    device tensor it read), p, shape and salt (the mask is stream ``salt + 0``)."""

    seed: Union[int, torch.Tensor]
    p: float
    shape: tuple[int, int]
    salt: int = 0

    def materialize(self, device: Union[str, torch.device]) -> torch.Tensor:
        """The keep mask as a bool tensor (the reference's form), from the same random stream."""
        device = torch.device(device)
        keep = _launch.alloc(self.shape, torch.bool, device)
        if keep.numel():
            r, g, c = 8, 4, 128
            grid = (triton.cdiv(self.shape[0], r), triton.cdiv(self.shape[1], g * c))
            sp, mask_salt = seed_args(self.seed, self.salt, keep.device, True, keep, streams=(0,))
            _keep_mask_kernel[grid](keep, *self.shape, _threshold(self.p), sp, mask_salt, R=r, G=g, C=c)
        return keep


def _check_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")


def _run(x_op, shape, keep, p, out_dtype, out_block, rounding, seed, salt, with_t, op, mask_seed=0, mask_salt=0):
    """One dropout launch. The mask is regenerated from ``mask_seed`` / ``mask_salt`` (stream 0 of the forward call)
    unless ``keep`` is given; the output's rounding noise is stream 1 (its transposed copy 2) of ``seed`` / ``salt``."""
    check_int32_addressable(x_op.data, "x")
    device = x_op.data.device
    out = Output(shape, device, out_dtype, out_block, rounding, with_t)
    grid, meta = tile3_launch(shape, out)
    flag, code = nonfinite.flag_args(device, op)
    if shape[0] and shape[1]:
        keep_prob = float(np.float32(1.0 - p))  # float32 arithmetic on the host (no tensors, no device)
        inv_keep = float(np.float32(1.0) / np.float32(keep_prob))
        mask_ptr, mask_salt = seed_args(mask_seed, mask_salt, device, keep is None, flag, streams=(0,))
        _dropout_kernel[grid](*x_op.args, keep, *out.args, *out.t_args, shape[0], shape[1], _threshold(p),
                              keep_prob, inv_keep, mask_ptr, mask_salt,
                              *seed_args(seed, salt, device, out.stochastic, flag, streams=(1, 2)), flag, code,
                              KEEP_GIVEN=keep is not None, **meta)
    return out.result()


def dropout_forward(x, p: float, seed=0, out_dtype: torch.dtype = torch.float32, out_block=None,
                    rounding: str = "nearest", *, with_t: bool = False, salt: int = 0):
    """Returns (y, DropoutMask); the same seed gives the same mask (and the same stochastic rounding).

    ``seed``: an int or a 1-element int64 tensor on x's device (``_launch`` "seeds"); the mask is its stream
    ``salt + 0``, the rounding noise streams ``salt + 1`` / ``salt + 2``. With ``with_t`` (1xK out_block) y is the
    pair (y_q, y_t_q)."""
    _check_p(p)
    x_op = operand(x, "x")
    check_seed(seed, x_op.data.device)
    check_salt(salt)
    mask = DropoutMask(seed, float(p), x_op.shape, salt)
    y = _run(x_op, x_op.shape, None, p, out_dtype, out_block, rounding, seed, salt, with_t, "dropout_forward",
             seed, salt)
    return y, mask


def dropout_backward(dy, mask: Union[DropoutMask, torch.Tensor], p: float, out_dtype: torch.dtype = torch.float32,
                     out_block=None, rounding: str = "nearest", seed=0, *, with_t: bool = False, salt: int = 0):
    """dx = dy * keep / (1 - p); ``mask`` is the forward's DropoutMask (regenerated) or a bool keep mask."""
    _check_p(p)
    dy_op = operand(dy, "dy")
    if isinstance(mask, DropoutMask):
        if tuple(mask.shape) != dy_op.shape or mask.p != float(p):
            raise ValueError(f"mask is for shape {tuple(mask.shape)} and p={mask.p}, but dy has shape {dy_op.shape} "
                             f"and p={p}; pass the DropoutMask of the matching forward call")
        return _run(dy_op, dy_op.shape, None, p, out_dtype, out_block, rounding, seed, salt, with_t,
                    "dropout_backward", mask.seed, mask.salt)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a DropoutMask or a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != dy_op.shape or mask.device != dy_op.data.device or not mask.is_contiguous():
        raise ValueError(f"mask must be a contiguous bool tensor of dy's shape {dy_op.shape} on {dy_op.data.device}, "
                         f"got shape {tuple(mask.shape)} on {mask.device}")
    return _run(dy_op, dy_op.shape, mask, p, out_dtype, out_block, rounding, seed, salt, with_t, "dropout_backward")


__all__ = ["DropoutMask", "dropout_backward", "dropout_forward"]
