"""``int8flow`` command line: train, prepare, sample, export, plot.

    int8flow train                                   # tiny GPT on the embedded Shakespeare, a few CPU minutes
    int8flow train gpt2-124m precision=int8 data=DIR # a preset, then key=value overrides
    int8flow train --config run.toml max_steps=100
    int8flow prepare texts/ more.txt --out data/mine --tokenizer gpt2
    int8flow sample runs/tiny --prompt "ROMEO:"
    int8flow export runs/tiny --format hf --out tiny.safetensors
    int8flow plot runs/tiny runs/tiny-int8 --out cmp.png
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _train(args) -> None:
    from .training import make_config, train

    positional = [a for a in args.items if "=" not in a]
    if len(positional) > 1:
        raise ValueError(f"at most one preset name, got {positional}; settings are key=value")
    cfg = make_config(positional[0] if positional else None, args.config,
                      [a for a in args.items if "=" in a])
    train(cfg)


def _prepare(args) -> None:
    from .data import prepare

    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction)
    print(f"int8flow: {meta['documents']} documents -> {args.out}: train.bin {meta['train_tokens']:,} tokens, "
          f"val.bin {meta['val_tokens']:,} tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}); "
          f"train on it with `int8flow train data={args.out}`")


def _sample(args) -> None:
    from .training.inference import sample_text

    print(sample_text(args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k or None, args.seed,
                      args.device, args.precision))


def _export(args) -> None:
    from .training.inference import export_weights

    out = export_weights(args.checkpoint, args.format, args.out)
    print(f"int8flow: wrote {out} ({args.format} names, bf16)")


def _plot(args) -> None:
    from .training import plot_runs

    print(f"int8flow: wrote {plot_runs(args.runs, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int8flow", description="Fully quantized INT8 training of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: tiny GPT on the embedded Shakespeare)",
                       description="Train. Settings: [PRESET] [--config FILE.toml] [key=value ...]; "
                                   "model.X=value goes to the model config. Presets: tiny (default), gpt2-124m, "
                                   "gpt2-350m, llama-60m, llama-350m, llama-1b.")
    p.add_argument("items", nargs="*", metavar="PRESET|key=value")
    p.add_argument("--config", help="TOML run file (top-level keys, optional preset, optional [model] table)")
    p.set_defaults(func=_train)

    p = sub.add_parser("prepare", help="tokenize text files/folders into train.bin/val.bin (uint16) + meta.json")
    p.add_argument("inputs", nargs="+", help="text files or folders (searched for .txt/.md/.rst/.text)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (train a byte-level BPE here), gpt2, auto, a folder with encoder.json + vocab.bpe, "
                        "or a tokenizers JSON file (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=2048, help="ids of a trained BPE (default: 2048)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of each document for val (default: 0.1)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder or run folder (its latest checkpoint)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", help="run the model in another precision mode than it was trained in")
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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"int8flow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the training guard gave up (nonfinite=raise or max_skips)
        print(f"int8flow {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
