"""The block-quantized INT8 tensor format (values + per-block float32 scales)."""
from .blocks import (
    PAPER_BLOCK,
    QMAX,
    ROUNDING_MODES,
    BlockLike,
    BlockShape,
    NonFiniteError,
    QTensor,
    block_absmax,
    dequantize,
    expand_scale,
    quantize,
    quantize_dual,
    quantize_transposed,
    transpose_qtensor,
)

__all__ = [
    "PAPER_BLOCK", "QMAX", "ROUNDING_MODES", "BlockLike", "BlockShape", "NonFiniteError", "QTensor",
    "block_absmax", "dequantize", "expand_scale", "quantize", "quantize_dual", "quantize_transposed",
    "transpose_qtensor",
]
