"""Modules of INT8 training: the drop-in linear layer and the model converters."""
from .convert import convert_to_int8_training, convert_to_linear, default_module_filter
from .linear import Int8Linear

__all__ = ["Int8Linear", "convert_to_int8_training", "convert_to_linear", "default_module_filter"]
