"""smaq_rs inside ``torch.distributed``: compressed gradient averaging for DDP and compressed
``torch.distributed.checkpoint`` storage.

- :class:`CompressState` + :func:`compress_hook`: ``ddp.register_comm_hook(state, hook)``;
  packed bytes on the wire (reduce-scatter + all-gather, or all-gather), error feedback, warm-up,
  bytes sent per step.
- :class:`Writer` / :class:`Reader`: a DCP storage pair that stores every tensor item with
  smaq_rs codecs by a :class:`smaq_rs.Policy` (lossless by default), checksummed and verified.
"""

from ._dcp import Reader, StoredItem, Writer
from ._hook import (
    AGGREGATIONS,
    SCHEMES,
    CompressState,
    ConfigMismatchError,
    DecodeFaultError,
    compress_hook,
    shard_bounds,
)

__all__ = [
    "AGGREGATIONS",
    "SCHEMES",
    "CompressState",
    "ConfigMismatchError",
    "DecodeFaultError",
    "Reader",
    "StoredItem",
    "Writer",
    "compress_hook",
    "shard_bounds",
]

# The public classes keep their public path (repr, pickle, docs).
for _cls in (CompressState, ConfigMismatchError, DecodeFaultError, Reader, StoredItem, Writer):
    _cls.__module__ = __name__
compress_hook.__module__ = shard_bounds.__module__ = __name__
del _cls
