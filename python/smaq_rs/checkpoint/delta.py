"""Differences from a base, for incremental checkpoints (docs/FORMAT.md, "deltas" and
"residuals").

Exact differences: a changed tensor stored exactly is kept as a *code* of its bit patterns
against the base's, taken as unsigned integers of the element's width:

- ``"sub"``: zigzag(new - base), the wrapping integer difference with its sign moved to bit 0
  (small differences of either sign become small numbers, whose high bytes are zero);
- ``"xor"``: new ^ base (bits that did not change are 0; it wins where the low bits of both
  are zeros, e.g. float64 copies of float32 values, which ``"sub"`` turns into runs of ones).

The code is stored so that the entry's codec sees its bytes as planes, most significant first:
``"rot"`` (entries coded by the ``lossless`` codec, which rotates each element left by one bit
before splitting it into byte planes: the code is stored rotated right by one, so the codec's
planes are exactly the code's bytes) or ``"planes"`` (zstd and raw entries: the bytes are
transposed into ``itemsize`` planes, most significant first, each ``n`` bytes long). For float
dtypes the elements are also put in ``"exponent"`` order, a stable sort by the base element's
exponent field: a step moves a weight by about the same amount whatever its magnitude, so the
size of the difference in units of the last place follows the base's exponent, and each chunk
of the ``lossless`` codec then holds differences of one size. Both sides know the base, so
the order costs nothing to store.

Per tensor the writer estimates (:func:`choose`) the coded size of the tensor itself and of
both codes, and keeps the smallest; a tensor kept whole is not a delta at all.

Document version 2 stored ``"sub"`` without a layout or an order, in the tensor's own dtype and
codec (:data:`PLAIN`); such files are still read.

Lossy residuals: a changed float tensor coded by a lossy codec is kept as ``new - base``, where
``base`` is what the base checkpoint returns for it; :func:`to_float` and :func:`from_float`
are the exact conversions both sides use for that arithmetic.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from .policy import itemsize

#: Element sizes with an exact delta coding, and their unsigned and signed integer types.
_TYPES = {1: (np.uint8, np.int8), 2: (np.uint16, np.int16), 4: (np.uint32, np.int32),
          8: (np.uint64, np.int64)}

#: (mantissa bits, exponent bits) of each float dtype: where its exponent field lies.
_FIELDS = {"float32": (23, 8), "float64": (52, 11), "float16": (10, 5), "bfloat16": (7, 8)}

OPS = ("sub", "xor")
LAYOUTS = ("rot", "planes", "plain")
ORDERS = ("none", "exponent")

#: The record of a document-version-2 delta: "sub" stored as is.
PLAIN: Dict[str, str] = {"op": "sub", "layout": "plain", "order": "none"}

#: The lossless codec's parameters for a delta entry: chunks small enough that one holds
#: differences of about one size once they are in exponent order.
LOSSLESS_PARAMS: Dict[str, Any] = {"chunk_size": 16384}

#: Elements coded per chunk when estimating sizes (the delta entries' chunk size).
_CHUNK = 16384
#: At most this many chunks are sampled, evenly spread over the tensor, to estimate sizes.
_SAMPLE_CHUNKS = 4


def supports(dtype: str, itemsize: int) -> bool:
    """Whether tensors of ``dtype`` (``itemsize`` bytes per element) can be stored as exact
    deltas (bool is not: its entries must hold 0 or 1)."""
    return itemsize in _TYPES and dtype != "bool"


def valid(rec: Any) -> bool:
    """Whether ``rec`` is a well-formed delta record of the document."""
    return (isinstance(rec, dict) and set(rec) == {"op", "layout", "order"}
            and rec["op"] in OPS and rec["layout"] in LAYOUTS and rec["order"] in ORDERS)


# -- the codes ------------------------------------------------------------------------------------
def _code(new: np.ndarray, base: np.ndarray, op: str) -> np.ndarray:
    """The code of `new` against `base` (unsigned arrays of one width)."""
    if op == "xor":
        return new ^ base
    u = new.dtype.type
    s = _TYPES[new.dtype.itemsize][1]
    d = (new - base).view(s)  # wraps modulo 2^bits
    return ((d << s(1)) ^ (d >> s(8 * new.dtype.itemsize - 1))).view(u)


def _uncode(c: np.ndarray, base: np.ndarray, op: str) -> np.ndarray:
    """The `new` that :func:`_code` was given, from its code and the same `base`."""
    if op == "xor":
        return c ^ base
    u = c.dtype.type
    d = (c >> u(1)) ^ (np.zeros_like(c) - (c & u(1)))
    return base + d


def _rotr(c: np.ndarray) -> np.ndarray:
    u = c.dtype.type
    return (c >> u(1)) | (c << u(8 * c.dtype.itemsize - 1))


def _rotl(c: np.ndarray) -> np.ndarray:
    u = c.dtype.type
    return (c << u(1)) | (c >> u(8 * c.dtype.itemsize - 1))


def _to_planes(c: np.ndarray) -> np.ndarray:
    """The bytes of `c` as planes, most significant first (little-endian elements)."""
    return np.ascontiguousarray(c.view(np.uint8).reshape(-1, c.dtype.itemsize)[:, ::-1].T)


def _from_planes(b: np.ndarray, itemsize: int) -> np.ndarray:
    u = _TYPES[itemsize][0]
    return np.ascontiguousarray(b.reshape(itemsize, -1)[::-1].T).reshape(-1).view(u)


def _order(base: np.ndarray, dtype: str) -> Optional[np.ndarray]:
    """The permutation that sorts the elements by the base's exponent field (stable), or None
    for dtypes without one."""
    if dtype not in _FIELDS:
        return None
    mant, exp = _FIELDS[dtype]
    u = base.dtype.type
    key = ((base >> u(mant)) & u((1 << exp) - 1)).astype(np.uint8 if exp <= 8 else np.uint16)
    return np.argsort(key, kind="stable")


# -- writing and reading -------------------------------------------------------------------------
def encode(new: np.ndarray, base: np.ndarray, dtype: str, rec: Dict[str, str]) -> np.ndarray:
    """The bytes to store for `new` (dense bytes) against `base` (the base's dense bytes of the
    same tensor) under delta record `rec`."""
    u = _TYPES[itemsize(dtype)][0]
    nu, bu = new.view(u), base.view(u)
    if rec["order"] == "exponent":
        perm = _order(bu, dtype)
        nu, bu = nu[perm], bu[perm]
    c = _code(nu, bu, rec["op"])
    if rec["layout"] == "rot":
        c = _rotr(c)
    elif rec["layout"] == "planes":
        return _to_planes(c).reshape(-1)
    return c.view(np.uint8)


def decode(stored: np.ndarray, base: np.ndarray, dtype: str, rec: Dict[str, str]) -> np.ndarray:
    """The dense bytes :func:`encode` was given as `new`, from what it returned and the same
    `base`."""
    size = itemsize(dtype)
    u = _TYPES[size][0]
    bu = base.view(u)
    if rec["layout"] == "planes":
        c = _from_planes(stored, size)
    else:
        c = stored.view(u)
        if rec["layout"] == "rot":
            c = _rotl(c)
    if rec["order"] != "exponent":
        return _uncode(c, bu, rec["op"]).view(np.uint8)
    perm = _order(bu, dtype)
    out = np.empty_like(bu)
    out[perm] = _uncode(c, bu[perm], rec["op"])
    return out.view(np.uint8)


def choose(new: np.ndarray, base: np.ndarray, dtype: str, codec: str
           ) -> Optional[Dict[str, str]]:
    """The delta record that stores `new` smallest against `base` with `codec` ("lossless",
    "zstd" or "raw"), or None when storing the tensor whole is estimated no larger (always for
    "raw", which does not compress). Sizes are estimated as the order-0 entropy of each byte
    plane in chunks of 16384 elements, on at most 4 such chunks spread over the tensor."""
    u = _TYPES[itemsize(dtype)][0]
    n = new.size // itemsize(dtype)
    if codec == "raw" or n == 0:
        return None
    nu, bu = _sample(new.view(u)), _sample(base.view(u))
    layout = "rot" if codec == "lossless" else "planes"
    order = "exponent" if dtype in _FIELDS else "none"
    # The lossless codec rotates each element left by one before splitting it into planes.
    best, cost = None, _cost(_rotl(nu) if layout == "rot" else nu)
    if order == "exponent":
        perm = _order(bu, dtype)
        nu, bu = nu[perm], bu[perm]
    for op in OPS:
        c = _cost(_code(nu, bu, op))
        if c < cost:
            best, cost = {"op": op, "layout": layout, "order": order}, c
    return best


def _sample(u: np.ndarray) -> np.ndarray:
    n = u.size
    if n <= _CHUNK * _SAMPLE_CHUNKS:
        return u
    starts = np.linspace(0, n - _CHUNK, _SAMPLE_CHUNKS).astype(np.int64)
    return np.concatenate([u[s:s + _CHUNK] for s in starts])


def _cost(c: np.ndarray) -> float:
    """Estimated bits to code `c`: per chunk of 16384 elements and byte plane, the order-0
    entropy of the plane's bytes."""
    planes = c.view(np.uint8).reshape(-1, c.dtype.itemsize).T
    n = planes.shape[1]
    n_chunks = -(-n // _CHUNK)
    offset = (np.arange(n, dtype=np.intp) // _CHUNK) * 256
    bits = 0.0
    for plane in planes:
        counts = np.bincount(offset + plane, minlength=n_chunks * 256)
        counts = counts.reshape(n_chunks, 256).astype(np.float64)
        total = counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(counts > 0, -counts * np.log2(counts / total), 0.0)
        bits += float(h.sum())
    return bits


# -- lossy residuals -----------------------------------------------------------------------------
def to_float(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The values of dense bytes `raw` of float dtype `dtype`: float64 for float64, float32
    otherwise (every float16 and bfloat16 value is exact in float32)."""
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "float64":
        return raw.view(np.float64)
    return raw.view(np.dtype(dtype)).astype(np.float32)


def from_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """The dense bytes of `x` (from :func:`to_float`'s arithmetic) in float dtype `dtype`,
    rounded to nearest, ties to even."""
    if dtype == "bfloat16":
        b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
        out = (rounded >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(x)
        out[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # quiet NaN
        return out.view(np.uint8)
    return np.ascontiguousarray(x, dtype=np.dtype(dtype)).reshape(-1).view(np.uint8)
