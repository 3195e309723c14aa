"""Seeds drawn as pure functions of their parts, the same in every process and after every resume."""

from __future__ import annotations

import numpy as np


def draw_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (in every process, unlike ``hash``)."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(2, np.uint64)[0] >> 1)
