"""int8flow: fully quantized INT8 training of transformers."""
from .format import BlockShape, NonFiniteError, QTensor, dequantize, quantize, quantize_transposed

__version__ = "0.1.0"
