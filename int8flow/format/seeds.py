"""Host-side arithmetic of stochastic-rounding seeds, shared by the kernels' launch code and the ops layer.

Pure Python (no torch, no triton), so the ops layer uses it without importing the kernels. The device twins of
`mix_seed` are ``int8flow.kernels._blockquant.derive_seed`` (Triton) and ``gluon_gemm._derive_seed`` (Gluon);
``int8flow.kernels._launch`` ("seeds") documents how kernels use it.
"""
from __future__ import annotations

M64 = 2**64 - 1  # 64-bit wrapping arithmetic: results are reduced with & M64
GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2**64 / golden ratio, odd)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def mix64(z: int) -> int:
    """splitmix64's finalizer (Steele et al. 2014), a bijection of 64-bit words, in 64-bit wrapping arithmetic."""
    z &= M64
    z = ((z ^ (z >> 30)) * _MIX1) & M64
    z = ((z ^ (z >> 27)) * _MIX2) & M64
    return z ^ (z >> 31)


def mix_seed(base: int, salt: int) -> int:
    """The 64-bit word of a base seed and a salt: ``mix64(base_u64 ^ mix64((salt + 1) * GAMMA mod 2**64))``.

    ``mix64((salt + 1) * GAMMA)`` is the (salt + 1)-th splitmix64 output, so salts 0, 1, 2, ... give unrelated
    words, and (base, salt) pairs that differ in either give unrelated results. ``base_u64`` is the base's
    two's-complement bits (a negative int64 base is fine). The kernels keep the top 31 bits as their Philox key
    (``_launch.derive_seed``); the reference route keeps 63 (``ops.backend.host_seed``).
    """
    return mix64((base & M64) ^ mix64(((salt + 1) * GAMMA) & M64))
