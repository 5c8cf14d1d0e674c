"""Autograd ops of INT8 training: custom ops dispatching to Triton kernels on CUDA, the reference elsewhere."""
from .flow import NormSpec, linear_residual, mlp_residual, norm_linear
from .linear import Int8LinearFunction, int8_linear

__all__ = ["Int8LinearFunction", "NormSpec", "int8_linear", "linear_residual", "mlp_residual", "norm_linear"]
