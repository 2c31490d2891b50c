"""Counter-based random numbers: the value at (key, index) is a pure function of both, so any part of a
tensor can be drawn on its own, on any device, in any order. A model initialised this way is the same
whichever rank holds which shard of which parameter, and no rank ever builds more than its own shard.

Each index is mixed with a 64-bit key by SplitMix64's finalizer (Steele, Lea and Flood 2014, "Fast
splittable pseudorandom number generators"; the mixer of java.util.SplittableRandom), in wrapping
int64 arithmetic; the top 53 bits give a uniform in (0, 1), and the inverse normal CDF
(sqrt(2) erfinv(2u - 1)) a standard normal.
"""

from __future__ import annotations

import hashlib
import math

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: SplitMix64's counter increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_CHUNK = 1 << 20  # elements drawn at a time: bounds the int64 and float64 temporaries


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 torch holds it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic): the sign bits masked off."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def key_of(*parts: object) -> int:
    """A 64-bit key from any parts (a seed and a parameter name, say): stable across runs and machines."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return _signed(int.from_bytes(digest, "little"))


def random_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """64 random bits (as int64) for each int64 index: SplitMix64 of key + index x golden (in place on
    one fresh tensor: the mixing is a dozen integer passes over it)."""
    x = index.to(torch.int64) * _signed(_GOLDEN)
    x += key
    for bits, multiplier in ((30, _MIX1), (27, _MIX2)):
        x ^= _shift_right(x, bits)
        x *= _signed(multiplier)
    x ^= _shift_right(x, 31)
    return x


def uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """A float64 uniform in the open interval (0, 1) for each index."""
    return (_shift_right(random_bits(key, index), 11).to(torch.float64) + 0.5) * 2.0**-53


def normal(key: int, index: torch.Tensor, std: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal(0, std) for each index (the inverse CDF of a counter-based uniform), in `dtype`; drawn in
    chunks, so a large tensor needs no temporaries many times its own size."""
    flat = index.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=index.device)
    for start in range(0, flat.numel(), _CHUNK):
        u = uniform(key, flat[start:start + _CHUNK])
        out[start:start + _CHUNK] = (torch.special.erfinv(u * 2 - 1) * (math.sqrt(2) * std)).to(dtype)
    return out.view(index.shape)
