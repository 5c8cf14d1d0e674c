"""``int8flow`` command line: train, prepare, sample, export, plot.

    int8flow train                                   # tiny GPT on the embedded Shakespeare, a few CPU minutes
    int8flow train gpt2-124m precision=int8 data=DIR # a preset, then key=value overrides
    int8flow train --config run.toml max_steps=100
    int8flow prepare texts/ more.txt --out data/mine --tokenizer gpt2
    int8flow sample runs/tiny --prompt "ROMEO:"
    int8flow export runs/tiny --format hf --out tiny.safetensors
    int8flow plot runs/tiny runs/tiny-int8 --out cmp.png

Every option is checked before any work starts: a bad one stops with one line naming the option, the value
and the fix, and exit status 2. SIGINT/SIGTERM during training finish the step, write a checkpoint and exit
with 128 + the signal number (130 for Ctrl-C).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


class UsageError(ValueError):
    """A bad command-line option: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the option, the value, the fix) and exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("int8flow")
    except Exception:  # not installed (run from a source tree)
        from . import __version__

        return __version__


# --- option checks (each raises UsageError naming the option, the value and the fix) ---------------------


def _positive_int(option: str, value: int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{option} {value}: expected an integer >= {0 if allow_zero else 1}"
                         + (" (0 = off)" if allow_zero else ""))


def _existing(option: str, path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{option} {path}: does not exist; pass {what}")
    return p


def _precision(value: str | None) -> None:
    from .config import RECIPES

    if value is not None and value not in RECIPES:
        raise UsageError(f"--precision {value!r}: expected one of {', '.join(RECIPES)}")


def _device(value: str) -> None:
    from .training.parallelize import check_device

    try:
        check_device(value, option="--device")
    except ValueError as err:
        raise UsageError(str(err)) from None


def _out_file(option: str, value: str, suffix: str) -> None:
    out = Path(value).expanduser()
    if out.suffix.lower() != suffix:
        raise UsageError(f"{option} {value}: expected a {suffix} file name, e.g. {out.with_suffix(suffix).name}")
    if out.is_dir():
        raise UsageError(f"{option} {value}: is a folder; name a {suffix} file in it")


# --- verbs ---------------------------------------------------------------------------------------------


def _train(args) -> None:
    from .training import make_config, train

    positional = [a for a in args.items if "=" not in a]
    if len(positional) > 1:
        raise UsageError(f"at most one preset name, got {positional}; settings are key=value")
    if args.config:
        _existing("--config", args.config, "a TOML run file")
    cfg = make_config(positional[0] if positional else None, args.config,
                      [a for a in args.items if "=" in a])
    train(cfg)


def _prepare(args) -> None:
    from .data import prepare

    for item in args.inputs:
        _existing("input", item, "text files or folders")
    if not 257 <= args.vocab_size <= 65535:
        raise UsageError(f"--vocab-size {args.vocab_size}: expected 257..65535 (byte-level BPE, uint16 token files)")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction {args.val_fraction}: expected a fraction in (0, 1), e.g. 0.1")
    if Path(args.out).is_file():
        raise UsageError(f"--out {args.out}: is a file; name a folder for train.bin/val.bin")
    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, say=print)
    print(f"int8flow: {meta['documents']} documents -> {args.out}: train.bin {meta['train_tokens']:,} tokens, "
          f"val.bin {meta['val_tokens']:,} tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}); "
          f"train on it with `int8flow train data={args.out}`")


def _sample(args) -> None:
    from .training.inference import sample_text

    _existing("checkpoint", args.checkpoint, "a run folder (e.g. runs/tiny) or a checkpoints/step_* folder")
    _positive_int("--tokens", args.tokens, allow_zero=True)
    _positive_int("--top-k", args.top_k, allow_zero=True)
    if not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: expected > 0 (e.g. 0.8; lower = more predictable)")
    _device(args.device)
    _precision(args.precision)
    print(sample_text(args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k or None, args.seed,
                      args.device, args.precision))


def _export(args) -> None:
    from .training.inference import export_weights

    _existing("checkpoint", args.checkpoint, "a run folder (e.g. runs/tiny) or a checkpoints/step_* folder")
    _out_file("--out", args.out, ".safetensors")
    out = export_weights(args.checkpoint, args.format, args.out)
    print(f"int8flow: wrote {out} ({args.format} names, bf16)")


def _plot(args) -> None:
    from .training import plot_runs

    for run in args.runs:
        _existing("run", run, "run folders holding log.jsonl (e.g. runs/tiny)")
    _out_file("--out", args.out, ".png")
    print(f"int8flow: wrote {plot_runs(args.runs, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    from .training.config import settings_help

    parser = _Parser(prog="int8flow", description="Fully quantized INT8 training of transformers.")
    parser.add_argument("--version", action="version", version=f"int8flow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (default: tiny GPT on the embedded Shakespeare)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train. Settings: [PRESET] [--config FILE.toml] [key=value ...]; later sources "
                                   "override earlier ones (preset < TOML < command line).",
                       epilog=settings_help())
    p.add_argument("items", nargs="*", metavar="PRESET|key=value")
    p.add_argument("--config", help="TOML run file (top-level keys, optional preset, optional [model] table)")
    p.set_defaults(func=_train)

    p = sub.add_parser("prepare", help="tokenize text files/folders into train.bin/val.bin (uint16) + meta.json")
    p.add_argument("inputs", nargs="+", help="text files or folders (searched for .txt/.md/.rst/.text)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (train a byte-level BPE here), gpt2, auto, a folder with encoder.json + vocab.bpe, "
                        "or a tokenizers JSON file (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=2048, help="ids of a trained BPE, 257..65535 (default: 2048)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of each document for val (default: 0.1)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder or run folder (its latest checkpoint)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more predictable (default: 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample from the k likeliest tokens; 0 = all (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", help="run the model in another precision mode than it was trained in "
                                       "(bf16, int8-linear, int8, int8+fallback)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="write a plain BF16 state dict (safetensors) with nanoGPT or HF names")
    p.add_argument("checkpoint", help="checkpoint folder or run folder")
    p.add_argument("--format", choices=("nanogpt", "hf"), required=True)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=_export)

    p = sub.add_parser("plot", help="overlay the loss curves of runs in one PNG")
    p.add_argument("runs", nargs="+", help="run folders (each with log.jsonl)")
    p.add_argument("--out", required=True, help="output .png")
    p.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .training.loop import TrainingStopped

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:  # user errors (CheckpointError too): one line, no traceback
        print(f"int8flow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the training guard gave up (nonfinite=raise or max_skips)
        print(f"int8flow {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as stop:  # SIGINT/SIGTERM: the step finished and a checkpoint was written
        return stop.exit_code
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print(f"int8flow {args.command}: interrupted; steps since the last checkpoint are lost "
              "(continue with resume=true)" if args.command == "train" else f"int8flow {args.command}: interrupted",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
