"""Building blocks shared by the fused ops: quantize / GEMM / transpose on the dispatched backend.

Custom ops take and return plain tensors, so QTensors cross op boundaries as (int8 data, float32
scale) pairs; `pack`/`unpack` convert. A config crosses as its JSON key (`Int8TrainingConfig.key`),
decoded once and cached, because custom-op schemas only carry primitive types.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch

from ..config import Int8TrainingConfig
from ..format import NonFiniteError, QTensor
from ..format.blocks import BlockShape
from . import backend
from .fallback import (
    ColumnTerm, column_residual, compact_term, expand_term, fallback_mask, gather_groups, gather_groups_q,
    group_capacity, residual_term, select_groups,
)

EMPTY_SHAPE = (0,)


def decode_config(key: str) -> Int8TrainingConfig:
    return Int8TrainingConfig.from_key(key)


def empty(device, dtype=torch.int8) -> torch.Tensor:
    """Placeholder output for a tensor a mode does not produce (custom ops need a fixed output list)."""
    return torch.empty(EMPTY_SHAPE, dtype=dtype, device=device)


def unpack(data: torch.Tensor, scale: torch.Tensor, block: BlockShape) -> Optional[QTensor]:
    return None if data.numel() == 0 and data.dim() == 1 else QTensor(data, scale, block)


def _quantize_op(op: str, x: torch.Tensor, block: BlockShape, rounding: str, seed: backend.SeedLike, cfg: Int8TrainingConfig,
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


def quantize(x: torch.Tensor, block: BlockShape, rounding: str, seed: backend.SeedLike, cfg: Int8TrainingConfig,
             what: str) -> QTensor:
    """Quantize on the dispatched backend; a NaN/Inf is refused (``nonfinite='raise'``) with a ``NonFiniteError``
    naming x as ``what`` ("fc1 weight", "output gradient"), the op added by `running`; on the CUDA kernel path
    the refusal moves to the step boundary (device flag, no sync here)."""
    return _quantize_op("quantize", x, block, rounding, seed, cfg, what)


def quantize_dual(x: torch.Tensor, block: BlockShape, rounding: str, seed: backend.SeedLike, cfg: Int8TrainingConfig,
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
                        what: str) -> tuple[QTensor, Union[QTensor, ColumnTerm, None], torch.Tensor]:
    """Forward-pass activation x (M, K) float: nearest rounding; with fallback also the second INT8 term.

    Returns (x_q, second term or None, fraction of x's blocks given a second term as a float32 scalar tensor on
    x's device). The second term is a `ColumnTerm` under ``cfg.column_fallback`` (the default 1x128 geometry:
    `fallback_term`), else a dense QTensor of x's shape, zero outside the flagged blocks (`fallback_mask`).
    `gemm` takes either as its second term.
    """
    x_q = quantize(x, cfg.activation_block, "nearest", 0, cfg, what)
    return (x_q, *second_term(x, x_q, cfg, what))


def second_term(x: torch.Tensor, x_q: QTensor, cfg: Int8TrainingConfig,
                what: str) -> tuple[Union[QTensor, ColumnTerm, None], torch.Tensor]:
    """(second term or None, fallback rate) of the float activation x (M, K) whose nearest-rounded quantization
    is x_q, as `quantize_activation` returns them (None and rate 0 without fallback)."""
    if not cfg.uses_fallback:
        return None, torch.zeros((), dtype=torch.float32, device=x.device)
    block = cfg.activation_block
    if cfg.column_fallback:
        return fallback_term(x_q, x, cfg, what)
    mask = fallback_mask(x, block, cfg.fallback_threshold, cfg.fallback_budget)
    x2_q = quantize(residual_term(x, x_q, mask), block, "nearest", 0, cfg, f"{what} (fallback term)")
    return x2_q, mask.float().mean()


def fallback_term(x_q: QTensor, values: Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                  cfg: Int8TrainingConfig, what: str) -> tuple[ColumnTerm, torch.Tensor]:
    """Column-structured fallback term of an activation whose first quantization is ``x_q`` (M, K), 1xK blocks.

    values: the float activation x (M, K) itself (any strides; only the chosen groups' columns are read), or
    ``groups`` (int64 (G,)) -> float (M, G * bk), the activation's float values on the columns of those K groups
    (its producer re-run on the gathered INT8 inputs); anything past column K. The selection uses x_q's scales
    (`select_groups`), and the residual and its quantization cover M x G * bk elements, not the dense tensor.
    On the kernel path (CUDA) one fused launch (``fallback_column_term``, `kernels.fallback_term`) writes the term
    and the GEMM's extended operand ``[term | x_q]`` (`ColumnTerm.a`, which `with_term` then returns): a
    callable's gathered values are its x input with the identity group mapping. Elsewhere the torch composition
    below (gather, residual, quantize; `with_term` concatenates), the oracle the kernel equals bit for bit.
    Returns (`ColumnTerm`, fraction of x_q's blocks given a second term: float32 scalar tensor, no sync).
    """
    m, n_groups = x_q.scale.shape
    groups, flags = select_groups(x_q.scale, cfg.fallback_threshold, cfg.fallback_budget,
                                  group_capacity(n_groups, cfg.fallback_groups))
    rate = flags.sum(dtype=torch.float32) / max(1, m * n_groups)
    dense = isinstance(values, torch.Tensor)
    bk = x_q.block.cols
    if backend.uses_kernel("fallback_column_term", x_q.device):
        a = backend.call("fallback_column_term", values if dense else values(groups), x_q, groups, flags,
                         gathered=not dense, device=x_q.device, flag_op=f"{what} (fallback term)")
        g = groups.shape[0]
        return ColumnTerm(QTensor(a.data[:, :g * bk], a.scale[:, :g], a.block), groups, a), rate
    vals = gather_groups(values, groups, bk) if dense else values(groups)
    residual = column_residual(vals, gather_groups_q(x_q, groups), flags, groups, x_q.shape[1])
    x2_q = quantize(residual, x_q.block, "nearest", 0, cfg, f"{what} (fallback term)")
    return ColumnTerm(x2_q, groups), rate


class Extended(NamedTuple):
    """A GEMM's A operand with its column fallback term in front along K: ``a = [term.q | x_q]`` (M, G * bk + K),
    and the term's K groups (int64 (G,)), which pick the B operand's extra columns (`extend_b`)."""

    a: QTensor
    groups: torch.Tensor


def with_term(x_q: QTensor, term: ColumnTerm) -> Extended:
    """The A operand of one GEMM over the extended K (`gemm`): a copy of x_q and the term side by side (1 byte per
    element). Build it once for several GEMMs reading the same activation (fc1 and gate)."""
    if term.q.block != x_q.block or term.q.shape[0] != x_q.shape[0]:
        raise ValueError(f"with_term: the fallback term {tuple(term.q.shape)} {term.q.block} does not belong to the "
                         f"activation {tuple(x_q.shape)} {x_q.block}; build it with fallback_term from that activation")
    if term.a is not None:  # the fused kernel wrote [term | x_q] with the term (the activation's copy included)
        if tuple(term.a.shape) != (x_q.shape[0], term.q.shape[1] + x_q.shape[1]):
            raise ValueError(f"with_term: the term's extended operand {tuple(term.a.shape)} does not belong to the "
                             f"activation {tuple(x_q.shape)}; build it with fallback_term from that activation")
        return Extended(term.a, term.groups)
    return Extended(concat_k([term.q, x_q]), term.groups)


def operand(x_q: QTensor, term: Union[QTensor, ColumnTerm, None]) -> list:
    """The ``terms`` of `gemm` for activation x_q and its second term: a column term joined to x_q once
    (`with_term`), so that several GEMMs reading the activation share the extended operand."""
    return [with_term(x_q, term)] if isinstance(term, ColumnTerm) else [x_q, term]


def extend_b(b_q: QTensor, groups: torch.Tensor, bk: int) -> QTensor:
    """``[b_g | b_q]``: the B operand (N, K) of a GEMM whose A operand carries a `ColumnTerm` (`with_term`), with
    ``b_g`` b's columns of the K groups ``groups`` (its K blocks must be ``bk`` wide: the activation's)."""
    if b_q.block.cols != bk:
        raise ValueError(f"a column fallback term needs weight blocks {bk} wide along K (the activation's), got "
                         f"{b_q.block}; use weight_block='{bk}x{bk}' or the dense fallback of other geometries")
    return concat_k([gather_groups_q(b_q, groups), b_q])


def wgrad_from_float_t(cfg: Int8TrainingConfig) -> bool:
    """Whether an activation's wgrad operand is its transposed copy quantized from the float values (1xK activation
    blocks, K >= 8: the producer or quantize_transposed writes it): without fallback, and with the column-structured
    fallback (``column_fallback``), whose second term only the forward GEMM reads (the transposed copy's blocks run
    along the tokens, one channel each, so an outlier channel crushes no other channel there; backward recomputes
    no term). The dense fallback of other geometries re-quantizes its INT8 terms transposed instead."""
    b = cfg.activation_block
    return b.rows == 1 and b.cols >= 8 and (not cfg.uses_fallback or cfg.column_fallback)


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


def emit(y: torch.Tensor, out_dtype: torch.dtype, out_block: Optional[BlockShape], rounding: str, seed: backend.SeedLike,
         cfg: Int8TrainingConfig, what: str):
    if out_block is None:
        return y.to(out_dtype)
    return quantize(y, out_block, rounding, seed, cfg, what)


def gemm(terms: Sequence[Union[QTensor, ColumnTerm, "Extended", None]], b_q: QTensor, bias=None, out_dtype=torch.float32,
         out_block=None, rounding="nearest", seed: backend.SeedLike = 0, cfg: Int8TrainingConfig = None, what: str = "GEMM output"):
    """``sum(a @ b.T for a in terms) + bias``; ``None`` terms are skipped (absent fallback terms).

    terms: QTensors (M, K); or ``[x_q, ColumnTerm]`` (column-structured fallback: one GEMM over K + G * bk,
    ``[x2_g | x_q] @ [b_g | b_q].T``, every epilogue as without fallback, the Gluon route on sm_90); or
    ``[Extended]`` (`with_term`). b_q: (N, K).
    what: names the output where it is re-quantized here (several terms with ``out_block``)."""
    terms = [t for t in terms if t is not None]
    if len(terms) == 2 and isinstance(terms[1], ColumnTerm):
        terms = [with_term(terms[0], terms[1])]
    if len(terms) == 1 and isinstance(terms[0], Extended):
        terms, b_q = [terms[0].a], extend_b(b_q, terms[0].groups, terms[0].a.block.cols)
    device = b_q.device
    if backend.uses_kernel("block_gemm", device):
        # Hopper's 8-bit wgmma reads both operands K-major only: a transposed view (w_q.t() in dgrad, dy_q.t()
        # and x_q.t() in wgrad) becomes one visible INT8 copy here, never a strided read inside the GEMM.
        terms, b_q = [k_major(t) for t in terms], k_major(b_q)
    if len(terms) == 1:
        return backend.call("block_gemm", terms[0], b_q, bias, out_dtype=out_dtype, out_block=out_block,
                            rounding=rounding, device=device, seed=seed)
    if len(terms) == 2 and backend.uses_kernel("block_gemm", device):
        # dense fallback term (32x32 geometry): the Triton kernel adds it inside its K loop, only for flagged
        # blocks: one pass, not two GEMMs
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


def transposed(q: QTensor, hp: Optional[torch.Tensor], rounding: str, seed: backend.SeedLike, cfg: Int8TrainingConfig,
               what: str) -> QTensor:
    """``q`` transposed: a free view for square blocks, else re-quantized with the transposed block grid
    from ``hp`` (or from ``q`` dequantized when the high-precision tensor was not kept)."""
    if q.block.is_square:
        return q.t()
    src = hp if hp is not None else backend.call("dequantize", q, device=q.device)
    return quantize_transposed(src, q.block, rounding, seed, cfg, f"{what} (transposed)")


def quantize_transposed(x: torch.Tensor, block: BlockShape, rounding: str, seed: backend.SeedLike, cfg: Int8TrainingConfig,
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
