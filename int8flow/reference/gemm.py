"""Reference for the three GEMMs of a linear layer on per-block-quantized operands.

Every GEMM is ``C = A @ B.T`` with ``A`` (M, K) and ``B`` (N, K) as QTensors. The exact value of the
per-block scheme (int32 products of int8 blocks, promoted with ``scale_a * scale_b``) equals the
product of the dequantized operands, so the reference dequantizes to float32 and multiplies; the
kernels must match it up to float32 summation order.

The three GEMMs of ``y = x @ w.T`` (x: (M, K), w: (N, K), dy: (M, N)):

* output          ``y  = x  @ w.T``   -> ``block_gemm(x_q, w_q)``
* input gradient  ``dx = dy @ w``     -> ``block_gemm(dy_q, w_q.t())``
* weight gradient ``dw = dy.T @ x``   -> ``block_gemm(dy_q.t(), x_q.t())``

With square blocks the ``.t()`` operands are views of the forward pass's quantized tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..format import BlockLike, QTensor, quantize
from ..format.blocks import BlockShape


def emit(
    y: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    out_block: Optional[BlockLike] = None,
    rounding: str = "nearest",
    generator: Optional[torch.Generator] = None,
):
    """Return a float32 result either cast to ``out_dtype`` or re-quantized to a QTensor.

    This is the epilogue shared by every reference operator: the INT8 data flow asks for
    ``out_block`` (the next operator reads INT8), the edges of the flow ask for a float dtype.
    """
    if out_block is not None:
        return quantize(y, BlockShape.parse(out_block), rounding, generator, check_finite=False)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a float dtype (e.g. torch.float32 or torch.bfloat16), got {out_dtype}; "
                        "pass out_block to get INT8 output")
    return y.to(out_dtype)


def _check_operands(a: QTensor, b: QTensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, QTensor):
            raise TypeError(f"block_gemm: {name} must be a QTensor (use int8flow.format.quantize), got {type(t).__name__}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"block_gemm computes a @ b.T and needs a (M, K), b (N, K) with the same K; "
            f"got a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"block_gemm: a is on {a.device}, b on {b.device}; move both to one device")


def block_gemm(
    a: QTensor,
    b: QTensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    out_block: Optional[BlockLike] = None,
    rounding: str = "nearest",
    generator: Optional[torch.Generator] = None,
):
    """``a @ b.T (+ bias)`` for per-block INT8 operands, output float or re-quantized INT8."""
    _check_operands(a, b)
    y = a.dequantize(torch.float32) @ b.dequantize(torch.float32).t()
    if bias is not None:
        if bias.shape != (b.shape[0],):
            raise ValueError(f"bias must have shape ({b.shape[0]},), got {tuple(bias.shape)}")
        y = y + bias.float()
    return emit(y, out_dtype, out_block, rounding, generator)


def linear_forward(x_q: QTensor, w_q: QTensor, bias=None, **out) -> torch.Tensor | QTensor:
    """y = x @ w.T + bias."""
    return block_gemm(x_q, w_q, bias, **out)


def linear_input_grad(dy_q: QTensor, w_q: QTensor, **out) -> torch.Tensor | QTensor:
    """dx = dy @ w, using the forward pass's quantized weight transposed."""
    return block_gemm(dy_q, w_q.t(), **out)


def linear_weight_grad(dy_q: QTensor, x_q: QTensor, **out) -> torch.Tensor | QTensor:
    """dw = dy.T @ x, using the forward pass's quantized input transposed."""
    return block_gemm(dy_q.t(), x_q.t(), **out)
