"""Autograd ops of INT8 training: custom ops dispatching to Triton kernels on CUDA, the reference elsewhere."""
from ._cache_tag import tag_compile_caches
from .flow import NormSpec, linear_residual, mlp_residual, norm_linear
from .linear import Int8LinearFunction, int8_linear

tag_compile_caches()  # compile caches keyed by our ops' source too (see _cache_tag)

__all__ = ["Int8LinearFunction", "NormSpec", "int8_linear", "linear_residual", "mlp_residual", "norm_linear"]
