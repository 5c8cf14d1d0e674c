"""Graph-safe seeds: kernels read the base seed from a 1-element int64 device tensor plus an int salt.

* the device derivation (``_blockquant.derive_seed``) equals its Python twin (``_launch.derive_seed``) bit for bit;
* a tensor seed gives the same bits as the int seed of the same value (the wrappers turn an int into that tensor),
  for every seeded kernel, and salts pick independent streams (a call's streams are ``salt + k``);
* a malformed seed tensor is refused with one line naming the argument and the fix;
* the ops layer hands kernels ``Seed(base, salt)`` without reading the base on the host.

Runs under the interpreter here (CPU tensors) and compiled on a GPU (``DEVICE``).
"""
import random

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from int8flow.format import QTensor
from int8flow.kernels import _launch, activations, dropout, gemm, norms, quantize as kq, residual
from int8flow.kernels._blockquant import load_seed
from int8flow.ops import backend


def _x(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


def _t(v):
    return torch.tensor([v], dtype=torch.int64, device=DEVICE)


def _same(a, b):
    """Bit equality of kernel results: tensors, QTensors, or (nested) tuples of them."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    elif isinstance(a, QTensor):
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dropout.DropoutMask):
        assert a.p == b.p and a.shape == b.shape and a.salt == b.salt
    else:
        assert a == b


@triton.jit(do_not_specialize=["salt"])
def _derive_kernel(seed_ptr, salt, out_ptr):
    tl.store(out_ptr, load_seed(seed_ptr, salt))


def test_device_derivation_equals_python_twin():
    rng = random.Random(0)
    cases = [(0, 0), (0, 1), (1, 0), (12345, 7), (2**31 - 2, 3), (2**63 - 1, 2**62), (-5, 2)]
    # salts at every width Triton gives a Python int: i32, u32 ([2**31, 2**32): failed in the interpreter once), i64
    cases += [(7, 2**31 - 1), (7, 2**31), (7, 2**32 - 1), (7, 2**32)]
    cases += [(rng.randrange(2**63), rng.randrange(2**62)) for _ in range(12)]
    keys = set()
    for base, salt in cases:
        out = torch.full((1,), -1, dtype=torch.int32, device=DEVICE)
        _derive_kernel[(1,)](_t(base), salt, out)
        want = _launch.derive_seed(base & (2**64 - 1), salt)
        assert 0 <= want < 2**31 - 1
        assert out.item() == want, (base, salt)
        keys.add(want)
    assert len(keys) == len(cases)  # no collisions among these (in particular (0, 1) vs (1, 0))


def test_python_derivation_streams_do_not_collide():
    keys = {_launch.derive_seed(b, s) for b in range(64) for s in range(8)}
    assert len(keys) == 64 * 8


# (name, call(seed, salt)) of every seeded kernel wrapper, stochastic rounding on
def _calls():
    x = _x((40, 256), 1)
    xb = _x((40, 256), 2, torch.bfloat16)
    dy = _x((40, 256), 3)
    w = _x((256,), 4)
    a = kq.quantize(_x((40, 128), 5), "1x128")
    b = kq.quantize(_x((64, 128), 6), "128x128")
    a32, b32 = kq.quantize(_x((40, 64), 7), "32x32"), kq.quantize(_x((48, 64), 8), "32x32")
    ln = norms.layer_norm_forward(x, w, None)
    st = dict(rounding="stochastic")
    return {
        "quantize 1x128": lambda s, k: kq.quantize(xb, "1x128", seed=s, salt=k, **st),
        "quantize 32x32": lambda s, k: kq.quantize(x, "32x32", seed=s, salt=k, **st),
        "quantize 1x96 (generic kernel)": lambda s, k: kq.quantize(x, "1x96", seed=s, salt=k, **st),
        "quantize_transposed": lambda s, k: kq.quantize_transposed(x, "1x32", seed=s, salt=k, **st),
        "quantize_dual": lambda s, k: kq.quantize_dual(xb, "1x32", seed=s, salt=k, **st),
        "block_gemm 1x128 out": lambda s, k: gemm.block_gemm(a, b, out_block="1x128", seed=s, salt=k, **st),
        "block_gemm 32x32 out": lambda s, k: gemm.block_gemm(a32, b32, out_block="32x32", seed=s, salt=k, **st),
        "layer_norm_forward": lambda s, k: norms.layer_norm_forward(x, w, None, out_block="1x32", seed=s, salt=k,
                                                                    with_t=True, **st)[0],
        "layer_norm_backward": lambda s, k: norms.layer_norm_backward(dy, x, w, ln[1], ln[2], out_block="1x32",
                                                                      seed=s, salt=k, with_t=True, **st)[0],
        "rms_norm_forward": lambda s, k: norms.rms_norm_forward(x, w, out_block="32x32", seed=s, salt=k, **st)[0],
        "gelu_backward": lambda s, k: activations.gelu_backward(dy, x, out_block="1x32", seed=s, salt=k,
                                                                with_t=True, **st),
        "swiglu_backward": lambda s, k: activations.swiglu_backward(dy, x, xb, out_block="1x32", seed=s, salt=k,
                                                                    with_t=True, **st),
        "residual_add_forward": lambda s, k: residual.residual_add_forward(x, dy, "rmsnorm", out_block="1x32",
                                                                           seed=s, salt=k, with_t=True, **st).h_q,
        "convert": lambda s, k: residual.convert(x, out_block="1x128", seed=s, salt=k, **st),
        "dropout_forward": lambda s, k: dropout.dropout_forward(x, 0.25, seed=s, out_block="1x32", salt=k, **st),
    }


NAMES = ["quantize 1x128", "quantize 32x32", "quantize 1x96 (generic kernel)", "quantize_transposed", "quantize_dual",
         "block_gemm 1x128 out", "block_gemm 32x32 out", "layer_norm_forward", "layer_norm_backward",
         "rms_norm_forward", "gelu_backward", "swiglu_backward", "residual_add_forward", "convert", "dropout_forward"]


@pytest.mark.parametrize("name", NAMES)
def test_tensor_seed_equals_int_seed_and_salts_differ(name):
    call = _calls()[name]
    base, salt = 2**40 + 123, 5
    by_int = call(base, salt)
    by_tensor = call(_t(base), salt)
    _same(by_int, by_tensor)
    _same(by_int, call(_t(base), salt))  # reproducible
    other_salt, other_base = call(_t(base), salt + 1000), call(_t(base + 1), salt)
    data = lambda r: (r[0] if isinstance(r, tuple) else r)  # noqa: E731  (the first output's INT8 codes)
    data_of = lambda r: data(data(r)).data  # noqa: E731
    assert not torch.equal(data_of(by_int), data_of(other_salt))
    assert not torch.equal(data_of(by_int), data_of(other_base))


def test_streams_of_one_call_are_salt_plus_stream_index():
    """quantize_dual's row copy is stream ``salt``, its transposed copy ``salt + 1``: the standalone quantizers
    with those salts give the same bits (noise keyed by (seed, row, column), not by launch)."""
    x = _x((64, 96), 11, torch.bfloat16)
    s = _t(77)
    q, qt = kq.quantize_dual(x, "1x32", "stochastic", seed=s, salt=40)
    _same(q, kq.quantize(x, "1x32", "stochastic", seed=s, salt=40))
    _same(qt, kq.quantize_transposed(x, "1x32", "stochastic", seed=s, salt=41))
    assert not torch.equal(qt.data, kq.quantize_transposed(x, "1x32", "stochastic", seed=s, salt=40).data)


def test_dropout_mask_regenerated_from_tensor_seed():
    x, dy = _x((24, 160), 12), _x((24, 160), 13)
    s = _t(99)
    y, mask = dropout.dropout_forward(x, 0.3, seed=s, salt=3)
    assert mask.seed is s and mask.salt == 3
    keep = mask.materialize(DEVICE)
    torch.testing.assert_close(y, torch.where(keep, x / 0.7, 0.0), rtol=1e-6, atol=0)
    dx = dropout.dropout_backward(dy, mask, 0.3, seed=_t(5))
    _same(dx, dropout.dropout_backward(dy, keep, 0.3))
    _same(keep, dropout.DropoutMask(99, 0.3, (24, 160), 3).materialize(DEVICE))


def test_stochastic_rounding_unbiased_with_tensor_seeds():
    """Mean of the dequantized codes over 64 base seeds (tensors) -> x, in steps (block scales): a code's standard
    deviation is at most 1/2 step, so the 64-draw mean's standard error is <= 1/16; every element within 5.5 of them
    (2048 elements), the mean over elements within 5 standard errors of 0."""
    x = _x((16, 128), 14)
    draws = torch.stack([kq.quantize(x, "1x128", "stochastic", seed=_t(1000 + i)).dequantize() for i in range(64)])
    scale = kq.quantize(x, "1x128").scale.repeat_interleave(128, dim=1)
    err = (draws.mean(0) - x) / scale
    assert err.abs().max() < 5.5 * 0.5 / 64 ** 0.5
    assert err.mean().abs() < 5 * 0.5 / (64 * err.numel()) ** 0.5


@pytest.mark.parametrize("bad, exc, match", [
    (torch.tensor([3], dtype=torch.int32), TypeError, "seed tensor must be int64.*long"),
    (torch.tensor([3.0]), TypeError, "seed tensor must be int64"),
    (torch.tensor([1, 2], dtype=torch.int64), ValueError, "exactly 1 element"),
    (torch.zeros((2, 1), dtype=torch.int64), ValueError, "exactly 1 element"),
    (torch.tensor([3], dtype=torch.int64, device="meta"), ValueError, "seed tensor is on meta.*pass seed.to"),
    (-1, ValueError, "non-negative.*pass seed % 2"),
    (2**63, ValueError, "below 2\\*\\*63"),
    (1.5, TypeError, "seed must be a Python int or a 1-element int64 tensor, got a float"),
    (True, TypeError, "seed must be a Python int"),
    (__import__("numpy").int64(3), TypeError, "got a numpy.int64; pass int\\(seed\\)"),
])
def test_malformed_seed_refused_in_one_line(bad, exc, match):
    if isinstance(bad, torch.Tensor) and bad.device.type != "meta":
        bad = bad.to(DEVICE)
    x = _x((8, 128), 15)
    for call in (lambda: kq.quantize(x, "1x128", "stochastic", seed=bad),
                 lambda: gemm.block_gemm(kq.quantize(x, "1x128"), kq.quantize(x, "1x128"), out_block="1x128",
                                         rounding="stochastic", seed=bad),
                 lambda: norms.rms_norm_forward(x, None, out_block="1x128", rounding="stochastic", seed=bad)):
        with pytest.raises(exc, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_malformed_salt_refused():
    x = _x((8, 128), 16)
    with pytest.raises(ValueError, match="salt must be in"):
        kq.quantize(x, "1x128", "stochastic", seed=1, salt=-1)
    with pytest.raises(TypeError, match="salt must be an int"):
        kq.quantize(x, "1x128", "stochastic", seed=1, salt=1.0)


def test_subseed_salts_are_distinct_and_pure_python():
    base = _t(7)
    s = backend.Seed(base)
    salts = {backend.subseed(s, i).salt for i in range(16)}
    salts |= {backend.subseed(backend.subseed(s, i), j).salt for i in range(16) for j in range(16)}
    assert len(salts) == 16 + 256
    assert all(0 <= v < 2**62 for v in salts)
    assert backend.subseed(s, 3).base is base
    with pytest.raises(TypeError, match="backend.Seed"):
        backend.subseed(5, 1)


def test_backend_call_hands_kernels_base_and_salt(monkeypatch):
    """The kernel route gets ``seed=base, salt=salt`` (same bits as the wrapper called directly) and never reads
    the base on the host."""
    monkeypatch.setattr(backend, "uses_kernel", lambda name, device: True)
    x = _x((32, 128), 17)
    seed = backend.subseed(backend.Seed(_t(2024)), 4)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self) or real_item(self))
    got = backend.call("quantize", x, "1x128", rounding="stochastic", device=x.device, seed=seed)
    assert not reads
    monkeypatch.undo()
    _same(got, kq.quantize(x, "1x128", "stochastic", seed=seed.base, salt=seed.salt))


def test_reference_route_seeds_a_generator_from_base_and_salt():
    """Without a kernel (CPU) the base is read on the host and mixed with the salt: same Seed, same bits;
    another salt, other noise."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(18))
    s = backend.Seed(torch.tensor([31], dtype=torch.int64))
    q = lambda seed: backend.call("quantize", x, "1x32", rounding="stochastic", device=x.device,  # noqa: E731
                                  seed=seed).data
    assert torch.equal(q(s), q(backend.Seed(s.base.clone(), s.salt)))
    assert not torch.equal(q(s), q(backend.subseed(s, 1)))


def test_draw_seed_is_a_device_tensor_from_the_default_generator():
    torch.manual_seed(3)
    a = backend.draw_seed(DEVICE)
    torch.manual_seed(3)
    b = backend.draw_seed(DEVICE)
    assert a.dtype == torch.int64 and tuple(a.shape) == (1,) and a.device.type == torch.device(DEVICE).type
    assert torch.equal(a, b) and 0 <= int(a.item()) < 2**31 - 1


@pytest.mark.parametrize("salt", [2**31, 2**32 - 1])
def test_salts_in_the_unsigned_32_bit_range_work(salt):
    """Salts in [2**31, 2**32) are valid ([0, 2**62]); Triton types them u32, which the derivation once failed
    on (quantize, quantize_dual whose transposed stream is salt + 1, dropout)."""
    from int8flow.kernels import quantize as Q

    x = torch.randn(64, 128, device=DEVICE)
    a = Q.quantize(x, "1x32", rounding="stochastic", seed=3, salt=salt)
    b = Q.quantize(x, "1x32", rounding="stochastic", seed=3, salt=salt + 1)
    assert not torch.equal(a.data, b.data)
    q, qt = Q.quantize_dual(x, "1x128", rounding="stochastic", seed=3, salt=2**31 - 1)
    assert q.data.shape == (64, 128) and qt.data.shape == (128, 64)
