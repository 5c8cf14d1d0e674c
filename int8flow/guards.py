"""Non-finite detection: find where a NaN/Inf appeared, and the policy for a step that has one.

The trainer (``int8flow.training.loop``) checks each step's loss and gradient norm once, at no extra cost,
and treats a ``NonFiniteError`` raised by an INT8 operator as a bad step too. For a bad step it uses this
module: ``locate_nonfinite`` and ``nonfinite_params`` say *where* the fault came from, and
``recompute_high_precision`` is the third policy.

* ``check_finite(t, where, what, policy)``: one tensor; ``raise`` throws ``NonFiniteError`` naming the
  layer/operator and tensor ("layer transformer.h.3.mlp.c_fc: input gradient holds 12 NaN ...").
* ``NonFiniteTracker(model)``: a context that hooks every submodule and records, in execution order,
  each module output, output gradient and input gradient holding NaN/Inf. Each check synchronizes with the
  device, so use it to diagnose a step already known to be bad (``locate_nonfinite``), not on every step.
* ``grads_are_finite(model)`` (one device sync) / ``nonfinite_grads(model)`` / ``nonfinite_params(model)``
  (name the parameters whose gradient / value holds NaN/Inf).
* ``high_precision(model)``: a context in which INT8 layers and INT8 data-flow blocks run their ordinary
  high-precision PyTorch math (BF16 under autocast on CUDA), sharing the same parameters. The ``bf16``
  policy recomputes a bad step's forward and backward inside it (``recompute_high_precision``).

Policies (``POLICIES``): ``raise`` stop with the location; ``skip`` drop the optimizer step, optimizer
state untouched; ``bf16`` recompute the step in high precision and step on that if it is finite (else skip).
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .format import NonFiniteError

__all__ = [
    "POLICIES", "NonFiniteError", "NonFiniteEvent", "NonFiniteTracker", "check_finite", "count_nonfinite",
    "grads_are_finite", "nonfinite_grads", "nonfinite_params", "high_precision", "locate_nonfinite", "recompute_high_precision",
    "check_policy", "check_device_nonfinite", "device_nonfinite",
]

POLICIES = ("raise", "skip", "bf16")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(
            f"non-finite policy must be one of {POLICIES}, got {policy!r}: 'raise' stops, 'skip' drops the "
            "step, 'bf16' recomputes it in high precision"
        )
    return policy


@dataclass(frozen=True)
class NonFiniteEvent:
    """One tensor found holding NaN/Inf: ``where`` (layer or operator), ``what`` (which tensor)."""

    where: str
    what: str
    n_nan: int = 0
    n_inf: int = 0
    numel: int = 0
    note: str = ""  # set instead of counts when an operator refused the tensor (its NonFiniteError)

    def __str__(self) -> str:
        if self.note:
            return f"{self.where}: {self.what}: {self.note}"
        counts = " and ".join(f"{n} {k}" for n, k in ((self.n_nan, "NaN"), (self.n_inf, "Inf")) if n)
        return f"{self.where}: {self.what} holds {counts} of {self.numel} values"


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(number of NaN, number of Inf) in ``t``; (0, 0) for integer tensors. Synchronizes with the device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"count_nonfinite expects a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0, 0
    if hasattr(t, "full_tensor"):  # a sharded DTensor (FSDP2): count over all shards (a collective)
        t = t.full_tensor()
    counts = torch.stack([torch.isnan(t).sum(), torch.isinf(t).sum()]).tolist()
    return int(counts[0]), int(counts[1])


def check_finite(t: torch.Tensor, where: str, what: str = "tensor", policy: str = "raise",
                 events: Optional[list] = None) -> bool:
    """True when ``t`` is all finite. Otherwise record the event in ``events`` (if given) and, under the
    ``raise`` policy, raise ``NonFiniteError`` naming ``where`` and ``what``; other policies return False
    and leave the decision to the caller (the trainer skips or recomputes the step)."""
    check_policy(policy)
    n_nan, n_inf = count_nonfinite(t)
    if not (n_nan or n_inf):
        return True
    return _apply_policy(NonFiniteEvent(where, what, n_nan, n_inf, t.numel()), policy, events)


def _apply_policy(event: NonFiniteEvent, policy: str, events: Optional[list]) -> bool:
    """Record ``event``; under ``raise`` raise it as a NonFiniteError; else return False (not clear)."""
    if events is not None:
        events.append(event)
    if policy == "raise":
        raise NonFiniteError(f"{event}; lower the learning rate, check the data, or set the non-finite policy to "
                             "'skip' or 'bf16'")
    return False


def device_nonfinite(device, flag_values=None) -> Optional[NonFiniteEvent]:
    """What the INT8 kernels recorded on ``device`` since the last check (NaN/Inf in a block they wrote), or None.

    The kernels set a persistent int32 flag on the device (`int8flow.kernels.nonfinite`) instead of checking
    eagerly; reading it is one device->host copy, so call this once per step, at the step boundary. To
    share that copy with the loss the loop reads anyway, pass ``flag_values`` (the flag's two values already
    on the host, e.g. ``torch.cat([loss.detach().float().view(1), flag.float()]).tolist()[1:]`` with
    ``flag = int8flow.kernels.nonfinite.device_flag(device)``). The flag is cleared (asynchronously) when set.
    CPU devices without the kernels return None.
    """
    try:
        from .kernels import nonfinite
    except ImportError:  # no triton: no kernels, nothing recorded
        return None
    device = torch.device(device)
    flag = nonfinite.device_flag(device)
    recorded = nonfinite.decode(flag.tolist() if flag_values is None else flag_values)
    if recorded is None:
        return None
    nonfinite.reset(device)
    return NonFiniteEvent(recorded.op, "INT8 output blocks", note=f"NaN/Inf in {recorded.blocks} output blocks "
                          "(recorded on the device)")


def check_device_nonfinite(device, policy: str = "raise", events: Optional[list] = None,
                           flag_values=None) -> bool:
    """The ``nonfinite`` policy at the step boundary for what the kernels flagged on ``device``: True when
    clear; else record the event and, under ``raise``, raise ``NonFiniteError`` naming the op (the first op
    whose output blocks held NaN/Inf). One device->host copy (none with ``flag_values``). ``policy`` is one of
    ``POLICIES`` or the operators' ``propagate`` (both: record and return False)."""
    if policy != "propagate":
        check_policy(policy)
    event = device_nonfinite(device, flag_values)
    return True if event is None else _apply_policy(event, policy, events)


def _tensors(x) -> Iterator[tuple[int, torch.Tensor]]:
    items = x if isinstance(x, (tuple, list)) else (x,)
    for i, t in enumerate(items):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            yield i, t


class NonFiniteTracker:
    """Records, in execution order, every submodule output / output gradient / input gradient holding NaN/Inf.

    Layer names are the model's ``named_modules`` paths (``transformer.h.3.mlp.c_fc``). Gradients are
    caught with tensor hooks on the module's inputs and outputs, so the first backward event names the
    layer where the gradient first went bad (backward runs from the last layer to the first).
    A ``NonFiniteError`` raised inside (INT8 quantization refuses NaN/Inf under the ``raise`` policy, with a
    message naming the op and the tensor, not the layer) is re-raised prefixed with the layer that was running: the innermost
    module in the forward pass, the last module whose output gradient was seen in the backward pass.
    """

    def __init__(self, model: nn.Module, prefix: str = "layer ", max_events: int = 64):
        if not isinstance(model, nn.Module):
            raise TypeError(f"NonFiniteTracker needs an nn.Module, got {type(model).__name__}")
        self.model, self.prefix, self.max_events = model, prefix, max_events
        self.events: list[NonFiniteEvent] = []
        self._handles: list = []
        self._stack: list[str] = []  # modules whose forward is running, innermost last
        self._backward_at: Optional[str] = None

    def _label(self, name: str) -> str:
        return f"{self.prefix}{name or '<model>'}"

    def running(self) -> Optional[tuple[str, str]]:
        """(layer, 'forward' | 'backward') being executed, for naming a fault raised inside it."""
        if self._stack:
            return self._label(self._stack[-1]), "forward"
        return (self._label(self._backward_at), "backward") if self._backward_at is not None else None

    def _record(self, name: str, what: str, t: torch.Tensor) -> None:
        if len(self.events) < self.max_events:
            check_finite(t, self._label(name), what, "skip", self.events)

    def _grad_hook(self, name: str, what: str) -> Callable:
        def hook(grad):
            if what.startswith("output"):
                self._backward_at = name
            self._record(name, what, grad)
        return hook

    def _pre_hook(self, name: str) -> Callable:
        def hook(module, args):
            self._stack.append(name)
            for i, t in _tensors(args):
                if t.requires_grad:
                    t.register_hook(self._grad_hook(name, "input gradient" if i == 0 else f"input {i} gradient"))
        return hook

    def _fwd_hook(self, name: str) -> Callable:
        def hook(module, args, output):
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            for i, t in _tensors(output):
                self._record(name, "output" if i == 0 else f"output {i}", t)
                if t.requires_grad:
                    t.register_hook(self._grad_hook(name, "output gradient" if i == 0 else f"output {i} gradient"))
        return hook

    def __enter__(self) -> "NonFiniteTracker":
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._fwd_hook(name)))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        at = self.running()
        self._stack.clear()
        if isinstance(exc, NonFiniteError) and at is not None and not str(exc).startswith(self.prefix):
            layer, phase = at
            self.events.append(NonFiniteEvent(layer, f"{phase} pass", note=str(exc)))
            raise NonFiniteError(f"{layer} ({phase} pass): {exc}") from exc

    @property
    def first(self) -> Optional[NonFiniteEvent]:
        return self.events[0] if self.events else None

    def first_backward(self) -> Optional[NonFiniteEvent]:
        return next((e for e in self.events if "gradient" in e.what), None)

    def raise_if_any(self) -> None:
        if self.events:
            more = f" (and {len(self.events) - 1} later events)" if len(self.events) > 1 else ""
            raise NonFiniteError(f"{self.events[0]}{more}; lower the learning rate, check the data, or set the "
                                 "non-finite policy to 'skip' or 'bf16'")


def _grads(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]


def grads_are_finite(model: nn.Module) -> bool:
    """True when every parameter gradient is finite; one device sync however many parameters."""
    grads = [g for _, g in _grads(model)]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def nonfinite_grads(model: nn.Module) -> list[NonFiniteEvent]:
    """One event per parameter whose gradient holds NaN/Inf (``parameter NAME: gradient holds ...``)."""
    events: list[NonFiniteEvent] = []
    for name, g in _grads(model):
        check_finite(g, f"parameter {name}", "gradient", "skip", events)
    return events


def nonfinite_params(model: nn.Module) -> list[NonFiniteEvent]:
    """One event per parameter whose value holds NaN/Inf (``parameter NAME: value holds ...``)."""
    events: list[NonFiniteEvent] = []
    for name, p in model.named_parameters():
        check_finite(p.detach(), f"parameter {name}", "value", "skip", events)
    return events


def _int8_modules(model: nn.Module):
    from .nn import Int8Linear  # lazy: keeps `import int8flow.guards` light

    flows = [m for m in model.modules() if getattr(m, "int8_flow", None) is not None]
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    return flows, linears


@contextlib.contextmanager
def high_precision(model: nn.Module):
    """Run the model's INT8 parts in ordinary high-precision math inside the block, then restore them.

    Parameters are shared (no copy), so gradients land on the same tensors the optimizer owns.
    """
    flows, linears = _int8_modules(model)
    saved = [(m, m.int8_flow) for m in flows]
    own_forward = [(m, m.__dict__.get("forward")) for m in linears]  # instance overrides, e.g. test hooks
    try:
        for m in flows:
            m.int8_flow = None
        for m in linears:
            m.forward = types.MethodType(nn.Linear.forward, m)
        yield model
    finally:
        for m, flow in saved:
            m.int8_flow = flow
        for m, fwd in own_forward:
            if fwd is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def locate_nonfinite(model: nn.Module, closure: Callable[[], torch.Tensor]) -> list[NonFiniteEvent]:
    """Re-run ``closure`` (forward + backward of the bad step, same seed) under a tracker; returns the events.

    Gradients are cleared first and left as the re-run produced them. A ``NonFiniteError`` raised inside
    (an operator refusing NaN/Inf) ends the re-run and becomes the last event, naming the layer.
    """
    _zero_grads(model)
    tracker = NonFiniteTracker(model)
    try:
        with tracker:
            closure()
    except NonFiniteError:
        pass
    return tracker.events


def recompute_high_precision(model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The ``bf16`` policy: clear gradients and re-run ``closure`` (forward + backward) in high precision.

    The caller re-seeds the step's RNG before calling, then steps the optimizer only if the returned loss
    and ``grads_are_finite(model)`` are finite.
    """
    _zero_grads(model)
    with high_precision(model):
        return closure()
