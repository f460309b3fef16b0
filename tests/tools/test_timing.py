"""The one CPU timer (``pyfastpeft.tools.timing``): interleaving, quantiles, budgets, failures."""
import pytest

from pyfastpeft.tools import timing


def _clock(monkeypatch, durations):
    """A fake perf_counter: every call of a timed function advances the clock by ``durations[name]``."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    order = []

    def make(name):
        def fn():
            order.append(name)
            now[0] += durations[name]
        return fn

    return {n: make(n) for n in durations}, order


def test_median_and_spread_of_each_callable(monkeypatch):
    calls, _ = _clock(monkeypatch, {"a": 0.001, "b": 0.004})
    out = timing.time_interleaved(calls, warmup=1, budget_s=0.0, min_rounds=7, max_rounds=7)
    assert out["a"].rounds == 7 and out["a"][:3] == pytest.approx((0.001, 0.001, 0.001))
    assert out["b"].median == pytest.approx(0.004) and out["b"].rounds == 7


def test_rounds_rotate_the_starting_callable(monkeypatch):
    calls, order = _clock(monkeypatch, {"a": 1e-3, "b": 1e-3, "c": 1e-3})
    timing.time_interleaved(calls, warmup=0, budget_s=0.0, min_rounds=3, max_rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_budget_stops_new_rounds_once_min_rounds_are_done(monkeypatch):
    calls, _ = _clock(monkeypatch, {"slow": 0.5})
    out = timing.time_interleaved(calls, warmup=0, budget_s=1.0, min_rounds=2, max_rounds=50)
    assert out["slow"].rounds == 2
    out = timing.time_interleaved(calls, warmup=0, budget_s=100.0, min_rounds=2, max_rounds=9)
    assert out["slow"].rounds == 9


def test_quantiles_interpolate_like_numpy():
    s = sorted([5.0, 1.0, 3.0, 2.0, 4.0])
    assert timing._quantile(s, 0.5) == 3.0
    assert timing._quantile(s, 0.2) == pytest.approx(1.8)
    assert timing._quantile(s, 0.8) == pytest.approx(4.2)


def test_a_failing_callable_raises_or_is_reported(monkeypatch):
    calls, _ = _clock(monkeypatch, {"ok": 1e-3})

    def bad():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        timing.time_interleaved({**calls, "bad": bad}, warmup=0, min_rounds=2, max_rounds=2)
    out = timing.time_interleaved({**calls, "bad": bad}, warmup=0, min_rounds=2, max_rounds=2, catch=True)
    assert isinstance(out["bad"], RuntimeError) and out["ok"].rounds == 2


def test_setup_runs_before_every_call_untimed(monkeypatch):
    calls, _ = _clock(monkeypatch, {"a": 1e-3})
    seen = []
    timing.time_interleaved(calls, warmup=1, budget_s=0.0, min_rounds=3, max_rounds=3, setup=seen.append)
    assert seen == ["a"] * 4
