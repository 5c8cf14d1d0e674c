"""GPU tier: the training loop on CUDA, eager and under CUDA graphs (``compile=true compile_mode=reduce-overhead``),
makes ONE host-device synchronization per step, and the CUDA-graph run trains like the eager one (``pytest -m gpu``).

Synchronizations are counted with ``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call
(``.item()``, ``.tolist()``, a device->host copy, ``torch.cuda.synchronize``, ``nonzero``, ...) emits a warning,
recorded here. Steps are delimited by the loop's per-step kill point (``loop.kill_point``, called once after each
step's ``zero_grad``), so the warnings between two consecutive kill points are exactly one step's: evaluation and
checkpoints run only after the last step here (eval_interval = max_steps, ckpt_interval = 0). The one expected
sync is the loop's read of the loss, gradient norm and the INT8 kernels' non-finite flag (one ``.tolist()``).
The first WARM steps are not counted: torch.compile, Triton autotuning and the cudagraph-trees warmup and
recording synchronize while they run.

Tiny Llama: 2 layers of width 256 (the INT8 kernels' 128-blocks divide every GEMM dimension), 4 x 128 tokens a
micro-batch, 2 micro-batches a step (gradient accumulation: the CUDA-graph run keeps stable .grad buffers).

Eager vs CUDA graphs, same seed, same batches, same initial weights. They are not bit-equal: inductor fuses the
high-precision parts (embedding, RoPE, attention glue, final norm, loss) and rounds their bf16 intermediates in
other places than eager, and the INT8 operators' stochastic rounding of gradients turns such differences into
different roundings. The thresholds follow tests/test_gpu_models.py: there, one INT8 forward's loss is within 2%
of a float32 twin's; here both runs carry INT8 noise, so step 1 (same weights, same batch: the forward's noise
only) must agree within 2% and every later step within 4% (the two trajectories drift apart a little with each
update at lr 1e-3, 8 steps). The gradient norms (one number over all parameters, averaging the rounding noise)
within 10%. A broken graph (a replay reading a stale batch, gradients overwritten between micro-batches, a
frozen stochastic-rounding seed turning into a bias) shows up as a loss off by far more or a non-finite one.
"""
import math
import warnings

import pytest
import torch

from _training_fixtures import prepared_tokens
from int8flow.training import TrainConfig, read_log, train

pytestmark = pytest.mark.gpu

STEPS, WARM = 8, 3
SYNC_WARNING = "synchronizing CUDA operation"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_tokens(tmp_path_factory, docs=3, chars=60_000, vocab_size=384)


def _config(data_dir, out, compile_mode=None, precision="int8", compile_scope="model") -> TrainConfig:
    return TrainConfig(model="llama-tiny", precision=precision, compile_scope=compile_scope, data=str(data_dir),
                       out_dir=str(out),
                       model_args=dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512),
                       seq_len=128, batch_size=4, grad_accum=2, max_steps=STEPS, warmup_steps=2, lr=1e-3, min_lr=1e-4,
                       eval_interval=STEPS, eval_batches=1, ckpt_interval=0, progress=False, tensorboard=False,
                       device="cuda", seed=11, compile=compile_mode is not None,
                       compile_mode=compile_mode or "default")


def _train_counting_syncs(cfg: TrainConfig, monkeypatch) -> tuple[list[int], list[float], list[dict]]:
    """(synchronizations in each of steps 2..STEPS, train losses, step records of the log)."""
    import int8flow.training.loop as loop

    torch._dynamo.reset()
    caught, marks = [], []

    def count() -> int:
        return sum(SYNC_WARNING in str(w.message) for w in caught)

    monkeypatch.setattr(loop, "kill_point", lambda name: marks.append(count()))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        caught = got
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(marks) == STEPS
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # per_step[i]: step i + 2
    records = [r for r in read_log(cfg.run_dir) if "loss" in r]
    return per_step, result.losses, records


@pytest.fixture(scope="module")
def eager_run(data_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return _train_counting_syncs(_config(data_dir, tmp_path_factory.mktemp("eager")), mp)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def graphs_run(data_dir, tmp_path_factory):
    from torch._dynamo.utils import counters

    counters.clear()
    mp = pytest.MonkeyPatch()
    try:
        run = _train_counting_syncs(_config(data_dir, tmp_path_factory.mktemp("graphs"), "reduce-overhead"), mp)
    finally:
        mp.undo()
    return (*run, dict(counters["inductor"]))


def test_eager_int8_step_syncs_once(eager_run):
    per_step, losses, _ = eager_run
    assert all(math.isfinite(x) for x in losses), losses
    # steps WARM+1..STEPS: only the loss / grad-norm / non-finite-flag read (one .tolist())
    assert per_step[WARM - 1:] == [1] * (STEPS - WARM), per_step


def test_reduce_overhead_int8_step_syncs_once_and_uses_cuda_graphs(graphs_run):
    per_step, losses, _, inductor = graphs_run
    assert all(math.isfinite(x) for x in losses), losses
    assert inductor.get("cudagraph_skips", 0) == 0, f"inductor skipped CUDA graphs: {inductor}"
    assert per_step[WARM - 1:] == [1] * (STEPS - WARM), per_step


def test_reduce_overhead_trains_like_eager(eager_run, graphs_run):
    _, eager, eager_log, *_ = eager_run
    _, graphs, graphs_log, _ = graphs_run
    assert len(eager) == len(graphs) == STEPS
    rel = [abs(a - b) / abs(a) for a, b in zip(eager, graphs)]
    assert rel[0] <= 0.02, (eager, graphs)
    assert max(rel) <= 0.04, (eager, graphs)
    assert eager[-1] < eager[0] and graphs[-1] < graphs[0], (eager, graphs)  # both learn
    for a, b in zip(eager_log, graphs_log):
        assert a["step"] == b["step"]
        assert math.isfinite(b["grad_norm"]) and abs(a["grad_norm"] - b["grad_norm"]) <= 0.1 * a["grad_norm"], (a, b)


@pytest.mark.parametrize("precision, scope", [("int8+fallback", "model"), ("int8", "blocks")])
def test_reduce_overhead_variants_sync_once_and_use_cuda_graphs(data_dir, tmp_path, monkeypatch, precision, scope):
    """The fallback's group selection (median, top-k on the device) and regional compilation (compile_scope=blocks:
    one CUDA graph per block call, the embedding, head and loss eager between them) keep the step at one host
    sync, with no graph skipped, and train (finite losses that go down). The per-layer fallback rates (buffers the
    replays update in place) are read at the last step only, after its kill point: outside the counted steps."""
    from torch._dynamo.utils import counters

    counters.clear()
    cfg = _config(data_dir, tmp_path / "run", "reduce-overhead", precision=precision, compile_scope=scope)
    per_step, losses, records = _train_counting_syncs(cfg, monkeypatch)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert [r["step"] for r in records if "fallback_rate" in r] == ([STEPS] if precision == "int8+fallback" else [])
    if precision == "int8+fallback":
        rates = records[-1]["fallback_rate"]
        assert list(rates) == ["model.layers.0.mlp", "model.layers.1.mlp"], rates
        assert all(0 <= r <= 1 for r in rates.values()), rates
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, f"inductor skipped CUDA graphs: {counters['inductor']}"
    assert per_step[WARM - 1:] == [1] * (STEPS - WARM), per_step
