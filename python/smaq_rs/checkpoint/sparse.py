"""Pruned tensors in a checkpoint: a float tensor whose elements are mostly zeros is kept as a
bitmask of its non-zero elements plus those elements, coded like any tensor (docs/FORMAT.md,
"sparse"). Both +0.0 and -0.0 count as zeros (pruning by multiplying with a mask leaves -0.0
where a weight was negative); when any zero is -0.0, one sign bit per zero is kept too, so
every element comes back bit for bit."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from .. import _core

#: Unsigned integer views of each element size.
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _nonzeros(u: np.ndarray, limit: Optional[int] = None) -> int:
    """Elements of `u` (the bit patterns of a float tensor) that are not a zero of either sign:
    one parallel pass in the core, no temporary. With `limit`, counting stops past it (the
    result is then some count above `limit`)."""
    flat = np.ascontiguousarray(u).reshape(-1).view(np.uint8)
    return int(_core.count_nonzero_bits(flat, u.itemsize, limit))


#: Codecs a tensor's non-zero values may go through when it is stored sparse: the exact ones and
#: SmaQ, which code a 1-D run of values as they code the dense tensor. Other codecs (blockwise
#: or per-row layouts) keep the dense tensor.
CODECS = ("lossless", "zstd", "smaq")

#: Tensors smaller than this are never split (the mask entry's own record would cost more).
MIN_NUMEL = 4096


def split(raw: np.ndarray, itemsize: int, threshold: Optional[float]
          ) -> Optional[Tuple[np.ndarray, np.ndarray, int, Optional[np.ndarray]]]:
    """(packed bitmask of the non-zero elements, their bytes, their count, packed sign bits of
    the zeros or None when every zero is +0.0) when at least ``threshold`` of the elements of
    ``raw`` (the dense bytes) are zeros; None otherwise. Bit order little."""
    if threshold is None or itemsize not in _UINT:
        return None
    u = raw.view(_UINT[itemsize])
    n = u.size
    if n < MIN_NUMEL:
        return None
    # Sparse when n - nnz >= threshold * n, i.e. nnz <= floor(n - threshold * n): the count
    # stops past that (a dense tensor, the common case, is decided after about half of it).
    most = math.floor(n - threshold * n)
    nnz = _nonzeros(u, max(most, 0))
    if nnz > most:
        return None
    sign = _UINT[itemsize](1 << (8 * itemsize - 1))
    keep = (u & ~sign) != 0
    neg = u[~keep] == sign
    signs = np.packbits(neg, bitorder="little") if neg.any() else None
    return np.packbits(keep, bitorder="little"), u[keep].view(np.uint8), nnz, signs


def expand(mask: np.ndarray, values: np.ndarray, numel: int, itemsize: int,
           signs: Optional[np.ndarray] = None) -> np.ndarray:
    """The dense bytes ``split`` took apart: zeros (of the recorded signs) where the mask is
    clear, the values where it is set."""
    u = _UINT[itemsize]
    keep = np.unpackbits(mask, count=numel, bitorder="little").view(bool)
    out = np.zeros(numel, dtype=u)
    out[keep] = values.view(u)
    if signs is not None:
        zeros = numel - int(np.count_nonzero(keep))
        neg = np.unpackbits(signs, count=zeros, bitorder="little").view(bool)
        z = out[~keep]
        z[neg] = u(1 << (8 * itemsize - 1))
        out[~keep] = z
    return out.view(np.uint8)
