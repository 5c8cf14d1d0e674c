"""The one place that decides how the Triton kernels run under test.

* No CUDA GPU: Triton's CPU interpreter (``TRITON_INTERPRET=1``); kernel tests use CPU tensors.
* A CUDA GPU: the compiled kernels (``TRITON_INTERPRET=0``); kernel tests use CUDA tensors, and the
  tests marked ``gpu`` (real shapes, models, training) run too.

Triton reads the variable when a kernel is defined (at import), so it must be set here, before any test
module imports ``int8flow.kernels``; no test module sets it. Test modules ask
``int8flow.kernels._launch.interpreting()`` (or ``DEVICE`` below) which mode they are in.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ["TRITON_INTERPRET"] = "0" if HAS_CUDA else "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
