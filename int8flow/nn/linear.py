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
        """Wrap an existing layer, sharing its parameter tensors (no copy). Its hooks (forward-pre, forward,
        backward, state-dict; handles returned by ``register_*_hook`` keep working), its train/eval flag and any
        other attribute set on it carry over."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new._setup(config)
        _carry_over(linear, new)
        return new

    def to_linear(self) -> nn.Linear:
        """The inverse: a plain ``nn.Linear`` sharing the parameters, hooks and train/eval flag."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        _carry_over(self, linear, skip=("config", "_non_persistent_buffers_set"))
        linear._buffers.pop("fallback_rate", None)
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


# per-module hook registries: shared (not copied) so that hook handles still remove the hooks
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _carry_over(old: nn.Module, new: nn.Module, skip: tuple = ()) -> None:
    """Hooks, the training flag and user attributes of ``old`` onto ``new`` (parameters are set by the caller)."""
    for name in _HOOK_DICTS:
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]
    if "_is_full_backward_hook" in old.__dict__:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    new.training = old.training
    for key, value in old.__dict__.items():  # e.g. flags libraries set on modules (_is_hf_initialized)
        if key not in new.__dict__ and key not in skip:
            new.__dict__[key] = value
