"""Pure-PyTorch references of every operator of the INT8 data flow (CPU and GPU).

They are the oracle for the Triton kernels and the library's fallback where no GPU is present.
"""
from .gemm import block_gemm, emit, linear_forward, linear_input_grad, linear_weight_grad
