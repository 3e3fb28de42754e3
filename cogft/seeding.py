"""Seeds that depend only on where the run is (seed, step, epoch, sample…), never on RNG history.

A resumed run rebuilds its data loader and models, which consumes global random numbers; every draw
that must repeat exactly after a resume (noise and timesteps, the window of a clip, stochastic
rounding) is seeded from its position instead.
"""

from __future__ import annotations

_MULTIPLIERS = (1_000_003, 1_000_033, 1_000_037)


def mixed_seed(*parts: int) -> int:
    """One 63-bit seed from a few integers, each position weighted differently (seed first)."""
    if not 1 <= len(parts) <= len(_MULTIPLIERS) + 1:
        raise ValueError(f"mixed_seed takes 1 to {len(_MULTIPLIERS) + 1} integers, got {len(parts)}")
    value = parts[0]
    for multiplier, part in zip(_MULTIPLIERS, parts[1:]):
        value = value * multiplier + part
    return value % (2**63 - 1)
