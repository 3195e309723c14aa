"""How sure a gain is: the mean of paired per-seed differences with a Student's t confidence interval, and wins.

With the same seeds on both sides, each seed's difference removes the noise the two runs share (the seed's
data order and initialisation); the interval is the mean difference ± t(level, n − 1) · s / √n over those
differences. With one seed there is no spread to judge, so there is no interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Gain:
    """A paired gain in top-1 points over ``seeds`` seeds: its mean, the interval (None with one seed), the wins.

    ``seeds`` 0: the two sides share no seed, and the gain is the difference of their means, not paired.
    """

    mean: float
    low: float | None
    high: float | None
    wins: int  # seeds where the distilled student beat the baseline
    seeds: int

    @property
    def includes_zero(self) -> bool:
        """Whether the interval holds 0, so the gain could be noise (never, without an interval)."""
        return self.low is not None and self.low <= 0 <= self.high

    def short(self) -> str:
        """``+2.10 [−0.51, +4.71], 2/3 wins`` (the mean alone for one seed), for table cells."""
        if self.low is None:
            return f"{self.mean:+.2f}" if self.seeds else f"{self.mean:+.2f} (no shared seeds)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}], {self.wins}/{self.seeds} wins"

    def sentence(self) -> str:
        """The gain in words, saying the interval's level and method and whether it holds zero."""
        if self.low is None:
            why = "one seed" if self.seeds else "no seed on both sides: the difference of the means"
            return f"{self.mean:+.2f} top-1 points ({why}: no interval)"
        verdict = ("; the interval includes zero: the gain could be noise" if self.includes_zero
                   else "; the interval excludes zero")
        return (f"{self.mean:+.2f} top-1 points, {LEVEL:.0%} CI [{self.low:+.2f}, {self.high:+.2f}] (Student's t over "
                f"{self.seeds} seeds' paired differences), wins on {self.wins} of {self.seeds} seeds{verdict}")


def unpaired_gain(difference: float) -> Gain:
    """The :class:`Gain` of two groups that share no seed: the difference of their means, without an interval."""
    return Gain(difference, None, None, int(difference > 0), 0)


def paired_gain(differences: list[float]) -> Gain:
    """The :class:`Gain` of per-seed ``differences`` (distilled minus baseline top-1), with its 95% interval."""
    n, mean = len(differences), statistics.fmean(differences)
    wins = sum(d > 0 for d in differences)
    if n < 2:
        return Gain(mean, None, None, wins, n)
    half = float(stats.t.ppf((1 + LEVEL) / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return Gain(mean, mean - half, mean + half, wins, n)
