"""Hypothesis strategies shared by the property tests: shapes, block shapes, value distributions, dtypes."""
import torch
from hypothesis import strategies as st

from _inputs import sample

BLOCKS = ("1x32", "32x32", "1x128", "32x128", "128x128")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# sample()'s distributions plus the edge cases quantization must survive.
VALUE_KINDS = ("gaussian", "heavy_tailed", "outlier_channels", "constant_blocks", "all_zero", "subnormal", "near_max")
# Largest absolute value any one test input reaches, per dtype: the dtype's own max, capped at float32's
# (the per-block scales are float32; float64 beyond it is refused, see test_reliability_numerics.py).
F32_MAX = torch.finfo(torch.float32).max
F32_TINY = torch.finfo(torch.float32).smallest_normal

dims = st.integers(1, 130)
blocks = st.sampled_from(BLOCKS)
float_dtypes = st.sampled_from(FLOAT_DTYPES)
seeds = st.integers(0, 2**31 - 1)


def dtype_max(dtype: torch.dtype) -> float:
    return min(torch.finfo(dtype).max, F32_MAX)


def make_values(shape, kind: str, seed: int, dtype: torch.dtype = torch.float32, max_abs: float | None = None):
    """A tensor of ``kind`` values in ``dtype``; ``near_max`` reaches ``max_abs`` (default: the dtype's max)."""
    if kind in ("gaussian", "heavy_tailed", "outlier_channels"):
        x = sample(shape, kind, seed, dtype=torch.float64)
    elif kind == "constant_blocks":
        # One value per 8x8 tile: every block of every tested shape is constant or a few constants.
        g = torch.Generator().manual_seed(seed)
        tiles = torch.randn((shape[0] + 7) // 8, (shape[1] + 7) // 8, generator=g, dtype=torch.float64)
        x = tiles.repeat_interleave(8, 0).repeat_interleave(8, 1)[: shape[0], : shape[1]].contiguous()
    elif kind == "all_zero":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "subnormal":
        # Subnormal magnitudes of dtype (float32's for float64): in float32 the scale absmax / 127
        # then underflows or keeps only a few bits.
        tiny = max(torch.finfo(dtype).smallest_normal, F32_TINY) * 1e-2
        x = sample(shape, "gaussian", seed, dtype=torch.float64) * tiny
    elif kind == "near_max":
        x = sample(shape, "heavy_tailed", seed, dtype=torch.float64)
        x = x / x.abs().max() * (max_abs if max_abs is not None else dtype_max(dtype))
    else:
        raise ValueError(kind)
    x = x.to(dtype)
    if kind == "near_max":  # rounding to dtype may overshoot its max: clamp to it
        m = max_abs if max_abs is not None else dtype_max(dtype)
        x = x.clamp(-m, m)
    return x


@st.composite
def tensors(draw, kinds=VALUE_KINDS, dtypes=float_dtypes, rows=dims, cols=dims):
    shape = (draw(rows), draw(cols))
    kind = draw(st.sampled_from(kinds))
    dtype = draw(dtypes)
    return make_values(shape, kind, draw(seeds), dtype), kind
