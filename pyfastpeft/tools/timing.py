"""The one CPU timer of the tools and benchmarks: several callables, timed in interleaved rounds.

Each round runs every callable once, starting point rotated per round, so machine noise (other processes,
frequency changes) hits every callable alike. ``torch.utils.benchmark`` is not used: its ``Timer`` times
one statement at a time (no interleaving) and reports the median and interquartile range, not p20 / p80.

The spread rule of every tool and benchmark table: a timing whose ``(p80 - p20) / median`` exceeds
:data:`SPREAD_LIMIT` (20 %) is flagged with :data:`FLAG` and is not a result; a ratio computed from a flagged
timing is shown flagged (:func:`ratio_text`), never as a plain ratio.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Union

# ----------------------------------------------------------------------------------------------------
# the spread rule: a timing whose (p80 - p20) / median exceeds SPREAD_LIMIT is not a result
# ----------------------------------------------------------------------------------------------------
SPREAD_LIMIT = 0.20
#: a CPU timing of fewer interleaved rounds than this is not a result either: p20 / p80 of a handful of calls
#: say nothing about the spread (the committed quick run had 5 rounds on Llama, and its frozen fwd+bwd median
#: came out below its fwd median)
MIN_ROUNDS = 10
FLAG = "!"
FOOTNOTE = (f"{FLAG} spread (p80 - p20) / median > {100 * SPREAD_LIMIT:.0f} %: not a result; a ratio marked "
            f"(x){FLAG} uses such a timing")
LEGEND = f"spread > {100 * SPREAD_LIMIT:.0f} %: not a result"


def spread(median: Optional[float], p20: Optional[float], p80: Optional[float]) -> Optional[float]:
    """``(p80 - p20) / median`` (a fraction), or None when a value is missing or the median is not > 0."""
    try:
        m, lo, hi = float(median), float(p20), float(p80)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not (m > 0) or any(math.isnan(v) for v in (m, lo, hi)):
        return None
    return (hi - lo) / m


def noisy(median: Optional[float], p20: Optional[float], p80: Optional[float],
          limit: float = SPREAD_LIMIT) -> bool:
    """True when the timing's spread exceeds ``limit`` (a timing without a known spread is not flagged)."""
    s = spread(median, p20, p80)
    return s is not None and s > limit


def spread_text(s: Optional[float], limit: float = SPREAD_LIMIT) -> str:
    """``"8 %"``, ``"31 % !"`` (over the limit) or ``"?"`` (unknown)."""
    if s is None:
        return "?"
    return f"{100 * s:.0f} %" + (f" {FLAG}" if s > limit else "")


def ratio_text(value: Optional[float], flagged: bool, fmt: str = ".2f", empty: str = "") -> str:
    """A ratio cell: ``"1.05"``, or ``"(1.05)!"`` when it is computed from a flagged timing."""
    if value is None:
        return empty
    v = format(value, fmt)
    return f"({v}){FLAG}" if flagged else v


def any_noisy(timings: Iterable[Optional["Timing"]], limit: float = SPREAD_LIMIT) -> bool:
    """True when one of ``timings`` (``Timing`` or ``(median, p20, p80, ...)``; None skipped) is flagged."""
    return any(t is not None and noisy(t[0], t[1], t[2], limit) for t in timings)


class Timing(NamedTuple):
    """Per-call seconds: the median and the 20th / 80th percentiles, over ``rounds`` timed calls;
    ``samples`` are the per-round seconds in round order (for :func:`paired_ratio`)."""

    median: float
    p20: float
    p80: float
    rounds: int
    samples: tuple = ()

    @property
    def spread(self) -> Optional[float]:
        """``(p80 - p20) / median``."""
        return spread(self.median, self.p20, self.p80)

    @property
    def noisy(self) -> bool:
        """The spread exceeds :data:`SPREAD_LIMIT`: the timing is not a result."""
        return noisy(self.median, self.p20, self.p80)


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
            out[n] = Timing(_quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8), len(s), tuple(ts))
    return out


def paired_ratio(num: Iterable[float], den: Iterable[float]) -> Optional[tuple[float, float, float]]:
    """``(median, p20, p80)`` of the per-round ratios ``num[i] / den[i]`` of two callables timed in the same
    interleaved rounds. Each round's pair ran back to back, so a slow phase of the machine (another process,
    a clock change) scales both and cancels in the ratio, where a ratio of two medians taken over different
    rounds keeps it. None when fewer than :data:`MIN_ROUNDS` pairs exist."""
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    if len(pairs) < MIN_ROUNDS:
        return None
    s = sorted(pairs)
    return _quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8)
