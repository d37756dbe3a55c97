"""splitmix64 for the data layer: the one seed mixer, and order-free digests of sample multisets.

    g = torch.Generator().manual_seed(mix(seed, epoch, stream, block))     # the sampler's draw
    rng = random.Random(mix(seed, epoch, rank, worker))                    # a stream worker's shuffle
    d = multiset_digest(indices)          # which samples an epoch drew, whatever the order and the ranks
    range_digest(n)                       # the digest of 0..n-1: an eval split covered exactly once

Different tuples give unrelated seeds (splitmix64 over the parts); the values are part of the
definition of every draw and stream built from them, so they never change. Digests of disjoint parts
add up (mod 2**64) to the digest of the union, so ranks sum theirs with an all-reduce.
"""

from __future__ import annotations

import numpy as np

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


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every entry (uint64 arithmetic wraps, as the scalar version's masks do)."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def multiset_digest(values: np.ndarray) -> int:
    """An order-free digest of a multiset of integers: the sum of their splitmix64 hashes mod 2**64, as a
    signed int64 (so digests of parts add up, also through a torch all-reduce, to the digest of the whole)."""
    with np.errstate(over="ignore"):
        total = _splitmix64_array(np.asarray(values, dtype=np.int64)).sum(dtype=np.uint64)
    return int(np.array(total, dtype=np.uint64).view(np.int64))


def add_digests(a: int, b: int) -> int:
    """a + b mod 2**64 as a signed int64: the digest of the union of two disjoint multisets."""
    s = (a + b) & ((1 << 64) - 1)
    return s - (1 << 64) if s >= 1 << 63 else s


def range_digest(n: int, chunk: int = 1 << 20) -> int:
    """`multiset_digest(range(n))` in constant memory (chunks of `chunk`)."""
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for lo in range(0, n, chunk):
            total += _splitmix64_array(np.arange(lo, min(n, lo + chunk), dtype=np.int64)).sum(dtype=np.uint64)
    return int(np.array(total, dtype=np.uint64).view(np.int64))
