"""Triton kernels of the INT8 data flow (GPU). Import submodules directly; nothing here imports triton."""
