"""smaq-rs: compress, decompress and inspect checkpoints from the command line.

    smaq-rs compress model.pt model.smaq                # lossy SmaQ 6/8 for large float tensors
    smaq-rs compress model.safetensors m.smaq --lossless
    smaq-rs decompress m.smaq model.safetensors         # or .pt / .pth
    smaq-rs compress hf-model/ m.smaq --lossless        # a sharded .safetensors directory
    smaq-rs decompress m.smaq restored/                 # ... back to the same shards and index
    smaq-rs info m.smaq --against model.pt              # per-entry sizes, ratios and errors
    smaq-rs train --model resnet18 --dataset digits --compress smaq --steps 200
    smaq-rs report runs/a runs/b --out report/          # curves, memory per tag, Table I
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

from . import checkpoint as ckpt
from ._core import SmaqError

_TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")


def _need_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        sys.exit("smaq-rs: this command needs torch (pip install torch)")
    return torch


def _read_any(path: str) -> Any:
    """Loads .pt/.pth (torch.load with weights_only=True), .safetensors or a smaq_rs checkpoint."""
    low = path.lower()
    if low.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if low.endswith(_TORCH_EXT):
        torch = _need_torch()
        return torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.load(path)


#: Key of a checkpoint's metadata under which `compress` keeps a .safetensors file's own metadata
#: (the string map Hugging Face loaders read, e.g. {"format": "pt"}), for `decompress` to write
#: back.
SAFETENSORS_METADATA = "safetensors_metadata"


def _safetensors_metadata(path: str) -> Optional[Dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


#: Key of a checkpoint's metadata under which `compress` keeps the layout of a sharded
#: .safetensors directory: the index file's name and content, and each shard's own metadata.
SHARDED = "safetensors_sharded"


def _index_of(directory: str) -> str:
    """The one `*.safetensors.index.json` of a sharded Hugging Face directory."""
    found = sorted(glob.glob(os.path.join(directory, "*.safetensors.index.json")))
    if len(found) != 1:
        raise SmaqError(f"{directory}: a directory to compress must hold one "
                        f"*.safetensors.index.json (found {len(found)})")
    return found[0]


def _read_sharded(directory: str) -> Any:
    """(tensors of every shard by name, the metadata that rebuilds the layout)."""
    from safetensors.torch import load_file

    index_path = _index_of(directory)
    with open(index_path) as f:
        index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SmaqError(f"{index_path}: no weight_map")
    tensors, shards = {}, {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(directory, shard)
        tensors.update(load_file(path))
        shards[shard] = _safetensors_metadata(path) or {}
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise SmaqError(f"{index_path}: the shards hold no tensor {missing[0]!r}")
    layout = {"index_name": os.path.basename(index_path), "index": index, "shards": shards}
    return tensors, {SHARDED: layout}


def _write_sharded(flat: Dict[str, Any], layout: Dict[str, Any], directory: str) -> None:
    """The shards and the index file of `layout` into `directory` (created if needed)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    weight_map = layout["index"]["weight_map"]
    for shard, meta in layout["shards"].items():
        part = {k: flat[k] for k, s in weight_map.items() if s == shard}
        save_file(part, os.path.join(directory, shard), metadata=meta or None)
    with open(os.path.join(directory, layout["index_name"]), "w") as f:
        json.dump(layout["index"], f, indent=2)
        f.write("\n")


def _flat_tensors(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """name -> tensor for every tensor in a nesting of dicts/lists (names as the container's)."""
    torch = _need_torch()
    out: Dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


class _Bar:
    """A progress bar on stderr, shown only on a terminal and for runs longer than a moment."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.t0 = label, enabled and sys.stderr.isatty(), time.time()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or (not self.shown and time.time() - self.t0 < 0.5):
            return
        self.shown = True
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}%  {done / 1e6:,.0f}/{total / 1e6:,.0f} MB"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def _parse_params(items: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SmaqError(f"--param expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                pass
        else:
            out[k] = {"true": True, "false": False, "none": None}.get(v.lower(), v)
    return out


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_compress(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    meta = None
    if os.path.isdir(a.input):
        obj, meta = _read_sharded(a.input)
    else:
        obj = _read_any(a.input)
    t1 = time.perf_counter()
    codec = "lossless" if a.lossless else a.codec
    policy = ckpt.Policy.for_codec(codec, **_parse_params(a.param))
    if a.min_numel is not None and codec != "lossless":  # lossless codes every float tensor
        policy = dataclasses.replace(policy, min_numel=a.min_numel)
    if a.input.lower().endswith(".safetensors"):
        st_meta = _safetensors_metadata(a.input)
        meta = {SAFETENSORS_METADATA: st_meta} if st_meta else None
    bar = _Bar("compress", not a.quiet)
    try:
        summary = ckpt.save(obj, a.output, policy=policy, progress=bar, metadata=meta)
    finally:
        bar.close()
    t2 = time.perf_counter()
    if not a.quiet:
        dense, stored = summary["dense_nbytes"], summary["nbytes"]
        print(
            f"{a.input} -> {a.output}: {len(summary['entries'])} tensors, {_size(dense)} -> "
            f"{_size(stored)} ({dense / stored if stored else float('nan'):.2f}x); "
            f"read {t1 - t0:.2f} s, compress+write {t2 - t1:.2f} s"
        )
    return 0


def cmd_decompress(a: argparse.Namespace) -> int:
    torch = _need_torch()
    obj = ckpt.load(a.input)
    with ckpt.open(a.input) as ck:
        meta = ck.metadata
    meta = meta if isinstance(meta, dict) else {}
    low = a.output.lower()
    if SHARDED in meta and not low.endswith((".safetensors",) + _TORCH_EXT):
        flat = _flat_tensors(obj)
        _write_sharded({k: v.contiguous() for k, v in _unshare(flat).items()}, meta[SHARDED],
                       a.output)
    elif low.endswith(".safetensors"):
        from safetensors.torch import save_file

        flat = _flat_tensors(obj)
        if not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
            print(
                "smaq-rs: note: the checkpoint is not a flat dict of tensors; safetensors keeps "
                "only its tensors (names joined by '.'); use .pt to keep everything",
                file=sys.stderr,
            )
        st_meta = meta.get(SAFETENSORS_METADATA)
        save_file({k: v.contiguous() for k, v in _unshare(flat).items()}, a.output,
                  metadata=st_meta)
    elif low.endswith(_TORCH_EXT):
        torch.save(obj, a.output)
    else:
        raise SmaqError(f"output {a.output!r}: expected a .pt, .pth or .safetensors file name "
                        "(or a directory, for a checkpoint of a sharded .safetensors directory)")
    if not a.quiet:
        print(f"{a.input} -> {a.output}")
    return 0


def _unshare(flat: Dict[str, Any]) -> Dict[str, Any]:
    """`flat` with every tensor that shares storage with an earlier one copied (safetensors
    refuses shared storage)."""
    seen: Dict[int, str] = {}
    out = dict(flat)
    for k, v in flat.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            out[k] = v.clone()
        seen[ptr] = k
    return out


def _errors(orig, back) -> str:
    torch = _need_torch()
    if orig is None:
        return ""
    if tuple(orig.shape) != tuple(back.shape):
        return "shape differs"
    if orig.numel() == 0:
        return "exact"
    if not (orig.is_floating_point() or orig.is_complex()):
        return "exact" if torch.equal(orig, back) else "DIFFERS"
    o, b = orig.double(), back.double()
    if torch.equal(orig.view(-1), back.view(-1)) or bool(
        (o.isnan() == b.isnan()).all() and (o.nan_to_num() == b.nan_to_num()).all()
    ):
        return "exact"
    d = (o - b).abs().nan_to_num()
    rel = (torch.linalg.vector_norm(d) / torch.linalg.vector_norm(o.nan_to_num())).item()
    return f"max {d.max().item():.3g} rel {rel:.3g}"


def cmd_info(a: argparse.Namespace) -> int:
    against: Optional[Dict[str, Any]] = None
    if a.against:
        against = _flat_tensors(_read_any(a.against))
    with ckpt.open(a.file) as ck:
        rows = []
        for e in ck.entries():
            err = ""
            if against is not None:
                orig = against.get(e["name"])
                err = _errors(orig, ck[e["name"]]) if orig is not None else "not in original"
            ratio = e["ratio"]
            rows.append([
                e["name"], e["dtype"], "x".join(map(str, e["shape"])) or "()", e["codec"],
                str(e["nbytes"]), str(e["dense_nbytes"]),
                "-" if math.isnan(ratio) else f"{ratio:.2f}", err,
            ])
        head = ["name", "dtype", "shape", "codec", "bytes", "dense", "ratio"]
        if against is not None:
            head.append("error vs original")
        else:
            rows = [r[:-1] for r in rows]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        dense = sum(e["dense_nbytes"] for e in ck.entries())
        print(
            f"{len(rows)} entries; file {_size(ck.nbytes)} ({ck.nbytes} bytes) holds "
            f"{_size(dense)} of tensors: {dense / ck.nbytes if ck.nbytes else 0:.2f}x"
        )
        if ck.metadata is not None:
            print(f"metadata: {ck.metadata!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smaq-rs",
        description="Compress deep-learning checkpoints into smaq_rs containers (no pickle, "
        "checksummed, atomic writes), expand them back, and inspect them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser(
        "compress",
        help="torch .pt/.pth, .safetensors or a sharded .safetensors directory -> smaq_rs "
        "checkpoint",
        description="Reads IN (torch.load with weights_only=True, safetensors, or a directory of "
        "safetensors shards with its *.safetensors.index.json) and writes a "
        "smaq_rs checkpoint. By default large float tensors are stored lossy with SmaQ 6/8 and "
        "small, integer and norm-layer tensors exactly.",
    )
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--codec", default=None,
                   help="codec for large float tensors: smaq (default), lossless, raw, or any "
                   "codec smaq_rs.list_codecs() lists")
    c.add_argument("--lossless", action="store_true",
                   help="store every tensor bit-exactly (same as --codec lossless)")
    c.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="codec parameter, repeatable (e.g. --param bits_main=5)")
    c.add_argument("--min-numel", type=int, default=None,
                   help="float tensors with fewer elements are stored exactly (default 4096)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=cmd_compress)
    d = sub.add_parser(
        "decompress",
        help="smaq_rs checkpoint -> .pt/.pth or .safetensors",
        description="Decodes IN and writes OUT with torch.save (.pt/.pth) or safetensors "
        "(.safetensors: the tensors, named as in the checkpoint, and the metadata of the "
        ".safetensors file it was compressed from). A checkpoint of a sharded directory goes "
        "back to a directory OUT: the same shards, their metadata and the index file.",
    )
    d.add_argument("input", metavar="IN")
    d.add_argument("output", metavar="OUT")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_decompress)
    i = sub.add_parser(
        "info",
        help="per-entry table: dtype, shape, codec, bytes, ratio (and error vs an original)",
        description="Prints one row per entry. With --against ORIG (.pt/.pth/.safetensors or a "
        "checkpoint) also the max absolute and relative L2 error of each tensor.",
    )
    i.add_argument("file", metavar="FILE")
    i.add_argument("--against", metavar="ORIG", default=None)
    i.set_defaults(func=cmd_info)
    # train / report have their own parsers (smaq_rs.train); listed here for --help
    sub.add_parser("train", add_help=False,
                   help="train a model with the five data structures coded, logging real "
                   "packed bytes per tag (smaq-rs train --help)")
    sub.add_parser("report", add_help=False,
                   help="plots and the Table I analogue of run directories "
                   "(smaq-rs report --help)")
    return p


_SUBPROGRAMS = {"train": "smaq_rs.train.driver", "report": "smaq_rs.train.report"}


def main(argv: Optional[List[str]] = None) -> int:
    """The ``smaq-rs`` console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _SUBPROGRAMS:
        import importlib

        return importlib.import_module(_SUBPROGRAMS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SmaqError, OSError) as e:
        print(f"smaq-rs {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
