"""The training driver: one run of a model on a dataset with the five data structures coded.

    smaq-rs train --model resnet18 --dataset digits --compress smaq --bits-main 6 \\
        --bits-outlier 8 --steps 200 --run-dir runs/r18-smaq
    python -m smaq_rs.train --model gpt2 --dataset stdlib-text --compress fp8 --steps 100

What each structure switch does (``--compress NAME`` picks the codec, ``fp32`` is the plain
baseline: nothing is coded, every structure is measured dense):

- ``--compress-weights`` (simulation): after each optimizer step every parameter with at least
  ``--min-numel`` values is packed and decoded back in place;
- ``--compress-grads`` (simulation): each such gradient is packed and decoded before the step;
- ``--compress-activations`` (real): what autograd saves for backward is held as packed bytes
  (:class:`smaq_rs.torch.compressed_activations`);
- ``--compress-gradient-maps`` (simulation): the gradient flowing back into every convolution /
  linear layer's output is packed and decoded (:func:`smaq_rs.torch.wrap_model`,
  ``forward=False``);
- ``--compress-optimizer`` (real): the optimizer's state is held packed
  (:mod:`smaq_rs.torch.optim`).

Every figure logged is a byte length: ``dense`` (the structure uncompressed), ``packed`` (the
real packed buffers of its coded form; equal to dense when not coded) and ``held`` (what the
process really holds for it: packed for the real structures, dense for the simulated ones).
``ratio`` is dense / packed.

Determinism: the model is initialised from ``--seed``; the data order of every step is a
function of (seed, step) only; codec seeds (stochastic rounding) are derived from (seed, step,
structure, tensor); the global torch RNG (dropout) is saved in each checkpoint. ``--resume``
therefore continues a run with the same losses as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .._core import SmaqError
from ..checkpoint import Policy, load as ck_load, save as ck_save
from ..torch import _store, optim as sopt
from ..torch._autograd import unwrap_model, wrap_model
from ..torch._hooks import compressed_activations
from ..torch._meter import MemoryMeter
from . import bn as bn_mod
from .data import COMPATIBLE, DATASETS, MODELS, Dataset, build_dataset, build_model, layer_types

__all__ = [
    "COMPRESS",
    "CODEC_FLAGS",
    "TAGS",
    "RunDirError",
    "build_parser",
    "main",
    "run",
    "codec_spec",
]

#: ``--compress`` name -> (codec, fixed parameters). ``fp32`` is the uncoded baseline.
COMPRESS: Dict[str, Tuple[Optional[str], Dict[str, Any]]] = {
    "fp32": (None, {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "fp8": ("fp8", {}),
    "s2fp8": ("s2fp8", {}),
    "smaq": ("smaq", {}),
    "int8": ("int", {"bits": 8}),
    "int4": ("int", {"bits": 4}),
    "mantissa": ("mantissa", {}),
    "luq": ("luq", {}),
    "nnw_bdi": ("nnw_bdi", {}),
    "sign": ("sign", {}),
}

#: Codec parameter flags: flag dest -> (codec parameter, type).
CODEC_FLAGS: Dict[str, Tuple[str, Callable[[str], Any]]] = {
    "bits_main": ("bits_main", int),
    "bits_outlier": ("bits_outlier", int),
    "t_main": ("t_main", float),
    "t_outlier": ("t_outlier", float),
    "bits": ("bits", int),
    "block_size": ("block_size", int),
    "rounding": ("rounding", str),
    "format": ("format", str),
    "mantissa_bits": ("mantissa_bits", int),
    "overflow": ("overflow", str),
}

#: The five data structures, in the order of the logs.
TAGS: Tuple[str, ...] = ("weights", "gradients", "activations", "gradient_maps", "optimizer")
#: Which structures are really held packed (the others are simulated).
REAL_TAGS = ("activations", "optimizer")
STRUCTURES = {"weights": "compress_weights", "gradients": "compress_grads",
              "activations": "compress_activations", "gradient_maps": "compress_gradient_maps",
              "optimizer": "compress_optimizer"}

_RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "checkpoint.smaq")


class RunDirError(SmaqError):
    """A run directory that cannot be used as asked (exists, or holds no run to resume)."""


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
class _Choice:
    """argparse type that names the allowed values of an unknown choice."""

    def __init__(self, what: str, allowed: Iterable[str]):
        self.what, self.allowed = what, tuple(allowed)

    def __call__(self, s: str) -> str:
        if s not in self.allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {self.what} {s!r}; allowed: {', '.join(self.allowed)}")
        return s


def build_parser(prog: str = "smaq-rs train") -> argparse.ArgumentParser:
    """The driver's argument parser."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=_Choice("model", MODELS), default="resnet18",
                    help=f"one of {', '.join(MODELS)}")
    ap.add_argument("--dataset", type=_Choice("dataset", DATASETS), default=None,
                    help=f"one of {', '.join(DATASETS)} (default: the model's first)")
    ap.add_argument("--compress", type=_Choice("codec", COMPRESS), default="fp32",
                    help=f"one of {', '.join(COMPRESS)}")
    g = ap.add_argument_group("codec parameters (refused when the codec does not take them)")
    for dest, (param, typ) in CODEC_FLAGS.items():
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, default=None,
                       help=f"codec parameter {param}")
    g.add_argument("--codec-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other codec parameter (repeatable)")
    s = ap.add_argument_group("data structures (all on by default; --no-... turns one off)")
    for dest in STRUCTURES.values():
        s.add_argument("--" + dest.replace("_", "-"), dest=dest,
                       action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--min-numel", type=int, default=4096,
                   help="tensors with fewer values are kept dense (default 4096)")
    s.add_argument("--bn-aware", choices=("off", "running", "batch"), default="off",
                   help="code the feature maps feeding each BatchNorm with BN-aware SmaQ "
                        "(simulation; normalised by the BN's running or batch statistics)")
    t = ap.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps in all")
    t.add_argument("--epochs", type=float, default=None, help="passes over the training set")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="adamw")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    m = ap.add_argument_group("model and data sizes")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--width", type=int, default=64)
    m.add_argument("--heads", type=int, default=2)
    m.add_argument("--seq", type=int, default=64, help="sequence length (text datasets)")
    m.add_argument("--image-size", type=int, default=32, help="digits upsampled to this")
    m.add_argument("--val-examples", type=int, default=512)
    r = ap.add_argument_group("run directory and logs")
    r.add_argument("--run-dir", default=None, help="default: runs/MODEL-DATASET-COMPRESS")
    r.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    r.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir")
    r.add_argument("--eval-every", type=int, default=0, help="0: at the end only")
    r.add_argument("--log-every", type=int, default=1)
    r.add_argument("--ckpt-every", type=int, default=0, help="0: at the end only")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events (needs tensorboard installed)")
    r.add_argument("--quiet", action="store_true", help="no progress display")
    return ap


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    return v


def codec_spec(cfg: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
    """(codec, parameters) of a run configuration; refuses parameters the codec does not take
    and values the codec rejects (before any training)."""
    codec, fixed = COMPRESS[cfg["compress"]]
    given: Dict[str, Any] = {}
    for dest, (param, _) in CODEC_FLAGS.items():
        if cfg.get(dest) is not None:
            given[param] = cfg[dest]
    for item in cfg.get("codec_param") or []:
        if "=" not in item:
            raise ValueError(f"--codec-param expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        given[k.strip().replace("-", "_")] = _parse_value(v.strip())
    if codec is None:
        if given:
            raise ValueError(f"--compress fp32 is the uncoded baseline and takes no codec "
                             f"parameter; got {', '.join(sorted(given))}")
        return None, {}
    allowed = next(c["defaults"] for c in _list_codecs() if c["name"] == codec)
    bad = sorted(k for k in given if k not in allowed or k == "seed")
    if bad:
        flags = {p: "--" + d.replace("_", "-") for d, (p, _) in CODEC_FLAGS.items()}
        names = [flags.get(k, f"--codec-param {k}=...") for k in bad]
        raise ValueError(f"--compress {cfg['compress']} (codec {codec!r}) does not take "
                         f"{', '.join(names)}; its parameters are "
                         f"{', '.join(k for k in sorted(allowed) if k != 'seed')}")
    fixed_clash = sorted(k for k in given if k in fixed and given[k] != fixed[k])
    if fixed_clash:
        raise ValueError(f"--compress {cfg['compress']} fixes {fixed_clash[0]}="
                         f"{fixed[fixed_clash[0]]}; got {given[fixed_clash[0]]}")
    params = {**fixed, **given}
    _store.roundtrip(torch.arange(1.0, 65.0), codec, params)  # CodecError on a bad value
    return codec, params


def _list_codecs() -> List[Dict[str, Any]]:
    from .. import list_codecs

    return list_codecs()


def _takes_seed(codec: Optional[str]) -> bool:
    return codec is not None and any(c["name"] == codec and "seed" in c["defaults"]
                                     for c in _list_codecs())


def _seed(base: int, *parts: Any) -> int:
    h = hashlib.blake2b(":".join(map(str, (base,) + parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# ------------------------------------------------------------------------------------------------
# the run directory
# ------------------------------------------------------------------------------------------------
def _prepare_dir(run_dir: str, resume: bool, overwrite: bool) -> Optional[Dict[str, Any]]:
    """Creates or checks the run directory; on resume returns the saved configuration."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    exists = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if resume:
        cfg_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(cfg_path) or not os.path.isfile(
                os.path.join(run_dir, "checkpoint.smaq")):
            raise RunDirError(f"--resume: {run_dir} holds no run to resume (expected "
                              "config.json and checkpoint.smaq)")
        with open(cfg_path) as f:
            return json.load(f)
    if exists:
        if not overwrite:
            raise RunDirError(f"run directory {run_dir} exists and is not empty; pass --resume "
                              "to continue it or --overwrite to replace it")
        for name in _RUN_FILES:
            p = os.path.join(run_dir, name)
            if os.path.exists(p):
                os.remove(p)
        tb = os.path.join(run_dir, "tb")
        if os.path.isdir(tb):
            import shutil

            shutil.rmtree(tb)
    os.makedirs(run_dir, exist_ok=True)
    return None


class RunLog:
    """The run's logs: ``metrics.jsonl`` (one JSON object per logged step or evaluation) and
    ``metrics.csv`` (the same, flattened: ``TAG_dense``, ``TAG_held``, ``TAG_packed``,
    ``TAG_ratio`` columns), plus callbacks called with each record."""

    COLUMNS = (["kind", "step", "epoch", "loss", "val_loss", "val_acc", "step_time", "rss_peak",
                "rss"] + [f"{t}_{k}" for t in TAGS for k in ("dense", "held", "packed", "ratio")])

    def __init__(self, run_dir: str, keep_until: Optional[int] = None,
                 callbacks: Iterable[Callable[[Dict[str, Any]], None]] = ()):
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")
        self.callbacks = list(callbacks)
        kept: List[Dict[str, Any]] = []
        if keep_until is not None and os.path.exists(self.jsonl):
            kept = [r for r in read_records(run_dir) if r["step"] <= keep_until]
        with open(self.jsonl, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        with open(self.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.COLUMNS)
            for r in kept:
                w.writerow(self._row(r))

    def _row(self, r: Dict[str, Any]) -> List[Any]:
        row = []
        for c in self.COLUMNS:
            tag, _, k = c.rpartition("_")
            if tag in TAGS and isinstance(r.get("tags", {}).get(tag), dict):
                row.append(r["tags"][tag].get(k, ""))
            else:
                v = r.get(c, "")
                row.append("" if v is None else v)
        return row

    def write(self, r: Dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow(self._row(r))
        for cb in self.callbacks:
            cb(r)


def read_records(run_dir: str) -> List[Dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} holds no metrics.jsonl (not a run directory)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tensorboard_callback(log_dir: str) -> Callable[[Dict[str, Any]], None]:
    """A log callback writing each record's scalars with TensorBoard's ``SummaryWriter``
    (``torch.utils.tensorboard``; needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"--tensorboard needs the tensorboard package ({e})") from None
    w = SummaryWriter(log_dir)

    def cb(r: Dict[str, Any]) -> None:
        step = r["step"]
        for k in ("loss", "val_loss", "val_acc", "step_time", "rss_peak"):
            if r.get(k) is not None:
                w.add_scalar(k, r[k], step)
        for tag, e in r.get("tags", {}).items():
            w.add_scalar(f"held_bytes/{tag}", e["held"], step)
            w.add_scalar(f"ratio/{tag}", e["ratio"], step)
        w.flush()

    return cb


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, total // 10)

    def __call__(self, step: int, loss: float, dt: float) -> None:
        if not self.enabled:
            return
        n = 30
        fill = int(n * step / max(self.total, 1))
        line = (f"[{'#' * fill}{'.' * (n - fill)}] step {step}/{self.total} loss {loss:.4f} "
                f"{dt * 1e3:.0f} ms/step")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if step == self.total else ""))
            sys.stderr.flush()
        elif step % self.every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)


def _loss(task: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               y[:, 1:].reshape(-1))
    return F.cross_entropy(logits, y)


def _correct(task: str, logits: torch.Tensor, y: torch.Tensor) -> Tuple[int, int]:
    if task == "lm":
        pred = logits[:, :-1].argmax(-1)
        return int((pred == y[:, 1:]).sum()), pred.numel()
    return int((logits.argmax(-1) == y).sum()), y.numel()


def _evaluate(model: nn.Module, data: Dataset, batches) -> Tuple[float, float]:
    was = model.training
    model.eval()
    tot = n = correct = count = 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            tot += float(_loss(data.task, logits, y)) * len(y)
            n += len(y)
            c, k = _correct(data.task, logits, y)
            correct += c
            count += k
    model.train(was)
    return tot / max(n, 1), 100.0 * correct / max(count, 1)


def _make_optimizer(cfg: Dict[str, Any], model: nn.Module, codec: Optional[str],
                    params: Dict[str, Any]) -> torch.optim.Optimizer:
    kind = cfg["optimizer"]
    wd = cfg["weight_decay"]
    if wd is None:
        wd = 1e-2 if kind == "adamw" else 0.0
    ps = list(model.parameters())
    if codec is not None and cfg["compress_optimizer"]:
        common = dict(codec=codec, codec_params={k: v for k, v in params.items() if k != "seed"},
                      min_numel=cfg["min_numel"], seed=cfg["seed"])
        if kind == "sgd":
            return sopt.SGD(ps, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=wd,
                            **common)
        ctor = sopt.AdamW if kind == "adamw" else sopt.Adam
        return ctor(ps, lr=cfg["lr"], weight_decay=wd, **common)
    if kind == "sgd":
        return torch.optim.SGD(ps, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=wd)
    ctor = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return ctor(ps, lr=cfg["lr"], weight_decay=wd)


class _Coder:
    """Packs-and-decodes tensors in place (weights, gradients) and sums their real sizes."""

    def __init__(self, codec: Optional[str], params: Dict[str, Any], min_numel: int, seed: int):
        self.codec, self.params, self.min_numel, self.seed = codec, params, min_numel, seed
        self.takes_seed = _takes_seed(codec)

    def params_for(self, *where: Any) -> Dict[str, Any]:
        p = dict(self.params)
        if self.takes_seed:
            p["seed"] = _seed(self.seed, *where)
        return p

    @torch.no_grad()
    def code(self, tensors: List[torch.Tensor], on: bool, step: int, tag: str
             ) -> Tuple[int, int]:
        dense = packed = 0
        for i, t in enumerate(tensors):
            n = t.numel() * t.element_size()
            dense += n
            if (not on or self.codec is None or t.numel() < self.min_numel
                    or t.dtype not in _store.CODEC_DTYPES):
                packed += n
                continue
            s = _store.encode(t, self.codec, self.params_for(step, tag, i))
            packed += s.nbytes
            t.copy_(_store.decode(s).to(t.device))
        return dense, packed


def _entry(dense: int, held: int, packed: int, real: bool) -> Dict[str, Any]:
    return {"dense": int(dense), "held": int(held), "packed": int(packed),
            "ratio": (dense / packed) if packed else 1.0, "mode": "real" if real else "sim"}


def _gradmap_meter(model: nn.Module, types: Tuple[type, ...], meter: MemoryMeter) -> List[Any]:
    """Hooks that count the dense bytes of the gradient maps of ``types`` layers' outputs."""

    def fwd(_m, _i, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            n = out.numel() * out.element_size()
            out.register_hook(lambda g: meter.log("gradient_maps", n, n))

    return [m.register_forward_hook(fwd) for m in model.modules() if isinstance(m, types)]


def run(argv: Optional[List[str]] = None,
        callbacks: Iterable[Callable[[Dict[str, Any]], None]] = ()) -> Dict[str, Any]:
    """Runs the driver with command-line arguments ``argv``; returns the final record.
    ``callbacks`` receive every log record (after it is written)."""
    ap = build_parser()
    a = ap.parse_args(argv)
    cli = vars(a)
    run_dir = a.run_dir or os.path.join(
        "runs", f"{a.model}-{a.dataset or 'default'}-{a.compress}")
    saved = _prepare_dir(run_dir, a.resume, a.overwrite)
    if saved is not None:
        defaults = vars(ap.parse_args([]))
        fixed = ("resume", "overwrite", "run_dir", "steps", "epochs", "quiet", "tensorboard",
                 "threads")
        clash = sorted(k for k, v in cli.items() if k not in fixed and v != defaults[k]
                       and v != saved.get(k))
        if clash:
            flags = ", ".join("--" + k.replace("_", "-") for k in clash)
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in clash)
            raise ValueError(f"--resume continues {run_dir} with its saved configuration; it "
                             f"cannot change {flags} (saved: {was})")
        cfg = dict(saved)
        for k in ("steps", "epochs"):  # a resumed run may be extended
            if cli[k] is not None:
                cfg[k] = cli[k]
                cfg["epochs" if k == "steps" else "steps"] = None
        for k in ("quiet", "tensorboard", "threads"):
            cfg[k] = cli[k]
    else:
        cfg = {k: v for k, v in cli.items() if k not in ("resume", "overwrite", "run_dir")}
    if cfg["dataset"] is None:
        cfg["dataset"] = next(d for d, t in DATASETS.items() if cfg["model"] in COMPATIBLE[t])
    return _run(cfg, run_dir, resume=saved is not None, callbacks=list(callbacks),
                fresh_dir=saved is None)


def _validate(cfg: Dict[str, Any]) -> None:
    for k in ("batch_size", "log_every", "layers", "width", "heads", "seq", "val_examples"):
        if cfg[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    for k in ("eval_every", "ckpt_every", "min_numel", "threads"):
        if cfg[k] < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {cfg[k]}")
    if cfg["steps"] is not None and cfg["epochs"] is not None:
        raise ValueError("give --steps or --epochs, not both")
    if (cfg["steps"] is not None and cfg["steps"] < 1) or (
            cfg["epochs"] is not None and not cfg["epochs"] > 0):
        raise ValueError(f"--steps must be >= 1 and --epochs > 0; got steps={cfg['steps']}, "
                         f"epochs={cfg['epochs']}")
    if cfg["bn_aware"] != "off" and cfg["compress"] != "smaq":
        raise ValueError(f"--bn-aware codes feature maps with SmaQ; it needs --compress smaq, "
                         f"got --compress {cfg['compress']}")


def _run(cfg: Dict[str, Any], run_dir: str, resume: bool,
         callbacks: List[Callable[[Dict[str, Any]], None]], fresh_dir: bool) -> Dict[str, Any]:
    try:
        _validate(cfg)
        codec, params = codec_spec(cfg)
        if cfg["tensorboard"]:
            callbacks = callbacks + [tensorboard_callback(os.path.join(run_dir, "tb"))]
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        data = build_dataset(cfg["dataset"], cfg["image_size"], cfg["seq"])
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg["model"], data, cfg["layers"], cfg["width"], cfg["heads"],
                            cfg["image_size"])
    except BaseException:
        if fresh_dir and os.path.isdir(run_dir) and not os.listdir(run_dir):
            os.rmdir(run_dir)
        raise
    model.train()
    on = {tag: codec is not None and bool(cfg[STRUCTURES[tag]]) for tag in TAGS}
    opt = _make_optimizer(cfg, model, codec, params)
    bs = cfg["batch_size"]
    spe = max(1, data.n_train // (bs * (data.seq if data.task == "lm" else 1)))
    total = cfg["steps"] if cfg["steps"] is not None else (
        max(1, math.ceil(cfg["epochs"] * spe)) if cfg["epochs"] is not None else spe)
    cfg["total_steps"] = total
    cfg["steps_per_epoch"] = spe
    cfg["codec"], cfg["codec_params"] = codec, params
    start = 0
    ck_path = os.path.join(run_dir, "checkpoint.smaq")
    if resume:
        ck = ck_load(ck_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        start = int(ck["step"])
        if start > total:
            raise ValueError(f"the run is at step {start}, past the {total} steps asked")
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    log = RunLog(run_dir, keep_until=start if resume else None, callbacks=callbacks)
    types = layer_types(model)
    coder = _Coder(codec, params, cfg["min_numel"], cfg["seed"])
    meter = MemoryMeter(model, opt)
    bn_coder = None
    if cfg["bn_aware"] != "off":
        bn_coder = bn_mod.BNAwareFeatureMaps(model, params, stats=cfg["bn_aware"],
                                             seed=cfg["seed"])
    count_hooks = [] if on["gradient_maps"] else _gradmap_meter(model, types, meter)
    val = data.val_batches(max(bs, 64), cfg["val_examples"])
    progress = _Progress(total, not cfg["quiet"])
    perm_cache: Dict[int, torch.Tensor] = {}

    def batch_at(step: int):
        if data.task == "lm":
            g = torch.Generator().manual_seed(_seed(cfg["seed"], "data", step) % (2**63))
            return data.batch(torch.randint(0, data.n_train, (bs,), generator=g))
        epoch, i = divmod(step, spe)
        perm = perm_cache.get(epoch)
        if perm is None:
            perm_cache.clear()
            g = torch.Generator().manual_seed(_seed(cfg["seed"], "epoch", epoch) % (2**63))
            perm = perm_cache[epoch] = torch.randperm(data.n_train, generator=g)
        return data.batch(perm[i * bs:(i + 1) * bs])

    def save_ck(step: int) -> None:
        ck_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "torch_rng": torch.get_rng_state(), "step": step}, ck_path,
                policy=Policy.lossless(), metadata={"step": step})

    rec: Dict[str, Any] = {}
    try:
        for step in range(start, total):
            x, y = batch_at(step)
            t0 = time.perf_counter()
            acts = compressed_activations(
                codec if on["activations"] else None, min_numel=cfg["min_numel"], model=model,
                **(coder.params_for(step, "activations") if on["activations"] else {}))
            meter.activations = acts
            if on["gradient_maps"]:
                wrap_model(model, codec, types, forward=False, backward=True, meter=meter,
                           **coder.params_for(step, "gradient_maps"))
            if bn_coder is not None:
                bn_coder.step = step
            with acts:
                loss = _loss(data.task, model(x), y)
            loss.backward()
            gd, gp = coder.code([p.grad for p in model.parameters() if p.grad is not None],
                                on["gradients"], step, "gradients")
            opt.step()
            wd, wp = coder.code([p.data for p in model.parameters()], on["weights"], step,
                                "weights")
            dt = time.perf_counter() - t0
            mrec = meter.step()
            opt.zero_grad(set_to_none=True)
            loss_v = float(loss.detach())
            del acts, loss
            meter.activations = None
            step1 = step + 1
            rec = _record(step1, spe, mrec, (gd, gp), (wd, wp), on, dt, bn_coder)
            rec["loss"] = loss_v
            progress(step1, loss_v, dt)
            evaluate = step1 == total or (cfg["eval_every"] and step1 % cfg["eval_every"] == 0)
            if evaluate:
                rec["val_loss"], rec["val_acc"] = _evaluate(model, data, val)
            if evaluate or step1 % cfg["log_every"] == 0:
                log.write(rec)
            if step1 == total or (cfg["ckpt_every"] and step1 % cfg["ckpt_every"] == 0):
                save_ck(step1)
    finally:
        unwrap_model(model)
        for h in count_hooks:
            h.remove()
        if bn_coder is not None:
            bn_coder.remove()
    return rec


def _record(step: int, spe: int, mrec: Dict[str, Any], grads: Tuple[int, int],
            weights: Tuple[int, int], on: Dict[str, bool], dt: float, bn_coder) -> Dict[str, Any]:
    a = mrec.get("activations", {"dense": 0, "held": 0})
    o = mrec.get("optimizer", {"dense": 0, "held": 0})
    gm = mrec.get("gradient_maps", {"dense": 0, "held": 0})
    wbuf = mrec["weights"]["dense"] - weights[0]  # buffers (BN statistics): dense in both
    tags = {
        "weights": _entry(weights[0] + wbuf, weights[0] + wbuf, weights[1] + wbuf, False),
        "gradients": _entry(grads[0], grads[0], grads[1], False),
        "activations": _entry(a["dense"], a["held"], a["held"], True),
        "gradient_maps": _entry(gm["dense"], gm["dense"], gm["held"], False),
        "optimizer": _entry(o["dense"], o["held"], o["held"], True),
    }
    for t in TAGS:
        tags[t]["coded"] = on[t]
    rec: Dict[str, Any] = {"kind": "step", "step": step, "epoch": step / spe,
                           "step_time": dt, "rss_peak": mrec.get("rss_peak"),
                           "rss": mrec.get("rss"), "tags": tags}
    if bn_coder is not None:
        rec["bn_feature_maps"] = bn_coder.pop_stats()
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point (``smaq-rs train`` / ``python -m smaq_rs.train``)."""
    try:
        rec = run(argv)
    except (SmaqError, ValueError, TypeError, ImportError) as e:
        print(f"smaq-rs train: error: {e}", file=sys.stderr)
        return 2
    if rec:
        print(json.dumps({k: rec.get(k) for k in ("step", "loss", "val_loss", "val_acc")}))
    return 0
