"""The single internal entry point of framework adapters (``smaq_rs.torch``, and any later one).

An adapter needs more of the Rust core than the public API gives: zero-copy NumPy views of its
framework's tensors, the core record inside a :class:`PackedTensor`, the zero-map store and the
fused optimizer steps. It takes all of that from this module and nothing else of the package's
internals: adapters import neither ``_core`` nor ``_api`` and read no private attribute of another
module (tests/torch/test_torch_layering.py checks the torch layer's sources). Whatever the core
offers is named here once, so a change of the extension's Python API is absorbed in this file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from ._api import PackedTensor, _torch_as_numpy, compress, decompress
from ._core import ChecksumError, CodecError, DtypeError, FormatError, LayoutError, SmaqError
from .checkpoint import Policy
from .checkpoint import open as open_checkpoint
from .checkpoint import save as save_checkpoint

__all__ = [
    "ChecksumError", "CodecError", "CsrPattern", "DtypeError", "FormatError", "LayoutError",
    "PackedTensor", "Policy", "SmaqError", "adam_stats_settled", "adam_step", "compress", "core_of", "decompress",
    "open_checkpoint", "pack", "registry", "save_checkpoint",
    "registry_keeps_zeros",
    "sgd_step", "sparse_linear_backward", "sparse_linear_forward", "sparse_padded_ld",
    "sparse_transpose", "store_decode",
    "store_encode", "torch_as_numpy",
]


# -- tensors and packed records ------------------------------------------------------------------
def torch_as_numpy(t: Any, what: str) -> Tuple[np.ndarray, str]:
    """A zero-copy NumPy view of a contiguous CPU torch tensor, and its smaq_rs dtype name
    (bfloat16 is viewed as uint16). ``what`` names the tensor in the LayoutError / DtypeError."""
    return _torch_as_numpy(t, what)


def pack(core: "_core.Packed", kind: str = "torch") -> PackedTensor:
    """The PackedTensor of a core record (as ``store_encode`` and the fused steps return)."""
    return PackedTensor(core, kind)


def core_of(packed: Optional[PackedTensor]) -> Optional["_core.Packed"]:
    """The core record inside a PackedTensor (None for None), as the core functions take it."""
    return None if packed is None else packed._packed


# -- zero-map store (src/zmap.rs) and fused optimizer steps (src/optim.rs) -----------------------
#: See _core.pyi for the signatures.
store_encode = _core.store_encode
store_decode = _core.store_decode
adam_step = _core.adam_step
adam_stats_settled = _core.adam_stats_settled
sgd_step = _core.sgd_step

# -- sparse Linear kernels (src/sparse/) ----------------------------------------------------------
#: See _core.pyi for the signatures.
CsrPattern = _core.CsrPattern
sparse_linear_forward = _core.sparse_linear_forward
sparse_linear_backward = _core.sparse_linear_backward
sparse_padded_ld = _core.sparse_padded_ld
sparse_transpose = _core.sparse_transpose


# -- the codec registry ---------------------------------------------------------------------------
def registry() -> List[Dict[str, Any]]:
    """Every registered codec: name, id, doc, defaults (as ``smaq_rs.list_codecs()``)."""
    return _core.codecs()


def registry_keeps_zeros(codec: str, params: Dict[str, Any]) -> bool:
    """Whether ``codec`` with ``params`` decodes every exact 0 to exactly 0, as the core's
    registry states it (a function of the parameters: ``int`` keeps zeros with
    ``scheme="absmax"`` and nearest or stochastic rounding, not with ``affine`` or
    ``dithered``; a seed never decides it). CodecError for an unknown codec or invalid
    parameters."""
    return bool(_core.keeps_zeros(codec, params))
