"""The warp-specialized Gluon INT8 GEMM (int8flow.kernels.gluon_gemm) and block_gemm's route to it.

CPU (CI): the module imports, the route picks Triton under the interpreter, the wrapper refuses what it
cannot run with the fix, and the kernel compiles for sm_90 without a GPU (int8 wgmma, no spills,
setmaxnreg). GPU (``-m gpu``, sm_90): results against the float64 reference.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
pytest.importorskip("triton", reason="the Triton kernels need triton (pip install int8flow[test])")

from int8flow import format as fmt  # noqa: E402
from int8flow.kernels import gemm as kg  # noqa: E402
from int8flow.kernels import gluon_gemm as gg  # noqa: E402
from int8flow.kernels._launch import interpreting  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
needs_gluon = pytest.mark.skipif(not gg.available(), reason=f"Gluon is not importable: {gg.GLUON_IMPORT_ERROR}")
on_hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                               reason="needs an sm_90 GPU")


def operand(rows, cols, block, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, cols), generator=g) / (torch.randn((3, rows, cols), generator=g).pow(2).mean(0)).sqrt()
    if cols > 2:
        x[:, 1] *= 30.0
    return fmt.quantize(x.to(device), block)


def test_module_constants_are_consistent():
    assert gg.BK == gg.G == 128 and gg.HALF == 64 and set(gg.REGS) == {2, 3}
    # two epilogue buffers plus the ring fit in shared memory, at least double-buffered
    for dt in (torch.float32, torch.bfloat16, torch.int8):
        for nc in gg.REGS:
            for sb_smem in (False, True):  # with staged per-column scales each stage also holds BN float32
                s = gg.stages_for(dt, nc, sb_smem)
                ring = s * ((nc * gg.HALF + gg.BN) * gg.BK + (4 * gg.BN if sb_smem else 0))
                assert s >= 2 and ring + nc * gg.HALF * gg.BN * torch.empty((), dtype=dt).element_size() <= gg.SMEM_BUDGET
    # registers: every partition's warpgroup fits the register file at the launch cap, and after setmaxnreg
    for nc, (cap, consumer, producer) in gg.REGS.items():
        assert (nc + 1) * 128 * cap <= 65536
        assert nc * consumer + producer <= (nc + 1) * cap and consumer % 8 == 0 and producer >= 24
    assert gg.default_consumers(False) in gg.REGS and gg.default_consumers(True) == 2


def test_route_on_cpu_is_triton_and_kernel_argument_checked():
    a, b = operand(64, 256, "1x128", 1), operand(32, 256, "128x128", 2)
    kernel, why = kg.route(a, b)
    if interpreting():
        assert kernel == "triton" and "interpreter" in why
    assert kg.route(a, b, kernel="triton") == ("triton", "asked for")
    with pytest.raises(ValueError, match="kernel must be one of"):
        kg.route(a, b, kernel="cuda")
    if interpreting():
        with pytest.raises(ValueError, match="kernel='gluon'"):
            kg.block_gemm(a, b, kernel="gluon")
        kg.block_gemm(a, b)
        assert kg.last_route[0] == "triton"


def test_k_major_problem_names_the_fix():
    q = operand(256, 256, "128x128", 3, device="cpu")
    assert gg.k_major_problem(q.data, "b.data") is None
    why = gg.k_major_problem(q.data.t(), "b.data")
    assert "not K-major" in why and "quantize_transposed" in why and "contiguous" in why
    storage = torch.zeros((256, 264), dtype=torch.int8)
    assert "16-byte" in gg.k_major_problem(storage[:, :250], "a.data")


def test_unsupported_reasons():
    a, b = operand(64, 256, "1x128", 4, device="cpu"), operand(32, 256, "128x128", 5, device="cpu")
    why = gg.unsupported(a, b, torch.float32, None)
    assert why is not None  # CPU tensors (or no Gluon)
    if gg.available():
        assert "CUDA" in why
        with pytest.raises(ValueError, match="cannot run this call"):
            gg.block_gemm(a, b)


_COMPILE_SCRIPT = """
import json
from int8flow.kernels import _hopper_check as h
for out, kw in (("bf16", {}), ("int8", {}), ("fp32", dict(magic=True)), ("int8", dict(stochastic=True)),
                ("int8", dict(consumers=3)),
                ("bf16", dict(b_per_col=True, sb_smem=True, prefetch=False, bias=False))):  # wgrad as block_gemm runs it
    print(json.dumps(h.gluon_variant(out, **kw)))
"""


@needs_gluon
def test_gluon_kernel_compiles_for_sm90_with_int8_wgmma_and_no_spills():
    """The kernel is compiled (Gluon -> PTX -> cubin) for sm_90 on the CPU: the checks the interpreter cannot do.

    In a subprocess without TRITON_INTERPRET (this module sets it on CPU, and jit functions then build for it).
    """
    import json
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 6  # the last: wgrad's per-column B scales through shared memory (the L2 route spills 48 B)
    for r in reports:
        assert r["wgmma"] == ["wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8"], r
        assert r["shared_bytes"] <= 227 * 1024 and r["local_ld_st"] == 0, r
        cap, consumer, producer = gg.REGS[r["consumers"]]
        assert r["regs"] == cap and any(s.split()[-1] == str(consumer) for s in r["setmaxnreg"]), r
        # two consumers at 232 registers: no spills; three at 160: a few words outside the K loop at most
        assert r["stack_bytes"] == 0 if r["consumers"] == 2 else r["stack_bytes"] <= 128, r


@pytest.mark.gpu
@on_hopper
@needs_gluon
@pytest.mark.parametrize("blocks", [("1x128", "128x128"), ("1x128", "1x128"), ("128x128", "1x128")])
@pytest.mark.parametrize("shape", [(300, 208, 400), (1000, 384, 1152)], ids=lambda s: "x".join(map(str, s)))
def test_gluon_matches_reference_on_gpu(shape, blocks):
    M, N, K = shape
    a, b = operand(M, K, blocks[0], 6), operand(N, K, blocks[1], 7)
    bias = torch.randn(N, device=DEVICE)
    assert kg.route(a, b)[0] == "gluon"
    want = a.dequantize().double() @ b.dequantize().double().t() + bias.double()
    y = kg.block_gemm(a, b, bias)
    assert kg.last_route[0] == "gluon"
    err = (y.double() - want).abs().max() / want.abs().max()
    assert err < 2e-6
    q = kg.block_gemm(a, b, bias, out_block="1x128")
    want_q = fmt.quantize(want.float(), "1x128")
    torch.testing.assert_close(q.scale, want_q.scale, rtol=1e-5, atol=0)
    assert (q.data.int() - want_q.data.int()).abs().max() <= 1


@pytest.mark.gpu
@on_hopper
@needs_gluon
@pytest.mark.parametrize("consumers", [2, 3])
@pytest.mark.parametrize("out", ["fp32", "int8", "int8-stochastic"])
@pytest.mark.parametrize("shape", [(77, 16, 144), (128, 128, 128), (450, 272, 1040)], ids=lambda s: "x".join(map(str, s)))
def test_gluon_tails_both_consumer_counts_on_gpu(shape, out, consumers):
    """Tails in M (partial and fully out-of-range 64-row boxes), N and K on 128- and 192-row tiles."""
    M, N, K = shape
    a, b = operand(M, K, "1x128", 9), operand(N, K, "128x128", 10)
    want = a.dequantize().double() @ b.dequantize().double().t()
    if out == "fp32":
        y = gg.block_gemm(a, b, consumers=consumers)
        assert ((y.double() - want).abs().max() / want.abs().max()) < 2e-6
        return
    rounding = "stochastic" if out == "int8-stochastic" else "nearest"
    q = gg.block_gemm(a, b, out_block="1x128", rounding=rounding, seed=5, consumers=consumers)
    want_q = fmt.quantize(want.float(), "1x128")
    torch.testing.assert_close(q.scale, want_q.scale, rtol=1e-5, atol=0)
    assert (q.data.int() - want_q.data.int()).abs().max() <= 1
    if rounding == "stochastic":
        # The memory-bound kernels' random stream (one Philox4x32-7 per 8 elements, keyed by seed, row, column):
        # quantizing the kernel's own float32 result with kernels.quantize gives the same codes (the same float
        # ops: reciprocal + Markstein step, centred 16-bit noise, round half to even).
        from int8flow.kernels import quantize as kq
        y = gg.block_gemm(a, b, consumers=consumers)
        ref = kq.quantize(y, "1x128", rounding="stochastic", seed=5)
        assert torch.equal(q.scale, ref.scale) and torch.equal(q.data, ref.data)
        # The Triton GEMM draws another stream (tl.rand per element) of the same distribution: both unbiased, so
        # the code difference d of an element has mean 0 and variance <= 1/4 + 1/4 (independent streams); the
        # sum over n elements is then within 5 sqrt(n / 2) but with p < 6e-7.
        t = kg.block_gemm(a, b, out_block="1x128", rounding=rounding, seed=5, kernel="triton")
        d = q.data.double() - t.data.double()  # the scales agree to 1e-5 (asserted above for q)
        assert abs(float(d.sum())) < 5 * (d.numel() / 2) ** 0.5


@pytest.mark.gpu
@on_hopper
@needs_gluon
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("shape", [(77, 16, 144), (300, 208, 400), (450, 1028, 1040), (256, 512, 16384)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gluon_per_column_scales_through_shared_memory_on_gpu(shape, prefetch):
    """wgrad's operands (1x128 blocks along K on both sides: B's scale varies per column). The per-column scales
    staged by the producer's TMA (``sb_smem``) give the same bits as the L2 loads (the same float ops in the same
    order), and both match float64; tails in M, N (N % 128 != 0) and K."""
    M, N, K = shape
    a, b = operand(M, K, "1x128", 11), operand(N, K, "1x128", 12)
    want = a.dequantize().double() @ b.dequantize().double().t()
    y_l2 = gg.block_gemm(a, b, sb_smem=False, prefetch=prefetch)
    y_sm = gg.block_gemm(a, b, sb_smem=True, prefetch=prefetch)
    assert ((y_sm.double() - want).abs().max() / want.abs().max()) < 2e-6
    assert torch.equal(y_sm, y_l2)
    assert torch.equal(y_sm, gg.block_gemm(a, b, sb_smem=True, prefetch=not prefetch))
    with pytest.raises(ValueError, match="sb_smem needs per-column B scales"):
        gg.block_gemm(a, operand(N, K, "128x128", 13), sb_smem=True)
    with pytest.raises(ValueError, match="run on 2 consumer warpgroups"):
        gg.block_gemm(a, b, consumers=3)


@pytest.mark.gpu
@on_hopper
@needs_gluon
def test_gluon_per_column_scales_many_tiles_per_cta_on_gpu():
    """The staged per-column scales with more output tiles than SMs (several tiles per persistent CTA through the
    scale ring) and a long K: the conditions of the 3-consumer failure seen in the probe (review finding), on the
    2-consumer route that runs; against float64 on every 16th row."""
    M, N, K = 2048, 2048 + 64, 16384
    a, b = operand(M, K, "1x128", 16), operand(N, K, "1x128", 17)
    y = gg.block_gemm(a, b)
    rows = torch.arange(0, M, 16, device=DEVICE)
    a_rows = fmt.QTensor(a.data[rows], a.scale[rows], a.block)
    want = a_rows.dequantize().double() @ b.dequantize().double().t()
    assert ((y[rows].double() - want).abs().max() / want.abs().max()) < 2e-6


@pytest.mark.gpu
@on_hopper
@needs_gluon
@pytest.mark.parametrize("consumers", [2, 3])
@pytest.mark.parametrize("shape", [(77, 16, 144), (450, 272, 1040), (300, 256, 16384)], ids=lambda s: "x".join(map(str, s)))
def test_gluon_scale_prefetch_same_bits_on_gpu(shape, consumers):
    """Loading each K group's scales one group ahead (``prefetch``, the default) changes when, not what: the same
    bits as loading them with the group's own wgmma, float and INT8 outputs, tails in M, N, K and long K."""
    M, N, K = shape
    a, b = operand(M, K, "1x128", 14), operand(N, K, "128x128", 15)
    want = a.dequantize().double() @ b.dequantize().double().t()
    y = gg.block_gemm(a, b, consumers=consumers)
    assert ((y.double() - want).abs().max() / want.abs().max()) < 2e-6
    assert torch.equal(y, gg.block_gemm(a, b, consumers=consumers, prefetch=False))
    q1 = gg.block_gemm(a, b, out_block="1x128", rounding="stochastic", seed=3, consumers=consumers)
    q0 = gg.block_gemm(a, b, out_block="1x128", rounding="stochastic", seed=3, consumers=consumers, prefetch=False)
    assert torch.equal(q1.data, q0.data) and torch.equal(q1.scale, q0.scale)


@pytest.mark.gpu
@on_hopper
@needs_gluon
def test_gluon_refuses_transposed_view_on_gpu():
    a = operand(256, 256, "128x128", 8)
    with pytest.raises(ValueError, match="K-major"):
        gg.block_gemm(a, a.t())
    assert kg.route(a, a.t())[0] == "triton"
