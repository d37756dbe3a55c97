"""The one seed mixer of the data layer: independent 63-bit seeds from tuples of integers.

    g = torch.Generator().manual_seed(mix(seed, epoch, stream, block))     # the sampler's draw
    rng = random.Random(mix(seed, epoch, rank, worker))                    # a stream worker's shuffle

Different tuples give unrelated seeds (splitmix64 over the parts); the values are part of the
definition of every draw and stream built from them, so they never change.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (any sign); different tuples give unrelated seeds."""
    h = 0x6A09E667F3BCC908
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1
