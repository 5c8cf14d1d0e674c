"""Benchmarks: `python -m int8flow.bench kernels|blocks|...` (GPU; each writes JSON under bench/results/)."""
