"""int8flow: fully quantized INT8 training of transformers.

Entry points: the block-quantized format (`quantize`, `QTensor`, `BlockShape`), the drop-in layer
(`convert_to_int8_training(model, Int8TrainingConfig(...))`), ready models (`build_model('gpt2-124m', 'int8')`)
and the `int8flow train` command (`int8flow.training`).
"""
from .config import Int8TrainingConfig
from .format import BlockShape, NonFiniteError, QTensor, dequantize, quantize, quantize_transposed
from .models import MODEL_PRESETS, build_model
from .nn import Int8Linear, convert_to_int8_training, convert_to_linear

__version__ = "0.1.0"

__all__ = [
    "BlockShape", "Int8Linear", "Int8TrainingConfig", "MODEL_PRESETS", "NonFiniteError", "QTensor", "build_model",
    "convert_to_int8_training", "convert_to_linear", "dequantize", "quantize", "quantize_transposed",
]
