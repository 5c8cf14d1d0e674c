"""compile_mode on the CPU: it reaches model.compile, reduce-overhead marks a cudagraph-trees step before every
forward (training micro-batches and evaluation), and the loop's CUDA-graph measures (stable .grad buffers under
gradient accumulation) leave the results unchanged. torch.compile itself is stubbed: these check the loop's
plumbing; tests/test_gpu_training_graphs.py runs the real thing on CUDA."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _training_fixtures import prepared_tokens
from int8flow.models.gpt2 import check_token_ids, token_ids_checked_on_host
from int8flow.training import TrainConfig, read_log, train
from int8flow.training.loop import _batch
from int8flow.training.parallelize import DistInfo, parallelize


class CountingLM(nn.Module):
    """A small LM that logs each forward (train or eval) into ``events``."""

    def __init__(self, vocab_size, events, n_embd=32, poison_calls=()):
        super().__init__()
        self.poison_calls, self.train_calls = set(poison_calls), 0
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.mlp = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, n_embd), nn.GELU())
        self.head = nn.Linear(n_embd, vocab_size)
        self.events = events

    def forward(self, idx, targets=None):
        self.events.append("forward")
        x = self.wte(idx)
        logits = self.head(x + self.mlp(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        if self.training:
            self.events.append(all(p.grad is not None for p in self.parameters()))  # .grad buffers present
            self.train_calls += 1
            if self.train_calls in self.poison_calls:
                loss = loss * float("nan")
        return logits, loss


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_tokens(tmp_path_factory, docs=2, chars=30_000, vocab_size=300)


@pytest.fixture
def stub_compile(monkeypatch):
    """torch.nn.Module.compile -> record the mode, compile nothing."""
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: modes.append(kw.get("mode", "<none>")))
    return modes


@pytest.fixture
def events(monkeypatch):
    """Forwards and cudagraph-trees step marks, in the order they happen."""
    seen = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: seen.append("mark"))
    return seen


def _config(data_dir, out, **kw):
    base = dict(data=str(data_dir), out_dir=str(out), seq_len=16, batch_size=4, grad_accum=3, max_steps=5,
                warmup_steps=1, eval_interval=2, eval_batches=2, ckpt_interval=0, progress=False, tensorboard=False,
                device="cpu", threads=1, seed=3)
    return TrainConfig(**{**base, **kw})


def _run(data_dir, out, events, poison_calls=(), **kw):
    cfg = _config(data_dir, out, **kw)
    result = train(cfg, lambda name, precision="bf16", vocab_size=256, **_: CountingLM(vocab_size, events,
                                                                                      poison_calls=poison_calls))
    return cfg, result


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_mode_reaches_model_compile(mode, stub_compile):
    model = nn.Linear(4, 4)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    assert parallelize(model, "none", info, True, mode) is model
    assert stub_compile == [mode]
    parallelize(model, "none", info, False, "default")  # compile=false: nothing compiled
    assert stub_compile == [mode]


def test_train_passes_compile_mode(data_dir, tmp_path, stub_compile):
    _run(data_dir, tmp_path / "a", [], compile=True, compile_mode="max-autotune-no-cudagraphs", max_steps=1)
    _run(data_dir, tmp_path / "b", [], compile=True, max_steps=1)
    _run(data_dir, tmp_path / "c", [], max_steps=1)
    assert stub_compile == ["max-autotune-no-cudagraphs", "default"]


def test_reduce_overhead_marks_a_step_before_every_forward(data_dir, tmp_path, stub_compile, events, capsys):
    cfg, result = _run(data_dir, tmp_path / "run", events, compile=True, compile_mode="reduce-overhead")
    assert stub_compile == ["reduce-overhead"]
    n_eval = 1 + cfg.max_steps // cfg.eval_interval + (cfg.max_steps % cfg.eval_interval != 0)  # step 0, 2, 4, 5
    forwards = cfg.max_steps * cfg.grad_accum + n_eval * cfg.eval_batches * cfg.grad_accum
    assert events.count("forward") == forwards
    marks = [e for e in events if e in ("mark", "forward")]
    assert marks == ["mark", "forward"] * forwards  # exactly one mark, right before each forward
    assert all(e for e in events if isinstance(e, bool))  # grad_accum=3: stable .grad buffers in every forward
    assert all(math.isfinite(x) for x in result.losses)
    assert "CUDA graphs, which need CUDA" in capsys.readouterr().out  # on the CPU it says the mode does nothing


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_other_modes_do_not_mark_steps(data_dir, tmp_path, stub_compile, events, mode):
    _run(data_dir, tmp_path / "run", events, compile=True, compile_mode=mode, max_steps=2)
    assert "mark" not in events and events.count("forward") > 0
    assert False in events  # .grad freed after each step (no stable buffers without CUDA graphs)


def test_reduce_overhead_loop_gives_the_same_run(data_dir, tmp_path, stub_compile, events):
    """With compilation stubbed, the reduce-overhead loop (step marks, .grad buffers kept and zeroed rather than
    freed under gradient accumulation) trains bit for bit like the plain loop: the same losses, val loss and
    logged grad norms."""
    _, plain = _run(data_dir, tmp_path / "plain", [])
    _, graphs = _run(data_dir, tmp_path / "graphs", events, compile=True, compile_mode="reduce-overhead")
    assert graphs.losses == plain.losses and graphs.val_loss == plain.val_loss
    norms = [[r["grad_norm"] for r in read_log(tmp_path / name) if "grad_norm" in r] for name in ("plain", "graphs")]
    assert norms[0] == norms[1] and all(n > 0 for n in norms[0])
    logged = [r for r in read_log(tmp_path / "graphs") if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in logged)


def test_token_ids_checked_on_host_skips_only_the_range_check():
    ids = torch.tensor([[0, 5, 300]])
    with pytest.raises(ValueError, match="largest token id, 300"):
        check_token_ids(ids, 256)
    with token_ids_checked_on_host():
        check_token_ids(ids, 256)  # the caller vouches for the range
        with pytest.raises(TypeError, match="integer tensor"):
            check_token_ids(ids.float(), 256)
    with pytest.raises(ValueError):
        check_token_ids(ids, 256)  # the context ended


def test_cuda_batches_are_range_checked_on_the_host_before_the_copy():
    """On CUDA the loop checks token ids on the host tensors, before pinning and copying: an out-of-range id is
    refused with the model's message without any device work (so this runs on a CPU-only machine too)."""
    import numpy as np

    tokens = np.arange(100, dtype=np.uint16)
    cfg = TrainConfig(seq_len=8, batch_size=2)
    info = DistInfo(0, 1, 0, torch.device("cuda"))
    with pytest.raises(ValueError, match="largest token id, 9[0-9]"):
        _batch(tokens, torch.tensor([0, 90]), cfg, info, vocab=64)


def test_reduce_overhead_loop_after_the_guard_cleared_the_gradients(data_dir, tmp_path, stub_compile, events):
    """nonfinite=bf16: a poisoned micro-batch makes the guard clear the gradients (to None) and recompute the step;
    the recompute and the steps after it get stable .grad buffers again and the run equals the plain loop's."""
    kw = dict(nonfinite="bf16", poison_calls=(5,))  # step 2, second micro-batch
    _, plain = _run(data_dir, tmp_path / "plain", [], **kw)
    events.clear()
    _, graphs = _run(data_dir, tmp_path / "graphs", events, compile=True, compile_mode="reduce-overhead", **kw)
    assert [r.get("fallback") for r in read_log(tmp_path / "graphs") if "loss" in r].count("bf16") == 1
    assert graphs.losses == plain.losses and all(math.isfinite(x) for x in graphs.losses)
    assert all(e for e in events if isinstance(e, bool))  # the recompute and later steps found .grad buffers too


# --- compile_scope: the whole model or each transformer block (regional compilation) -------------------------------

def test_compile_scope_blocks_compiles_each_block_and_not_the_model(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append((self, kw.get("mode"))))
    model = nn.Sequential(nn.Embedding(8, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]), nn.Linear(4, 8))
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    assert parallelize(model, "none", info, True, "reduce-overhead", "blocks") is model
    assert compiled == [(block, "reduce-overhead") for block in model[1]]
    compiled.clear()
    parallelize(model, "none", info, True, "default", "model")
    assert compiled == [(model, "default")]


def test_compile_scope_blocks_refuses_a_model_without_blocks():
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="no nn.ModuleList of transformer blocks.*compile_scope=model"):
        parallelize(nn.Linear(4, 4), "none", info, True, "default", "blocks")


def test_compile_scope_blocks_compiles_one_graph_and_matches_eager():
    """Regional compilation for real (inductor on the CPU): a 3-layer int8 Llama compiles ONE graph for its
    three blocks (dynamo's unique_graphs). The forward rounds to nearest, so the loss equals the eager model's up
    to float32 reassociation by inductor's fused glue (RoPE, residual adds): rtol 1e-4. The backward rounds
    gradients stochastically and inductor replaces torch.randint with its own generator, so the compiled run
    draws other seeds than eager: each parameter's gradient agrees only up to two independent INT8 roundings,
    SQNR >= 20 dB (the gate of tests/test_gpu_models.py against float32; 35 dB and up seen here), where a wrong
    block (another block's weights, a missing block) gives ~0 dB."""
    from torch._dynamo.utils import counters

    from int8flow.models import LlamaConfig, build_model
    from _inputs import sqnr_db

    cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=3, n_heads=2, n_kv_heads=2, ffn_dim=160, max_seq_len=32)
    torch.manual_seed(0)
    eager = build_model(cfg, "int8")
    regional = build_model(cfg, "int8")
    regional.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    parallelize(regional, "none", DistInfo(0, 1, 0, torch.device("cpu")), True, "default", "blocks")
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, regional):
        torch.manual_seed(5)  # the same stochastic-rounding seeds in both
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.detach())
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    for (name, p), q in zip(eager.named_parameters(), regional.parameters()):
        assert sqnr_db(p.grad, q.grad) >= 20, name
    torch._dynamo.reset()
