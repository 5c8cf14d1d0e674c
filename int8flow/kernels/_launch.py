"""Launch-side helpers shared by the Triton wrappers: device checks, interpreter detection, SM count.

Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, used by the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(t: torch.Tensor, name: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; anything else is a caller bug."""
    if interpreting():
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}, but TRITON_INTERPRET=1 runs kernels on CPU tensors")
    elif t.device.type != "cuda":
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need CUDA tensors. "
            "Use int8flow.reference (or int8flow.format) on CPU."
        )


def check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (rows, cols), got shape {tuple(x.shape)}; flatten leading dims first, "
            "e.g. x.reshape(-1, x.shape[-1])"
        )


def check_int32_addressable(t: torch.Tensor, name: str) -> None:
    """Kernels index with int32 offsets (cheaper registers); refuse tensors whose furthest element needs more."""
    if t.numel() == 0:
        return
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    if span >= 2**31:
        raise ValueError(
            f"{name} spans {span} elements in memory; the kernels address with int32 offsets (< 2**31). "
            "Split the tensor along its rows."
        )


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Multiprocessor count of a CUDA device (queried on first launch, never at import)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()
