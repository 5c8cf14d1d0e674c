"""Under ddp/fsdp2 a stop signal travels with the step's loss all-reduce: one collective and one host read a
step, and every rank decides the same (the torchrun test in test_training_distributed.py runs it end to end)."""
import signal

import pytest
import torch

from int8flow.training import loop
from int8flow.training.parallelize import DistInfo

TWO = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def collectives(monkeypatch):
    """dist.all_reduce as if the other ranks contributed ``other`` (loss, ranks with SIGINT, ranks with SIGTERM)."""
    calls = []

    def fake(t, op=None):
        calls.append((t.numel(), op))
        t.add_(torch.tensor(calls_other[0], dtype=t.dtype))

    calls_other = [[3.0, 0.0, 0.0]]
    monkeypatch.setattr(loop.dist, "all_reduce", fake)
    return calls, calls_other


def _step(signum, info):
    model = torch.nn.Linear(4, 2)

    def run_step():
        loss = model(torch.ones(3, 4)).square().mean()
        loss.backward()
        return loss.detach()

    cfg = loop.TrainConfig(grad_clip=1.0)
    return loop._forward_backward(model, run_step, cfg, info, signum), model


def test_one_all_reduce_carries_loss_and_stop_vote(collectives, monkeypatch):
    calls, other = collectives
    reads = []
    real = loop._read_step
    monkeypatch.setattr(loop, "_read_step", lambda values, info: reads.append(len(values)) or real(values, info))
    (loss, norm, fault, stop), model = _step(0, TWO)
    assert calls == [(3, torch.distributed.ReduceOp.SUM)]  # loss and the vote: one collective of three floats
    assert reads == [4]  # loss, grad norm, vote (2): one read
    assert stop == 0 and fault is None
    own = model(torch.ones(3, 4)).square().mean().item()
    assert loss == pytest.approx((own + 3.0) / 2)  # the mean over the two ranks


def test_the_other_ranks_signal_stops_this_one(collectives):
    calls, other = collectives
    other[0] = [1.0, 0.0, 1.0]  # SIGTERM on the other rank
    (_, _, _, stop), _ = _step(0, TWO)
    assert stop == signal.SIGTERM
    (_, _, _, stop), _ = _step(signal.SIGINT, TWO)  # its own signal wins for the exit code
    assert stop == signal.SIGINT


def test_single_process_needs_no_collective(collectives):
    calls, _ = collectives
    (_, _, _, stop), _ = _step(signal.SIGINT, ONE)
    assert calls == [] and stop == signal.SIGINT


def test_mixed_signals_give_a_real_signal_on_every_rank(collectives):
    """SIGINT on one rank, SIGTERM on another: a rank without a signal stops on SIGTERM (not on the mean of the two
    numbers, 8 = SIGFPE, exit code 136)."""
    _, other = collectives
    other[0] = [2.0, 1.0, 1.0]  # two other ranks: one SIGINT, one SIGTERM
    (_, _, _, stop), _ = _step(0, TWO)
    assert stop == signal.SIGTERM
    other[0] = [2.0, 2.0, 0.0]  # SIGINT only
    (_, _, _, stop), _ = _step(0, TWO)
    assert stop == signal.SIGINT
    (_, _, _, stop), _ = _step(signal.SIGINT, TWO)  # its own wins
    assert stop == signal.SIGINT


def test_a_stopped_run_meets_the_others_at_the_teardown_barrier(monkeypatch):
    """TrainingStopped is a coordinated end (every rank stops at the same step): teardown takes the barrier, so
    no rank exits with 128 + signal (and makes torchrun SIGTERM the rest) while rank 0 still writes its log and
    plot. Other errors skip it (the other ranks may never arrive)."""
    seen = []
    monkeypatch.setattr(loop, "check_device", lambda device: None)
    monkeypatch.setattr(loop, "setup_distributed", lambda parallel, device: TWO)
    monkeypatch.setattr(loop, "teardown_distributed", lambda finished=False: seen.append(finished))
    for err in (loop.TrainingStopped(3, signal.SIGTERM, None), RuntimeError("x")):
        monkeypatch.setattr(loop, "_train", lambda cfg, info, build_fn, err=err: (_ for _ in ()).throw(err))
        with pytest.raises(type(err)):
            loop.train(loop.TrainConfig())
    assert seen == [True, False]
