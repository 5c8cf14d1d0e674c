import os

import pytest
import torch

# Triton picks interpreted vs compiled when a kernel is defined (at import): without a GPU, every test module
# that imports int8flow.kernels must see the interpreter, whichever module imports them first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
