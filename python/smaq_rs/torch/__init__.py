"""smaq_rs for PyTorch training: real packed memory, measured from real buffers.

- :func:`wrap_model` / :class:`Compressor`: simulation as in the SmaQ paper (compress and
  decompress feature maps and gradient maps); studies accuracy, saves no memory.
- :class:`compressed_activations`: saved-tensor hooks that keep what autograd saves for backward
  as packed bytes (real savings).
- :mod:`smaq_rs.torch.optim`: SGD / Adam / AdamW with momentum / exp_avg / exp_avg_sq packed
  between steps.
- :class:`MemoryMeter`: per-step, per-tag dense vs held bytes and the process's peak RSS.
- :func:`load_into`: a checkpoint into a module by name, one tensor at a time.
- :mod:`smaq_rs.torch.qml`: quantizers (any codec, FloatingPoint, Int, Tiled), QLinear / QConv2d
  with eight quantized data paths, Sum / Hsum gradient accumulators, :func:`quantize_model`.
- :mod:`smaq_rs.torch.ptq`: post-training quantization, static (calibrated) or dynamic, with
  the weights stored as packed bytes in the state_dict.
- :mod:`smaq_rs.torch.distributed` (imported on first use): a DDP communication hook with
  packed bytes on the wire, and a compressed ``torch.distributed.checkpoint`` Writer/Reader.
- :mod:`smaq_rs.torch.sparse`: SparseLinear (CSR weight, forward and backward in the Rust
  core) and :func:`swap_modules_with_sparse`, which swaps a layer only where measured faster.
- :mod:`smaq_rs.torch.prune`: magnitude / snip-momentum pruning, unstructured, N:M and block
  patterns, cubic or exponential schedules, training callbacks.

CPU tensors; a CUDA tensor is copied to the host to be packed and brought back when decoded.
"""

from . import optim, prune, ptq, qml, sparse
from ._autograd import LAYER_GROUPS, Compressor, unwrap_model, wrap_model
from ._hooks import compressed_activations
from ._load import LoadResult, load_into
from ._meter import MemoryMeter, format_table, peak_rss, reset_peak_rss
from ._store import Stored, codec_keeps_zeros
from .optim import SGD, Adam, AdamW, state_nbytes
from .qml import (
    CodecQuantizer,
    FloatingPointQuantizer,
    HsumAccumulator,
    IntQuantizer,
    PrefixBundle,
    QConv2d,
    QLinear,
    Quantizer,
    SumAccumulator,
    TiledQuantizer,
    quantize_model,
)


def __getattr__(name: str):
    # torch.distributed is imported only when the distributed layer is asked for.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYER_GROUPS",
    "LoadResult",
    "SGD",
    "Adam",
    "AdamW",
    "CodecQuantizer",
    "Compressor",
    "FloatingPointQuantizer",
    "HsumAccumulator",
    "IntQuantizer",
    "MemoryMeter",
    "PrefixBundle",
    "QConv2d",
    "QLinear",
    "Quantizer",
    "Stored",
    "SumAccumulator",
    "TiledQuantizer",
    "codec_keeps_zeros",
    "compressed_activations",
    "distributed",
    "format_table",
    "load_into",
    "optim",
    "peak_rss",
    "prune",
    "ptq",
    "qml",
    "quantize_model",
    "reset_peak_rss",
    "sparse",
    "state_nbytes",
    "unwrap_model",
    "wrap_model",
]
