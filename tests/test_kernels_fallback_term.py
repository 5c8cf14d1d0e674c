"""The fused column fallback term (`kernels.fallback_term`): ``[term | x_q]`` in one launch, bit for bit the torch
composition of `ops.primitives.fallback_term` + `with_term` (CPU: Triton interpreter)."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install int8flow[test])")

from int8flow.config import Int8TrainingConfig  # noqa: E402
from int8flow.format import quantize  # noqa: E402
from int8flow.kernels import fallback_term as ft  # noqa: E402
from int8flow.ops import backend  # noqa: E402
from int8flow.ops import primitives as P  # noqa: E402
from int8flow.ops.fallback import (  # noqa: E402
    column_residual, gather_groups, gather_groups_q, group_capacity, select_groups,
)
import test_kernels_gemm  # noqa: E402
from test_kernels_gemm import DEVICE  # noqa: E402

poisoned = test_kernels_gemm.poisoned  # the fixture: NaN / -128 outputs of torch.empty, so unwritten elements show

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _input(M, K, seed, dtype=torch.float32):
    """Gaussian (M, K) with two outlier channels (x60) and scattered single outliers (1e3-2e3, distinct)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:2]] *= 60.0
    hits = torch.rand(M, -(-K // 128), generator=g) < 0.05
    rows, groups = hits.nonzero(as_tuple=True)
    x[rows, (groups * 128 + 7).clamp_max(K - 1)] = 1e3 * (1 + torch.rand(len(rows), generator=g))
    return x.to(dtype)


def _torch_composition(values, x_q, groups, flags, gathered=False):
    """Today's torch path: gather, residual, mask, quantize in 1xbk blocks, concatenate [term | x_q]."""
    bk = x_q.block.cols
    vals = values if gathered else gather_groups(values, groups, bk)
    r = column_residual(vals, gather_groups_q(x_q, groups), flags, groups, x_q.shape[1])
    return P.concat_k([quantize(r, x_q.block), x_q])


def _select(x_q, fraction, threshold=4.0, budget=1.0):
    ng = x_q.scale.shape[1]
    return select_groups(x_q.scale, threshold, budget, group_capacity(ng, fraction))


def _assert_same(got, want):
    assert got.shape == want.shape and got.scale.shape == want.scale.shape
    assert got.data.is_contiguous() and got.scale.is_contiguous()
    assert torch.equal(got.data.cpu(), want.data.cpu()), (got.data != want.data).nonzero()[:5]
    # scales bit for bit (an equal float compare would let -0.0 / 0.0 through)
    assert torch.equal(got.scale.cpu().view(torch.int32), want.scale.cpu().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", ["one", "all"])
@pytest.mark.parametrize("M,K,layout", [(48, 1000, "rows"), (37, 200, "rows"), (40, 1024, "cols"),
                                        (24, 640, "sliced")])
@pytest.mark.usefixtures("poisoned")
def test_fused_term_equals_the_torch_composition(M, K, layout, groups, dtype):
    """Data and scales bit for bit: K tails (1000, 200: a partial last group), G = 1 and G = all groups, strided x
    (a transposed view, a column slice). The term must be non-trivial (flagged blocks with non-zero codes)."""
    x = _input(M, K, seed=M + K, dtype=dtype)
    if layout == "cols":
        x = x.t().contiguous().t()  # column-major storage, stride (1, M)
    elif layout == "sliced":
        x = torch.cat([x, x[:, :64]], dim=1)[:, :K]  # row stride K + 64
    x = x.to(DEVICE)
    x_q = quantize(x, "1x128")
    g, flags = _select(x_q, 1.0 if groups == "all" else 1e-9)
    assert g.numel() == (x_q.scale.shape[1] if groups == "all" else 1)
    assert bool(flags.any())
    got = ft.fallback_column_term(x, x_q, g, flags)
    want = _torch_composition(x, x_q, g, flags)
    _assert_same(got, want)
    gk = g.numel() * 128
    assert bool(got.data[:, :gk].ne(0).any()) and bool(got.scale[:, :g.numel()].gt(0).any())


@pytest.mark.parametrize("K", [1000, 512])
@pytest.mark.usefixtures("poisoned")
def test_fused_term_takes_gathered_values(K):
    """``gathered=True``: the values of the chosen groups (M, G*bk) with garbage past K (a producer re-run may write
    anything there) equal the gather of the activation."""
    x = _input(33, K, seed=K).to(DEVICE)
    x_q = quantize(x, "1x128")
    g, flags = _select(x_q, 0.5)
    vals = gather_groups(x, g, 128)
    if K % 128:
        vals = torch.where(vals == 0, torch.full_like(vals, 1e30), vals)  # the zeros past K become garbage
    got = ft.fallback_column_term(vals, x_q, g, flags, gathered=True)
    _assert_same(got, _torch_composition(x, x_q, g, flags))


def test_fused_term_with_a_binding_budget_and_no_flags():
    """Few flags (budget binds) and none at all (a threshold nobody passes): zero blocks with scale 0."""
    x = _input(64, 768, seed=9).to(DEVICE)
    x_q = quantize(x, "1x128")
    for threshold, budget in ((4.0, 0.02), (1e9, 1.0)):
        g, flags = _select(x_q, 0.34, threshold, budget)
        got = ft.fallback_column_term(x, x_q, g, flags)
        _assert_same(got, _torch_composition(x, x_q, g, flags))
        if threshold == 1e9:
            assert not bool(got.data[:, :g.numel() * 128].any()) and not bool(got.scale[:, :g.numel()].any())


def test_fused_term_of_an_empty_activation():
    x = torch.empty(0, 384, device=DEVICE)
    x_q = quantize(x, "1x128")
    g, flags = _select(x_q, 0.5)
    got = ft.fallback_column_term(x, x_q, g, flags)
    assert got.shape == (0, 2 * 128 + 384) and got.scale.shape == (0, 2 + 3)
    _assert_same(got, _torch_composition(x, x_q, g, flags))


def test_fused_term_bad_inputs_name_the_fix():
    x = _input(16, 256, seed=1).to(DEVICE)
    x_q = quantize(x, "1x128")
    g, flags = _select(x_q, 0.5)
    cases = [
        (dict(x=x.to(torch.int32)), "x must be a float32/bfloat16/float16 tensor.*x.float"),
        (dict(x=x[:, :200]), r"x must have shape \(16, 256\)"),
        (dict(x=x, gathered=True), r"x must have shape \(16, 128\), the gathered values"),
        (dict(x_q=quantize(x, "32x32")), "needs 1xbk activation blocks"),
        (dict(x_q=x), "x_q must be a QTensor"),
        (dict(groups=g.int()), "groups must be a 1-D int64 tensor"),
        (dict(groups=torch.arange(3, device=DEVICE)), r"pass between 1 and 2"),
        (dict(flags=flags.float()), r"flags must be a bool tensor of shape \(16, 1\)"),
        (dict(flags=flags[:8]), r"flags must be a bool tensor of shape \(16, 1\)"),
        (dict(x=x.to("meta")), "x is on meta"),
    ]
    for change, match in cases:
        args = {**dict(x=x, x_q=x_q, groups=g, flags=flags), **change}
        with pytest.raises(ValueError, match=match):
            ft.fallback_column_term(args.pop("x"), args.pop("x_q"), args.pop("groups"), args.pop("flags"), **args)


# --- the ops layer: the dispatch takes the fused kernel on the kernel path ----------------------------------


@pytest.fixture
def kernel_term(monkeypatch):
    """The kernel path of the fused term alone (everything else stays on the reference): records its calls."""
    calls, real = [], backend.call

    def call(name, *args, **kwargs):
        if name == "fallback_column_term":
            calls.append(kwargs.get("gathered"))
            return ft.fallback_column_term(*args, **{k: v for k, v in kwargs.items() if k != "device"})
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backend, "uses_kernel", lambda name, device: name == "fallback_column_term")
    monkeypatch.setattr(backend, "call", call)
    return calls


@contextlib.contextmanager
def reference_path():
    """Every operator on the reference (the torch composition of the term) inside `kernel_term`'s test."""
    real = backend.uses_kernel
    backend.uses_kernel = lambda name, device: False
    try:
        yield
    finally:
        backend.uses_kernel = real


def test_ops_linear_path_builds_the_extended_operand_in_the_kernel(kernel_term):
    """`quantize_activation` + `operand` (the linear layer's path: x itself is the kernel's input): the fused
    kernel's operand is the torch path's bit for bit, the term a view of it, the rate the same; the GEMM through it
    equals the torch path's exactly."""
    if DEVICE != "cpu":
        pytest.skip("compares the CPU reference path against the interpreted kernel")
    cfg = Int8TrainingConfig(precision="int8+fallback", fallback_groups=0.25)
    x = _input(64, 1000, seed=4)
    w_q = quantize(torch.randn(48, 1000, generator=torch.Generator().manual_seed(5)) / 16, cfg.weight_block)
    with reference_path():
        x_q, term, rate = P.quantize_activation(x, cfg, "x")
        want = P.operand(x_q, term)[0]
        y_want = P.gemm([x_q, term], w_q, cfg=cfg)
    assert not kernel_term and term.a is None
    x_q2, term2, rate2 = P.quantize_activation(x, cfg, "x")
    assert kernel_term == [False] and term2.a is not None
    got = P.operand(x_q2, term2)[0]
    assert got.a is term2.a and torch.equal(got.groups, want.groups)
    _assert_same(got.a, want.a)
    assert torch.equal(term2.q.data, term.q.data) and torch.equal(term2.q.scale, term.q.scale)
    assert float(rate2) == float(rate) > 0
    torch.testing.assert_close(P.gemm([x_q2, term2], w_q, cfg=cfg), y_want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not belong to the activation"):
        P.with_term(quantize(x[:, :512], "1x128"), term2)


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_ops_flow_path_feeds_the_producer_rerun_to_the_kernel(activation, kernel_term):
    """norm -> fc1 -> act -> fc2 with outlier channels (the producer re-run's gathered values as the kernel's x,
    ``gathered=True``): the same output, rate and gradients as the torch composition, exactly."""
    if DEVICE != "cpu":
        pytest.skip("compares the CPU reference path against the interpreted kernel")
    from int8flow.ops import NormSpec, mlp_residual

    cfg = Int8TrainingConfig(precision="int8+fallback")
    D, F = 256, 384
    g = torch.Generator().manual_seed(6)
    norm_w = torch.ones(D)
    norm_w[7] = 60.0
    w_in = torch.randn(F, D, generator=g) / 16
    w_in[5] *= 40.0
    w_in.requires_grad_()
    w_out = (torch.randn(D, F, generator=g) / 16).requires_grad_()
    w_gate = (torch.randn(F, D, generator=g) / 16).requires_grad_() if activation == "swiglu" else None
    h = torch.randn(2, 16, D, generator=g)
    params = [p for p in (w_in, w_out, w_gate) if p is not None]

    def run():
        torch.manual_seed(0)
        out, rate = mlp_residual(h, NormSpec("rmsnorm", norm_w, None, 1e-6), w_in, None, w_out, None, activation,
                                 cfg, w_gate=w_gate)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out.detach(), rate, grads

    fused = run()
    assert kernel_term and all(kernel_term), kernel_term  # every term of the forward came from the kernel
    with reference_path():
        plain = run()
    assert float(fused[1]) == float(plain[1]) > 0
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    for a, b in zip(fused[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_term_compiles_for_sm90_without_spills():
    """The compiled path (sm_90 on the CPU, no GPU): no spills, and the dequantize multiply stays a rounded
    ``mul.rn.f32`` (the launch disables fp fusion; a contracted fma would change the residual's bits)."""
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    script = ("import json\nfrom int8flow.kernels import _hopper_check as h\n"
              "for a in ((2, 32), (2, 32, True, 'fp32'), (6, 86)):\n    print(json.dumps(h.fallback_term_variant(*a)))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 3
    for r in reports:
        assert r["stack_bytes"] == 0 and r["regs"] <= 64, r
        assert r["f32_mul_rn"] > 0, r


def test_launch_disables_fp_fusion():
    """The launch passes enable_fp_fusion=False (what the sm_90 check compiles); the interpreter ignores the option,
    so this reads the wrapper's source."""
    import inspect
    assert "enable_fp_fusion=False" in inspect.getsource(ft.fallback_column_term)


def test_kernel_path_builds_the_operand_in_one_launch(kernel_term):
    """Launches of `second_term` + `operand` (x_q given; K = 4096, G = 2), counted on CPU: aten ops that launch a CUDA
    kernel (views, allocations and wrapped Python scalars excluded) + Triton launches. The torch path (the term
    quantized by the Triton quantizer): 24 = select_groups and the rate 10 + gathers of x, x_q and its scales 5 (one
    launch for each gather's column indices: `group_columns` reuses a cached arange) + dequantize, residual and mask 6
    + the term's quantize 1 + the two concatenations 2 (32 before the cached arange); the fused path: the same 10 +
    one Triton launch."""
    if DEVICE != "cpu":
        pytest.skip("counts the interpreted launches")
    import triton.runtime.interpreter as ti
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"empty", "empty_strided", "lift_fresh", "detach", "alias", "scalar_tensor"}  # a wrapped scalar: no launch
    counts, inside = [], [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and not func.is_view and func.overloadpacket.__name__ not in free:
                counts.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    real = ti.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        counts.append("triton:" + self.fn.__name__)
        inside[0] += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            inside[0] -= 1

    cfg = Int8TrainingConfig(precision="int8+fallback")
    x = _input(16, 4096, seed=2)
    x_q = quantize(x, "1x128")
    runs = {}
    for path in ("torch", "fused", "torch", "fused"):  # the second run of each: the device flag exists by then
        counts.clear()
        with contextlib.ExitStack() as stack:
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            if path == "torch":  # today's kernel path: the term's quantize on the Triton quantizer, one launch
                mp.setattr(backend, "uses_kernel", lambda name, device: name == "quantize")
            mp.setattr(ti.GridExecutor, "__call__", launch)
            with Count():
                term, _ = P.second_term(x, x_q, cfg, "x")
                P.operand(x_q, term)
        runs[path] = list(counts)
    select = ["kthvalue", "clamp_min", "amax", "topk", "sort", "index_select", "gt", "sum", "div"]
    fused = runs["fused"]
    assert [n for n in fused if n.startswith("triton:")] == ["triton:_column_term_kernel"], fused
    assert len(fused) == 11 and all(n in select for n in fused if not n.startswith("triton:")), " ".join(fused)
    assert len(runs["torch"]) == 24, " ".join(runs["torch"])
