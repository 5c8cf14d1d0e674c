"""GPU tier: graph-safe stochastic-rounding seeds (``pytest -m gpu``; skipped without CUDA, tests/conftest.py).

Kernels read their base seed from a 1-element int64 device tensor and derive the Philox key on the device
(``int8flow.kernels._launch`` "seeds"), so a CUDA graph that draws the base seed inside the capture
(``torch.randint(..., device='cuda')``: captured RNG ops advance the generator's Philox offset on every replay)
rounds with fresh noise on each replay, and a replay equals an eager call given the same seed value.

* ``test_captured_quantize_fresh_noise_per_replay_and_matches_eager``: a stochastic quantize in ``torch.cuda.graph``;
* ``test_captured_stochastic_gemm_fresh_noise_per_replay_and_matches_eager``: a GEMM with a stochastically rounded
  INT8 output, on the default route (the Gluon kernel on sm_90) and on the Triton kernel;
* ``test_compiled_int8_linear_and_mlp_reduce_overhead_fresh_noise``: an ``Int8Linear`` and the fused MLP op under
  ``torch.compile(mode="reduce-overhead")``, forward + backward three times on the same inputs: the gradients
  (quantized with stochastic rounding) differ between steps, and stay close to the float gradients.
"""
import pytest
import torch

from int8flow.config import Int8TrainingConfig
from int8flow.kernels import gemm as kg
from int8flow.kernels import quantize as kq
from int8flow.nn import Int8Linear
from int8flow.ops import NormSpec, mlp_residual

pytestmark = pytest.mark.gpu


def _randn(shape, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda") * scale


def _draw():
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device="cuda")


def _capture(step):
    """Warm ``step`` up on a side stream (compiles and autotunes the kernels outside the capture), then capture one
    call in a CUDA graph; returns (graph, the call's static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    torch.cuda.synchronize()
    return graph, out


def _replay(graph, tensors):
    graph.replay()
    torch.cuda.synchronize()
    return [t.clone() for t in tensors]


def test_captured_quantize_fresh_noise_per_replay_and_matches_eager():
    x = _randn((512, 1024), 1)

    def step():
        seed = _draw()
        return seed, kq.quantize(x, "1x128", "stochastic", seed=seed, check_finite=False, salt=3)

    graph, (seed, q) = _capture(step)
    s1, d1, sc1 = _replay(graph, [seed, q.data, q.scale])
    s2, d2, _ = _replay(graph, [seed, q.data, q.scale])
    assert not torch.equal(s1, s2), "the seed drawn inside the capture must change between replays"
    assert not torch.equal(d1, d2), "two replays rounded with the same noise"
    eager = kq.quantize(x, "1x128", "stochastic", seed=s1, check_finite=False, salt=3)
    assert torch.equal(eager.data, d1) and torch.equal(eager.scale, sc1)
    assert torch.equal(sc1, kq.quantize(x, "1x128", check_finite=False).scale)  # scales do not depend on the noise
    # an int seed is frozen into the graph: the same noise on every replay (documented, not graph-safe-random)
    graph_int, q_int = _capture(lambda: kq.quantize(x, "1x128", "stochastic", seed=1234, check_finite=False))
    a, = _replay(graph_int, [q_int.data])
    b, = _replay(graph_int, [q_int.data])
    assert torch.equal(a, b) and torch.equal(a, kq.quantize(x, "1x128", "stochastic", seed=1234).data)


@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_captured_stochastic_gemm_fresh_noise_per_replay_and_matches_eager(kernel):
    a = kq.quantize(_randn((512, 1024), 2), "1x128", check_finite=False)
    b = kq.quantize(_randn((768, 1024), 3, 0.02), "128x128", check_finite=False)

    def step():
        seed = _draw()
        return seed, kg.block_gemm(a, b, out_block="1x128", rounding="stochastic", seed=seed, kernel=kernel, salt=1)

    graph, (seed, y) = _capture(step)
    s1, d1, sc1 = _replay(graph, [seed, y.data, y.scale])
    s2, d2, _ = _replay(graph, [seed, y.data, y.scale])
    assert not torch.equal(s1, s2)
    assert not torch.equal(d1, d2), "two replays rounded with the same noise"
    eager = kg.block_gemm(a, b, out_block="1x128", rounding="stochastic", seed=s1, kernel=kernel, salt=1)
    assert torch.equal(eager.data, d1) and torch.equal(eager.scale, sc1)


def _grads(step, params, runs=3):
    out = []
    for _ in range(runs):
        for p in params:
            p.grad = None
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous replay's outputs may be overwritten
        step()
        torch.cuda.synchronize()
        out.append([p.grad.detach().clone() for p in params])
    return out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_compiled_int8_linear_and_mlp_reduce_overhead_fresh_noise():
    torch._dynamo.reset()
    cfg = Int8TrainingConfig(precision="int8")
    assert cfg.grad_rounding == "stochastic"
    torch.manual_seed(0)
    # Int8Linear: y = x w^T + b; backward quantizes dy with stochastic rounding
    lin = Int8Linear(512, 768, config=cfg, device="cuda", dtype=torch.bfloat16)
    x = _randn((256, 512), 4).to(torch.bfloat16).requires_grad_()
    dy = _randn((256, 768), 5).to(torch.bfloat16)
    # the loss inside the compiled function (as the training loop does): d loss / d y = dy. One eager step first:
    # module-level caches (the device's non-finite flag, kernel compilations) must not be allocated inside the
    # cudagraph pool, where a live tensor that is no graph output is an error
    eager_lin = lambda: (lin(x).float() * dy.float()).sum()  # noqa: E731
    _grads(lambda: eager_lin().backward(), [x, lin.weight], runs=1)
    lin_loss = torch.compile(eager_lin, mode="reduce-overhead")
    lin_grads = _grads(lambda: lin_loss().backward(), [x, lin.weight])
    # the fused MLP op (norm -> fc1 -> GELU -> fc2 -> residual add): every backward GEMM output and gradient
    # quantizer rounds stochastically
    d, ff = 512, 1024
    h = _randn((256, d), 6).to(torch.bfloat16).requires_grad_()
    w_in = (_randn((ff, d), 7) * d ** -0.5).to(torch.bfloat16).requires_grad_()
    w_out = (_randn((d, ff), 8) * ff ** -0.5).to(torch.bfloat16).requires_grad_()
    norm = NormSpec("layernorm", None, None, 1e-5)
    dout = _randn((256, d), 9).to(torch.bfloat16)
    eager_mlp = lambda: (mlp_residual(h, norm, w_in, None, w_out, None, "gelu", cfg)[0].float()  # noqa: E731
                         * dout.float()).sum()
    _grads(lambda: eager_mlp().backward(), [h, w_in, w_out], runs=1)
    mlp_loss = torch.compile(eager_mlp, mode="reduce-overhead")
    mlp_grads = _grads(lambda: mlp_loss().backward(), [h, w_in, w_out])
    for grads in (lin_grads, mlp_grads):
        first, second, third = grads
        for g1, g2, g3 in zip(first, second, third):
            assert torch.isfinite(g1.float()).all()
            assert not torch.equal(g1, g2) and not torch.equal(g2, g3), "compiled steps rounded with the same noise"
            assert _rel(g1, g2) < 0.1  # the same gradient up to rounding noise
    # against the float gradients of the linear layer: INT8 error, not a broken seed stream
    xf, wf = x.detach().float(), lin.weight.detach().float()
    assert _rel(lin_grads[0][0], dy.float() @ wf) < 0.05
    assert _rel(lin_grads[0][1], dy.float().t() @ xf) < 0.05
