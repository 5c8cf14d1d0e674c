"""INT8 linear layer as a PyTorch custom op with a registered autograd formula.

Forward: ``y = x_q @ w_q.T + b`` with x and w quantized per block (nearest rounding).
Backward: ``dy`` quantized with stochastic rounding; ``dx = dy_q @ w_q`` uses ``w_q.t()`` and
``dw = dy_q.T @ x_q`` uses ``dy_q.t()`` and ``x_q.t()``: exact copies for square blocks; for 1xK blocks the
transposed operands are quantized from the high-precision values in the same pass as the row copies
(`primitives.quantize_dual`); the GEMM reads every operand K-major (`primitives.gemm`). What is saved for
backward is INT8 - ``x_q``, or for 1xK activation blocks without fallback x's transposed copy, the only form
wgrad reads - not the high-precision x (the memory saving of INT8 training), and the weight parameter
itself (which exists anyway): backward quantizes ``w.T`` straight into the K-major layout dgrad reads,
with nearest rounding, so for square weight blocks it is the forward's INT8 weight, transposed, bit for
bit, and no INT8 copy of a weight is kept between forward and backward. With fallback quantization in the 1xK
geometry (``column_fallback``) the second term only enters the forward GEMM (as extra K columns) and backward is
plain INT8's: x's transposed copy, no term saved. In other geometries the flagged blocks of the dense second term
are saved too, compactly (indices + blocks + scales; see `fallback.compact_term`), and wgrad reads them.

The op is opaque to torch.compile (one node per call, a fake impl gives shapes), so models compile
without graph breaks; parameters stay ordinary tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import Int8TrainingConfig
from . import backend
from . import primitives as P


@torch.library.custom_op("int8flow::linear_fwd", mutates_args=())
def _linear_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], seed: Tensor, cfg: str, out_dtype: torch.dtype,
                save_input: bool, static_storage: bool) -> list[Tensor]:
    c = P.decode_config(cfg)
    keep_t = _keeps_transposed_input(c, save_input)
    with P.running("int8_linear", x.device):
        if keep_t:  # the GEMM's operand and the wgrad operand backward keeps, both from x
            x_q, x_t = P.quantize_dual(x, c.activation_block, "nearest", 0, c, "input")
            x2_q, rate = P.second_term(x, x_q, c, "input")  # a column term or None: backward never reads it
        else:
            x_q, x2_q, rate = P.quantize_activation(x, c, "input")
        w_q = P.quantize(w, c.weight_block, "nearest", 0, c, "weight")
        if c.quantize_fprop:
            y = P.gemm([x_q, x2_q], w_q, b, out_dtype=out_dtype, cfg=c)
        else:
            y = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(out_dtype)
    keep = _keeps_int8_input(c, save_input)
    d = x.device
    capacity = P.fallback_capacity(x.shape, c) if static_storage else None
    return [y, *P.pack((x_t if keep_t else x_q) if keep else None, d),
            *P.pack_compact(x2_q if keep and not keep_t else None, d, capacity), rate]


def _keeps_int8_input(c: Int8TrainingConfig, save_input: bool) -> bool:
    """Whether backward gets x as INT8 (+ compact fallback term) rather than x itself."""
    return c.quantize_wgrad and not save_input


def _keeps_transposed_input(c: Int8TrainingConfig, save_input: bool) -> bool:
    """Whether the INT8 x backward gets is its transposed copy (K, M) in 1xK blocks along M - the only form
    wgrad reads, written by the forward's quantize from the same read of x - rather than x_q (M, K), which
    backward would have to dequantize and re-quantize transposed."""
    return _keeps_int8_input(c, save_input) and P.wgrad_from_float_t(c)


@_linear_fwd.register_fake
def _(x, w, b, seed, cfg, out_dtype, save_input, static_storage):
    c = P.decode_config(cfg)
    M, N = x.shape[0], w.shape[0]
    keep = _keeps_int8_input(c, save_input)
    x_shape = (x.shape[1], x.shape[0]) if _keeps_transposed_input(c, save_input) else x.shape
    x_keep = P.fake_q(x, x_shape, c.activation_block) if keep else P.fake_absent(x)
    dense_store = keep and c.uses_fallback and not c.column_fallback  # the compact store of a dense term
    if dense_store and not static_storage:
        raise NotImplementedError("int8_linear: an exact-size fallback store has a data-dependent shape; "
                                  "trace with static_storage=True (int8_linear does so under torch.compile)")
    capacity = P.fallback_capacity(x.shape, c) if dense_store else None
    return [x.new_empty((M, N), dtype=out_dtype), *x_keep, *P.fake_compact(x, c.activation_block, capacity),
            x.new_empty((), dtype=torch.float32)]


@torch.library.custom_op("int8flow::linear_bwd", mutates_args=())
def _linear_bwd(dy: Tensor, x_saved: Tensor, x_scale: Tensor, x2_index: Tensor, x2_blocks: Tensor, x2_scale: Tensor,
                w_saved: Tensor, seed: Tensor, cfg: str, has_bias: bool, x_dtype: torch.dtype,
                w_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    c = P.decode_config(cfg)
    s = backend.Seed(seed)  # the call's base seed stays on the device; streams differ by salt (backend.subseed)
    with P.running("int8_linear", dy.device):
        blk, x_ts = c.activation_block, None
        if x_saved.dtype == torch.int8 and _keeps_transposed_input(c, save_input=False):
            x_ts = [P.unpack(x_saved, x_scale, blk)]  # the forward kept x's transposed copy (K, M)
        elif x_saved.dtype == torch.int8:
            x_q = P.unpack(x_saved, x_scale, blk)
            x2_q = P.unpack_compact(x2_index, x2_blocks, x2_scale, x_saved.shape, blk)
        elif c.quantize_wgrad and P.wgrad_from_float_t(c):
            x_ts = [P.quantize_transposed(x_saved, blk, "nearest", 0, c, "saved input")]  # one pass over x
        elif c.quantize_wgrad:  # x itself was kept (held anyway): the forward's INT8 operands, recomputed
            x_q, x2_q, _ = P.quantize_activation(x_saved, c, "saved input")
        dy_q = dy_t = None
        if c.quantize_wgrad and c.grad_block.rows == 1 and c.grad_block.cols >= 8:
            dy_q, dy_t = P.quantize_dual(dy, c.grad_block, c.grad_rounding, backend.subseed(s, 0), c, "output gradient")
        elif c.quantize_dgrad or c.quantize_wgrad:
            dy_q = P.quantize(dy, c.grad_block, c.grad_rounding, backend.subseed(s, 0), c, "output gradient")
        if c.quantize_dgrad:
            # w.T quantized straight into K-major storage (the forward's INT8 weight, transposed, for square blocks)
            w_t = P.quantize_transposed(w_saved, c.weight_block, "nearest", 0, c, "weight (transposed)")
            dx = P.gemm([dy_q], w_t, out_dtype=x_dtype, cfg=c)
        else:
            dx = (dy.float() @ w_saved.float()).to(x_dtype)
        if c.quantize_wgrad:
            dy_t = dy_t if dy_t is not None else P.transposed(dy_q, dy, c.grad_rounding, backend.subseed(s, 1), c,
                                                              "output gradient")
            x_ts = x_ts if x_ts is not None else [P.transposed(t, None, "nearest", 0, c, "saved input")
                                                  for t in (x_q, x2_q) if t is not None]
            dw = P.wgrad(dy_t, x_ts, c, w_dtype)
        else:
            dw = (dy.float().t() @ x_saved.float()).to(w_dtype)
        db = dy.sum(0, dtype=torch.float32).to(w_dtype) if has_bias else P.empty(dy.device, w_dtype)
    return dx, dw, db


@_linear_bwd.register_fake
def _(dy, x_saved, x_scale, x2_index, x2_blocks, x2_scale, w_saved, seed, cfg, has_bias, x_dtype, w_dtype):
    N, K = w_saved.shape
    db = dy.new_empty((N,) if has_bias else P.EMPTY_SHAPE, dtype=w_dtype)
    return dy.new_empty((dy.shape[0], K), dtype=x_dtype), dy.new_empty((N, K), dtype=w_dtype), db


def _setup_context(ctx, inputs, output):
    x, w, b, seed, cfg, _, save_input, _ = inputs
    _, x_data, x_scale, x2_index, x2_blocks, x2_scale, _ = output
    c = P.decode_config(cfg)
    x_keep = (x_data, x_scale) if _keeps_int8_input(c, save_input) else (x, P.empty(x.device, torch.float32))
    ctx.save_for_backward(*x_keep, x2_index, x2_blocks, x2_scale, w, seed)
    ctx.cfg, ctx.has_bias, ctx.x_dtype, ctx.w_dtype = cfg, b is not None, x.dtype, w.dtype


def _backward(ctx, grads):
    dx, dw, db = _linear_bwd(grads[0], *ctx.saved_tensors, ctx.cfg, ctx.has_bias, ctx.x_dtype, ctx.w_dtype)
    return dx, dw, (db if ctx.has_bias else None), None, None, None, None, None


_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x: Tensor, w: Tensor, b: Optional[Tensor]) -> None:
    if w.dim() != 2:
        raise ValueError(f"int8_linear: weight must be 2-D (out_features, in_features), got {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} features but weight expects {w.shape[1]} (in_features)")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"int8_linear: bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")


def int8_linear(x: Tensor, w: Tensor, b: Optional[Tensor], cfg: Int8TrainingConfig, return_fallback_rate: bool = False,
                save_input: bool = False):
    """``F.linear`` on per-block INT8 operands; x may have any leading dims.

    save_input: keep x itself for backward and re-quantize it there (nearest rounding: the same INT8
    numbers) instead of storing an INT8 copy - for an x that its producer saves anyway (SDPA's output).
    """
    _check(x, w, b)
    x2d = x.reshape(-1, x.shape[-1])
    # The fallback store holds exactly the flagged blocks in eager mode; a traced graph (and a meta tensor,
    # which only the fake implementation sees) needs a static size: the budget's worth, the most that can be flagged.
    static_storage = torch.compiler.is_compiling() or x.device.type == "meta"
    y, *_, rate = _linear_fwd(x2d, w, b, backend.draw_seed(x.device), cfg.key, P.output_dtype(x), save_input,
                                static_storage)
    y = y.reshape(*x.shape[:-1], w.shape[0])
    return (y, rate.detach()) if return_fallback_rate else y


class Int8LinearFunction:
    """The autograd pair of the INT8 linear layer; ``apply`` mirrors ``torch.autograd.Function.apply``.

    The forward/backward formulas are registered on the ``int8flow::linear_fwd`` custom op with
    ``torch.library.register_autograd`` (rather than subclassing ``autograd.Function``) so that
    torch.compile sees one opaque node per call.
    """

    @staticmethod
    def apply(x: Tensor, w: Tensor, b: Optional[Tensor], cfg: Int8TrainingConfig) -> Tensor:
        return int8_linear(x, w, b, cfg)
