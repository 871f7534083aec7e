"""Checkpoints on disk: ``save``, ``load`` and ``open`` for state dicts and optimizer states.

The file is a smaq_rs checkpoint container (docs/FORMAT.md, "Checkpoint container"): a bounded,
checksummed header naming every tensor, 8-byte-aligned payloads, and a JSON document holding
everything that is not a tensor (nested dicts/lists, step counters, param_groups, user metadata).
Nothing is pickled. Writes go to a temporary file in the same directory, are fsynced and renamed
over the target, so a crash never damages an existing checkpoint.

>>> import torch, smaq_rs
>>> sd = torch.nn.Linear(256, 256).state_dict()
>>> smaq_rs.save(sd, "/tmp/m.smaq")                      # lossy SmaQ 6/8 for large float tensors
>>> back = smaq_rs.load("/tmp/m.smaq")
>>> with smaq_rs.open("/tmp/m.smaq") as ck:              # lazy: reads only what is asked for
...     w = ck["weight"]

The package is split by concern:

- :mod:`.policy`: :class:`Policy`, which codec stores each tensor;
- :mod:`.document`: flattening a nested object into tensors plus the JSON document, the
  document's schema, and rebuilding the object from it;
- :mod:`.delta`, :mod:`.sparse`: a changed tensor kept as its difference from a base's; a pruned
  tensor kept as a bitmask plus its non-zero elements;
- :mod:`.writer`: :func:`save`;
- :mod:`.reader`: :class:`Checkpoint`, :func:`open` and :func:`load`.
"""

from .policy import Policy
from .reader import Checkpoint, load, open
from .writer import save

__all__ = ["Policy", "Checkpoint", "save", "load", "open"]

# The public classes keep their public path (repr, pickle, docs): smaq_rs.checkpoint.X.
Policy.__module__ = Checkpoint.__module__ = __name__
