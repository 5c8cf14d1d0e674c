"""Autograd ops of INT8 training: custom ops dispatching to Triton kernels on CUDA, the reference elsewhere."""
from .linear import Int8LinearFunction, int8_linear

__all__ = ["Int8LinearFunction", "int8_linear"]
