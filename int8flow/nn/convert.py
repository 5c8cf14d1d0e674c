"""Swap ``nn.Linear`` layers of any model for ``Int8Linear`` in place, and back."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..config import as_config
from .linear import Int8Linear

ModuleFilter = Callable[[nn.Module, str], bool]


def _tied_to_embedding(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def default_module_filter(model: nn.Module, min_features: int) -> ModuleFilter:
    """Skip the LM head, layers tied to an embedding, and layers with in or out features < min_features."""
    tied = _tied_to_embedding(model)

    def keep(module: nn.Module, fqn: str) -> bool:
        return (
            fqn.split(".")[-1] != "lm_head"
            and id(module.weight) not in tied
            and min(module.in_features, module.out_features) >= min_features
        )

    return keep


def _swap(model: nn.Module, select: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Replace modules everywhere they are registered. ``select(fqn, module)`` is asked once per module (with the
    first name it has); a module registered at several places (``Sequential(shared, ReLU(), shared)``) becomes
    the *same* new module at every place, so the model's sharing is kept."""
    new_of: dict[int, nn.Module] = {}
    for fqn, module in list(model.named_modules()):  # each module once, at its first name
        new = select(fqn, module)
        if new is None:
            continue
        if fqn == "":
            raise TypeError("the model itself is a linear layer; call Int8Linear.from_linear / .to_linear on it")
        new_of[id(module)] = new
    if not new_of:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                setattr(parent, name, new_of[id(child)])
    return model


def convert_to_int8_training(model: nn.Module, config="int8-linear",
                             module_filter_fn: Optional[ModuleFilter] = None) -> nn.Module:
    """Replace each selected ``nn.Linear`` by an ``Int8Linear`` sharing its parameters; returns ``model``.

    ``module_filter_fn(module, fqn) -> bool`` picks the layers (True = convert); the default is
    `default_module_filter`. Parameter names and the state dict are unchanged. A layer registered at several
    places becomes one ``Int8Linear`` registered at all of them (the filter sees its first name). The layer's
    hooks (forward-pre, forward, backward, state-dict) and its train/eval flag carry over (`Int8Linear.from_linear`).
    """
    config = as_config(config)
    keep = module_filter_fn or default_module_filter(model, config.min_features)

    def select(fqn, module):
        if type(module) is nn.Linear and keep(module, fqn):
            return Int8Linear.from_linear(module, config)
        return None

    return _swap(model, select)


def convert_to_linear(model: nn.Module) -> nn.Module:
    """Replace every ``Int8Linear`` by a plain ``nn.Linear`` sharing its parameters (export / inference)."""
    return _swap(model, lambda fqn, m: m.to_linear() if isinstance(m, Int8Linear) else None)
