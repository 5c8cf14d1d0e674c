"""Pure-PyTorch references of every operator of the INT8 data flow (CPU and GPU).

They are the oracle for the Triton kernels and the library's fallback where no GPU is present.
"""
from .gemm import block_gemm, emit, linear_forward, linear_input_grad, linear_weight_grad
from .nonlinear import (
    ResidualAdd,
    as_float,
    dropout_backward,
    dropout_forward,
    gelu_backward,
    gelu_forward,
    layer_norm_backward,
    layer_norm_forward,
    residual_add_backward,
    residual_add_forward,
    rms_norm_backward,
    rms_norm_forward,
    swiglu_backward,
    swiglu_forward,
)

__all__ = [
    "ResidualAdd", "as_float", "block_gemm", "emit", "linear_forward", "linear_input_grad", "linear_weight_grad",
    "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward", "gelu_forward",
    "gelu_backward", "swiglu_forward", "swiglu_backward", "dropout_forward", "dropout_backward",
    "residual_add_forward", "residual_add_backward",
]
