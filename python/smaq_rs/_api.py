"""compress / decompress and PackedTensor: the public face of the Rust core."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _core
from ._core import DtypeError, LayoutError

try:  # torch is optional: everything works on NumPy arrays without it.
    import torch as _torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    _torch = None

ArrayLike = Any  # numpy.ndarray or torch.Tensor

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def _is_torch(x: Any) -> bool:
    return _torch is not None and isinstance(x, _torch.Tensor)


def _torch_dtype(name: str):
    return {
        "float32": _torch.float32,
        "float16": _torch.float16,
        "bfloat16": _torch.bfloat16,
        "float64": _torch.float64,
    }[name]


def _torch_as_numpy(t, what: str) -> Tuple[np.ndarray, str]:
    """A zero-copy NumPy view of a CPU tensor, and the smaq_rs dtype name (framework adapters
    reach it, and PackedTensor's core record, through _bridge only)."""
    if t.device.type != "cpu":
        raise LayoutError(f"{what} is on {t.device}; move it to the CPU first (t.cpu())")
    if not t.is_contiguous():
        raise LayoutError(
            f"{what} is not contiguous; pass x.contiguous() (smaq_rs never copies silently)"
        )
    if t.dtype == _torch.bfloat16:
        return t.detach().view(_torch.int16).numpy().view(np.uint16), "bfloat16"
    name = str(t.dtype).replace("torch.", "")
    if name not in _NUMPY_DTYPES:
        raise DtypeError(
            f"cannot compress a tensor of dtype {t.dtype}; supported: float32, float16, "
            "bfloat16, float64"
        )
    return t.detach().numpy(), name


class PackedTensor:
    """A tensor stored as packed bytes.

    ``nbytes`` is the true length of those bytes (header, statistics, chunk index, payload and
    checksum included); ``to_bytes()`` returns exactly them and ``PackedTensor.from_bytes`` reads
    them back, verifying the checksum. Immutable, picklable.
    """

    __slots__ = ("_packed", "_kind", "_device")

    def __init__(self, packed: "_core.Packed", kind: str = "numpy", device: Any = None):
        if kind not in ("numpy", "torch"):
            raise ValueError(f"kind must be 'numpy' or 'torch', not {kind!r}")
        self._packed = packed
        self._kind = kind
        self._device = device

    # -- what it is ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held: the length of ``to_bytes()``."""
        return self._packed.nbytes

    @property
    def dense_nbytes(self) -> int:
        """Bytes the tensor takes uncompressed."""
        return self._packed.dense_nbytes

    @property
    def ratio(self) -> float:
        """dense_nbytes / nbytes (inf for an empty tensor's header-only record is avoided: 0)."""
        return self.dense_nbytes / self.nbytes

    @property
    def bits_per_value(self) -> float:
        """8 * nbytes / numel, all overheads included (nan for an empty tensor)."""
        n = self.numel
        return 8.0 * self.nbytes / n if n else float("nan")

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._packed.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def dtype(self) -> str:
        """Element type of the original tensor: float32, float16, bfloat16 or float64."""
        return self._packed.dtype

    @property
    def codec(self) -> str:
        return self._packed.codec

    @property
    def params(self) -> Dict[str, Any]:
        """Every parameter the tensor was encoded with (the seed actually used included)."""
        return self._packed.params

    @property
    def stats(self) -> Dict[str, Any]:
        """What the encoder recorded. SmaQ: mean, std, n_outliers, n_clamped (values clamped at
        t_outlier: only with ``outliers="clamp"``), n_escapes and escape_bytes (values beyond
        t_outlier in the escape stream), n_exceptions (kept exactly), n_nonfinite, ..."""
        return self._packed.stats

    @property
    def kind(self) -> str:
        """'numpy' or 'torch': what ``decompress`` returns."""
        return self._kind

    # -- bytes --------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return self._packed.to_bytes()

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], kind: Optional[str] = None
                   ) -> "PackedTensor":
        """Reads packed bytes. Raises FormatError / ChecksumError on anything malformed.

        ``kind`` chooses what ``decompress`` returns: 'numpy' by default, 'torch' for bfloat16
        (NumPy has no bfloat16) when torch is installed.
        """
        packed = _core.Packed.from_bytes(data)
        if kind is None:
            kind = "torch" if packed.dtype == "bfloat16" and _torch is not None else "numpy"
        return cls(packed, kind)

    def __reduce__(self):
        return (PackedTensor.from_bytes, (self.to_bytes(), self._kind))

    def __repr__(self) -> str:
        return (
            f"PackedTensor(codec={self.codec!r}, dtype={self.dtype}, shape={self.shape}, "
            f"nbytes={self.nbytes}, ratio={self.ratio:.2f})"
        )


def compress(x: ArrayLike, codec: str = "smaq", **params: Any) -> PackedTensor:
    """Compresses a NumPy array or a torch tensor into packed bytes.

    The input is read in place (no copy) and must be C-contiguous; a CUDA tensor is first copied
    to the host and ``decompress`` returns it to the same device. Parameters are the codec's
    (``smaq_rs.list_codecs()`` lists them with their defaults); unknown names raise CodecError.
    """
    if _is_torch(x):
        device = x.device if x.device.type != "cpu" else None
        t = x.detach()
        if device is not None:
            t = t.cpu()
        arr, dtype = _torch_as_numpy(t, "input")
        return PackedTensor(_core.encode(arr, codec, params, dtype), "torch", device)
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise LayoutError(
                "input is not C-contiguous; pass np.ascontiguousarray(x) "
                "(smaq_rs never copies silently)"
            )
        return PackedTensor(_core.encode(x, codec, params), "numpy")
    raise DtypeError(f"expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def decompress(packed: Union[PackedTensor, bytes, bytearray, memoryview],
               out: Optional[ArrayLike] = None) -> ArrayLike:
    """Decodes a PackedTensor (or its bytes) into a new array, or into ``out``.

    Returns the kind of object that was compressed (NumPy array or torch tensor) with the
    original dtype and shape. ``out`` must be a C-contiguous CPU array or tensor of that dtype and
    shape; it is filled and returned.
    """
    if not isinstance(packed, PackedTensor):
        packed = PackedTensor.from_bytes(packed)
    if out is not None:
        return _decompress_into(packed, out)
    arr = packed._packed.decode()
    if packed.kind == "numpy":
        return arr
    t = _torch.from_numpy(arr)
    if packed.dtype == "bfloat16":
        t = t.view(_torch.int16).view(_torch.bfloat16)
    if packed._device is not None:
        t = t.to(packed._device)
    return t


def _decompress_into(packed: PackedTensor, out: ArrayLike) -> ArrayLike:
    if not (_is_torch(out) or isinstance(out, np.ndarray)):
        raise LayoutError(f"out must be a numpy.ndarray or torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != packed.shape:
        raise LayoutError(f"out has shape {tuple(out.shape)}, the tensor has {packed.shape}")
    if _is_torch(out):
        if out.dtype != _torch_dtype(packed.dtype):
            raise LayoutError(f"out has dtype {out.dtype}, the tensor is {packed.dtype}")
        view, _ = _torch_as_numpy(out, "out")
        packed._packed.decode_into(view)
        return out
    else:
        want = np.uint16 if packed.dtype == "bfloat16" else _NUMPY_DTYPES[packed.dtype]
        if out.dtype != want:
            raise LayoutError(f"out has dtype {out.dtype}, expected {np.dtype(want).name}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise LayoutError("out must be a writable C-contiguous array")
        packed._packed.decode_into(out)
        return out


def list_codecs() -> List[Dict[str, Any]]:
    """Every registered codec: name, id, doc and default parameters."""
    return _core.codecs()


def codecs() -> List[Dict[str, Any]]:
    """Deprecated name of :func:`list_codecs` (same list); kept for one version."""
    warnings.warn(
        "smaq_rs.codecs() is deprecated; use smaq_rs.list_codecs() (codec config classes are in "
        "smaq_rs.configs)",
        DeprecationWarning,
        stacklevel=2,
    )
    return list_codecs()


def set_num_threads(n: int) -> None:
    """Threads used by encode/decode (0: the default, SMAQ_RS_NUM_THREADS or the CPU count)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


def thread_backend() -> str:
    """Where the codecs' parallel loops run in this process now.

    ``"openmp"``: as parallel regions of the GNU OpenMP team the process already has (torch's),
    so that a codec called between torch operators (the activation hooks, the packed optimizer
    step) uses torch's workers instead of competing with them while they spin. ``"rayon"``:
    smaq_rs's own thread pool (no OpenMP loaded, a forked child, or ``SMAQ_RS_THREADS=rayon`` in
    the environment). Either way the threads number :func:`get_num_threads` and the bytes
    written are the same.
    """
    return _core.thread_backend()


def empty_cache() -> int:
    """Frees the packed buffers and scratch space kept for reuse; returns the bytes released.

    When a large PackedTensor (8 MiB or more) is freed, smaq_rs keeps its buffer, up to 256 MiB
    in all (``SMAQ_RS_BUFFER_CACHE_MB`` sets the limit, 0 turns it off), and the next encode of
    a similar size writes into it: a fresh buffer costs a page fault and a kernel-zeroed page on
    first write, as much time as the encoding itself. The SmaQ encoder's per-chunk side streams
    are kept the same way (up to 64 MiB). Kept memory counts in the process's resident memory;
    ``cached_bytes()`` says how much, and this releases it.
    """
    return _core.empty_cache()


def cached_bytes() -> int:
    """Bytes of freed packed buffers and scratch space kept for reuse (see ``empty_cache``)."""
    return _core.cached_bytes()
