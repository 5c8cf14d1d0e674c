"""Benchmarks of int8flow on a CUDA GPU: ``python -m int8flow.bench SUBCOMMAND`` (see ``--help``)."""
