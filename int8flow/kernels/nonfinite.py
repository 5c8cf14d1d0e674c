"""The device non-finite flag: NaN/Inf seen by the INT8 kernels, checked once per step without a sync.

Every kernel that writes per-block INT8 computes each block's absmax anyway (NaN-propagating, see
``_blockquant.absmax_nan``); a block holding a NaN/Inf sets a persistent int32 tensor of its device:
``flag[1]`` += 1 per such block (a masked atomic add, so nothing happens while all is finite) and the block
whose add found 0 (the first, device-wide) writes its op's code to ``flag[0]``. Nothing reads it back inside a step: the caller checks it at the
step boundary, ideally in the same device->host copy as the loss it reads for its log::

    flag = nonfinite.device_flag(device)               # int32 (2,), lives as long as the process
    values = torch.cat([loss.detach().float().reshape(1), flag.float()]).tolist()   # the step's one sync
    loss_val, event = values[0], nonfinite.decode(values[1:])
    if event is not None:
        nonfinite.reset(device)                        # asynchronous
    # or, with the policy applied: int8flow.guards.check_device_nonfinite(device, policy, flag_values=values[1:])

``int8flow.guards.device_nonfinite`` / ``check_device_nonfinite`` wrap this with the ``nonfinite``
policies. On the CPU (interpreter tests) the flag is a CPU tensor and works the same way.
"""
from __future__ import annotations

import threading
from typing import NamedTuple, Optional, Union

import torch

_LOCK = threading.Lock()
_FLAGS: dict = {}
_CODES: dict[str, int] = {}
_NAMES: list[str] = []


class DeviceNonFinite(NamedTuple):
    """What the flag recorded: the first op that wrote a NaN/Inf block, and how many such blocks all ops wrote."""

    op: str
    blocks: int

    def __str__(self) -> str:
        return f"{self.op}: NaN/Inf in its output blocks ({self.blocks} such blocks written since the last check)"


def _key(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_flag(device: Union[str, torch.device]) -> torch.Tensor:
    """The persistent int32 (2,) flag of ``device`` (created zeroed on first use; never reallocated).

    Under CUDA graphs (torch.compile mode="reduce-overhead") call this once before the first compiled run: a
    first use inside cudagraph trees' warmup would allocate the flag in the graphs' private memory pool, whose
    bytes later replays may reuse (the training loop and ``bench blocks`` do)."""
    key = _key(device)
    flag = _FLAGS.get(key)
    if flag is None:
        with _LOCK:
            flag = _FLAGS.get(key)
            if flag is None:
                flag = _FLAGS[key] = torch.zeros(2, dtype=torch.int32, device=key)
    return flag


def op_code(op: str) -> int:
    """Positive int32 code of an op name (registered on first use), the value a kernel writes to flag[0]."""
    code = _CODES.get(op)
    if code is None:
        with _LOCK:
            code = _CODES.get(op)
            if code is None:
                _NAMES.append(op)
                code = _CODES[op] = len(_NAMES)
    return code


def flag_args(device: Union[str, torch.device], op: str) -> tuple[torch.Tensor, int]:
    """(flag tensor, op code): the two kernel arguments of ``_blockquant.flag_nonfinite``."""
    return device_flag(device), op_code(op)


def decode(values) -> Optional[DeviceNonFinite]:
    """Turn the flag's two values (already on the host) into an event, or None when clear."""
    code, blocks = int(values[0]), int(values[1])
    if code == 0 and blocks == 0:
        return None
    name = _NAMES[code - 1] if 0 < code <= len(_NAMES) else f"op #{code}"
    return DeviceNonFinite(name, blocks)


def reset(device: Union[str, torch.device]) -> None:
    """Clear the flag (an asynchronous fill on the device's stream; no sync)."""
    device_flag(device).zero_()


def take(device: Union[str, torch.device]) -> Optional[DeviceNonFinite]:
    """Read the flag (one device->host copy: a sync, meant for the step boundary) and clear it."""
    flag = device_flag(device)
    event = decode(flag.tolist())
    if event is not None:
        flag.zero_()
    return event


__all__ = ["DeviceNonFinite", "decode", "device_flag", "flag_args", "op_code", "reset", "take"]
