"""Building blocks shared by the fused ops: quantize / GEMM / transpose on the dispatched backend.

Custom ops take and return plain tensors, so QTensors cross op boundaries as (int8 data, float32
scale) pairs; `pack`/`unpack` convert. A config crosses as its JSON key (`Int8TrainingConfig.key`),
decoded once and cached, because custom-op schemas only carry primitive types.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, Optional, Sequence

import torch

from ..config import Int8TrainingConfig
from ..format import NonFiniteError, QTensor
from ..format.blocks import BlockShape
from . import backend
from .fallback import compact_term, expand_term, fallback_mask, residual_term

EMPTY_SHAPE = (0,)


def decode_config(key: str) -> Int8TrainingConfig:
    return Int8TrainingConfig.from_key(key)


def empty(device, dtype=torch.int8) -> torch.Tensor:
    """Placeholder output for a tensor a mode does not produce (custom ops need a fixed output list)."""
    return torch.empty(EMPTY_SHAPE, dtype=dtype, device=device)


def unpack(data: torch.Tensor, scale: torch.Tensor, block: BlockShape) -> Optional[QTensor]:
    return None if data.numel() == 0 and data.dim() == 1 else QTensor(data, scale, block)


def _quantize_op(op: str, x: torch.Tensor, block: BlockShape, rounding: str, seed: int, cfg: Int8TrainingConfig,
                 what: str):
    """Quantizer ``op`` on the dispatched backend. On the CUDA kernel path no eager check (it would cost an isfinite
    pass and a host sync per call): the kernel records a NaN/Inf block in the device flag, checked once at the
    step boundary (`int8flow.guards.check_device_nonfinite`), where 'raise' raises naming ``what``. Elsewhere,
    under ``nonfinite='raise'``, a ``NonFiniteError`` naming x as ``what``."""
    if backend.uses_kernel(op, x.device):
        return backend.call(op, x, block, rounding=rounding, device=x.device, seed=seed, check_finite=False,
                            flag_op=what)
    try:
        return backend.call(op, x, block, rounding=rounding, device=x.device, seed=seed,
                            check_finite=cfg.nonfinite == "raise")
    except NonFiniteError as err:
        raise NonFiniteError(_renamed(str(err), what)) from err


def quantize(x: torch.Tensor, block: BlockShape, rounding: str, seed: int, cfg: Int8TrainingConfig,
             what: str) -> QTensor:
    """Quantize on the dispatched backend; a NaN/Inf is refused (``nonfinite='raise'``) with a ``NonFiniteError``
    naming x as ``what`` ("fc1 weight", "output gradient"), the op added by `running`; on the CUDA kernel path
    the refusal moves to the step boundary (device flag, no sync here)."""
    return _quantize_op("quantize", x, block, rounding, seed, cfg, what)


def quantize_dual(x: torch.Tensor, block: BlockShape, rounding: str, seed: int, cfg: Int8TrainingConfig,
                  what: str) -> tuple[QTensor, QTensor]:
    """``(quantize(x), quantize_transposed(x))`` in a 1xK ``block``: the next GEMM's operand and the K-major
    copy the weight-gradient GEMM reads (two kernel launches on the kernel path). NaN/Inf as in `quantize`."""
    return _quantize_op("quantize_dual", x, block, rounding, seed, cfg, what)


def _renamed(message: str, what: str) -> str:
    """The format's message about its argument ``x``, about ``what`` instead, with the op-level fix."""
    message = re.sub(r"\bx\b", what, message)
    return message.replace("pass check_finite=False to quantize anyway",
                           "set Int8TrainingConfig(nonfinite='propagate') to let it reach the loss check")


@contextlib.contextmanager
def running(op: str, device: torch.device) -> Iterator[None]:
    """The body of custom op ``op``: autocast off (the ops control precision themselves and the reference's
    float32 math must not be recast), and a ``NonFiniteError`` prefixed with ``op``."""
    with torch.autocast(device_type=device.type, enabled=False):
        try:
            yield
        except NonFiniteError as err:
            raise NonFiniteError(f"{op}: {err}") from err


def quantize_activation(x: torch.Tensor, cfg: Int8TrainingConfig,
                        what: str) -> tuple[QTensor, Optional[QTensor], torch.Tensor]:
    """Forward-pass activation: nearest rounding; with fallback also the second INT8 term of flagged blocks.

    Returns (x_q, x2_q or None, fraction of blocks that fell back as a float32 scalar tensor).
    """
    block = cfg.activation_block
    x_q = quantize(x, block, "nearest", 0, cfg, what)
    if not cfg.uses_fallback:
        return x_q, None, torch.zeros((), dtype=torch.float32, device=x.device)
    mask = fallback_mask(x, block, cfg.fallback_threshold, cfg.fallback_budget)
    x2_q = quantize(residual_term(x, x_q, mask), block, "nearest", 0, cfg, f"{what} (fallback term)")
    return x_q, x2_q, mask.float().mean()


def stackable(ws: Sequence[torch.Tensor], cfg: Int8TrainingConfig) -> bool:
    """Whether GEMMs over weights stacked by rows (q|k|v) can run as one: every boundary between them falls
    on a weight-block row and on a gradient-block column of the output, so no block mixes two weights."""
    step = math.lcm(cfg.weight_block.rows, cfg.grad_block.cols)
    return all(w.shape[0] % step == 0 for w in ws[:-1])


def stack_rows(qs: Sequence[QTensor]) -> QTensor:
    """Separately quantized weights as one operand (INT8 data and scales concatenated; 1 byte per element
    transiently): the same numbers as quantizing the stacked weight when `stackable`."""
    if len(qs) == 1:
        return qs[0]
    return QTensor(torch.cat([q.data for q in qs]), torch.cat([q.scale for q in qs]), qs[0].block)


def concat_k(qs: Sequence[QTensor]) -> Optional[QTensor]:
    """GEMM operands side by side along K (``[a1 | a2]``, so ``[a1 | a2] @ [b1 | b2].T = a1 @ b1.T + a2 @ b2.T``):
    K-major copies concatenated (INT8 data and scales; 1 byte per element). None when a block would straddle two
    operands (every operand but the last must end on a block boundary along K) or the blocks differ."""
    block = qs[0].block
    if any(q.block != block for q in qs) or any(q.shape[1] % block.cols for q in qs[:-1]):
        return None
    qs = [k_major(q) for q in qs]
    return QTensor(torch.cat([q.data for q in qs], dim=1), torch.cat([q.scale for q in qs], dim=1), block)


def emit(y: torch.Tensor, out_dtype: torch.dtype, out_block: Optional[BlockShape], rounding: str, seed: int,
         cfg: Int8TrainingConfig, what: str):
    if out_block is None:
        return y.to(out_dtype)
    return quantize(y, out_block, rounding, seed, cfg, what)


def gemm(terms: Sequence[Optional[QTensor]], b_q: QTensor, bias=None, out_dtype=torch.float32, out_block=None,
         rounding="nearest", seed: int = 0, cfg: Int8TrainingConfig = None, what: str = "GEMM output"):
    """``sum(a @ b.T for a in terms) + bias``; ``None`` terms are skipped (absent fallback terms).
    what: names the output where it is re-quantized here (several terms with ``out_block``)."""
    terms = [t for t in terms if t is not None]
    device = b_q.device
    if backend.uses_kernel("block_gemm", device):
        # Hopper's 8-bit wgmma reads both operands K-major only: a transposed view (w_q.t() in dgrad, dy_q.t()
        # and x_q.t() in wgrad) becomes one visible INT8 copy here, never a strided read inside the GEMM.
        terms, b_q = [k_major(t) for t in terms], k_major(b_q)
    if len(terms) == 1:
        return backend.call("block_gemm", terms[0], b_q, bias, out_dtype=out_dtype, out_block=out_block,
                            rounding=rounding, device=device, seed=seed)
    if len(terms) == 2 and backend.uses_kernel("block_gemm", device):
        # the kernel adds the fallback term inside its K loop, only for flagged blocks: one pass, not two GEMMs
        return backend.call("block_gemm", terms[0], b_q, bias, out_dtype=out_dtype, out_block=out_block,
                            rounding=rounding, device=device, seed=seed, a_fallback=terms[1])
    y = sum(backend.call("block_gemm", a, b_q, None, out_dtype=torch.float32, device=device) for a in terms)
    if bias is not None:
        y = y + bias.float()
    return emit(y, out_dtype, out_block, rounding, seed, cfg, what)


def k_major(q: QTensor) -> QTensor:
    """``q`` in K-major (row-major) storage: itself when it is, a transposed view through the INT8 transpose
    kernel on the kernel path (a strided ``contiguous()`` of INT8 data ran at ~0.35 TB/s on the H200: 270 us for
    one 4096 x 11008 weight), else ``QTensor.k_major`` (one copy)."""
    if q.data.is_contiguous() and q.scale.is_contiguous():
        return q
    if q.data.dim() == 2 and q.data.t().is_contiguous() and backend.uses_kernel("transpose_qtensor", q.device):
        return backend.call("transpose_qtensor", q.t(), device=q.device)
    return q.k_major()


def transposed(q: QTensor, hp: Optional[torch.Tensor], rounding: str, seed: int, cfg: Int8TrainingConfig,
               what: str) -> QTensor:
    """``q`` transposed: a free view for square blocks, else re-quantized with the transposed block grid
    from ``hp`` (or from ``q`` dequantized when the high-precision tensor was not kept)."""
    if q.block.is_square:
        return q.t()
    src = hp if hp is not None else backend.call("dequantize", q, device=q.device)
    return quantize_transposed(src, q.block, rounding, seed, cfg, f"{what} (transposed)")


def quantize_transposed(x: torch.Tensor, block: BlockShape, rounding: str, seed: int, cfg: Int8TrainingConfig,
                        what: str) -> QTensor:
    """``x.T`` quantized with ``block`` into contiguous storage: the K-major operand of a dgrad / wgrad GEMM.

    On the kernel path one pass reads x in its own layout and writes the transpose (a strided read of ``x.t()``
    would not coalesce); NaN/Inf as in `quantize`. Elsewhere the reference quantizes ``x.t()`` (the same numbers
    under nearest rounding; stochastic rounding draws other, equally distributed noise)."""
    return _quantize_op("quantize_transposed", x, block, rounding, seed, cfg, what)


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the surrounding code computes in: autocast's when enabled on x's device, else x's own
    (also on devices without autocast, such as ``meta``)."""
    device = x.device.type
    # A fixed set, not torch.amp.is_autocast_available: dynamo (torch 2.11) refuses to trace that call and breaks
    # the graph at every op on CUDA.
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def pack(q: Optional[QTensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of a QTensor, or empty placeholders for an absent one."""
    if q is None:
        return empty(device), empty(device, torch.float32)
    return q.data, q.scale


def fake_q(like: torch.Tensor, shape, block: BlockShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-mode (data, scale) of a QTensor of ``shape``."""
    return like.new_empty(tuple(shape), dtype=torch.int8), like.new_empty(block.grid(tuple(shape)), dtype=torch.float32)


def fake_absent(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return like.new_empty(EMPTY_SHAPE, dtype=torch.int8), like.new_empty(EMPTY_SHAPE, dtype=torch.float32)


def pack_compact(q: Optional[QTensor], device, capacity: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """(block indices, INT8 blocks, scales) of a fallback term's non-zero blocks (`compact_term`), or empty
    placeholders for an absent term."""
    if q is None:
        return torch.empty(EMPTY_SHAPE, dtype=torch.int32, device=device), empty(device), empty(device, torch.float32)
    return compact_term(q, capacity)


def fallback_capacity(shape, cfg: Int8TrainingConfig) -> int:
    """Most blocks of an activation of ``shape`` that can fall back (the budget): a static storage size."""
    rows, cols = cfg.activation_block.grid(tuple(shape))
    return math.floor(cfg.fallback_budget * rows * cols)


def unpack_compact(index, blocks, scale, shape, block: BlockShape) -> Optional[QTensor]:
    if blocks.dim() == 1:
        return None
    return expand_term(index, blocks, scale, shape, block)


def fake_compact(like: torch.Tensor, block: BlockShape, capacity: Optional[int]) -> tuple[torch.Tensor, ...]:
    """Fake-mode `pack_compact` output: ``capacity`` blocks (None: absent term)."""
    if capacity is None:
        return like.new_empty(EMPTY_SHAPE, dtype=torch.int32), *fake_absent(like)
    return (like.new_empty((capacity,), dtype=torch.int32),
            like.new_empty((capacity, block.rows, block.cols), dtype=torch.int8),
            like.new_empty((capacity,), dtype=torch.float32))


def weight_t(w_q: QTensor, w_hp: Sequence[torch.Tensor], cfg: Int8TrainingConfig, what: str) -> QTensor:
    """The weight operand of dgrad (``dx = dy @ w``): ``w_q.t()``, or ``w.T`` re-quantized for non-square blocks
    (``w_hp``: the weights stacked by rows in ``w_q``)."""
    if w_q.block.is_square:
        return w_q.t()
    w = w_hp[0] if len(w_hp) == 1 else torch.cat(list(w_hp))
    return quantize(w.t(), cfg.weight_block, "nearest", 0, cfg, f"{what} (transposed)")


def wgrad(dy_t: QTensor, x_ts: Sequence[QTensor], cfg: Int8TrainingConfig, out_dtype: torch.dtype) -> torch.Tensor:
    """``dw = sum(dy_t @ x_t.T for x_t in x_ts)`` from the transposed operands: dy_t (N, M) and each x_t (K, M),
    INT8 with blocks along M (the token dimension, the reduction of the weight gradient); returns (N, K) in
    ``out_dtype``: one term is written in it by the GEMM's epilogue (the same rounding as a float32 result cast
    afterwards, without the (N, K) float32 round trip); several are summed in float32 first."""
    if len(x_ts) == 1:
        return gemm([dy_t], x_ts[0], out_dtype=out_dtype, cfg=cfg)
    return sum(gemm([dy_t], x_t, cfg=cfg) for x_t in x_ts).to(out_dtype)
