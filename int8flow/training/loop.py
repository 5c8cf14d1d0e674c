"""The training loop, top to bottom: data -> model -> (resume) -> wrap -> AdamW -> steps -> final eval.

- FP32 master weights: parameters stay float32 and AdamW updates them; on CUDA the forward runs under
  bf16 autocast. Linear warmup then cosine decay to ``min_lr``; gradient clipping; accumulation.
- Exact resume: a batch, dropout and stochastic rounding depend only on (seed, step, rank), because
  the batch is sampled from (seed, step) and the global RNG is reseeded from (seed, step, rank) at each
  step. A checkpoint therefore needs weights, optimizer state and the step; resumed losses equal
  uninterrupted ones bitwise on CPU.
- Guard: a step whose loss or gradient norm is not finite, or in which an INT8 operator refused NaN/Inf
  (``NonFiniteError``), follows ``nonfinite``: ``skip`` drops it before ``optimizer.step()`` (optimizer state
  untouched), ``raise`` stops, ``bf16`` recomputes it with the INT8 layers in high precision and steps on
  that if it is finite (else skips). Skipped and stopped steps are located first: one re-run with the same
  seed under ``guards.NonFiniteTracker`` names the layer and tensor, in the log and the error. A loss spike
  (``spike_factor``) is skipped too.
  Under ``parallel=ddp|fsdp2`` the INT8 operators let NaN/Inf propagate instead of raising (`model_precision`),
  so a fault on one rank reaches the rank-symmetric loss / gradient-norm check rather than hanging the others.
- Fallback rates: in ``int8+fallback`` / ``jetfire+fallback`` runs each evaluated record also holds the per-layer
  fraction of activation blocks that took the 16-bit fallback term in the step (`metrics.fallback_rates`), read in
  one more host sync at evaluation steps only, and the final summary names the mean, the max and its layer.
- Test-only kill points (``killpoints``): ``INT8FLOW_TEST_KILL_AT=step:N`` SIGKILLs the run after step N.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import Int8TrainingConfig
from ..data import PreparedData, ensure_prepared, eval_offsets, gather_batch, load_prepared, step_offsets
from ..format import NonFiniteError
from ..guards import locate_nonfinite, nonfinite_params, recompute_high_precision
from ..models.gpt2 import check_token_ids, token_ids_checked_on_host
from .checkpoint import (CKPT_DIR, MODEL_FILE, CheckpointError, check_state_dict, checkpoint_folders,
                         latest_checkpoint, load_checkpoint, save_checkpoint)
from .config import TrainConfig
from .killpoints import kill_point
from .metrics import LOG_FILE, MetricsLog, fallback_rate_buffers, fallback_rates, fallback_summary, plot_runs
from .parallelize import (DistInfo, all_reduce_mean, check_device, full_state_dicts, load_optimizer_state, parallelize,
                          set_grad_sync, setup_distributed, teardown_distributed, unwrap)

__all__ = ["TrainResult", "train", "lr_at", "model_kwargs", "model_precision", "NonFiniteLossError",
           "TrainingStopped", "RunExistsError"]

# settings a resumed run must share with its checkpoint (others, e.g. max_steps or lr, may change)
RESUME_MUST_MATCH = ("model", "model_args", "precision", "tokenizer", "vocab_size", "seq_len", "seed")


class NonFiniteLossError(FloatingPointError):
    pass


class RunExistsError(ValueError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


class TrainingStopped(Exception):
    """SIGINT/SIGTERM stopped the run after a step; a checkpoint of that step was written."""

    def __init__(self, step: int, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped at step {step}; continue with resume=true")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]          # train loss per step run by this call (nan for skipped steps)
    val_loss: float | None
    checkpoint: Path | None
    seconds: float


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def _persistent_device_state(device: torch.device) -> None:
    """Allocate the INT8 kernels' persistent non-finite flag (`int8flow.kernels.nonfinite.device_flag`) now, in
    ordinary device memory. Allocated lazily by the first INT8 operator instead, under compile_mode=reduce-overhead
    that would happen inside cudagraph trees' warmup, in the graphs' private memory pool, where later replays may
    reuse its bytes."""
    if device.type == "cuda":
        from ..kernels import nonfinite  # torch only: no triton needed

        nonfinite.device_flag(device)


def _seed_step(seed: int, step: int, rank: int) -> None:
    digest = hashlib.blake2b(f"int8flow-rng:{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") >> 1)


def _default_data_dir(cfg: TrainConfig) -> Path:
    source = Path(cfg.data)
    tag = cfg.data if cfg.data.isidentifier() else f"{source.stem}-{hashlib.sha1(cfg.data.encode()).hexdigest()[:8]}"
    vocab = f"{cfg.vocab_size}" if cfg.tokenizer == "bpe" else ""
    return cfg.run_dir.parent / "_data" / f"{tag}-{Path(cfg.tokenizer).stem}{vocab}"


def load_data(cfg: TrainConfig, info: DistInfo, say: Callable | None = None) -> PreparedData:
    """A prepared folder as is; otherwise prepare (rank 0, cached by content) then open everywhere."""
    if (Path(cfg.data) / "meta.json").is_file():
        return load_prepared(cfg.data)
    folder = Path(cfg.data_dir) if cfg.data_dir else _default_data_dir(cfg)
    if info.is_main:
        ensure_prepared(cfg.data, folder, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, say=say)
    if info.distributed:
        dist.barrier()
    return load_prepared(folder)


def model_kwargs(cfg: TrainConfig, vocab_size: int, presets: dict) -> dict:
    """build_model overrides: vocabulary (padded to 64) and context length from the data, then model.*."""
    kwargs = {"vocab_size": -(-vocab_size // 64) * 64}
    preset = presets.get(cfg.model)
    if preset is not None:
        names = {f.name for f in dataclasses.fields(preset)}
        for context in ("block_size", "max_seq_len"):
            if context in names:
                kwargs[context] = cfg.seq_len
    kwargs.update(cfg.model_args)
    return kwargs


def model_precision(cfg: TrainConfig) -> str | Int8TrainingConfig:
    """What ``build_fn`` gets as ``precision``: the name; under ``parallel=ddp|fsdp2`` its config with
    ``nonfinite='propagate'``. An INT8 operator raising on one rank would leave the other ranks waiting in the
    gradient collectives (a hang); propagated, the fault reaches the loss and gradient norm, which are the
    same on every rank (loss all-reduced; gradients all-reduced by DDP, the norm of FSDP2's shards all-reduced
    by ``full_tensor``), so every rank takes the same skip/raise/bf16 decision."""
    if cfg.parallel == "none":
        return cfg.precision
    return Int8TrainingConfig.from_recipe_name(cfg.precision).with_(nonfinite="propagate")


def _precision_label(precision: str) -> str:
    """``bf16``, or an INT8 recipe with its blocks (``int8 1x128/128x128`` vs ``jetfire 32x32/32x32``)."""
    if precision == "bf16":
        return precision
    c = Int8TrainingConfig.from_recipe_name(precision)
    return f"{precision} {c.activation_block}/{c.weight_block}"


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2) decay, biases and norm weights do not (as in nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def _check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(f"{path}: checkpoint was made with {key}={saved.get(key)!r}, this run has "
                                  f"{key}={getattr(cfg, key)!r}; pass the same value or use a new out_dir")


def _uses_cudagraphs(cfg: TrainConfig) -> bool:
    """compile_mode=reduce-overhead: the compiled model replays CUDA graphs (cudagraph trees)."""
    return cfg.compile and cfg.compile_mode == "reduce-overhead"


def _keeps_grad_buffers(cfg: TrainConfig) -> bool:
    """CUDA graphs with gradient accumulation: a .grad first allocated by a graph replay lives in the graph's memory
    pool and the next micro-batch's replay overwrites it. Stable .grad buffers, allocated outside the graphs
    (`_stable_grads`) and zeroed rather than freed after each step, take the accumulation instead."""
    return _uses_cudagraphs(cfg) and cfg.grad_accum > 1


def _stable_grads(model) -> None:
    """A zeroed .grad for every trainable parameter without one (at the first step, and after the guards' re-runs,
    which clear the gradients to None)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _model_vocab(model) -> int | None:
    """The vocabulary the model's embedding takes (its config's ``vocab_size``), None for a model without one."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def _batch(tokens, chunk: torch.Tensor, cfg: TrainConfig, info: DistInfo, vocab: int | None):
    """(inputs, targets) on the run's device. The token-id range check runs here, on the host tensors before the
    host->device copy (one min/max of a few thousand ids on the CPU), instead of in the model's forward, where
    it costs a device->host sync per forward on CUDA (`check_token_ids`)."""
    if vocab is None or info.device.type != "cuda":
        return gather_batch(tokens, chunk, cfg.seq_len, info.device)
    x, y = gather_batch(tokens, chunk, cfg.seq_len, "cpu")
    check_token_ids(x, vocab)
    check_token_ids(y, vocab)  # targets too: an id past the vocabulary is a device-side assert in the loss
    return x.pin_memory().to(info.device, non_blocking=True), y.pin_memory().to(info.device, non_blocking=True)


def _forward_loss(model, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, info: DistInfo, vocab: int | None,
                  autocast) -> torch.Tensor:
    """The model's loss on (x, y). Under compile_mode=reduce-overhead each forward starts a new cudagraph-trees
    step (`torch.compiler.cudagraph_mark_step_begin`): the previous replay's outputs may then be overwritten, so
    callers consume the loss (accumulate it into a tensor of their own) before the next forward and keep no
    reference to it. The logits are dropped here (not kept alive through the backward)."""
    if _uses_cudagraphs(cfg):
        torch.compiler.cudagraph_mark_step_begin()
    checked = token_ids_checked_on_host() if vocab is not None and info.device.type == "cuda" \
        else contextlib.nullcontext()
    with checked, autocast():
        return model(x, y)[1]


@torch.no_grad()
def evaluate(model, data: PreparedData, cfg: TrainConfig, info: DistInfo, autocast, vocab: int | None = None) -> float:
    """Mean val loss over fixed windows (eval_batches x global batch), split evenly over ranks.

    Every window batch has batch_size rows (fixed shapes for CUDA graphs); the losses are summed into a tensor
    of the loop's own (no graph output outlives the next replay) and read once, at the end."""
    per_rank = cfg.eval_batches * cfg.batch_size * cfg.grad_accum
    offsets = eval_offsets(per_rank * info.world_size, len(data.val), cfg.seq_len)
    mine = offsets[info.rank * per_rank:(info.rank + 1) * per_rank]
    model.eval()
    total = torch.zeros((), device=info.device)
    try:
        for chunk in mine.split(cfg.batch_size):
            x, y = _batch(data.val, chunk, cfg, info, vocab)
            total += _forward_loss(model, x, y, cfg, info, vocab, autocast).float() * len(chunk)
    except NonFiniteError:  # an INT8 operator refused NaN/Inf: the val loss is not finite
        total.fill_(math.nan)
    finally:
        model.train()
    return all_reduce_mean(total / len(mine), info).item()


def _step_closure(model, data: PreparedData, offsets: torch.Tensor, cfg: TrainConfig, info: DistInfo, step: int,
                  autocast, vocab: int | None = None) -> Callable[[], torch.Tensor]:
    """Forward + backward of one step on this rank's windows; returns the rank's mean loss (a device tensor: the
    loop reads it once per step, with the gradient norm and the kernels' non-finite flag).

    Reseeds the RNG first, so a re-run (to locate a fault, or the bf16 recompute) sees the same dropout
    masks and stochastic-rounding seeds as the step itself. Each micro-batch's loss is added into ``loss_sum``
    (the loop's own tensor) right after its forward, before the next forward may replay a CUDA graph over it.
    """
    def run() -> torch.Tensor:
        _seed_step(cfg.seed, step, info.rank)
        if _keeps_grad_buffers(cfg):
            _stable_grads(model)
        loss_sum = torch.zeros((), device=info.device)
        for micro, chunk in enumerate(offsets.split(cfg.batch_size)):
            x, y = _batch(data.train, chunk, cfg, info, vocab)
            set_grad_sync(model, micro == cfg.grad_accum - 1)
            loss = _forward_loss(model, x, y, cfg, info, vocab, autocast)
            loss_sum += loss.detach().float()  # consumed now: the next micro-batch's replay reuses its memory
            (loss / cfg.grad_accum).backward()
            del loss
        return loss_sum / cfg.grad_accum
    return run


def _clip_grads_tensor(model, cfg: TrainConfig) -> torch.Tensor:
    """Clip the gradients; their norm before clipping as a device tensor (no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _clip_grads(model, cfg: TrainConfig) -> float:
    return float(_clip_grads_tensor(model, cfg))


_STOP_VOTE_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the signals `_StopSignals` handles, weakest first


def _forward_backward(model, run_step: Callable, cfg: TrainConfig, info: DistInfo,
                      signum: int = 0) -> tuple[float, float, str | None, int]:
    """(loss, clipped grad norm, fault, stop signal): an INT8 operator refusing NaN/Inf (``NonFiniteError``) ends
    the step with loss and grad norm NaN and its message as ``fault``; the caller applies the non-finite policy.
    The loss, the gradient norm and the kernels' non-finite flag reach the host in ONE copy, the step's only
    host sync. ``signum``: this rank's pending stop signal (0: none); under ddp/fsdp2 it rides the loss's
    all-reduce (`_reduce_loss_and_stop`) and the result is the signal every rank stops on, so stopping together
    costs no collective or host read of its own. Single process: ``signum`` itself."""
    try:
        loss = run_step()
    except NonFiniteError as err:
        loss, vote = _reduce_loss_and_stop(torch.full((), math.nan, device=info.device), signum, info)
        got, _ = _read_step([loss, *vote], info)
        return got[0], math.nan, str(err), _stop_from_vote(got[1:], signum, info)
    loss, vote = _reduce_loss_and_stop(loss, signum, info)
    norm = _clip_grads_tensor(model, cfg)
    got, flagged = _read_step([loss, norm, *vote], info)
    stop = _stop_from_vote(got[2:], signum, info)
    if flagged is not None:  # an INT8 kernel wrote a NaN/Inf block this step: the step is non-finite, named
        return math.nan, got[1], f"{flagged}", stop
    return got[0], got[1], None, stop


def _reduce_loss_and_stop(loss: torch.Tensor, signum: int, info: DistInfo) -> tuple[torch.Tensor, list]:
    """(mean loss over ranks, [ranks with SIGINT, ranks with SIGTERM] as device scalars) from ONE all-reduce of
    three floats; single process: (loss, []). Counted per signal, not summed as numbers: the mean of SIGINT (2)
    and SIGTERM (15) would be no signal at all (8, SIGFPE). The vote is built with ``torch.full`` (a fill
    kernel), not a host->device copy, so it adds no sync."""
    if not info.distributed:
        return loss, []
    v = torch.stack([loss.detach().float().reshape(())]
                    + [torch.full((), float(signum == sig), device=loss.device) for sig in _STOP_VOTE_SIGNALS])
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v[0] / info.world_size, list(v[1:])


def _stop_from_vote(vote: list, signum: int, info: DistInfo) -> int:
    """The signal every rank stops on: this rank's own when it has one, else the strongest signal another rank
    got (SIGTERM over SIGINT, as a MAX over signal numbers would pick); 0 when no rank has one."""
    if not info.distributed:
        return signum
    if signum:
        return signum
    return next((int(sig) for sig, count in zip(reversed(_STOP_VOTE_SIGNALS), reversed(vote)) if count > 0.5), 0)


def _read_step(values: list[torch.Tensor], info: DistInfo):
    """([the scalars as floats], what the INT8 kernels flagged or None) from ONE device->host copy.

    On CUDA the kernels do not check for NaN/Inf eagerly (that would cost a pass and a host sync per
    operator); they set a device flag (`int8flow.kernels.nonfinite`), read here together with the loss and
    gradient norm the loop reads anyway, and cleared asynchronously. Elsewhere the operators check eagerly:
    nothing to read.
    """
    row = [v.detach().float().reshape(1) for v in values]
    flag = None
    if info.device.type == "cuda":
        try:
            from ..kernels import nonfinite
        except ImportError:  # no triton: the reference path checks eagerly
            pass
        else:
            flag = nonfinite.device_flag(info.device)
            row.append(flag.float())
    got = torch.cat(row).tolist()
    if flag is None:
        return got, None
    from ..guards import device_nonfinite

    n = len(values)
    return got[:n], device_nonfinite(info.device, flag_values=got[n:])


def _recompute_high_precision(model, run_step: Callable, cfg: TrainConfig, info: DistInfo) -> tuple[float, float]:
    """The bf16 policy: the same step (same seed) with INT8 layers in high precision; (loss, grad norm)."""
    try:
        loss = recompute_high_precision(unwrap(model), run_step)
    except NonFiniteError:
        return math.nan, math.nan
    return all_reduce_mean(loss, info).item(), _clip_grads(model, cfg)


def _locate(model, run_step: Callable, fault: str | None, info: DistInfo) -> str:
    """Where a non-finite step went bad: one re-run (same seed) under NonFiniteTracker, plus parameters
    that hold NaN/Inf. Costs a forward + backward, on bad steps only. In a distributed run every rank
    locates its own part and the reports are gathered, labelled by rank, so the rank that caused the fault is
    named even though all of them see its NaN."""
    net = unwrap(model)
    events = locate_nonfinite(net, run_step)
    params = nonfinite_params(net)
    parts = [f"non-finite weights: {'; '.join(map(str, params[:3]))}"] if params else []
    if events:
        parts.append(f"first non-finite: {events[0]}")
        refused = next((e for e in events if e.note), None)  # an INT8 operator's refusal, naming the tensor
        if refused is not None and refused is not events[0]:
            parts.append(f"refused by {refused}")
    elif fault:
        parts.append(f"INT8 quantization refused: {fault.rstrip('.')}; not seen again when the step was re-run")
    found = ["; ".join(parts)]
    if info.distributed:
        reports = [None] * info.world_size
        dist.all_gather_object(reports, found[0])
        found = [f"rank {rank}: {report}" for rank, report in enumerate(reports) if report]
    return "; ".join(p for p in found if p) or "not seen again when the step was re-run (a transient fault)"


def train(cfg: TrainConfig, build_fn: Callable | None = None) -> TrainResult:
    """Run ``cfg``; ``build_fn(name, precision=..., **kwargs)`` defaults to int8flow.models.build_model.

    Nothing is written to the run folder until the settings, the data and the model (and the checkpoint to
    resume from) are valid. SIGINT / SIGTERM finish the running step, write a checkpoint and raise
    `TrainingStopped`; a second signal stops at once."""
    check_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = setup_distributed(cfg.parallel, cfg.device)
    finished = False
    try:
        result = _train(cfg, info, build_fn)
        finished = True
        return result
    except TrainingStopped:
        # every rank stops at the same step (the stop vote), so they all reach the barrier: rank 0 closes its log
        # and writes the plot before any rank exits with 128 + signal, which makes torchrun SIGTERM the others
        finished = True
        raise
    finally:
        teardown_distributed(finished)  # a barrier first only when this rank ended normally (or stopped on a signal)
        torch.set_num_threads(threads)


RUN_FILES = (LOG_FILE, "loss.png", "tokenizer.json", CKPT_DIR, "tensorboard")


def existing_run(run_dir: Path) -> str | None:
    """What of a previous run the folder holds (None when it holds none)."""
    if not run_dir.is_dir():
        return None
    ckpts = checkpoint_folders(run_dir)
    if ckpts:
        return f"checkpoints up to {ckpts[0].name}"
    log = run_dir / LOG_FILE
    if log.is_file() and log.stat().st_size:
        return "a training log"
    if any((run_dir / name).exists() for name in RUN_FILES):
        return "files of a run"
    return None


def _check_run_dir(cfg: TrainConfig) -> None:
    """Refuse to start over a previous run unless resume or overwrite says what to do with it."""
    held = existing_run(cfg.run_dir)
    if held and not (cfg.resume or cfg.overwrite):
        new = "out_dir=<another folder>" if cfg.out_dir else "name=<new name> (or out_dir=)"
        raise RunExistsError(f"{cfg.run_dir} already holds a run ({held}); continue it with resume=true, start "
                             f"another with {new}, or replace it with overwrite=true")


def _check_model(cfg: TrainConfig, build_fn: Callable, presets: dict) -> None:
    """Build the model on the meta device (no memory, no values): a bad model= or model.* fails here, before
    data preparation (seconds on a first run) and before anything is written."""
    try:
        with torch.device("meta"):
            build_fn(cfg.model, precision=model_precision(cfg), **model_kwargs(cfg, 64, presets))
    except TypeError as err:
        raise ValueError(f"model={cfg.model} with model.* settings {cfg.model_args}: {err}") from None


def _check_data_settings(cfg: TrainConfig) -> None:
    """data= and tokenizer= name something that exists (before any data preparation)."""
    from ..data import EMBEDDED_CORPORA

    if cfg.data not in EMBEDDED_CORPORA and not Path(cfg.data).expanduser().exists():
        raise FileNotFoundError(f"data={cfg.data}: does not exist; pass {' or '.join(EMBEDDED_CORPORA)} (embedded), "
                                "a text file or folder, or a folder made by `int8flow prepare`")
    if cfg.tokenizer not in ("bpe", "gpt2", "auto") and not Path(cfg.tokenizer).expanduser().exists():
        raise FileNotFoundError(f"tokenizer={cfg.tokenizer}: does not exist; pass bpe, gpt2, auto, a folder holding "
                                "encoder.json + vocab.bpe, or a tokenizers JSON file")


def _check_writable(cfg: TrainConfig) -> None:
    """The folders the run will write (the run folder's parent, the data cache) can be created, checked before the
    tokenizer is trained or any data prepared."""
    for what, folder in (("out_dir", cfg.run_dir.parent), ("data_dir", Path(cfg.data_dir) if cfg.data_dir else None)):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{what}: cannot create {folder} ({err.strerror}); pick a writable folder") from None
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{what}: {folder} is not writable; pick a writable folder")


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def _check_tokenizer(cfg: TrainConfig, data: PreparedData) -> None:
    """A run's tokenizer never changes under its checkpoints: resuming with data tokenized differently stops."""
    mine = cfg.run_dir / "tokenizer.json"
    if cfg.resume and mine.is_file() and checkpoint_folders(cfg.run_dir) \
            and not _same_file(mine, data.folder / "tokenizer.json"):
        raise ValueError(f"{mine} differs from the tokenizer of data={cfg.data} ({data.folder / 'tokenizer.json'}): "
                         "the run's checkpoints were trained with its own tokenizer; resume with the data it was "
                         "made with (recorded in its checkpoints' state.json) or train a new run (name=...)")


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _clear_run(run_dir: Path) -> None:
    """overwrite=true: remove the previous run's files (only those a run writes)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class _StopSignals:
    """SIGINT/SIGTERM -> a flag the loop reads after each step; a second signal raises KeyboardInterrupt at once.
    Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    SIGNALS = _STOP_VOTE_SIGNALS

    def __init__(self, say: Callable):
        self.signum, self.say, self.previous = 0, say, {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        self.say(f"int8flow: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
                 "(send it again to stop at once and lose the steps since the last checkpoint)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def stop_requested(self, vote: int, info: DistInfo) -> int:
        """The signal to stop on after this step (0: none). Single process: any signal received so far. Under
        ddp/fsdp2: ``vote``, what the ranks' signals were when the step's loss was all-reduced
        (`_forward_backward`), the same on every rank, so every rank stops at the same step; a signal that came
        later is in the next step's vote."""
        return self.signum if not info.distributed else vote


def _train(cfg: TrainConfig, info: DistInfo, build_fn: Callable | None) -> TrainResult:
    presets, custom_build = {}, build_fn is not None
    if build_fn is None:
        from ..models import MODEL_PRESETS as presets
        from ..models import build_model as build_fn
    say = print if info.is_main else (lambda *a, **k: None)
    t_start = time.perf_counter()
    run_dir, device = cfg.run_dir, info.device
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    # validate everything before writing anything: run folder, model, data, checkpoint
    _check_run_dir(cfg)
    if not custom_build:  # a caller's build_fn may not run on meta; it is still built before anything is written
        _check_model(cfg, build_fn, presets)
    _check_data_settings(cfg)
    _check_writable(cfg)
    data = load_data(cfg, info, say)
    _check_tokenizer(cfg, data)

    # model: same seed -> same initial weights in every precision mode
    torch.manual_seed(cfg.seed)
    kwargs = model_kwargs(cfg, data.vocab_size, presets)
    model = build_fn(cfg.model, precision=model_precision(cfg), **kwargs)

    # resume: weights before wrapping, optimizer state after
    ckpt = None
    if cfg.resume:
        path = cfg.resume_checkpoint
        if path is not None and not (path / "state.json").is_file():
            raise FileNotFoundError(f"resume_from={cfg.resume_from}: {path} is not a checkpoint folder; the run has "
                                    f"{', '.join(p.name for p in checkpoint_folders(run_dir)) or 'no checkpoints'}")
        path = path or latest_checkpoint(run_dir)
        if path is None:
            say(f"int8flow: resume=true but {run_dir} has no checkpoint yet; starting from step 0")
        else:
            ckpt = load_checkpoint(path)
            _check_resume_config(ckpt.state["config"], cfg, path)
            check_state_dict(ckpt.model, model.state_dict(), path / MODEL_FILE)
            model.load_state_dict(ckpt.model)
    start_step = ckpt.step if ckpt else 0
    end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    if ckpt is not None and start_step >= end_step:
        if start_step >= cfg.max_steps:
            say(f"int8flow: {cfg.name}: run complete at step {start_step}; raise max_steps to continue")
        else:
            say(f"int8flow: {cfg.name}: already at step {start_step} (stop_at={cfg.stop_at}); raise stop_at or "
                "drop it to continue")
        metrics = ckpt.state.get("metrics", {})
        return TrainResult(run_dir, start_step, [], metrics.get("val_loss"), ckpt.path, time.perf_counter() - t_start)

    # all valid: now the run folder changes, once every rank has checked it (a prepared data folder has no barrier
    # in load_data, and a rank still in _check_run_dir would find rank 0's new files: "already holds a run")
    if info.distributed:
        dist.barrier()
    if info.is_main:
        if cfg.overwrite:
            _clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not _same_file(run_dir / "tokenizer.json", data.folder / "tokenizer.json"):
            _copy_atomic(data.folder / "tokenizer.json", run_dir / "tokenizer.json")
    if info.distributed:
        dist.barrier()

    model.to(device)
    _persistent_device_state(device)  # before compile: never first allocated inside a CUDA graph's warmup
    vocab = _model_vocab(model)  # the token-id range check runs on the host, once per batch (`_batch`)
    model = parallelize(model, cfg.parallel, info, cfg.compile, cfg.compile_mode, cfg.compile_scope)
    optimizer = _build_optimizer(model, cfg, device)
    keep_grads = _keeps_grad_buffers(cfg)  # zeroed, not freed, after each step (`_stable_grads`)
    if ckpt is not None:
        load_optimizer_state(model, optimizer, ckpt.trainer["optimizer"])
    guard = {"loss_ema": None, "skips_in_a_row": 0, "skipped": 0, "fallbacks": 0, **(ckpt.state["guard"] if ckpt else {})}

    n_params = sum(p.numel() for p in unwrap(model).parameters())
    per_rank = cfg.batch_size * cfg.grad_accum
    tokens_per_step = per_rank * info.world_size * cfg.seq_len
    label = _precision_label(cfg.precision)
    reports_fallback = bool(fallback_rate_buffers(model))  # int8+fallback / jetfire+fallback: per-layer rates logged
    say(f"int8flow: {cfg.name}: {cfg.model} ({n_params / 1e6:.2f}M params, {label}) on {device}"
        f"{f' x{info.world_size} {cfg.parallel}' if info.distributed else ''}; data {data.folder} "
        f"({data.meta['train_tokens'] / 1e6:.2f}M train tokens, vocab {data.vocab_size}); "
        f"{tokens_per_step} tokens/step, steps {start_step}..{cfg.max_steps}")
    if _uses_cudagraphs(cfg) and device.type != "cuda":
        say(f"int8flow: note: compile_mode=reduce-overhead uses CUDA graphs, which need CUDA; on {device} the model "
            "is compiled without them")
    if cfg.warmup_steps > cfg.max_steps:
        say(f"int8flow: note: warmup_steps={cfg.warmup_steps} > max_steps={cfg.max_steps}: the learning rate never "
            f"reaches lr={cfg.lr} and never decays; set warmup_steps below max_steps for the usual schedule")

    log = MetricsLog(run_dir, ckpt.step if ckpt else None, cfg.tensorboard) if info.is_main else None
    if ckpt is None:
        val = evaluate(model, data, cfg, info, autocast, vocab)
        if log:
            log.log({"step": 0, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "tokens": 0, "time_s": 0.0})

    def save(step: int, metrics: dict) -> Path | None:
        model_sd, optim_sd = full_state_dicts(model, optimizer)  # collective under FSDP2
        path = None
        if info.is_main:
            state = {"config": cfg.to_dict(), "model_kwargs": kwargs, "metrics": metrics, "guard": guard,
                     "world_size": info.world_size, "data": data.meta}
            path = save_checkpoint(run_dir, step, model_sd, {"optimizer": optim_sd}, state, cfg.keep_checkpoints)
        if info.distributed:
            dist.barrier()
        return path

    # a progress bar on a terminal; otherwise (output to a file or pipe) one plain line per evaluation
    show = cfg.progress and info.is_main
    interactive = show and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not interactive, unit="step", dynamic_ncols=True)
    note = bar.write if info.is_main else (lambda *a, **k: None)
    losses, val, last_ckpt, rates = [], None, None, {}
    train_seconds = 0.0
    stopper = _StopSignals(lambda msg: print(msg, file=sys.stderr, flush=True) if info.is_main else None)
    stopped = 0
    t_prev_read = None  # CUDA step timing: when the previous step's loss was read (None: start from the step's start)
    with stopper:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = step_offsets(cfg.seed, step, per_rank * info.world_size, len(data.train), cfg.seq_len)
            run_step = _step_closure(model, data, offsets[info.rank * per_rank:(info.rank + 1) * per_rank], cfg, info,
                                     step, autocast, vocab)
            loss_val, grad_norm, fault, stop_vote = _forward_backward(model, run_step, cfg, info, stopper.signum)
            t_read = time.perf_counter()

            reason, fallback = None, None
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                if cfg.nonfinite == "bf16":
                    loss_val, grad_norm = _recompute_high_precision(model, run_step, cfg, info)
                    fallback = fault or "loss or gradient norm not finite"
                if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                    reason, fallback = "nonfinite", None
            if reason is None and cfg.spike_factor and guard["loss_ema"] is not None \
                    and loss_val > cfg.spike_factor * guard["loss_ema"]:
                reason = "spike"
            where = _locate(model, run_step, fault, info) if reason == "nonfinite" else None
            if reason is None:
                optimizer.step()
                guard["loss_ema"] = loss_val if guard["loss_ema"] is None else 0.9 * guard["loss_ema"] + 0.1 * loss_val
                guard["skips_in_a_row"] = 0
                guard["fallbacks"] += fallback is not None
            else:
                guard["skips_in_a_row"] += 1
                guard["skipped"] += 1
                if cfg.nonfinite == "raise" or guard["skips_in_a_row"] > cfg.max_skips:
                    raise NonFiniteLossError(
                        f"step {step + 1}: loss {loss_val}, grad norm {grad_norm} ({reason})"
                        + (f"; {where.rstrip('.')}" if where else "") + "; "
                        + ("nonfinite=raise" if cfg.nonfinite == "raise" else f"{guard['skips_in_a_row']} steps skipped "
                           f"in a row (max_skips={cfg.max_skips})") + "; lower lr or check the data")
            optimizer.zero_grad(set_to_none=not keep_grads)
            if device.type == "cuda":
                # No synchronize here: the loss read above is the step's only host sync. The GPU work between two
                # consecutive reads is one whole step (the previous optimizer step, this forward and backward), so
                # the time from the previous read to this one is the step's time; after anything that waited for
                # the GPU in between (evaluation, a checkpoint, a recomputed or located step) the clock restarts
                # at this step's start.
                dt = t_read - (t_prev_read if t_prev_read is not None else t0)
                t_prev_read = t_read if reason is None and fallback is None else None
            else:
                dt = time.perf_counter() - t0
            train_seconds += dt

            done = step + 1
            kill_point(f"step:{done}")
            losses.append(loss_val if reason is None else math.nan)
            record = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / dt, "tokens": done * tokens_per_step,
                      "time_s": round(time.perf_counter() - t_start, 3)}
            if reason:
                record["skipped"] = reason
                note(f"int8flow: step {done} skipped ({reason}): loss {loss_val}, grad norm {grad_norm}"
                          + (f"; {where}" if where else ""))
            if where:
                record["fault"] = where
            if fallback:
                record.update(fallback="bf16", fault=fallback)
                note(f"int8flow: step {done} recomputed in high precision (nonfinite=bf16): {fallback}")
            if done % cfg.eval_interval == 0 or done == end_step:
                if reports_fallback:  # read before evaluate(): its forwards overwrite the buffers
                    rates = fallback_rates(model, info)
                    record.update(fallback_summary(rates))
                val = evaluate(model, data, cfg, info, autocast, vocab)
                record.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
                t_prev_read = None
            if log:
                log.log(record)
            stopped = stopper.stop_requested(stop_vote, info) if done < end_step else 0
            if (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or done == end_step or stopped:
                last_ckpt = save(done, record) or last_ckpt
                t_prev_read = None
            bar.set_postfix(loss=f"{loss_val:.3f}", val=f"{val:.3f}" if val is not None else "-",
                            tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            bar.update(1)
            if show and not interactive and ("val_loss" in record or done == end_step):
                say(f"int8flow: step {done}/{cfg.max_steps} loss {loss_val:.4f}"
                    + (f" val {record['val_loss']:.4f}" if "val_loss" in record else "")
                    + f" | {tokens_per_step / dt:,.0f} tokens/s | {time.perf_counter() - t_start:.0f} s", flush=True)
            if stopped:
                break
    bar.close()

    seconds = time.perf_counter() - t_start
    if stopped:
        done = start_step + len(losses)
        if log:
            log.close()
            plot_runs([run_dir], run_dir / "loss.png", labels=[f"{cfg.name} ({cfg.precision})"])
        say(f"int8flow: stopped at step {done}; continue with resume=true (checkpoint {last_ckpt})")
        raise TrainingStopped(done, stopped, last_ckpt)
    if log:
        log.close()
        plot = plot_runs([run_dir], run_dir / "loss.png", labels=[f"{cfg.name} ({cfg.precision})"])
        ran = end_step - start_step
        early = end_step < cfg.max_steps  # stop_at: this session's part of the run, not the end of training
        say(f"int8flow: {cfg.name} {'paused' if early else 'done'}: {ran} steps "
            f"({ran * tokens_per_step / 1e6:.2f}M tokens) in "
            f"{seconds / 60:.1f} min, {ran * tokens_per_step / max(train_seconds, 1e-9):,.0f} tokens/s"
            + (f", {guard['skipped']} skipped" if guard["skipped"] else "")
            + (f", {guard['fallbacks']} recomputed in high precision" if guard["fallbacks"] else ""))
        if val is not None:
            ppl = math.exp(min(val, 50.0))
            say(f"int8flow: {'val' if early else 'final val'} loss {val:.4f} (perplexity {ppl:.1f}) at step {end_step}")
        if rates:
            worst = max(rates, key=rates.get)
            say(f"int8flow: fallback rate at step {end_step} (activation blocks with the 16-bit term, {len(rates)} "
                f"layers): mean {sum(rates.values()) / len(rates):.2%}, max {rates[worst]:.2%} ({worst})")
        say(f"int8flow: log {run_dir / 'log.jsonl'} | plot {plot} | checkpoint {last_ckpt}")
        if early:
            say(f"int8flow: stopped at step {end_step} of {cfg.max_steps} (stop_at); continue with resume=true")
    return TrainResult(run_dir, end_step, losses, val, last_ckpt, seconds)
