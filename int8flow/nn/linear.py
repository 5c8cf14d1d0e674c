"""``Int8Linear``: a drop-in ``nn.Linear`` whose three GEMMs run on per-block INT8."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Int8TrainingConfig, as_config
from ..ops import int8_linear


class Int8Linear(nn.Linear):
    """Same parameters (``weight``, ``bias``) and state dict as ``nn.Linear``; only the math changes.

    ``fallback_rate`` (a non-persistent buffer) holds the fraction of input blocks that fell back to
    16-bit in the last forward when the config enables fallback quantization.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config="int8-linear",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(config)

    def _setup(self, config) -> None:
        self.config: Int8TrainingConfig = as_config(config)
        if not self.config.is_quantized:
            raise ValueError("Int8Linear needs a quantized config; precision='bf16' means a plain nn.Linear")
        self.register_buffer("fallback_rate", torch.zeros((), device=self.weight.device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config="int8-linear") -> "Int8Linear":
        """Wrap an existing layer, sharing its parameter tensors (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new._setup(config)
        return new

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.uses_fallback:
            return int8_linear(x, self.weight, self.bias, self.config)
        y, rate = int8_linear(x, self.weight, self.bias, self.config, return_fallback_rate=True)
        self.fallback_rate.copy_(rate)
        return y

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, precision={c.precision}, blocks=act {c.activation_block}/w {c.weight_block}/grad {c.grad_block}"
