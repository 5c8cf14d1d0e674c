"""int32 accumulation cannot overflow: worst-case operands (all +-127) against exact integer math.

Per promotion group of G elements, |sum q_a q_b| <= G * 127^2, <= 2^31 - 1 for G <= 133,144; the kernels promote
each group to float32 (G <= 128), so K itself is unbounded (docs/reliability.md has the proof).
"""

import pytest
import torch


from int8flow.format import QMAX, QTensor, BlockShape
from int8flow import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _full(rows, cols, value, block, device="cpu"):
    block = BlockShape.parse(block)
    data = torch.full((rows, cols), value, dtype=torch.int8, device=device)
    return QTensor(data, torch.ones(block.grid((rows, cols)), device=device), block)


def _exact(a: QTensor, b: QTensor) -> torch.Tensor:
    """Integer math in int64 (scales are 1): the value an overflow-free accumulator must produce."""
    return (a.data.cpu().long() @ b.data.cpu().long().t()).to(a.data.device)  # CUDA has no int64 matmul


def test_bound_constants():
    assert 133_144 * QMAX**2 <= 2**31 - 1 < 133_145 * QMAX**2  # largest group that cannot overflow int32
    assert 128 * QMAX**2 < 2**24, "a G=128 group's int32 sum converts to float32 exactly"


@pytest.mark.parametrize("K", [4096, 2**18])
@pytest.mark.parametrize("sign_b", [1, -1])
def test_reference_worst_case_large_k(K, sign_b):
    """All +127 (and +127 x -127): K * 127^2 reaches 4.2e9 at K = 2^18, past int32's 2^31, which a single
    int32 accumulator over K would wrap (to a wrong sign); promoted to float32 the result keeps its sign and
    is within float32 summation error (K roundings of 2^-24) of the exact integer."""
    a, b = _full(3, K, QMAX, "1x128"), _full(2, K, sign_b * QMAX, "128x128")
    y = ref.block_gemm(a, b)
    exact = _exact(a, b)
    assert int(exact.abs().max()) == K * QMAX**2
    if K == 2**18:
        assert int(exact.abs().max()) > 2**31 - 1
    assert bool((torch.sign(y) == torch.sign(exact)).all())
    torch.testing.assert_close(y.double(), exact.double(), rtol=K * 2.0**-24, atol=0)


@pytest.mark.parametrize("impl", ["int8", "dequant"])
@pytest.mark.parametrize("geometry", [("1x128", "128x128"), ("32x32", "32x32")])
def test_kernel_worst_case_against_exact_integers(impl, geometry):
    pytest.importorskip("triton")
    from int8flow.kernels import gemm as kg

    device = "cpu" if not torch.cuda.is_available() else "cuda"
    K = 1024 if device == "cpu" else 2**18  # interpreter: small; GPU: past int32 for the whole K
    ba, bb = geometry
    for sign_b in (1, -1):
        a, b = _full(2, K, QMAX, ba, device), _full(3, K, sign_b * QMAX, bb, device)
        y = kg.block_gemm(a, b, impl=impl)
        exact = _exact(a, b).double().cpu()
        assert bool((torch.sign(y.cpu()) == torch.sign(exact)).all()), (impl, geometry, sign_b)  # no int32 wrap
        if device == "cpu":  # K = 1024: every partial sum < 2^24, so float32 holds it exactly
            assert torch.equal(y.double().cpu(), exact), (impl, geometry, sign_b)
        else:  # K = 2^18: 4.2e9 is past float32's exact integers; float32 summation error as for the reference
            torch.testing.assert_close(y.double().cpu(), exact, rtol=K * 2.0**-24, atol=0)
