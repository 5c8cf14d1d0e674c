"""Test-only: SIGKILL this process at a named point, so tests can check that a killed run resumes exactly.

``INT8FLOW_TEST_KILL_AT`` names the point; unset (normal use) nothing happens, at the cost of one
environment lookup per point reached. Points:

  step:N                  after step N's optimizer update, before the step is logged or checkpointed
  ckpt:FILE               inside a checkpoint write, just before FILE is written: model.safetensors,
                          trainer.pt, state.json (all into the temporary folder), or latest (the folder is
                          already renamed into place, the ``latest`` pointer not yet moved)
  ckpt:step_NNNNNN/FILE   the same, only in the write of that checkpoint

``INT8FLOW_TEST_SIGNAL_AT=step:N@R`` instead sends SIGTERM to this process at point step:N when it is rank R
(the ``RANK`` torchrun sets; 0 without it): one rank of a ddp/fsdp2 run receiving a stop signal alone.
"""
from __future__ import annotations

import os
import signal
import sys

__all__ = ["KILL_ENV", "SIGNAL_ENV", "kill_point"]

KILL_ENV = "INT8FLOW_TEST_KILL_AT"
SIGNAL_ENV = "INT8FLOW_TEST_SIGNAL_AT"


def kill_point(*names: str) -> None:
    """SIGKILL this process (no cleanup, no ``finally``) when ``INT8FLOW_TEST_KILL_AT`` is one of ``names``;
    SIGTERM (the handled stop signal) when ``INT8FLOW_TEST_SIGNAL_AT`` names one of them and this rank."""
    sig_at = os.environ.get(SIGNAL_ENV)
    if sig_at:
        point, _, rank = sig_at.partition("@")
        if point in names and int(rank or 0) == int(os.environ.get("RANK", "0")):
            os.kill(os.getpid(), signal.SIGTERM)
    at = os.environ.get(KILL_ENV)
    if not at:
        return
    if not at.startswith(("step:", "ckpt:")):
        raise ValueError(f"{KILL_ENV}={at!r}: expected step:N or ckpt:FILE (test-only; unset it for real runs)")
    if at in names:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
