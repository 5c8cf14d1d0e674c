"""Fallback quantization: outlier blocks get a second INT8 term; budget and threshold are honored."""
import math

import torch

from int8flow.config import Int8TrainingConfig
from int8flow.format import BlockShape
from int8flow.ops import int8_linear
from int8flow.ops.fallback import fallback_mask, fallback_sqnr_sweep

from _inputs import sqnr_db

BLOCK = BlockShape(32, 32)


def _outlier_blocks(M=96, K=256, seed=0):
    """Gaussian x with one 1e4 element in every block of the first column band ("massive activations")."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    outlier_rows = torch.arange(0, M, 32) + 7
    x[outlier_rows, 3] = 1e4
    return x, outlier_rows


def test_outlier_blocks_lose_accuracy_and_fallback_recovers_it():
    x, outlier_rows = _outlier_blocks()
    w = torch.randn(64, x.shape[1]) / 16
    ref = x.double() @ w.double().t()
    normal = torch.ones(x.shape[0], dtype=torch.bool)
    normal[outlier_rows] = False  # ordinary tokens that share a block with an outlier
    y_int8 = int8_linear(x, w, None, Int8TrainingConfig(precision="int8-linear"))
    y_fb = int8_linear(x, w, None, Int8TrainingConfig(precision="int8+fallback"))
    # Plain INT8: the 32 columns of each outlier block are crushed to 0 for the other 31 rows
    # (step 1e4/127 >> 1), i.e. 1/8 of K lost: ~9 dB. Floor for "lost": 15 dB.
    assert sqnr_db(ref[normal], y_int8[normal]) < 15.0
    # Fallback adds the residual term for exactly those blocks: back to the per-block INT8 level of a
    # Gaussian GEMM (~40 dB measured); floor 30 dB.
    assert sqnr_db(ref[normal], y_fb[normal]) > 30.0


def test_mask_flags_outlier_blocks_only_and_respects_budget():
    x, _ = _outlier_blocks()
    mask = fallback_mask(x, BLOCK, threshold=8.0, budget=1.0)
    expected = torch.zeros(BLOCK.grid(tuple(x.shape)), dtype=torch.bool)
    expected[:, 0] = True
    torch.testing.assert_close(mask, expected, rtol=0, atol=0)
    assert int(fallback_mask(x, BLOCK, 8.0, budget=1 / 24).sum()) == 1  # 24 blocks: budget of one
    assert not fallback_mask(x, BLOCK, 8.0, budget=0.0).any()
    assert not fallback_mask(torch.randn(96, 256), BLOCK, 8.0, 1.0).any()  # Gaussian: no block is 8x the median
    assert not fallback_mask(torch.zeros(64, 64), BLOCK, 8.0, 1.0).any()


def test_sweep_improves_monotonically_as_threshold_drops():
    x, _ = _outlier_blocks()
    rows = fallback_sqnr_sweep(x, torch.randn(64, 256), [math.inf, 32.0, 8.0], BLOCK)
    medians = [r[2] for r in rows]
    rates = [r[3] for r in rows]
    assert rates[0] == 0 and rates[-1] > 0
    assert medians[-1] > medians[0] + 15  # the per-token SQNR recovers (measured +30 dB)
