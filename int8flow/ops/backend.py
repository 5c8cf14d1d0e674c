"""Backend dispatch: Triton kernels for CUDA tensors, the pure-PyTorch reference everywhere else.

Kernel modules are imported lazily on first use and only for CUDA tensors; when triton or a kernel
module (or one function in it) is missing, that operator degrades to the reference. Kernels take
``seed: int`` for stochastic rounding, the reference a ``torch.Generator``; `call` turns one into the
other so the caller only deals in integer seeds.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch

# operator name -> module of int8flow.kernels that implements it
_KERNEL_MODULE = {
    "quantize": "quantize",
    "quantize_transposed": "quantize",
    "quantize_dual": "quantize",
    "dequantize": "quantize",
    "transpose_qtensor": "quantize",
    "block_gemm": "gemm",
    "layer_norm_forward": "norms",
    "layer_norm_backward": "norms",
    "rms_norm_forward": "norms",
    "rms_norm_backward": "norms",
    "gelu_forward": "activations",
    "gelu_backward": "activations",
    "swiglu_forward": "activations",
    "swiglu_backward": "activations",
    "residual_add_forward": "residual",
    # the column fallback term written into the extended GEMM operand [term | x_q] (CUDA only: the ops layer keeps
    # the torch composition of primitives.fallback_term, the oracle, elsewhere)
    "fallback_column_term": "fallback_term",
}


@functools.lru_cache(maxsize=None)
def _kernel(name: str) -> Optional[Callable]:
    try:
        module = importlib.import_module(f"int8flow.kernels.{_KERNEL_MODULE[name]}")
    except ImportError:
        return None
    return getattr(module, name, None)


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> Callable:
    if name in ("quantize", "quantize_transposed", "quantize_dual", "dequantize", "transpose_qtensor"):
        from .. import format

        return getattr(format, name)
    from ..reference import gemm, nonlinear

    return getattr(gemm, name, None) or getattr(nonlinear, name)


_SEEDLESS = ("dequantize", "transpose_qtensor")  # deterministic operators: no seed / generator argument


def uses_kernel(name: str, device: torch.device) -> bool:
    return device.type == "cuda" and _kernel(name) is not None


def generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def call(name: str, *args, device: torch.device, seed: int = 0, **kwargs):
    """Run operator ``name`` on the kernel for ``device`` if there is one, else on the reference."""
    if name in _SEEDLESS:
        return (_kernel(name) if uses_kernel(name, device) else _reference(name))(*args, **kwargs)
    if uses_kernel(name, device):
        return _kernel(name)(*args, seed=seed, **kwargs)
    gen = generator(seed, device) if kwargs.get("rounding") == "stochastic" else None
    return _reference(name)(*args, generator=gen, **kwargs)


def subseed(seed: int, index: int) -> int:
    """Independent-looking seed for the index-th stochastic rounding of one op call."""
    return (seed * 1_000_003 + index * 7_919) % (2**62)


def draw_seed() -> torch.Tensor:
    """One seed from torch's default CPU generator, as a CPU int64 tensor.

    A tensor (not a Python int) so torch.compile traces it without a graph break; drawn from the
    default generator so ``torch.manual_seed`` makes runs reproducible and activation checkpointing
    (which restores that generator's state on recompute) sees the same seed.
    """
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
