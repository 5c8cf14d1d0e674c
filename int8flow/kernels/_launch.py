"""Host side shared by every Triton wrapper: input validation, output allocation, seeds, launch geometry.

Every check raises naming the argument, what was expected and the fix. Nothing here touches the GPU at
import time. The device side (``@triton.jit`` helpers) lives in ``_blockquant``.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton

from ..format import QTensor
from ..format.blocks import ROUNDING_MODES, BlockShape
from ..format.seeds import mix_seed

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Block sides the in-register quantizers accept: powers of two (the tile is reshaped by them).
MAX_BLOCK_SIDE = 128


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, used by the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialized output buffer; every kernel output goes through here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Multiprocessor count of a CUDA device (queried on first launch, never at import)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- validation ------------------------------------------------------------------------------------


def check_device(t: torch.Tensor, name: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; anything else is a caller bug."""
    if interpreting():
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}, but TRITON_INTERPRET=1 runs kernels on CPU tensors; "
                             f"move it with {name}.cpu() or unset TRITON_INTERPRET")
    elif t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}; the Triton kernels need CUDA tensors. "
                         "Use int8flow.reference (or int8flow.format) on CPU.")


def check_int32_addressable(t: torch.Tensor, name: str) -> None:
    """Kernels that index with int32 offsets (cheaper registers) refuse tensors whose furthest element needs more."""
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    if span >= 2**31:
        raise ValueError(f"{name} spans {span} elements in memory; the kernels address with int32 offsets "
                         "(< 2**31). Split the tensor along its rows.")


def check_float(x, name: str) -> None:
    """A 2-D float32/bfloat16/float16 tensor (any strides) on the kernel device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (or a QTensor where accepted), got {x.dtype}; "
                        f"convert with {name}.float()")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(x.shape)}; flatten leading dims first, "
                         f"e.g. {name}.reshape(-1, {name}.shape[-1])")
    check_device(x, name)


def check_qtensor(q, name: str) -> None:
    if not isinstance(q, QTensor):
        raise TypeError(f"{name} must be a QTensor, got {type(q).__name__}; quantize it first with "
                        "int8flow.kernels.quantize.quantize")
    check_device(q.data, f"{name}.data")


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def check_out_dtype(out_dtype: torch.dtype, name: str = "out_dtype") -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {FLOAT_DTYPES} (pass out_block for an INT8 output), got {out_dtype}")


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}; the default is a safe choice")


def check_block(block: BlockShape, name: str) -> None:
    """Block sides the in-register quantizers take: powers of two up to ``MAX_BLOCK_SIDE``."""
    for side in (block.rows, block.cols):
        if not is_pow2(side) or side > MAX_BLOCK_SIDE:
            raise ValueError(
                f"{name} {block} is not supported by the Triton kernels: block sides must be powers of two up to "
                f"{MAX_BLOCK_SIDE} (e.g. 32x32, 1x32, 1x128); use int8flow.reference for other shapes"
            )


def check_vector(v: Optional[torch.Tensor], name: str, d: int, device: torch.device) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    if tuple(v.shape) != (d,):
        raise ValueError(f"{name} must have shape ({d},) to match the feature dimension, got {tuple(v.shape)}")
    if not v.is_contiguous() or v.device != device:
        raise ValueError(f"{name} must be contiguous and on {device}, got device {v.device}; "
                         f"pass {name}.contiguous().to({str(device)!r})")


def check_stats(v: torch.Tensor, name: str, m: int, device: torch.device) -> None:
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or tuple(v.shape) != (m,):
        raise ValueError(f"{name} must be a float32 tensor of shape ({m},) (the forward pass's row statistic), "
                         f"got {getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
    if not v.is_contiguous() or v.device != device:
        raise ValueError(f"{name} must be contiguous and on {device}, got device {v.device}")


# --- seeds -----------------------------------------------------------------------------------------
#
# Graph-safe seeds. A kernel never takes its random seed as a scalar argument: it takes ``seed_ptr``, a
# 1-element int64 tensor on the launch device holding the *base* seed, and an integer ``salt``, and derives
# the 31-bit Philox key in the kernel (``_blockquant.derive_seed``, twin of ``derive_seed`` below). A CUDA
# graph captures the pointer, not the value, so a base seed drawn on the device inside the captured region
# (``torch.randint(..., device='cuda')``, which CUDA graphs replay with a fresh Philox offset) gives new
# noise on every replay, and the host never reads a seed. Several random streams of one call (the row copy
# and the transposed copy, a dropout mask and the output's rounding) differ by salt: stream k of a call
# with salt s uses ``stream_salt(s, k) = s + k``.

SEED_MAX = 2**63  # seeds (ints or the base tensor's value) are int64; ints must be in [0, SEED_MAX)
SALT_MAX = 2**62  # salts are in [0, SALT_MAX] (kernels add a stream index < 8)
KEY_MOD = 2**31 - 1  # Philox keys are in [0, KEY_MOD)


def derive_seed(base: int, salt: int = 0) -> int:
    """The 31-bit Philox key (what ``tl.rand`` / ``tl.randint4x`` take) of base seed ``base`` and ``salt``.

    Python twin of the device helper ``_blockquant.derive_seed`` (and of ``gluon_gemm._derive_seed``), the
    formula both compute with 64-bit wrapping arithmetic on the base read from ``seed_ptr``::

        z   = mix64(base_u64 ^ mix64((salt + 1) * 0x9E3779B97F4A7C15 mod 2**64))    (format.seeds.mix_seed)
        key = (z >> 33) mod (2**31 - 1)

    ``mix64`` is splitmix64's finalizer: (base, salt) pairs that differ in either give unrelated keys (no
    ``stream 1 of seed s == stream 0 of seed s + 1`` collisions). ``base_u64`` is the int64 base's
    two's-complement bits (negative bases are fine on the device; ints must be non-negative).
    """
    return (mix_seed(base, salt) >> 33) % KEY_MOD


def stream_salt(salt: int, stream: int) -> int:
    """Salt of random stream ``stream`` (0-7) of a call with ``salt``: ``salt + stream``."""
    return salt + stream


def check_salt(salt, name: str = "salt") -> int:
    if isinstance(salt, bool) or not isinstance(salt, int):
        raise TypeError(f"{name} must be an int, got {type(salt).__name__}; pass int({name})")
    if not 0 <= salt <= SALT_MAX:
        raise ValueError(f"{name} must be in [0, 2**62], got {salt}")
    return salt


def check_seed(seed, device: Optional[torch.device] = None, name: str = "seed") -> None:
    """A kernel seed: a non-negative int below 2**63, or a 1-element int64 tensor on ``device``."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"{name} tensor must be int64, got {seed.dtype}; pass {name}.long() (a 1-element "
                            f"int64 tensor on the input's device, e.g. torch.randint(0, 2**31 - 1, (1,), "
                            f"dtype=torch.int64, device=x.device))")
        if seed.numel() != 1:
            raise ValueError(f"{name} tensor must hold exactly 1 element (the base seed), got shape "
                             f"{tuple(seed.shape)}; pass {name}[:1] or draw one with torch.randint(0, 2**31 - 1, (1,), "
                             f"dtype=torch.int64, device=x.device)")
        if device is not None and seed.device != device:
            raise ValueError(f"{name} tensor is on {seed.device}, but the kernel runs on {device}; the kernel reads "
                             f"the seed from device memory: pass {name}.to({str(device)!r})")
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        kind = f"{type(seed).__module__}.{type(seed).__qualname__}".removeprefix("builtins.")
        raise TypeError(f"{name} must be a Python int or a 1-element int64 tensor, got a {kind}; "
                        f"pass int({name})")
    if not 0 <= seed < SEED_MAX:
        raise ValueError(f"{name} must be a non-negative int below 2**63, got {seed}; pass {name} % 2**63 or draw "
                         f"one with random.randrange(2**63)")


def seed_ptr(seed, device: torch.device, used: bool = True, placeholder: Optional[torch.Tensor] = None,
             name: str = "seed") -> torch.Tensor:
    """The ``seed_ptr`` kernel argument of ``seed`` (validated by ``check_seed``).

    A tensor seed is passed as is: no host work, and graph-safe (a CUDA graph replays the launch reading
    whatever the tensor holds then). An int seed becomes a new 1-element int64 tensor on ``device``: a fill
    launch carrying the value from the host (a small host-to-device transfer, no sync), and under CUDA graph
    capture the value is frozen into the graph, so every replay draws the same noise - pass a tensor drawn
    on the device for fresh noise per replay. When the kernel will not read the seed (``used`` False: nearest
    rounding, no dropout mask) an int seed costs nothing: ``placeholder`` (any tensor of the launch) is passed.
    """
    check_seed(seed, device, name)
    if isinstance(seed, torch.Tensor):
        return seed
    if not used and placeholder is not None:
        return placeholder
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def seed_args(seed, salt: int, device: torch.device, used: bool, placeholder: torch.Tensor,
              streams: tuple = (0, 2)) -> tuple:
    """``seed_ptr, salt_a, salt_b, ...``: the kernel arguments of a call with ``seed`` and ``salt`` whose random
    streams are ``streams`` (default: 0 the row-major output, 2 its transposed copy, the streams the
    elementwise kernels have always used)."""
    check_salt(salt)
    return (seed_ptr(seed, device, used, placeholder), *(stream_salt(salt, k) for k in streams))


# --- operands and outputs of the row-major kernels ---------------------------------------------------


class Operand(NamedTuple):
    """Kernel arguments of one (M, N) input: ``ptr, scale_ptr, IS_Q, QR, QC`` (see ``_blockquant.load_operand``)."""

    data: torch.Tensor
    scale: torch.Tensor
    is_q: bool
    qr: int
    qc: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def args(self) -> tuple:
        return (self.data, self.scale, self.is_q, self.qr, self.qc)


def operand(x, name: str) -> Operand:
    """Validate a float tensor or QTensor input (2-D, row-major contiguous, on the kernel device)."""
    if isinstance(x, QTensor):
        check_device(x.data, name)
        if not (x.data.is_contiguous() and x.scale.is_contiguous()):
            raise ValueError(
                f"{name} is a QTensor whose data or scale is not row-major contiguous (a .t() view?); the kernels "
                f"read (rows, features) row-major: pass QTensor(q.data.contiguous(), q.scale.contiguous(), q.block)"
            )
        return Operand(x.data, x.scale, True, x.block.rows, x.block.cols)
    check_float(x, name)
    if not x.is_contiguous():
        raise ValueError(f"{name} must be row-major contiguous; call {name}.contiguous() first")
    return Operand(x, x, False, 1, 1)


def check_same_shape(*ops: tuple[str, Operand]) -> tuple[int, int]:
    shapes = {name: op.shape for name, op in ops}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}; these operands must have the same (rows, features) shape")
    devices = {str(op.data.device) for _, op in ops}
    if len(devices) != 1:
        raise ValueError(f"operands are on different devices {devices}; move them to one device")
    return ops[0][1].shape


class Output:
    """One kernel output: a float tensor of ``out_dtype`` or INT8 data + block scales (``out_block``).

    ``args`` are the kernel arguments ``out_ptr, out_scale_ptr, OUT_Q, QR, QC, STOCHASTIC``;
    ``result()`` is what the wrapper returns (a Tensor or a QTensor).
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, out_dtype: torch.dtype = torch.float32,
                 out_block=None, rounding: str = "nearest", with_t=False, t_only_ok: bool = False):
        check_rounding(rounding)
        if with_t not in (False, True, "only"):
            raise ValueError(f"with_t must be False, True or 'only' (the transposed copy alone), got {with_t!r}")
        if with_t == "only" and not t_only_ok:
            raise ValueError("with_t='only' (the transposed copy without the row-quantized output) is offered by the "
                             "norm forward and the activation forward kernels; use with_t=True here")
        self.block = None if out_block is None else BlockShape.parse(out_block)
        self.with_t = bool(with_t)
        self.row = with_t != "only"  # the kernel's ROW_OUT: write the row-major output too
        self.t_data = self.t_scale = None
        if self.with_t:
            if self.block is None or self.block.rows != 1:
                raise ValueError(f"with_t=True writes the transposed copy in 1xK blocks along M (the wgrad GEMM's "
                                 f"K-major operand): out_block must be '1xK' (e.g. '1x128'), got {out_block!r}; "
                                 "square blocks are their own transpose (use q.t())")
            check_block(self.block, "out_block")
            self.t_data = alloc((shape[1], shape[0]), torch.int8, device)
            self.t_scale = alloc(self.block.grid((shape[1], shape[0])), torch.float32, device)
        if not self.row:  # placeholders: a ROW_OUT=False kernel never touches them
            self.data, self.scale = self.t_data, self.t_scale
        elif self.block is None:
            check_out_dtype(out_dtype)
            self.data = alloc(shape, out_dtype, device)
            self.scale = self.data
        else:
            check_block(self.block, "out_block")
            if rounding == "stochastic" and self.block.cols < 8:
                raise ValueError(f"stochastic rounding in the kernels needs blocks at least 8 columns wide (noise is "
                                 f"drawn 8 values per counter), got out_block {self.block}; use e.g. '1x32' or '1x128'")
            self.data = alloc(shape, torch.int8, device)
            self.scale = alloc(self.block.grid(shape), torch.float32, device)
        self.stochastic = rounding == "stochastic"

    @property
    def qr(self) -> int:
        return 1 if self.block is None else self.block.rows

    @property
    def qc(self) -> int:
        return 1 if self.block is None else self.block.cols

    @property
    def args(self) -> tuple:
        return (self.data, self.scale, self.block is not None, self.qr, self.qc, self.stochastic)

    @property
    def t_args(self) -> tuple:
        """``outt_ptr, outt_scale, WITH_T`` of the transposed copy (placeholders when not asked for)."""
        return (self.t_data, self.t_scale, self.with_t) if self.with_t else (self.data, self.scale, False)

    def result(self):
        """A Tensor, a QTensor, with ``with_t`` the pair (QTensor (M, N), QTensor (N, M) of the transpose), with
        ``with_t='only'`` the transpose's QTensor alone."""
        if not self.row:
            return QTensor(self.t_data, self.t_scale, self.block)
        if self.block is None:
            return self.data
        q = QTensor(self.data, self.scale, self.block)
        return (q, QTensor(self.t_data, self.t_scale, self.block)) if self.with_t else q


# --- launch geometry -------------------------------------------------------------------------------


def tile_shape(qr: int, qc: int, elements: int = 4096) -> tuple[int, int]:
    """(BM, BN) of an elementwise tile: whole blocks of qr x qc, about ``elements`` values."""
    bn = max(qc, 128)
    bm = max(qr, elements // bn)
    return bm, bn


def warps_for(elements: int) -> int:
    """4 warps up to 4096 values per program (~32 fp32 values a thread), 8 above."""
    return 4 if elements <= 4096 else 8


def elementwise_launch(shape: tuple[int, int], out: Output) -> tuple[tuple[int, int], dict]:
    """Grid and tile constexprs (BM, BN) of an elementwise kernel writing ``out``."""
    bm, bn = tile_shape(out.qr, out.qc)
    grid = (triton.cdiv(shape[0], bm), triton.cdiv(shape[1], bn))
    return grid, dict(BM=bm, BN=bn, num_warps=warps_for(bm * bn))


def warps_for_tile(tile: int, per_thread: int) -> int:
    """Warps giving each thread about ``per_thread`` values of a ``tile``-value program (4 to 32).

    Fewer values a thread means fewer registers and more resident warps: the memory-bound kernels need
    many loads in flight (sm_90 SASS: 8 -> 32 resident warps per SM for the norm backward at 4 per thread).
    """
    return max(4, min(32, tile // (32 * per_thread)))


# The producers of a transposed 1xK copy alone (the wgrad operand: quantize_transposed, quantize_dual's second launch,
# the norm / activation forward with_t='only', SwiGLU backward's transposed launch) run on [K, G, c] tiles at ONE warp:
# the K-token block axis then lies within a warp (Triton's blocked layout: 16-byte vectors along the channels, the
# other lanes along the tokens), so the block absmax is in-thread maxima plus warp shuffles (no shared memory, no
# barrier) and the per-block divisions run once per thread column. c: 16 for float inputs (bf16: 8 tokens x 8
# channels a thread), 8 for INT8 inputs (4 x 8). sm_90 builds, docs/notes/membound_h200.md "Session 5".
# T_ONE_WARP = False restores session 4's launches (scripts/gpu/dual_probe.py times both in one run).
T_ONE_WARP = True
T_COLS_FLOAT_IN = 16
T_COLS_INT8_IN = 8


def t_cols(*ops: Operand) -> int:
    """c of ``transposed_tile`` for a kernel reading ``ops``: 8 where any is INT8, else 16."""
    return T_COLS_INT8_IN if any(op.is_q for op in ops) else T_COLS_FLOAT_IN


def transposed_tile(k: int, n: int, c: int) -> dict:
    """(R, G, C, num_warps) of a one-warp program writing the transposed copy alone: R = K tokens (one 1xK block per
    column), G groups of c channels (G > 1 only for K < 128, keeping ~128 x c values a program)."""
    g = max(1, min(next_pow2(-(-n // c)), 128 // k))
    return dict(R=k, G=g, C=c, num_warps=1)


def tile3_launch(shape: tuple[int, int], out: "Output", elements: int = 4096,
                 per_thread: int = 16, t_cols: int = T_COLS_INT8_IN) -> tuple[tuple[int, int], dict]:
    """Grid and (R, G, C) of an elementwise kernel on [R, G, C] tiles (``_blockquant.load3``/``emit3``).

    C = 128 (16-byte int8 vectors; narrower output blocks split a group in registers); R a multiple of the
    output block's rows; with the transposed copy R = the block's columns (one 1xK block along M per
    column); about ``elements`` values a program, ``per_thread`` a thread. The transposed copy alone: one-warp
    ``transposed_tile`` programs of ``t_cols`` channels.
    """
    m, n = shape
    c = 128
    if out.with_t and not out.row:
        # the transposed copy alone needs no 128-wide row blocks: the block axis within one warp (``transposed_tile``:
        # SwiGLU forward 54 SASS instructions per element on sm_90, 23 warps/SM; session 4's [K, 1, 64] x 8 warps: 69)
        if T_ONE_WARP:
            meta = transposed_tile(out.qc, n, t_cols)
            return (triton.cdiv(m, meta["R"]), triton.cdiv(n, meta["G"] * meta["C"])), meta
        c, per_thread = 64, max(per_thread, 32)
    g_cap = next_pow2(-(-n // c))
    if out.with_t:
        r = out.qc
        g = max(1, min(g_cap, elements // (r * c)))
    else:
        g = max(1, min(g_cap, 8))
        r = max(out.qr, min(next_pow2(m), elements // (g * c)))
    grid = (triton.cdiv(m, r), triton.cdiv(n, g * c))
    return grid, dict(R=r, G=g, C=c, num_warps=warps_for_tile(r * g * c, per_thread))


def row_launch(n: int, out: "Output", elements: int = 4096, max_row: int = 16384, chunk_rows: int = 4,
               per_thread: int = 16, t_only_cols: int = 0) -> dict:
    """(R, G, C, ONE) of a row-wise kernel: ONE = a whole (padded) row per tile, else column chunks.

    C = 128 whatever the output block (so the row statistics, summed over the same [G, C] shape, are the
    same bits for every output format). Whole rows (next_pow2(n) <= ``max_row``, not for 2-D output blocks
    or the transposed copy) give one read of the input; chunks (R rows = the output block's rows, or its
    columns with the transposed copy) re-read the band from L2 in a second pass. ``t_only_cols`` > 0 (the
    transposed copy alone with the statistics given: no row reduction, so the tile changes no bit): one-warp
    ``transposed_tile`` programs of that many channels.
    """
    c = 128
    g_row = next_pow2(-(-n // c))
    if t_only_cols and T_ONE_WARP:
        return dict(**transposed_tile(out.qc, n, t_only_cols), ONE=False)
    if not out.with_t and out.qr == 1 and g_row * c <= max_row:
        r = max(1, min(64, elements // (g_row * c)))
        return dict(R=r, G=g_row, C=c, ONE=True, num_warps=warps_for_tile(r * g_row * c, per_thread))
    r = out.qc if out.with_t else max(out.qr, chunk_rows)
    g = max(1, min(g_row, 8192 // (r * c)))
    return dict(R=r, G=g, C=c, ONE=False, num_warps=warps_for_tile(r * g * c, per_thread))


def band_launch(n: int, qr: int, qc: int, elements: int = 8192) -> dict:
    """ROWS x BLOCK_D chunk of a row-wise kernel: whole (qr, qc) blocks, about ``elements`` values, no wider than the row."""
    rows = max(qr, 4)
    block_d = max(qc, min(triton.next_power_of_2(n), elements // rows))
    return dict(ROWS=rows, BLOCK_D=block_d, num_warps=8 if rows * block_d >= 4096 else 4)
