"""What to quantize and how: one frozen config, named recipes, and the four precision modes.

Precision modes (what a model does with its linear layers and the tensors between them):

* ``bf16``: ordinary PyTorch (bf16 under ``torch.autocast`` on CUDA, float32 math on CPU).
* ``int8-linear``: drop-in ``Int8Linear`` layers; the three GEMMs of each linear layer run on per-block
  INT8, everything between them stays in the model's dtype.
* ``int8``: the Jetfire INT8 data flow; norm -> QKV, attention-out -> proj -> residual and
  norm -> fc1 -> act -> fc2 -> residual move INT8 + per-block scales forward and INT8 gradients backward.
* ``int8+fallback``: ``int8`` plus fallback quantization; activation blocks whose outliers INT8
  cannot hold get a second INT8 term (about 16-bit precision) inside the GEMM.

Blocks: by default the ``1x128`` geometry (1x128 activations and gradients, 128x128 weights), chosen by H200
measurement (docs/design.md, "Block geometry"); the Jetfire paper's 32x32 blocks are the ``jetfire`` recipe.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, replace

from .format.blocks import ROUNDING_MODES, BlockShape

PRECISIONS = ("bf16", "int8-linear", "int8", "int8+fallback")
NONFINITE_POLICIES = ("raise", "propagate")


@dataclass(frozen=True)
class Int8TrainingConfig:
    """Settings of INT8 training; block fields accept ``BlockShape``, ``'32x32'`` or ``(32, 32)``.

    fallback_threshold: an activation block falls back when its absmax exceeds this multiple of the
    median block absmax of the tensor (see docs/models.md for the sweep that chose 8).
    fallback_budget: at most this fraction of a tensor's blocks fall back (the largest ratios win),
    which bounds the extra GEMM work.
    fallback_groups: 1xK activation blocks with weight blocks of the same K width (the default 1x128 /
    128x128): the second term is column-structured. Per tensor, the ``G = ceil(fallback_groups * K / bk)``
    K groups (``bk`` = the block's K width, at least 1, at most all of them) holding the largest block ratios
    may carry it, and the GEMM runs once over ``K + G * bk`` (`ops.fallback`, docs/design.md "Fallback"):
    the extra GEMM work is ``G * bk / K``. Flagged blocks outside those groups get no second term. Other
    geometries (32x32) ignore it.
    nonfinite: what an INT8 operator does with a NaN/Inf input. ``raise``: refuse it with a
    ``NonFiniteError`` naming the operator and tensor (checking costs a device sync per quantization).
    ``propagate``: no check; a block holding NaN/Inf gets a non-finite scale, so the fault flows on as
    NaN/Inf to the loss, where the trainer's (rank-symmetric) check sees it. The trainer uses
    ``propagate`` under ``parallel=ddp|fsdp2``: an exception on one rank would leave the others waiting
    in the gradient collectives.
    min_features: ``convert_to_int8_training`` leaves linear layers with in or out features below this
    in high precision (too small to gain, and their blocks would be mostly tail).
    """

    precision: str = "int8"
    activation_block: BlockShape = BlockShape(1, 128)
    weight_block: BlockShape = BlockShape(128, 128)
    grad_block: BlockShape = BlockShape(1, 128)
    grad_rounding: str = "stochastic"
    quantize_fprop: bool = True
    quantize_dgrad: bool = True
    quantize_wgrad: bool = True
    fallback_threshold: float = 8.0
    fallback_budget: float = 0.25
    fallback_groups: float = 0.0625
    nonfinite: str = "raise"
    min_features: int = 32

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("activation_block", "weight_block", "grad_block"):
            object.__setattr__(self, name, BlockShape.parse(getattr(self, name)))
        if self.grad_rounding not in ROUNDING_MODES:
            raise ValueError(f"grad_rounding must be one of {ROUNDING_MODES}, got {self.grad_rounding!r}")
        for name in ("quantize_fprop", "quantize_dgrad", "quantize_wgrad"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.uses_data_flow and not (self.quantize_fprop and self.quantize_dgrad and self.quantize_wgrad):
            raise ValueError(
                f"precision={self.precision!r} (the INT8 data flow) quantizes every GEMM; per-GEMM toggles "
                "only apply to precision='int8-linear'"
            )
        if not self.fallback_threshold > 1.0:
            raise ValueError(f"fallback_threshold must be > 1 (a ratio to the median block absmax), got {self.fallback_threshold!r}")
        if not 0.0 <= self.fallback_budget <= 1.0:
            raise ValueError(f"fallback_budget must be a fraction in [0, 1], got {self.fallback_budget!r}")
        if isinstance(self.fallback_groups, bool) or not 0.0 < self.fallback_groups <= 1.0:
            raise ValueError(f"fallback_groups must be a fraction in (0, 1] (of the K groups that may carry a "
                             f"fallback term), got {self.fallback_groups!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 1:
            raise ValueError(f"min_features must be a positive int, got {self.min_features!r}")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        object.__setattr__(self, "_key", json.dumps({k: str(v) if isinstance(v, BlockShape) else v
                                                     for k, v in fields.items()}, sort_keys=True))

    @property
    def key(self) -> str:
        """This config as a JSON string: how it crosses custom-op boundaries (`from_key` reverses it)."""
        return self._key

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_key(key: str) -> "Int8TrainingConfig":
        return Int8TrainingConfig(**json.loads(key))

    @property
    def uses_data_flow(self) -> bool:
        """True for the modes where the transformer block runs the fused INT8 data-flow ops."""
        return self.precision in ("int8", "int8+fallback")

    @property
    def uses_fallback(self) -> bool:
        return self.precision == "int8+fallback"

    @property
    def column_fallback(self) -> bool:
        """Fallback by K-concatenation (`ops.fallback`, column-structured): 1xK activation blocks (K >= 8) and
        weight blocks of the same K width, as in the default 1x128 / 128x128 geometry. The second term then
        enters the GEMM as extra K columns (one plain GEMM), and backward needs no fallback term (wgrad reads the
        activation's transposed copy quantized from the float values, as in ``int8``)."""
        a = self.activation_block
        return self.uses_fallback and a.rows == 1 and a.cols >= 8 and self.weight_block.cols == a.cols

    @property
    def is_quantized(self) -> bool:
        return self.precision != "bf16"

    def with_(self, **changes) -> "Int8TrainingConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_recipe_name(cls, name: str) -> "Int8TrainingConfig":
        """Named recipes (``RECIPES``): ``int8``, ``int8+fallback``, ``int8-linear`` (the default 1x128 geometry:
        1x128 activations/gradients, 128x128 weights; ``-1x128`` names the same explicitly), ``jetfire``,
        ``jetfire+fallback``, ``jetfire-linear`` (the paper's 32x32 blocks), ``bf16``."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
        return cls(**RECIPES[name])


# Block geometries. ``jetfire``: the paper's 32x32 blocks everywhere (square, so a transposed operand is the same
# numbers; promotion every 32 of K). ``1x128``: activations and gradients in 1x128 blocks along K, weights in
# 128x128 (DeepSeek-V3's and TransformerEngine's block scaling): every GEMM promotes every 128 of K, which lets
# the promotion hide under Hopper's tensor cores (docs/kernels.md); transposed operands are re-quantized.
GEOMETRIES = {
    "jetfire": dict(activation_block="32x32", weight_block="32x32", grad_block="32x32"),
    "1x128": dict(activation_block="1x128", weight_block="128x128", grad_block="1x128"),
}

RECIPES = {
    "bf16": dict(precision="bf16"),
    "int8-linear": dict(precision="int8-linear"),
    "int8": dict(precision="int8"),
    "int8+fallback": dict(precision="int8+fallback"),
    "jetfire": dict(precision="int8", **GEOMETRIES["jetfire"]),
    "jetfire+fallback": dict(precision="int8+fallback", **GEOMETRIES["jetfire"]),
    "jetfire-linear": dict(precision="int8-linear", **GEOMETRIES["jetfire"]),
    "int8-1x128": dict(precision="int8", **GEOMETRIES["1x128"]),
    "int8+fallback-1x128": dict(precision="int8+fallback", **GEOMETRIES["1x128"]),
    "int8-linear-1x128": dict(precision="int8-linear", **GEOMETRIES["1x128"]),
}


def as_config(spec) -> Int8TrainingConfig:
    """Accept a config or a recipe/precision name."""
    if isinstance(spec, Int8TrainingConfig):
        return spec
    if isinstance(spec, str):
        return Int8TrainingConfig.from_recipe_name(spec)
    raise TypeError(f"expected an Int8TrainingConfig or a recipe name such as 'int8', got {type(spec).__name__}")
