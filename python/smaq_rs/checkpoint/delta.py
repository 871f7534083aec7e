"""Differences of bit patterns, for incremental checkpoints: a changed tensor stored exactly is
kept as the wrapped integer difference of its bit patterns from the base's, zigzag-coded (small
differences of either sign become small unsigned numbers, whose high bytes are zero), then
entropy-coded like any tensor (docs/FORMAT.md, "from_base" and "deltas")."""

from __future__ import annotations

import numpy as np

#: Element sizes with a delta coding, and their unsigned and signed integer types.
_TYPES = {2: (np.uint16, np.int16), 4: (np.uint32, np.int32), 8: (np.uint64, np.int64)}


def supports(itemsize: int) -> bool:
    return itemsize in _TYPES


def encode(new: np.ndarray, base: np.ndarray, itemsize: int) -> np.ndarray:
    """zigzag(new - base) of two equally long byte arrays of `itemsize`-byte elements."""
    u, s = _TYPES[itemsize]
    d = (new.view(u) - base.view(u)).view(s)  # wraps modulo 2^bits
    bits = 8 * itemsize
    z = (d << 1) ^ (d >> (bits - 1))
    return z.view(u).view(np.uint8)


def decode(z: np.ndarray, base: np.ndarray, itemsize: int) -> np.ndarray:
    """The bytes `encode` was given as `new`, from its output and the same `base`."""
    u, _ = _TYPES[itemsize]
    zz = z.view(u)
    d = (zz >> u(1)) ^ (np.zeros_like(zz) - (zz & u(1)))
    return (base.view(u) + d).view(np.uint8)
