"""``python -m int8flow.train [PRESET] [--config FILE] [key=value ...]``: the same as ``int8flow train``;
this is the form torchrun launches (``torchrun --nproc_per_node=N -m int8flow.train parallel=ddp``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
