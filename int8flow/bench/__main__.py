"""``python -m int8flow.bench SUBCOMMAND``: each subcommand is a module of this package with
``add_arguments(parser)`` and ``main(args) -> int``; add one by listing it in SUBCOMMANDS."""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import NoCudaError

# name -> (module, help). Later benchmarks (blocks, train, accuracy) add their line here.
SUBCOMMANDS = {
    "kernels": ("int8flow.bench.kernels", "GEMM / quantize / memory-bound kernels vs cuBLAS BF16 and copy"),
    "blocks": ("int8flow.bench.blocks", "transformer-block stacks, forward + backward, every precision mode"),
    "train": ("int8flow.bench.train", "end-to-end training tokens/s and peak memory, BF16 vs our modes"),
    "accuracy": ("int8flow.bench.accuracy", "pretraining from scratch per mode: final validation loss and curves"),
    "gpu-check": ("int8flow.bench.gpu_check", "the whole test suite on a GPU machine + a quick benchmark -> JSON summary"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m int8flow.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    args = parser.parse_args(argv)
    try:
        return args._main(args)
    except NoCudaError as e:
        print(f"int8flow.bench {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
