"""Per-block INT8 format: int8 values plus one float32 scale per block.

A 2-D tensor of shape (R, C) is cut into blocks of ``BlockShape(rows, cols)``; the
last block row/column may be partial (tail blocks). Each block stores
``scale = absmax / 127`` and ``q = round(x / scale)`` in [-127, 127] (symmetric, no -128).
An all-zero block gets ``scale = 0`` and ``q = 0`` (no 0/0).

Why blocks and not rows: a square block (32x32, the Jetfire paper's choice) is the same block
whether the tensor is read as ``X`` or ``X.T``, so the backward pass can use the forward pass's
quantized tensor transposed (`QTensor.t`) instead of quantizing again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

QMAX = 127
_FLOAT32_MAX = torch.finfo(torch.float32).max
ROUNDING_MODES = ("nearest", "stochastic")


class NonFiniteError(ValueError):
    """Raised when a tensor to be quantized holds NaN or Inf."""


@dataclass(frozen=True)
class BlockShape:
    """Rows x columns of one quantization block, e.g. ``BlockShape(32, 32)`` or ``"1x128"``."""

    rows: int
    cols: int

    def __post_init__(self):
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"BlockShape.{name} must be a positive int, got {v!r}; "
                    "use e.g. BlockShape(32, 32) or BlockShape.parse('1x128')"
                )

    @classmethod
    def parse(cls, spec: "BlockLike") -> "BlockShape":
        """Accept a BlockShape, a (rows, cols) pair, or a string like ``'32x32'``."""
        if isinstance(spec, BlockShape):
            return spec
        if isinstance(spec, str):
            parts = spec.lower().replace(" ", "").split("x")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(f"block shape {spec!r} is not of the form 'ROWSxCOLS', e.g. '32x32'")
            return cls(int(parts[0]), int(parts[1]))
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            return cls(*spec)
        raise TypeError(f"block shape must be a BlockShape, a (rows, cols) pair or 'RxC' string, got {spec!r}")

    @property
    def is_square(self) -> bool:
        return self.rows == self.cols

    def t(self) -> "BlockShape":
        return BlockShape(self.cols, self.rows)

    def grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Number of blocks along each dimension of a (R, C) tensor, tails included."""
        return math.ceil(shape[0] / self.rows), math.ceil(shape[1] / self.cols)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


BlockLike = Union[BlockShape, str, tuple, list]
PAPER_BLOCK = BlockShape(32, 32)


@dataclass
class QTensor:
    """A per-block quantized 2-D tensor: ``data`` int8 (R, C), ``scale`` float32 (grid of blocks)."""

    data: torch.Tensor
    scale: torch.Tensor
    block: BlockShape

    def __post_init__(self):
        if self.data.dtype != torch.int8:
            raise TypeError(f"QTensor.data must be int8, got {self.data.dtype}")
        if self.scale.dtype != torch.float32:
            raise TypeError(f"QTensor.scale must be float32, got {self.scale.dtype}")
        if self.data.dim() != 2:
            raise ValueError(f"QTensor.data must be 2-D, got shape {tuple(self.data.shape)}")
        expected = self.block.grid(tuple(self.data.shape))
        if tuple(self.scale.shape) != expected:
            raise ValueError(
                f"QTensor.scale has shape {tuple(self.scale.shape)} but data {tuple(self.data.shape)} "
                f"with {self.block} blocks needs {expected}"
            )
        if self.scale.device != self.data.device:
            raise ValueError(f"QTensor.data is on {self.data.device} but scale on {self.scale.device}")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def t(self) -> "QTensor":
        """The transpose as a view: same int8 values and scales, blocks transposed. No re-quantization."""
        return QTensor(self.data.t(), self.scale.t(), self.block.t())

    @property
    def is_k_major(self) -> bool:
        """Whether ``data`` is row-major with unit stride along the columns (K, the reduction dimension of
        ``a @ b.T``): the only layout Hopper's 8-bit wgmma reads, so the only one the fast GEMM takes."""
        return self.data.dim() == 2 and (self.data.stride(1) == 1 or self.data.shape[1] <= 1)

    def k_major(self) -> "QTensor":
        """This tensor with ``data`` and ``scale`` made contiguous (row-major): ``self`` when it already is,
        else one INT8 copy (1 byte per element read and written; no re-quantization, the numbers are equal).
        ``q.t().k_major()`` is the K-major transposed operand of a dgrad / wgrad GEMM for square blocks."""
        if self.data.is_contiguous() and self.scale.is_contiguous():
            return self
        return QTensor(self.data.contiguous(), self.scale.contiguous(), self.block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def _check_input(x: torch.Tensor, name: str, check_finite: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/bfloat16/float16/float64), got {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (shape only, no values); create or move it on cpu or cuda")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (rows, cols), got shape {tuple(x.shape)}; flatten leading dims first, "
            f"e.g. x.reshape(-1, x.shape[-1])"
        )
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteError(
            f"{name} holds {n_nan} NaN and {n_inf} Inf values of {x.numel()}; INT8 cannot represent them. "
            "Fix the source (learning rate, loss scale, data) or pass check_finite=False to quantize anyway."
        )
    if check_finite and x.dtype == torch.float64 and x.numel() and float(x.abs().max()) > _FLOAT32_MAX:
        raise NonFiniteError(
            f"{name} (float64) holds values up to {float(x.abs().max()):.3g}, beyond the float32 range "
            f"({_FLOAT32_MAX:.3g}) of the per-block scales; they would become Inf. Rescale {name} first."
        )


def _blocked(x: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """View x (R, C), zero-padded to whole blocks, as (Rb, br, Cb, bc)."""
    R, C = x.shape
    Rb, Cb = block.grid((R, C))
    pad_r, pad_c = Rb * block.rows - R, Cb * block.cols - C
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(Rb, block.rows, Cb, block.cols)


def block_absmax(x: torch.Tensor, block: BlockLike) -> torch.Tensor:
    """Max |x| of each block, float32, shape = number of blocks along (rows, cols)."""
    block = BlockShape.parse(block)
    return _blocked(x.float().abs(), block).amax(dim=(1, 3))


def expand_scale(scale: torch.Tensor, block: BlockLike, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a per-block tensor back to element shape (R, C), cutting the tail blocks."""
    block = BlockShape.parse(block)
    full = scale.repeat_interleave(block.rows, dim=0).repeat_interleave(block.cols, dim=1)
    return full[: shape[0], : shape[1]]


# Largest float32 scale whose 127 multiple is finite: absmax = FLT_MAX rounds absmax / 127 up, and
# dequantizing 127 * scale would give Inf from finite input.
_SCALE_MAX = float(torch.nextafter(torch.tensor(_FLOAT32_MAX / QMAX), torch.tensor(0.0)))


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """absmax / 127, correctly rounded on every device.

    The divisor is a tensor on ``absmax``'s device on purpose: with a Python-scalar divisor, PyTorch's CUDA
    division computes ``absmax * (1 / 127)``, which is off by one float32 ulp for some inputs (the CPU and the
    kernels divide exactly); that was the GPU-only mismatch between this function and the quantize kernel.
    """
    qmax = torch.full((), QMAX, dtype=torch.float32, device=absmax.device)
    scale = torch.div(absmax.to(torch.float32), qmax)
    # Clamp only finite scales: a NaN/Inf absmax (check_finite=False) must stay visible downstream.
    return torch.where(torch.isfinite(scale), scale.clamp(max=_SCALE_MAX), scale)


def quantize(
    x: torch.Tensor,
    block: BlockLike = PAPER_BLOCK,
    rounding: str = "nearest",
    generator: Optional[torch.Generator] = None,
    check_finite: bool = True,
) -> QTensor:
    """Quantize a 2-D float tensor per block (symmetric absmax to 127).

    rounding: ``"nearest"`` (round half to even, error <= scale/2 per element) or ``"stochastic"``
    (floor(v + u), u ~ U[0, 1) from ``generator``: unbiased, error < scale; seed the generator for
    reproducible runs).
    """
    block = BlockShape.parse(block)
    _check_input(x, "x", check_finite)
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    xf = x.float()
    scale = scale_from_absmax(block_absmax(xf, block))
    s = expand_scale(scale, block, tuple(x.shape))
    # Zero-scale blocks (all zeros, or absmax so small that absmax/127 underflows) quantize to 0.
    v = torch.where(s > 0, xf / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xf))
    if rounding == "nearest":
        q = torch.round(v)
    else:
        u = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
        q = torch.floor(v + u)
    q = q.clamp_(-QMAX, QMAX).to(torch.int8)
    return QTensor(q, scale, block)


def quantize_transposed(
    x: torch.Tensor,
    block: BlockLike = PAPER_BLOCK,
    rounding: str = "nearest",
    generator: Optional[torch.Generator] = None,
    check_finite: bool = True,
) -> QTensor:
    """Quantize ``x.T`` with blocks of ``block`` (in the transposed layout), data contiguous.

    For square blocks and nearest rounding this equals ``quantize(x, block).t()`` exactly; for other
    block shapes it is the re-quantization the backward pass needs.
    """
    _check_input(x, "x", check_finite)
    return quantize(x.t().contiguous(), block, rounding, generator, check_finite=False)


def quantize_dual(
    x: torch.Tensor,
    block: BlockLike = "1x128",
    rounding: str = "nearest",
    generator: Optional[torch.Generator] = None,
    check_finite: bool = True,
) -> tuple[QTensor, QTensor]:
    """``(quantize(x, block), quantize_transposed(x, block))``: the operand of the next GEMM and the K-major
    transposed copy the weight-gradient GEMM reads (the kernel writes both from one read of x)."""
    return (quantize(x, block, rounding, generator, check_finite),
            quantize_transposed(x, block, rounding, generator, check_finite=False))


def transpose_qtensor(q: QTensor) -> QTensor:
    """``q.t()`` in contiguous (K-major) storage; the numbers are unchanged."""
    return q.t().k_major()


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 * scale, computed in float32, returned in ``dtype``."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(q).__name__}")
    s = expand_scale(q.scale, q.block, tuple(q.shape))
    return (q.data.float() * s).to(dtype)
