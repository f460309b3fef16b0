"""The one CPU timer of the tools and benchmarks: several callables, timed in interleaved rounds.

Each round runs every callable once, starting point rotated per round, so machine noise (other processes,
frequency changes) hits every callable alike. ``torch.utils.benchmark`` is not used: its ``Timer`` times
one statement at a time (no interleaving) and reports the median and interquartile range, not p20 / p80.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union


class Timing(NamedTuple):
    """Per-call seconds: the median and the 20th / 80th percentiles, over ``rounds`` timed calls."""

    median: float
    p20: float
    p80: float
    rounds: int


def _quantile(s: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks of the sorted ``s`` (numpy's default)."""
    pos = p * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_interleaved(calls: Mapping[str, Callable[[], Any]], *, warmup: int = 2, budget_s: float = 1.0,
                     min_rounds: int = 5, max_rounds: int = 50, setup: Optional[Callable[[str], Any]] = None,
                     catch: bool = False) -> dict[str, Union[Timing, BaseException]]:
    """Time ``calls`` (``{name: fn}``, each ``fn()`` one call) in interleaved rounds.

    Args:
        warmup: untimed calls of each callable before the rounds.
        budget_s: timed seconds (all callables together) after which no new round starts, once
            ``min_rounds`` are done.
        min_rounds, max_rounds: bounds on the number of rounds (one call of each callable per round).
        setup: ``setup(name)`` runs before every call of ``name`` (warm-up and timed), outside the timing
            (e.g. dropping the gradients the previous call left).
        catch: a callable that raises: re-raised (default), or with ``catch=True`` its exception is
            returned in its place and it leaves the rotation.

    Returns:
        ``{name: Timing(median, p20, p80, rounds)}`` in seconds per call (or ``{name: exception}``).
    """
    out: dict[str, Union[Timing, BaseException]] = {}
    times: dict[str, list[float]] = {n: [] for n in calls}

    def once(n: str) -> Optional[float]:
        if setup is not None:
            setup(n)
        try:
            t0 = time.perf_counter()
            calls[n]()
            return time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported per callable when catch=True
            if not catch:
                raise
            out[n] = e
            return None

    for n in calls:
        for _ in range(warmup):
            if once(n) is None:
                break
    spent, r = 0.0, 0
    while r < max_rounds and (r < min_rounds or spent < budget_s):
        live = [n for n in calls if n not in out]
        if not live:
            break
        for j in range(len(live)):
            n = live[(r + j) % len(live)]
            t = once(n)
            if t is not None:
                times[n].append(t)
                spent += t
        r += 1
    for n, ts in times.items():
        if n not in out and ts:
            s = sorted(ts)
            out[n] = Timing(_quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8), len(s))
    return out
