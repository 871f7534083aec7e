"""smaq_rs: compress deep-learning tensors into real packed bytes.

>>> import numpy as np, smaq_rs
>>> x = np.random.default_rng(0).standard_normal(1 << 16, dtype=np.float32)
>>> p = smaq_rs.compress(x)            # SmaQ 6/8 bits
>>> p.nbytes < x.nbytes / 4.5          # the true byte length of the packed buffer
True
>>> y = smaq_rs.decompress(p)          # a numpy array again, same dtype and shape

``list_codecs()`` lists the codec registry; ``smaq_rs.configs`` holds one plain-data config class
per codec. ``codecs()`` is the deprecated name of ``list_codecs()``: it is a plain function of
this package (no module is named ``smaq_rs.codecs``, so importing a submodule never replaces it).
"""

from ._api import (
    PackedTensor,
    cached_bytes,
    codecs,
    compress,
    decompress,
    empty_cache,
    get_num_threads,
    list_codecs,
    set_num_threads,
    thread_backend,
)
from .checkpoint import Checkpoint, Policy, load, open, save
from ._core import (
    FORMAT_VERSION,
    ChecksumError,
    CodecError,
    DtypeError,
    FormatError,
    LayoutError,
    SmaqError,
    __version__,
)

__all__ = [
    "FORMAT_VERSION",
    "ChecksumError",
    "CodecError",
    "DtypeError",
    "FormatError",
    "LayoutError",
    "PackedTensor",
    "SmaqError",
    "__version__",
    "cached_bytes",
    "codecs",
    "compress",
    "decompress",
    "empty_cache",
    "get_num_threads",
    "list_codecs",
    "set_num_threads",
    "thread_backend",
    "Checkpoint",
    "Policy",
    "load",
    "open",
    "save",
]
