"""Run configurations as data: one frozen dataclass, named presets, TOML files and key=value overrides.

Precedence: preset defaults < ``--config file.toml`` < ``key=value`` on the command line. Keys
``model.X`` (or a ``[model]`` table in TOML) go to ``build_model(..., X=value)``. The data order is a
function of (seed, step) only, so runs that differ only in ``precision`` see the same batches.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import PRECISIONS, RECIPES
from ..guards import POLICIES as NONFINITE

__all__ = ["TrainConfig", "RUN_PRESETS", "PRECISIONS", "COMPILE_MODES", "COMPILE_SCOPES", "make_config", "parse_overrides", "load_toml",
           "settings_help"]

PARALLEL = ("none", "ddp", "fsdp2")
# torch.compile's modes that the loop supports; reduce-overhead = CUDA graphs (cudagraph trees)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# what torch.compile wraps: the whole model, or each transformer block (regional compilation: identical blocks share
# one compiled graph, so compile time does not grow with depth; embedding, final norm, head and loss stay eager)
COMPILE_SCOPES = ("model", "blocks")


def _setting(default, help: str, **kw):
    """A TrainConfig field with its meaning, which `int8flow train --help` prints (`settings_help`)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; validated on construction (bad values name the key and the fix)."""

    name: str = _setting("tiny", "run name: the run folder is runs/<name> unless out_dir is set")
    # model
    model: str = _setting("gpt-tiny", "model preset (int8flow.models.MODEL_PRESETS); model.X=... overrides a field")
    model_args: dict = _setting(dict, "build_model overrides, set as model.X=value or a [model] TOML table")
    precision: str = _setting("bf16", "bf16 | int8-linear | int8 | int8+fallback (1x128 activation/gradient and "
                                        "128x128 weight blocks), or a recipe: jetfire / jetfire+fallback / "
                                        "jetfire-linear (the paper's 32x32 blocks), int8-1x128 / int8+fallback-1x128 "
                                        "/ int8-linear-1x128 (docs/models.md)")
    # data
    data: str = _setting("shakespeare", "the embedded corpus, a text file/folder (prepared and cached) or a "
                                        "folder made by `int8flow prepare`")
    data_dir: str = _setting("", "where prepared tokens are cached (empty: _data/<source>-<tokenizer> beside the run "
                                 "folder, e.g. runs/_data/...)")
    tokenizer: str = _setting("bpe", "bpe (trained on the corpus) | gpt2 | auto | a GPT-2 file folder | a "
                                     "tokenizer JSON")
    vocab_size: int = _setting(2048, "ids of a trained BPE (tokenizer=bpe), 257..65535")
    val_fraction: float = _setting(0.1, "tail of each document held out for validation")
    seq_len: int = _setting(128, "tokens per sequence (the model's context length)")
    batch_size: int = _setting(16, "sequences per micro-batch per process")
    grad_accum: int = _setting(1, "micro-batches per optimizer step per process")
    # optimization (AdamW, fp32 master weights, linear warmup then cosine to min_lr)
    max_steps: int = _setting(800, "optimizer steps of the schedule (cosine decay ends here)")
    lr: float = _setting(2e-3, "peak learning rate (AdamW)")
    min_lr: float = _setting(2e-4, "learning rate at max_steps")
    warmup_steps: int = _setting(30, "linear warmup steps")
    weight_decay: float = _setting(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _setting(0.9, "AdamW beta1")
    beta2: float = _setting(0.95, "AdamW beta2")
    grad_clip: float = _setting(1.0, "clip the gradient norm to this (0 = off)")
    # guard against non-finite losses and spikes
    nonfinite: str = _setting("skip", "a step with NaN/Inf: skip (drop it) | raise (stop) | bf16 (recompute it in "
                                      "high precision)")
    spike_factor: float = _setting(0.0, "also skip a step whose loss > factor x running mean (0 = off)")
    max_skips: int = _setting(20, "stop after this many consecutive skipped steps")
    # evaluation, logs, checkpoints
    eval_interval: int = _setting(100, "steps between validation-loss evaluations")
    eval_batches: int = _setting(8, "validation windows = eval_batches x global batch")
    ckpt_interval: int = _setting(200, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = _setting(2, "newest checkpoints kept")
    out_dir: str = _setting("", "run folder (empty: runs/<name>)")
    resume: bool = _setting(False, "continue the run in the run folder from its latest checkpoint")
    resume_from: str = _setting("", "continue from this checkpoint instead: a step number (e.g. 600) or a "
                                    "checkpoint folder; implies resume=true")
    overwrite: bool = _setting(False, "replace an existing run in the run folder (its log and checkpoints are "
                                      "deleted once the new run's settings, data and model are valid)")
    stop_at: int = _setting(0, "stop (with a checkpoint) after this step; the schedule still spans max_steps "
                               "(0 = off)")
    tensorboard: bool = _setting(True, "write TensorBoard events too when tensorboard is importable")
    progress: bool = _setting(True, "show progress: a bar on a terminal, a plain line per evaluation otherwise")
    # system
    seed: int = _setting(1337, "seed of the initial weights, the batches, dropout and stochastic rounding")
    device: str = _setting("auto", "auto (cuda if present) | cpu | cuda | cuda:N")
    threads: int = _setting(0, "CPU threads for torch ops (0 = torch's default; the tiny preset uses 1)")
    compile: bool = _setting(False, "torch.compile the model")
    compile_mode: str = _setting("default", "torch.compile mode when compile=true: default | reduce-overhead (CUDA "
                                            "graphs: CUDA only, fixed shapes) | max-autotune-no-cudagraphs; a mode "
                                            "other than default needs compile=true")
    compile_scope: str = _setting("model", "what compile=true compiles: model (one graph) | blocks (each transformer "
                                           "block; identical blocks share one compiled graph: compile time flat in "
                                           "depth; the embedding, head and loss run eagerly)")
    parallel: str = _setting("none", "none | ddp | fsdp2 (launch with torchrun)")

    def __post_init__(self):
        def bad(key, value, expected):
            raise ValueError(f"{key}={value!r}: expected {expected}")

        for key, choices in (("precision", tuple(RECIPES)), ("parallel", PARALLEL), ("nonfinite", NONFINITE),
                             ("compile_mode", COMPILE_MODES), ("compile_scope", COMPILE_SCOPES)):
            if getattr(self, key) not in choices:
                bad(key, getattr(self, key), f"one of {', '.join(choices)}")
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                    "keep_checkpoints", "max_skips"):
            if getattr(self, key) < 1:
                bad(key, getattr(self, key), "an integer >= 1")
        for key in ("warmup_steps", "ckpt_interval", "stop_at", "seed", "threads"):
            if getattr(self, key) < 0:
                bad(key, getattr(self, key), "an integer >= 0")
        if not self.lr > 0:
            bad("lr", self.lr, "a learning rate > 0")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", self.min_lr, f"0 <= min_lr <= lr ({self.lr})")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                bad(key, getattr(self, key), "a value in [0, 1)")
        for key in ("weight_decay", "grad_clip", "spike_factor"):
            if getattr(self, key) < 0:
                bad(key, getattr(self, key), "a value >= 0")
        if self.spike_factor and self.spike_factor <= 1:
            bad("spike_factor", self.spike_factor, "0 (off) or a factor > 1, e.g. 3")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", self.val_fraction, "a fraction in (0, 1), e.g. 0.1")
        if not 257 <= self.vocab_size <= 65535:
            bad("vocab_size", self.vocab_size, "257..65535 (byte-level BPE, uint16 token files)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", self.device, "auto, cpu, cuda or cuda:N")
        if not self.name or "/" in self.name:
            bad("name", self.name, "a non-empty run name without '/'")
        if not isinstance(self.model_args, dict):
            bad("model_args", self.model_args, "a table of build_model overrides")
        if self.resume_from:
            object.__setattr__(self, "resume", True)
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other: resume continues the run "
                             "in the run folder, overwrite replaces it; pass one of them")
        for key, what, default in (("compile_mode", "mode", "default"), ("compile_scope", "scope", "model")):
            if getattr(self, key) != default and not self.compile:
                raise ValueError(f"{key}={getattr(self, key)} needs compile=true (the {what} applies to "
                                 f"torch.compile only); pass compile=true or drop {key}")

    @property
    def resume_checkpoint(self) -> Path | None:
        """The checkpoint folder ``resume_from`` names (None: the run's latest)."""
        if not self.resume_from:
            return None
        text = self.resume_from.strip()
        if text.isdigit():
            return self.run_dir / "checkpoints" / f"step_{int(text):06d}"
        return Path(text).expanduser()

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_GPU = dict(device="auto", tokenizer="gpt2", seq_len=1024, eval_interval=250, eval_batches=20,
            ckpt_interval=1000, warmup_steps=200, lr=6e-4, min_lr=6e-5)

RUN_PRESETS: dict[str, dict[str, Any]] = {
    # the default: ~1M-parameter GPT on the embedded Shakespeare, a few minutes on 2 CPU cores
    # (one thread: ops this small gain nothing from more, and lose a lot when cores are shared)
    "tiny": dict(name="tiny", model="gpt-tiny", threads=1),
    "gpt2-124m": dict(_GPU, name="gpt2-124m", model="gpt2-124m", batch_size=16, grad_accum=4, max_steps=5000),
    "gpt2-350m": dict(_GPU, name="gpt2-350m", model="gpt2-350m", batch_size=8, grad_accum=8, max_steps=5000,
                      lr=3e-4, min_lr=3e-5),
    "llama-60m": dict(_GPU, name="llama-60m", model="llama-60m", batch_size=32, grad_accum=2, max_steps=5000,
                      seq_len=512, lr=1e-3, min_lr=1e-4),
    "llama-350m": dict(_GPU, name="llama-350m", model="llama-350m", batch_size=16, grad_accum=4,
                       max_steps=5000, lr=3e-4, min_lr=3e-5),
    "llama-1b": dict(_GPU, name="llama-1b", model="llama-1b", batch_size=4, grad_accum=16, max_steps=5000,
                     lr=2e-4, min_lr=2e-5, parallel="fsdp2"),
}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _parse_value(key: str, text: str, kind: Any) -> Any:
    """Command-line text -> the field's type (``kind`` None: guess int, float, bool, else str)."""
    lowered = text.strip().lower()
    if kind is bool or (kind is None and lowered in ("true", "false")):
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}={text!r}: expected true or false")
    for cast in ((kind,) if kind in (int, float) else (int, float) if kind is None else ()):
        try:
            return cast(text)
        except ValueError:
            if kind is not None:
                raise ValueError(f"{key}={text!r}: expected {'an integer' if kind is int else 'a number'}") from None
    return text


def _field_type(key: str) -> Any:
    return {"int": int, "float": float, "bool": bool, "str": str}.get(str(_FIELDS[key].type), str)


def _unknown(key: str) -> ValueError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    hint = f"; did you mean {close[0]}?" if close else "; use model.<name>=... for model settings"
    return ValueError(f"unknown config key {key!r}{hint}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=1e-3', 'model.n_layer=2'] -> {'lr': 0.001, 'model_args': {'n_layer': 2}}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value, e.g. precision=int8 or max_steps=100")
        if key.startswith("model."):
            out.setdefault("model_args", {})[key[len("model."):]] = _parse_value(key, text, None)
        elif key == "preset":
            out["preset"] = text.strip()
        elif key == "model_args" or key not in _FIELDS:
            raise _unknown(key)
        else:
            out[key] = _parse_value(key, text, _field_type(key))
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML run file: top-level config keys, an optional ``preset``, an optional ``[model]`` table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML ({err})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "model" and isinstance(value, dict):
            out["model_args"] = dict(value)
        elif key == "preset" or (key in _FIELDS and key != "model_args"):
            kind = _field_type(key) if key in _FIELDS else str
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{path}: {key} = {value!r}: expected {kind.__name__}")
            out[key] = value
        else:
            raise ValueError(f"{path}: {_unknown(key)}")
    return out


def make_config(preset: str | None = None, toml_path: str | Path | None = None,
                overrides: list[str] | None = None) -> TrainConfig:
    """Preset < TOML file < command-line overrides; ``model_args`` tables merge key by key."""
    from_file = load_toml(toml_path) if toml_path else {}
    from_cli = parse_overrides(overrides or [])
    name = preset or from_cli.pop("preset", None) or from_file.pop("preset", None) or "tiny"
    from_file.pop("preset", None)
    if name not in RUN_PRESETS:
        raise ValueError(f"unknown run preset {name!r}; expected one of {', '.join(RUN_PRESETS)}")
    merged = dict(RUN_PRESETS[name])
    model_args: dict[str, Any] = {}
    for layer in (from_file, from_cli):
        model_args.update(layer.pop("model_args", {}))
        merged.update(layer)
    return TrainConfig(**merged, model_args=model_args)


def settings_help() -> str:
    """Every TrainConfig key with its default and meaning (what `int8flow train --help` lists)."""
    lines = ["settings (key=value; defaults of the tiny preset, other presets change some):"]
    for f in fields(TrainConfig):
        if f.name == "model_args":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = repr(default) if isinstance(default, str) else str(default).lower() if isinstance(default, bool) \
            else default
        preset = RUN_PRESETS["tiny"].get(f.name)
        if preset is not None and preset != default:
            shown = f"{shown} (tiny: {preset})"
        lines.append(f"  {f.name} = {shown}\n      {f.metadata.get('help', '')}")
    lines.append("  model.X = value\n      a field of the model config (e.g. model.n_layer=2), see docs/models.md")
    lines.append("presets: " + ", ".join(RUN_PRESETS) + " (tiny is the default)")
    return "\n".join(lines)
