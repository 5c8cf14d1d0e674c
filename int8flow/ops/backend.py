"""Backend dispatch: Triton kernels for CUDA tensors, the pure-PyTorch reference everywhere else.

Kernel modules are imported lazily on first use and only for CUDA tensors; when triton or a kernel
module (or one function in it) is missing, that operator degrades to the reference.

Seeds (graph-safe: CUDA graphs can capture and replay a training step). Each custom op call draws one base
seed on its device (`draw_seed`: a 1-element int64 tensor from the device's default generator) and the ops
layer carries it as a `Seed` (base tensor, salt): the i-th stochastic rounding of the call is
``subseed(seed, i)``, the same base with a new salt computed in pure Python. `call` hands the kernels
``seed=base, salt=salt``; they read the base from device memory and derive the Philox key on the device
(``int8flow.kernels._launch`` "seeds"), so no seed value ever reaches the host on CUDA, and a captured graph
that draws the base inside the capture rounds with fresh noise on every replay. The reference route (CPU, or an
operator without a kernel) takes a ``torch.Generator``: `call` reads the base there (``base.item()``: free on
CPU, a device sync on CUDA) and seeds one from (base, salt). Deterministic calls pass ``seed=0`` (an int).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Callable, Optional, Union

import torch

from ..format.seeds import GAMMA, M64, mix64, mix_seed

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


@dataclasses.dataclass(frozen=True, eq=False)
class Seed:
    """One random stream of an op call: ``base``, the call's 1-element int64 tensor on its device (`draw_seed`),
    and ``salt``, an int in [0, 2**62) naming the stream. Streams of one base differ by salt only, so deriving
    them (`subseed`) never touches the tensor; kernels get both (``seed=base, salt=salt``) and combine them on
    the device."""

    base: torch.Tensor
    salt: int = 0


SeedLike = Union[int, Seed]


def subseed(seed: Seed, index: int) -> Seed:
    """The index-th stochastic rounding stream of a call: the same base, salt
    ``mix64(mix64(salt + gamma) ^ (index + 1) * gamma) >> 2`` (62 bits; pure Python, no device work). Nested
    streams (``subseed(subseed(s, 0), 1)``) and siblings (``subseed(s, 1)``) get unrelated salts."""
    if not isinstance(seed, Seed):
        raise TypeError(f"subseed takes a backend.Seed (base tensor, salt), got {type(seed).__name__}; wrap the "
                        "op's seed tensor as backend.Seed(seed)")
    salt = mix64(mix64(seed.salt + GAMMA) ^ (((index + 1) * GAMMA) & M64)) >> 2
    return Seed(seed.base, salt)


def host_seed(seed: SeedLike) -> int:
    """A 63-bit int for ``torch.Generator.manual_seed`` on the reference route: an int seed as is, a `Seed`'s
    base (read with ``.item()``: no sync on CPU) mixed with its salt."""
    if not isinstance(seed, Seed):
        return int(seed)
    base = int(seed.base.reshape(-1)[0].item())
    return mix_seed(base, seed.salt) >> 1


def call(name: str, *args, device: torch.device, seed: SeedLike = 0, **kwargs):
    """Run operator ``name`` on the kernel for ``device`` if there is one, else on the reference.

    ``seed``: a `Seed` (the kernels get ``seed=base, salt=salt``: no host read) or an int (deterministic calls)."""
    if name in _SEEDLESS:
        return (_kernel(name) if uses_kernel(name, device) else _reference(name))(*args, **kwargs)
    if uses_kernel(name, device):
        if isinstance(seed, Seed):
            return _kernel(name)(*args, seed=seed.base, salt=seed.salt, **kwargs)
        return _kernel(name)(*args, seed=seed, **kwargs)
    gen = generator(host_seed(seed), device) if kwargs.get("rounding") == "stochastic" else None
    return _reference(name)(*args, generator=gen, **kwargs)


def draw_seed(device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """One base seed for an op call: a 1-element int64 tensor on ``device`` in [0, 2**31 - 1), drawn from that
    device's default generator.

    A tensor (not a Python int) so torch.compile traces it into the graph without a graph break; on the device
    so that the kernels read it there (no host sync) and a CUDA graph that captures the draw replays it with a
    fresh Philox offset (new noise every replay); from the default generator so ``torch.manual_seed`` makes runs
    reproducible, and activation checkpointing, which stashes and restores the CPU and CUDA RNG states around
    the recompute (``preserve_rng_state``), sees the same seed on recompute.
    """
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
