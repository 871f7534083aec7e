"""``torch.distributed.checkpoint`` storage that keeps every item with smaq_rs codecs.

:class:`Writer` subclasses DCP's ``FileSystemWriter``: planning, the ``.metadata`` file and
resharding stay DCP's; only the bytes of each rank's items change. Each rank writes one smaq_rs
checkpoint container (``__<rank>_0.smaq``, the format of ``smaq_rs.save``: atomic, checksummed
entries, no pickle) holding its tensor items coded by a :class:`smaq_rs.Policy` (lossless by
default) and its byte items as uint8 entries. Each item's storage record names its file and
entry. :class:`Reader` subclasses ``FileSystemReader``: it reads each requested entry (its
checksum is verified on every read), narrows it to the requested chunk and copies it into the
planner's tensor, so DCP's load planner can reshard (a checkpoint saved by 2 ranks loads on 1,
4, or into differently sharded DTensors).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Union

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ... import _bridge

__all__ = ["Reader", "StoredItem", "Writer"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class StoredItem:
    """Where a DCP item lives: the rank's container file (relative to the checkpoint
    directory) and the entry name inside it."""

    relative_path: str
    entry: str


def _entry_name(index: MetadataIndex) -> str:
    """The entry of an item: its fully qualified name, with the chunk's offsets when the item
    is a chunk of a sharded tensor that does not start at the origin."""
    off = tuple(index.offset) if index.offset is not None else ()
    if any(off):
        return f"{index.fqn}@{','.join(str(o) for o in off)}"
    return index.fqn


class Writer(FileSystemWriter):
    """A DCP ``StorageWriter`` storing every tensor item with smaq_rs codecs.

    ``policy``: a :class:`smaq_rs.Policy` (default :meth:`Policy.lossless`: bit-exact), or a
    callable ``(name, dtype, shape) -> codec | (codec, params) | None`` as ``smaq_rs.save``
    takes; the name it sees is the item's fully qualified name. Other keyword arguments go to
    ``FileSystemWriter`` (``sync_files``, ``overwrite``...); stream ``_extensions`` do not apply
    (the entries are coded already) and are refused.

    >>> import torch.distributed.checkpoint as dcp
    >>> dcp.save(state_dict, storage_writer=Writer("ckpt/"))
    >>> dcp.load(state_dict, storage_reader=Reader("ckpt/"))
    """

    def __init__(self, path: PathLike, policy: Any = None, **kwargs: Any) -> None:
        if kwargs.get("_extensions"):
            raise TypeError("Writer codes each entry itself; stream _extensions are not applied")
        kwargs.pop("single_file_per_rank", None)
        super().__init__(path, single_file_per_rank=True, **kwargs)
        self.policy = _bridge.Policy.lossless() if policy is None else policy
        #: What the last ``write_data`` stored: per entry (stored bytes, dense bytes, codec).
        self.summary: Dict[str, Any] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> "Future[List[WriteResult]]":
        """Codes this rank's items into one container file and returns their storage records."""
        prefix = plan.storage_data.prefix
        file_name = f"{prefix}0.smaq"
        entries: Dict[str, torch.Tensor] = {}
        names = []
        for item in plan.items:
            name = _entry_name(item.index)
            if name in entries:
                raise _bridge.SmaqError(f"two DCP items map to the entry {name!r}")
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
                    torch.empty(0, dtype=torch.uint8)
            else:
                t = data.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                t = t.contiguous()
            entries[name] = t
            names.append((item, name))
        path = os.path.join(self.path, file_name)
        summary = _bridge.save_checkpoint(entries, path, policy=self.policy,
                                          durable=self.sync_files)
        self.summary = summary
        # Items sharing storage (tied weights) are stored once: each item records the entry
        # that holds its bytes.
        with _bridge.open_checkpoint(path) as ck:
            stored = ck.tensor_names()
        results = []
        for item, name in names:
            entry = stored.get(name, name)
            results.append(WriteResult(index=item.index,
                                       size_in_bytes=summary["entries"][entry][0],
                                       storage_data=StoredItem(file_name, entry)))
        fut: "Future[List[WriteResult]]" = Future()
        fut.set_result(results)
        return fut


class Reader(FileSystemReader):
    """The DCP ``StorageReader`` of :class:`Writer`'s checkpoints: every read verifies the
    entry's checksum; a mismatch raises ``smaq_rs.ChecksumError`` naming the item and file."""

    def __init__(self, path: PathLike) -> None:
        super().__init__(path)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> "Future[None]":
        """Reads each requested item's entry and hands it (or its requested chunk) to the
        planner."""
        per_file: Dict[str, List[Any]] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if not isinstance(info, StoredItem):
                raise _bridge.FormatError(
                    f"item {req.storage_index.fqn!r} was not written by smaq_rs's DCP Writer "
                    f"(its storage record is a {type(info).__name__}); read it with "
                    "FileSystemReader")
            per_file.setdefault(info.relative_path, []).append(req)
        for rel, reqs in per_file.items():
            path = os.path.join(self.path, rel)
            with _bridge.open_checkpoint(path) as ck:
                for req in reqs:
                    self._read_one(ck, path, req, planner)
        fut: "Future[None]" = Future()
        fut.set_result(None)
        return fut

    def _read_one(self, ck: Any, path: str, req: Any, planner: LoadPlanner) -> None:
        entry = self.storage_data[req.storage_index].entry
        try:
            value = ck[entry]
        except _bridge.ChecksumError as e:
            raise _bridge.ChecksumError(
                f"DCP item {req.storage_index.fqn!r} (entry {entry!r} of {path}) is damaged: "
                f"{e}") from e
        except KeyError:
            raise _bridge.FormatError(
                f"DCP item {req.storage_index.fqn!r}: entry {entry!r} is missing from {path}"
            ) from None
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(value.numpy().tobytes()))
            return
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
            value = value.narrow(dim, start, length)
        target = planner.resolve_tensor(req).detach()
        if target.size() != value.size():
            raise _bridge.LayoutError(
                f"DCP item {req.storage_index.fqn!r}: the stored chunk has shape "
                f"{tuple(value.size())}, the planner expects {tuple(target.size())}")
        target.copy_(value)
        planner.commit_tensor(req, target)
