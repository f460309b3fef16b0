"""CPU ratios: paired per-round ratios (drift cancels), their own spread, and the minimum-rounds rule."""
from __future__ import annotations

import random

import pytest

from pyfastpeft.tools import bench, timing


def test_paired_ratio_cancels_a_drift_both_timings_share():
    rng = random.Random(0)
    drift = [1.0 + 0.8 * (i % 7 == 0) + 0.3 * rng.random() for i in range(20)]  # a loaded machine, per round
    frozen = [d * 10.0 for d in drift]
    ours = [d * 12.0 for d in drift]
    med, p20, p80 = timing.paired_ratio(ours, frozen)
    assert med == pytest.approx(1.2) and p80 - p20 == pytest.approx(0.0, abs=1e-12)
    assert timing.paired_ratio(ours[:timing.MIN_ROUNDS - 1], frozen[:timing.MIN_ROUNDS - 1]) is None


def _row(provider, samples, mode="fwd+bwd"):
    s = sorted(samples)
    q = lambda p: timing._quantile(s, p)  # noqa: E731
    return dict(op="lora_linear", workload="w", M=8, dtype="fp32", mode=mode, provider=provider,
                ms_p50=q(0.5), ms_p20=q(0.2), ms_p80=q(0.8), rounds=len(samples), _samples=tuple(samples))


def test_bench_ratios_are_paired_and_flag_their_own_spread():
    frozen = [1.0, 1.12] * 6
    ours = [1.12, 1.0] * 6  # each timing's own spread is 11 %, but the per-round ratio swings 0.89 - 1.12
    rows = [_row("frozen", frozen), _row("pyfastpeft-torch", ours)]
    bench._ratios(rows)
    r = rows[1]
    assert "_samples" not in r and r["rounds"] == 12 and not r["noisy"]
    assert r["ratio_to_frozen_spread"] > timing.SPREAD_LIMIT and r["ratio_to_frozen_noisy"]
    steady = [_row("frozen", [1.0 + 0.01 * i for i in range(12)]), _row("peft", [1.1 * (1.0 + 0.01 * i) for i in range(12)])]
    bench._ratios(steady)
    assert steady[1]["ratio_to_frozen"] == pytest.approx(1.1) and not steady[1]["ratio_to_frozen_noisy"]


def test_too_few_rounds_is_not_a_result():
    rows = [_row("frozen", [1.0] * 5), _row("peft", [1.1] * 5)]
    bench._ratios(rows)
    assert rows[0]["noisy"] and rows[1]["noisy"] and rows[1]["ratio_to_frozen_noisy"]
    assert rows[1]["ratio_to_frozen"] == pytest.approx(1.1)  # a ratio of medians, shown flagged
    # rows read back from an older file without a rounds column keep the spread rule alone
    old = {k: v for k, v in _row("peft", [1.1] * 5).items() if k not in ("rounds", "_samples")}
    assert not bench.row_noisy(old)
