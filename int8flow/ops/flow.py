"""The INT8 data flow of a pre-norm transformer block (Jetfire), as three fused autograd ops.

Attention half: ``h = x + proj(attn(qkv(norm1(x))))``
    * `norm_linear`: x (high precision) -> norm -> INT8 -> QKV GEMM -> high precision (for SDPA, as the paper).
    * attention (SDPA) stays high precision with ordinary autograd.
    * `linear_residual`: attention output -> INT8 -> proj GEMM -> + residual.
MLP half: ``out = h + fc2(act(fc1(norm2(h))))``
    * `mlp_residual`: every tensor between norm -> fc1 -> act -> fc2 is INT8 + per-block scales
      forward, every gradient between them INT8 with stochastic rounding backward.

The norm reads the high-precision residual stream, not an INT8 copy of it: its row statistics come from x,
and what is quantized (and saved for backward) is the normalized input xhat = (x - mean) * rstd, so a row's
offset or an outlier channel cannot take the other values' bits before the statistics are taken
(`_normalized_input`).

Saved for backward: only the INT8 op inputs (normalized x and h, the fc1/gate outputs), per-row norm statistics
and the INT8 weights. The norm output and the fc2 input (and their fallback terms) are recomputed in
backward from those by the same memory-bound kernels with the same numbers, since storing them would
cost 1 byte per element each. See docs/models.md for the per-token table.

The ops take the model's own parameters, so model files keep their standard parameter names. The
residual stream stays in its own (high) precision. Each op normalizes and quantizes its high-precision
input on entry; on the GPU the next norm's row statistics are what a fused residual-add kernel can produce,
which these reference compositions do not fuse.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..config import Int8TrainingConfig
from ..format import NonFiniteError
from . import backend
from . import primitives as P
from .fallback import gather_groups, gather_groups_q
from .linear import int8_linear

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh", "swiglu": None}  # name -> GELU approximation


class NormSpec(NamedTuple):
    """A norm's kind and parameters. The ops also take the model's nn.LayerNorm / nn.RMSNorm directly."""

    kind: str
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> "NormSpec":
        return cls(*_norm_args(module))


def _norm_args(norm) -> tuple:
    """(kind, weight, bias, eps) of a norm module or NormSpec (a plain tuple: torch.compile traces it)."""
    if isinstance(norm, nn.LayerNorm):
        return "layernorm", norm.weight, norm.bias, norm.eps
    if isinstance(norm, nn.RMSNorm):
        return "rmsnorm", norm.weight, None, norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    if isinstance(norm, NormSpec):
        if norm.kind not in NORMS:
            raise ValueError(f"norm kind must be one of {NORMS}, got {norm.kind!r}")
        return tuple(norm)
    raise TypeError(f"norm must be nn.LayerNorm, nn.RMSNorm or a NormSpec, got {type(norm).__name__}")


def _norm_forward(kind, x, weight, bias, eps, device, mean=None, rstd=None, **out):
    """-> (y, mean or None, rstd); given row statistics (the forward's, in backward) x is only normalized."""
    if kind == "layernorm":
        return backend.call("layer_norm_forward", x, weight, bias, eps, device=device, mean=mean, rstd=rstd, **out)
    y, rstd = backend.call("rms_norm_forward", x, weight, eps, device=device, rstd=rstd, **out)
    return y, None, rstd


def _norm_backward(kind, dy, x, weight, mean, rstd, device, **out):
    """-> (dx, dweight, dbias or None)."""
    if kind == "layernorm":
        return backend.call("layer_norm_backward", dy, x, weight, mean, rstd, device=device, **out)
    dx, dweight = backend.call("rms_norm_backward", dy, x, weight, rstd, device=device, **out)
    return dx, dweight, None


def _no_fallback(device) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=device)


def _normalized_input(x: Tensor, norm: str, eps: float, c: Int8TrainingConfig):
    """The norm reads the high-precision residual stream: row statistics from x itself, and an INT8 copy of the
    *normalized* input ``xhat = (x - mean) * rstd`` (RMSNorm: ``x * rstd``) for the norm's output and for
    backward. Returns (xhat_q, mean or None, rstd).

    Quantizing x before the norm (the paper's layout) loses what a row's offset or a 100x outlier channel
    leaves of the other values of its blocks *before* the statistics are taken: 20.8 dB for norm -> GEMM with
    one 100x channel. Taken from x, the statistics are exact and the offset is gone before the INT8 rounding;
    xhat_q costs the same bytes as an INT8 x. On the GPU the residual-add kernel, which writes x, can emit
    these statistics (Jetfire's fusion)."""
    d, blk = x.device, c.activation_block
    if backend.uses_kernel(f"{'layer' if norm == 'layernorm' else 'rms'}_norm_forward", d):
        # one pass: the kernel normalizes in float32 and writes xhat_q itself (the same numbers as quantizing its
        # float32 output, without that (M, D) float32 temporary); NaN/Inf go to the device flag
        return _norm_forward(norm, x, None, None, eps, d, out_block=blk)
    xhat, mean, rstd = _norm_forward(norm, x, None, None, eps, d, out_dtype=torch.float32)
    try:
        xhat_q = P.quantize(xhat, blk, "nearest", 0, c, "input")
    except NonFiniteError:
        P.quantize(x, blk, "nearest", 0, c, "input")  # names x's own NaN/Inf count
        raise
    return xhat_q, mean, rstd


def _unit_stats(norm: str, xhat_q) -> tuple[Optional[Tensor], Tensor]:
    """(mean 0, rstd 1) per row: a norm given these passes the saved normalized input through unchanged."""
    rows, d = xhat_q.shape[0], xhat_q.data.device
    mean = torch.zeros(rows, dtype=torch.float32, device=d) if norm == "layernorm" else None
    return mean, torch.ones(rows, dtype=torch.float32, device=d)


def _norm_input_grad(norm: str, dn_q, xhat_q, weight, rstd: Tensor, out_dtype: torch.dtype,
                     residual_grad: Optional[Tensor] = None):
    """(dx, dweight, dbias) from the normalized input: the norm backward at unit statistics, times rstd per row
    (``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``g = dy * w``), plus ``residual_grad`` (the
    residual branch's gradient) when given, in the same kernel (`dx_scale`, `residual`)."""
    d = dn_q.device
    mean1, rstd1 = _unit_stats(norm, xhat_q)
    res = None if residual_grad is None else residual_grad.contiguous()
    # the kernel applies rstd and adds the residual's gradient in registers and writes dx in out_dtype: no (M, D)
    # float32 dx between passes
    return _norm_backward(norm, dn_q, xhat_q, weight, mean1, rstd1, d, out_dtype=out_dtype, dx_scale=rstd,
                          residual=res)


def _norm_output(x_q, norm: str, weight, bias, eps: float, c: Int8TrainingConfig, mean=None, rstd=None):
    """norm(x_q) -> INT8 output (+ fallback term). Returns (n_q, n2_q, mean, rstd, rate).

    Backward calls it again with the forward's row statistics to recompute the norm output from the
    saved INT8 input instead of saving it (a memory-bound op; same numbers).
    """
    d = x_q.device
    if c.uses_fallback and not c.column_fallback:
        n, mean, rstd = _norm_forward(norm, x_q, weight, bias, eps, d, mean, rstd, out_dtype=torch.float32)
        n_q, n2_q, rate = P.quantize_activation(n, c, "norm output")
        return n_q, n2_q, mean, rstd, rate
    n_q, mean, rstd = _norm_forward(norm, x_q, weight, bias, eps, d, mean, rstd, out_block=c.activation_block)
    if not c.uses_fallback:
        return n_q, None, mean, rstd, _no_fallback(d)
    bk = c.activation_block.cols

    def values(groups):  # the norm output on the chosen K groups only: the norm of those columns, same statistics
        cols = lambda v: None if v is None else gather_groups(v.view(1, -1), groups, bk).view(-1)  # noqa: E731
        n_g, *_ = _norm_forward(norm, gather_groups_q(x_q, groups), cols(weight), cols(bias), eps, d, mean, rstd,
                                out_dtype=torch.float32)
        return n_g

    n2_q, rate = P.fallback_term(n_q, values, c, "norm output")
    return n_q, n2_q, mean, rstd, rate


def _norm_output_t(x_q, norm: str, weight, bias, eps: float, c: Int8TrainingConfig) -> list:
    """The wgrad operand(s) of the norm output, recomputed in backward from the saved normalized input: where
    `primitives.wgrad_from_float_t` (1xK blocks, no fallback or the column one) the producer writes the
    transposed copy itself (one pass, one rounding of the float output); otherwise the INT8 output (and
    fallback term) transposed as `_t_terms`."""
    if P.wgrad_from_float_t(c):
        n_t, *_ = _norm_forward(norm, x_q, weight, bias, eps, x_q.device, *_unit_stats(norm, x_q),
                                out_block=c.activation_block, with_t="only")
        return [n_t]
    n_q, n2_q, *_ = _norm_output(x_q, norm, weight, bias, eps, c, *_unit_stats(norm, x_q))
    return _t_terms([n_q, n2_q], c)


def _activation_t(f_q, g_q, activation: str, c: Int8TrainingConfig) -> list:
    """The wgrad operand(s) of the fc2 input, recomputed in backward as `_norm_output_t` does the norm's."""
    if P.wgrad_from_float_t(c):
        d, out = f_q.device, dict(out_block=c.activation_block, with_t="only")  # the transposed copy alone
        if activation == "swiglu":
            return [backend.call("swiglu_forward", g_q, f_q, device=d, **out)]
        return [backend.call("gelu_forward", f_q, ACTIVATIONS[activation], device=d, **out)]
    a_q, a2_q, _ = _activate(f_q, g_q, activation, c)
    return _t_terms([a_q, a2_q], c)


def _activate(f_q, g_q, activation: str, c: Int8TrainingConfig):
    """act(fc1 output) -> INT8 fc2 input (+ fallback term). Returns (a_q, a2_q, rate); recomputed in backward
    from the saved INT8 fc1 (and gate) outputs instead of being saved."""
    d = f_q.device
    dense = c.uses_fallback and not c.column_fallback

    def act(f, g, **out):
        if activation == "swiglu":
            return backend.call("swiglu_forward", g, f, device=d, **out)
        return backend.call("gelu_forward", f, ACTIVATIONS[activation], device=d, **out)

    a = act(f_q, g_q, **(dict(out_dtype=torch.float32) if dense else dict(out_block=c.activation_block)))
    if dense:
        return P.quantize_activation(a, c, "activation output")
    if not c.uses_fallback:
        return a, None, _no_fallback(d)
    # column fallback: the float activation on the chosen K groups only (elementwise: the gathered inputs' values)
    a2_q, rate = P.fallback_term(a, lambda groups: act(gather_groups_q(f_q, groups),
                                                       None if g_q is None else gather_groups_q(g_q, groups),
                                                       out_dtype=torch.float32), c, "activation output")
    return a, a2_q, rate


def _writes_t(block) -> bool:
    """Whether producers write the transposed copy of an output in ``block`` from the same pass: 1xK blocks (the
    transpose needs re-quantizing along M); square blocks are their own transpose (``q.t()``, a view)."""
    return block.rows == 1 and block.cols >= 8


def _grad_pair(dy: Tensor, seed: backend.Seed, c: Int8TrainingConfig, what: str = "output gradient"):
    """(dy_q, dy_t): the output gradient for dgrad and its transposed operand for wgrad, both quantized from dy
    for 1xK gradient blocks (`primitives.quantize_dual`)."""
    if _writes_t(c.grad_block):
        return P.quantize_dual(dy, c.grad_block, c.grad_rounding, seed, c, what)
    dy_q = P.quantize(dy, c.grad_block, c.grad_rounding, seed, c, what)
    return dy_q, P.transposed(dy_q, dy, c.grad_rounding, backend.subseed(seed, 1), c, what)


def _t_terms(terms, c: Int8TrainingConfig) -> list:
    """The wgrad operands of saved INT8 activation terms (views for square blocks, else re-quantized)."""
    return [P.transposed(t, None, "nearest", 0, c, "saved activation") for t in terms if t is not None]


def _stats(t: Optional[Tensor], device) -> Tensor:
    return t if t is not None else P.empty(device, torch.float32)


def _param_grads(device, dtype, grads: Sequence[tuple[Optional[Tensor], bool]]) -> list[Tensor]:
    """(gradient, parameter present) pairs -> gradients in the parameter dtype, empty placeholders where absent."""
    return [g.to(dtype) if keep else P.empty(device, dtype) for g, keep in grads]


# --- norm -> QKV GEMM ---------------------------------------------------------------------------


def _weight_names(ws: Sequence[Tensor]) -> list[str]:
    """How a NonFiniteError names each of the stacked weights."""
    return ["weight"] if len(ws) == 1 else [f"weight {i} of {len(ws)} (stacked by rows)" for i in range(len(ws))]


def _segments(ws: Sequence[Tensor], c: Int8TrainingConfig) -> list[tuple[int, int]]:
    """Output-column ranges computed as one GEMM each: all weights together when `stackable`, else one per
    weight (so no quantization block of the output or its gradient straddles two weights)."""
    bounds = [0]
    for w in ws:
        bounds.append(bounds[-1] + w.shape[0])
    if P.stackable(ws, c):
        return [(0, bounds[-1])]
    return list(zip(bounds[:-1], bounds[1:]))


def _segment_weights(w_qs: Sequence, ws: Sequence[Tensor], segments):
    """(INT8 operand, its high-precision weights) per output segment."""
    if len(segments) == 1:
        return [(P.stack_rows(w_qs), list(ws))]
    return [(q, [w]) for q, w in zip(w_qs, ws)]


@torch.library.custom_op("int8flow::norm_linear_fwd", mutates_args=())
def _norm_linear_fwd(x: Tensor, norm_w: Optional[Tensor], norm_b: Optional[Tensor], ws: list[Tensor],
                     b: Optional[Tensor], seed: Tensor, cfg: str, norm: str, eps: float,
                     out_dtype: torch.dtype) -> list[Tensor]:
    c = P.decode_config(cfg)
    d = x.device
    with P.running("norm_linear", d):
        x_q, mean, rstd = _normalized_input(x, norm, eps, c)
        n_q, n2_q, *_ = _norm_output(x_q, norm, norm_w, norm_b, eps, c, *_unit_stats(norm, x_q))
        w_qs = [P.quantize(w, c.weight_block, "nearest", 0, c, what) for w, what in zip(ws, _weight_names(ws))]
        segments = _segments(ws, c)
        seg_qs = [q for q, _ in _segment_weights(w_qs, ws, segments)]
        n_a = P.operand(n_q, n2_q)
        y = torch.cat([P.gemm(n_a, w_q, None if b is None else b[lo:hi], out_dtype=out_dtype, cfg=c)
                       for w_q, (lo, hi) in zip(seg_qs, segments)], dim=1)
    # backward gets each segment's INT8 operand as the GEMM read it (stacked q|k|v once, not re-stacked there)
    return [y, *P.pack(x_q, d), _stats(mean, d), rstd, *(t for q in seg_qs for t in P.pack(q, d))]


@_norm_linear_fwd.register_fake
def _(x, norm_w, norm_b, ws, b, seed, cfg, norm, eps, out_dtype):
    c = P.decode_config(cfg)
    M, N = x.shape[0], sum(w.shape[0] for w in ws)
    mean = x.new_empty((M,) if norm == "layernorm" else P.EMPTY_SHAPE, dtype=torch.float32)
    seg_shapes = [(hi - lo, ws[0].shape[1]) for lo, hi in _segments(ws, c)]  # one saved operand per segment
    return [x.new_empty((M, N), dtype=out_dtype), *P.fake_q(x, x.shape, c.activation_block), mean,
            x.new_empty((M,), dtype=torch.float32), *(t for sh in seg_shapes for t in P.fake_q(ws[0], sh, c.weight_block))]


@torch.library.custom_op("int8flow::norm_linear_bwd", mutates_args=())
def _norm_linear_bwd(dy: Tensor, saved: list[Tensor], norm_w: Optional[Tensor], norm_b: Optional[Tensor],
                     ws: list[Tensor], seed: Tensor, cfg: str, norm: str, eps: float, x_dtype: torch.dtype,
                     has_bias: bool) -> list[Tensor]:
    c = P.decode_config(cfg)
    s, d, wd, gb = backend.Seed(seed), dy.device, ws[0].dtype, c.grad_block  # no host read of the seed
    x_i8, x_s, mean, rstd, *w_saved = saved
    with P.running("norm_linear", d):
        x_q = P.unpack(x_i8, x_s, c.activation_block)
        segments = _segments(ws, c)
        seg_qs = [P.unpack(w_saved[2 * j], w_saved[2 * j + 1], c.weight_block) for j in range(len(segments))]
        n_ts = _norm_output_t(x_q, norm, norm_w, norm_b, eps, c)  # wgrad operand(s) of the norm output
        dn, dws = [], []
        names = _weight_names(ws)
        # one saved operand per segment: _segment_weights pairs them with their weights (a lone stack: no cat)
        for j, ((w_q, w_hp), (lo, hi)) in enumerate(zip(_segment_weights(seg_qs, ws, segments), segments)):
            dy_j = dy[:, lo:hi]
            dy_q, dy_t = _grad_pair(dy_j, backend.subseed(s, 0 if j == 0 else 3 + 2 * j), c)
            w_t = P.weight_t(w_q, w_hp, c, names[j] if len(segments) > 1 else "weight")
            dn.append(P.gemm([dy_q], w_t, cfg=c) if len(segments) > 1 else
                      P.gemm([dy_q], w_t, out_block=gb, rounding=c.grad_rounding, seed=backend.subseed(s, 1), cfg=c))
            dws.append(P.wgrad(dy_t, n_ts, c, wd))  # in the weights' dtype from the epilogue
        dn_q = dn[0] if len(dn) == 1 else P.emit(sum(dn), torch.float32, gb, c.grad_rounding, backend.subseed(s, 1), c,
                                                 "norm output gradient")
        dx, dnw, dnb = _norm_input_grad(norm, dn_q, x_q, norm_w, rstd, x_dtype)
        db = dy.sum(0, dtype=torch.float32) if has_bias else None  # no float32 copy of dy
        grads = _param_grads(d, wd, [(dnw, norm_w is not None), (dnb, norm_b is not None), (db, has_bias)])
        # ONE weight-gradient tensor, the weights stacked by rows: the autograd formula splits it into views
        # (custom-op outputs must not alias each other, so per-weight outputs would each be a copy: for gate|up
        # of Llama-1B 92 MB of float32 read and written again every backward)
        dw = dws[0] if len(dws) == 1 else torch.cat(dws)
    return [dx, *grads, dw]  # in wd already (P.wgrad's out_dtype)


@_norm_linear_bwd.register_fake
def _(dy, saved, norm_w, norm_b, ws, seed, cfg, norm, eps, x_dtype, has_bias):
    M, D, N, wd = dy.shape[0], ws[0].shape[1], dy.shape[1], ws[0].dtype
    vec = lambda n, keep: dy.new_empty((n,) if keep else P.EMPTY_SHAPE, dtype=wd)  # noqa: E731
    return [dy.new_empty((M, D), dtype=x_dtype), vec(D, norm_w is not None), vec(D, norm_b is not None), vec(N, has_bias),
            dy.new_empty((N, D), dtype=wd)]


def _norm_linear_setup(ctx, inputs, output):
    x, norm_w, norm_b, ws, b, seed, cfg, norm, eps, _ = inputs
    ctx.save_for_backward(*output[1:], norm_w, norm_b, seed, *ws)
    ctx.cfg, ctx.norm, ctx.eps, ctx.x_dtype, ctx.has_bias = cfg, norm, eps, x.dtype, b is not None
    ctx.n_saved = len(output) - 1


def _norm_linear_backward(ctx, grads):
    tensors = ctx.saved_tensors  # read once (checkpointing unpacks each saved tensor only once)
    k = ctx.n_saved
    saved, (norm_w, norm_b, seed), ws = list(tensors[:k]), tensors[k:k + 3], list(tensors[k + 3:])
    dx, dnw, dnb, db, dw = _norm_linear_bwd(grads[0], saved, norm_w, norm_b, ws, seed, ctx.cfg, ctx.norm, ctx.eps,
                                            ctx.x_dtype, ctx.has_bias)
    dws = list(dw.split([w.shape[0] for w in ws]))  # row views of the stacked gradient: no copy
    return (dx, dnw if norm_w is not None else None, dnb if norm_b is not None else None, dws,
            db if ctx.has_bias else None, None, None, None, None, None)


_norm_linear_fwd.register_autograd(_norm_linear_backward, setup_context=_norm_linear_setup)


def norm_linear(x: Tensor, norm, w: Union[Tensor, Sequence[Tensor]], b: Optional[Tensor],
                cfg: Int8TrainingConfig) -> Tensor:
    """``linear(norm(x))`` with the norm's output fed to the GEMM as INT8; output high precision (B, T, N).

    norm: the model's nn.LayerNorm / nn.RMSNorm, or a NormSpec.
    w: one weight, or several stacked by rows (e.g. q, k, v projections), output columns in that order:
    each weight is quantized on its own, never copied in high precision; one GEMM over their INT8 stack
    when block boundaries allow (`primitives.stackable`), else one GEMM per weight. b is then the bias of
    the stacked output.
    """
    kind, norm_w, norm_b, eps = _norm_args(norm)
    ws = [w] if isinstance(w, Tensor) else list(w)
    for wi in ws:
        if wi.dim() != 2 or wi.shape[1] != x.shape[-1]:
            raise ValueError(f"norm_linear: each weight must be (out_features, {x.shape[-1]}), got {tuple(wi.shape)}")
    x2d = x.reshape(-1, x.shape[-1])
    y = _norm_linear_fwd(x2d, norm_w, norm_b, ws, b, backend.draw_seed(x.device), cfg.key, kind, float(eps),
                         P.output_dtype(x))[0]
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --- attention output -> proj GEMM -> residual add -----------------------------------------------


def linear_residual(a: Tensor, w: Tensor, b: Optional[Tensor], residual: Tensor, cfg: Int8TrainingConfig,
                    save_input: bool = False) -> Tensor:
    """``residual + linear(a)``: a quantized to INT8, the sum kept in the residual's dtype.

    Backward gets a's INT8 copy, or with ``save_input`` a itself (re-quantized there: same numbers) - for an
    ``a`` its producer saves anyway, such as SDPA's output, so that no second copy is kept.
    """
    return residual + int8_linear(a, w, b, cfg, save_input=save_input).to(residual.dtype)


# --- norm -> fc1 -> act -> fc2 -> residual add -------------------------------------------------


@torch.library.custom_op("int8flow::mlp_residual_fwd", mutates_args=())
def _mlp_fwd(h: Tensor, norm_w: Optional[Tensor], norm_b: Optional[Tensor], w_in: Tensor, b_in: Optional[Tensor],
             w_gate: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor], seed: Tensor, cfg: str, norm: str,
             eps: float, activation: str) -> list[Tensor]:
    c = P.decode_config(cfg)
    d, blk = h.device, c.activation_block
    with P.running("mlp_residual", d):
        h_q, mean, rstd = _normalized_input(h, norm, eps, c)
        n_q, n2_q, *_ = _norm_output(h_q, norm, norm_w, norm_b, eps, c, *_unit_stats(norm, h_q))
        w_in_q = P.quantize(w_in, c.weight_block, "nearest", 0, c, "fc1 weight")
        w_out_q = P.quantize(w_out, c.weight_block, "nearest", 0, c, "fc2 weight")
        n_a = P.operand(n_q, n2_q)  # with a column fallback term: [n2_g | n_q], built once for fc1 and gate
        f_q = P.gemm(n_a, w_in_q, b_in, out_block=blk, cfg=c, what="fc1 output")
        w_gate_q = g_q = None
        if activation == "swiglu":
            w_gate_q = P.quantize(w_gate, c.weight_block, "nearest", 0, c, "gate weight")
            g_q = P.gemm(n_a, w_gate_q, None, out_block=blk, cfg=c, what="gate output")
        a_q, a2_q, rate = _activate(f_q, g_q, activation, c)
        # fc2's output in the residual stream's dtype, then the residual add: as the BF16 model rounds its linear
        # output before the add, and no (M, D) float32 temporaries (the output, h.float(), their sum)
        y = P.gemm([a_q, a2_q], w_out_q, b_out, out_dtype=h.dtype, cfg=c)
        out = h + y
    return [out, *P.pack(h_q, d), _stats(mean, d), rstd, *P.pack(f_q, d), *P.pack(g_q, d), *P.pack(w_in_q, d),
            *P.pack(w_gate_q, d), *P.pack(w_out_q, d), rate]


@_mlp_fwd.register_fake
def _(h, norm_w, norm_b, w_in, b_in, w_gate, w_out, b_out, seed, cfg, norm, eps, activation):
    c = P.decode_config(cfg)
    M, F, blk, wb = h.shape[0], w_in.shape[0], c.activation_block, c.weight_block
    glu = activation == "swiglu"
    mean = h.new_empty((M,) if norm == "layernorm" else P.EMPTY_SHAPE, dtype=torch.float32)
    return [h.new_empty(h.shape), *P.fake_q(h, h.shape, blk), mean, h.new_empty((M,), dtype=torch.float32),
            *P.fake_q(h, (M, F), blk), *(P.fake_q(h, (M, F), blk) if glu else P.fake_absent(h)),
            *P.fake_q(w_in, w_in.shape, wb), *(P.fake_q(w_in, w_in.shape, wb) if glu else P.fake_absent(h)),
            *P.fake_q(w_out, w_out.shape, wb), h.new_empty((), dtype=torch.float32)]


@torch.library.custom_op("int8flow::mlp_residual_bwd", mutates_args=())
def _mlp_bwd(dout: Tensor, saved: list[Tensor], norm_w: Optional[Tensor], norm_b: Optional[Tensor], w_in: Tensor,
             w_gate: Optional[Tensor], w_out: Tensor, seed: Tensor, cfg: str, norm: str, eps: float, activation: str,
             has_b_in: bool, has_b_out: bool) -> list[Tensor]:
    c = P.decode_config(cfg)
    s, d, blk, gb, wd = backend.Seed(seed), dout.device, c.activation_block, c.grad_block, w_in.dtype  # seed: on device
    h_i8, h_s, mean, rstd, f_i8, f_s, g_i8, g_s, wi_i8, wi_s, wg_i8, wg_s, wo_i8, wo_s = saved
    grad_out = dict(out_block=gb, rounding=c.grad_rounding)
    with P.running("mlp_residual", d):
        h_q, f_q, g_q = P.unpack(h_i8, h_s, blk), P.unpack(f_i8, f_s, blk), P.unpack(g_i8, g_s, blk)
        wi_q, wo_q = P.unpack(wi_i8, wi_s, c.weight_block), P.unpack(wo_i8, wo_s, c.weight_block)
        # recompute what the forward did not save, as the wgrad operands it feeds: the norm output and the fc2
        # input (memory-bound; with 1xK blocks the producers write the transposed copies themselves)
        n_ts = _norm_output_t(h_q, norm, norm_w, norm_b, eps, c)
        a_ts = _activation_t(f_q, g_q, activation, c)
        # fc2
        dy_q, dy_t = _grad_pair(dout, backend.subseed(s, 0), c)
        da_q = P.gemm([dy_q], P.weight_t(wo_q, [w_out], c, "fc2 weight"), seed=backend.subseed(s, 1), cfg=c,
                      **grad_out)
        dw_out = P.wgrad(dy_t, a_ts, c, wd)
        # activation, then fc1 (and gate): the gradients with their transposed copies from the same pass (1xK)
        pair = _writes_t(gb)

        def _t(q, seed, what):  # the wgrad operand of a gradient the producer wrote without its transpose
            return P.transposed(q, None, c.grad_rounding, seed, c, what)

        if activation == "swiglu":
            out = backend.call("swiglu_backward", da_q, g_q, f_q, device=d, seed=backend.subseed(s, 3), with_t=pair,
                               **grad_out)
            (dg_q, dg_t), (df_q, df_t) = out if pair else ((out[0], _t(out[0], backend.subseed(s, 5), "gate output gradient")),
                                                          (out[1], _t(out[1], backend.subseed(s, 6), "fc1 output gradient")))
            wg_q = P.unpack(wg_i8, wg_s, c.weight_block)
            wi_t, wg_t = P.weight_t(wi_q, [w_in], c, "fc1 weight"), P.weight_t(wg_q, [w_gate], c, "gate weight")
            a_cat, b_cat = P.concat_k([df_q, dg_q]), P.concat_k([wi_t, wg_t])
            if a_cat is not None and b_cat is not None:
                # dn = df @ w_in + dg @ w_gate as one GEMM over K = 2 x ffn, INT8 straight from its epilogue (no two
                # (M, D) float32 products, their sum and a quantize pass)
                dn_q = P.gemm([a_cat], b_cat, seed=backend.subseed(s, 4), cfg=c, **grad_out)
            else:  # ffn not a multiple of the blocks along K: two GEMMs, summed in float32
                dn = P.gemm([df_q], wi_t, cfg=c) + P.gemm([dg_q], wg_t, cfg=c)
                dn_q = P.quantize(dn, gb, c.grad_rounding, backend.subseed(s, 4), c, "norm output gradient")
            dw_gate = P.wgrad(dg_t, n_ts, c, wd)
        else:
            out = backend.call("gelu_backward", da_q, f_q, ACTIVATIONS[activation], device=d,
                               seed=backend.subseed(s, 3), with_t=pair, **grad_out)
            df_q, df_t = out if pair else (out, _t(out, backend.subseed(s, 6), "fc1 output gradient"))
            dn_q = P.gemm([df_q], P.weight_t(wi_q, [w_in], c, "fc1 weight"), seed=backend.subseed(s, 4), cfg=c,
                          **grad_out)
            dw_gate = P.empty(d, wd)
        dw_in = P.wgrad(df_t, n_ts, c, wd)
        # norm, then the residual branch
        dh, dnw, dnb = _norm_input_grad(norm, dn_q, h_q, norm_w, rstd, dout.dtype, residual_grad=dout)
        db_in = df_q.dequantize(torch.float32).sum(0) if has_b_in else None
        db_out = dout.sum(0, dtype=torch.float32) if has_b_out else None
        dnw, dnb, db_in, db_out = _param_grads(d, wd, [(dnw, norm_w is not None), (dnb, norm_b is not None),
                                                       (db_in, has_b_in), (db_out, has_b_out)])
    return [dh, dnw, dnb, dw_in, db_in, dw_gate, dw_out, db_out]


@_mlp_bwd.register_fake
def _(dout, saved, norm_w, norm_b, w_in, w_gate, w_out, seed, cfg, norm, eps, activation, has_b_in, has_b_out):
    D, F, wd = dout.shape[1], w_in.shape[0], w_in.dtype
    vec = lambda n, keep: dout.new_empty((n,) if keep else P.EMPTY_SHAPE, dtype=wd)  # noqa: E731
    dw_gate = dout.new_empty((F, D), dtype=wd) if activation == "swiglu" else vec(0, False)
    return [dout.new_empty(dout.shape), vec(D, norm_w is not None), vec(D, norm_b is not None),
            dout.new_empty((F, D), dtype=wd), vec(F, has_b_in), dw_gate, dout.new_empty((D, F), dtype=wd),
            vec(D, has_b_out)]


def _mlp_setup(ctx, inputs, output):
    h, norm_w, norm_b, w_in, b_in, w_gate, w_out, b_out, seed, cfg, norm, eps, activation = inputs
    ctx.save_for_backward(*output[1:-1], norm_w, norm_b, w_in, w_gate, w_out, seed)
    ctx.cfg, ctx.norm, ctx.eps, ctx.activation = cfg, norm, eps, activation
    ctx.present = tuple(t is not None for t in (norm_w, norm_b, b_in, w_gate, b_out))


def _mlp_backward(ctx, grads):
    *saved, norm_w, norm_b, w_in, w_gate, w_out, seed = ctx.saved_tensors
    has_nw, has_nb, has_bi, has_wg, has_bo = ctx.present
    dh, dnw, dnb, dwi, dbi, dwg, dwo, dbo = _mlp_bwd(grads[0], saved, norm_w, norm_b, w_in, w_gate, w_out, seed,
                                                     ctx.cfg, ctx.norm, ctx.eps, ctx.activation, has_bi, has_bo)
    keep = lambda g, flag: g if flag else None  # noqa: E731
    return (dh, keep(dnw, has_nw), keep(dnb, has_nb), dwi, keep(dbi, has_bi), keep(dwg, has_wg), dwo,
            keep(dbo, has_bo), None, None, None, None, None)


_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def mlp_residual(h: Tensor, norm, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor,
                 b_out: Optional[Tensor], activation: str, cfg: Int8TrainingConfig,
                 w_gate: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``h + fc2(act(fc1(norm(h))))`` on the INT8 data flow; returns (out, fallback rate of the fc2 input).

    norm: the model's nn.LayerNorm / nn.RMSNorm, or a NormSpec.
    activation: ``gelu`` / ``gelu_tanh`` (``w_in`` = fc1) or ``swiglu`` (``w_in`` = up_proj,
    ``w_gate`` = gate_proj, act = silu(gate) * up). The output keeps h's dtype (the residual stream).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if (activation == "swiglu") != (w_gate is not None):
        raise ValueError("activation='swiglu' needs w_gate (the gate projection); GELU MLPs take none")
    kind, norm_w, norm_b, eps = _norm_args(norm)
    h2d = h.reshape(-1, h.shape[-1])
    out = _mlp_fwd(h2d, norm_w, norm_b, w_in, b_in, w_gate, w_out, b_out, backend.draw_seed(h.device), cfg.key, kind,
                   float(eps), activation)
    return out[0].reshape(h.shape), out[-1].detach()
