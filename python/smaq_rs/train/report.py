"""``smaq-rs report RUN_DIR [RUN_DIR...] --out DIR``: plots and the Table I analogue of runs.

Writes into ``DIR``:

- ``curves.png``: per model/dataset, the training loss (a running mean over 1/30 of the run)
  and the validation metric (accuracy for classification, loss for language modelling) of
  every run against the step;
- ``memory.png``: per run, the packed bytes of each data structure per step, stacked, with the
  dense total (dashed) and the bytes really held (dotted);
- ``table.md``: the SmaQ paper's Table I in form: per run the final validation accuracy (or
  loss) and its difference to the fp32 run of the same model and dataset, and per data
  structure the reduction dense / packed summed over the logged steps, measured from the real
  packed buffers; the total over the five and the reduction of the bytes really held.

Everything comes from the runs' ``config.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from .._core import SmaqError
from .driver import TAGS, RunDirError, read_records

__all__ = ["Run", "load_run", "main", "plot_curves", "plot_memory", "table", "write_report"]

_TAG_TITLES = {"weights": "weights", "gradients": "gradients", "activations": "feature maps",
               "gradient_maps": "gradient maps", "optimizer": "optimizer"}


class Run:
    """One run directory: its configuration and records."""

    def __init__(self, path: str, config: Dict[str, Any], records: List[Dict[str, Any]]):
        self.path, self.config, self.records = path, config, records
        self.steps = [r for r in records if r.get("kind") == "step"]
        if not self.steps:
            raise RunDirError(f"{path}: metrics.jsonl holds no step record")

    @property
    def group(self) -> str:
        """model/dataset."""
        return f"{self.config['model']}/{self.config['dataset']}"

    @property
    def label(self) -> str:
        """The codec and its parameters, e.g. ``smaq 6/8``."""
        c = self.config
        p = c.get("codec_params") or {}
        name = c["compress"]
        if name == "smaq":
            name += f" {p.get('bits_main', 6)}/{p.get('bits_outlier', 8)}"
        extra = {k: v for k, v in p.items() if k not in ("bits_main", "bits_outlier", "bits")}
        if extra:
            name += " " + ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
        if c.get("bn_aware", "off") != "off":
            name += f" bn-{c['bn_aware']}"
        off = [t for t in TAGS if c.get("codec") and not self.steps[-1]["tags"][t]["coded"]]
        if off:
            name += " (not coded: " + ", ".join(_TAG_TITLES[t] for t in off) + ")"
        return name

    @property
    def metric(self) -> Tuple[str, str]:
        """(record key, title) of the validation metric."""
        if self.config["dataset"] == "stdlib-text":
            return "val_loss", "validation loss"
        return "val_acc", "validation accuracy (%)"

    def evals(self) -> List[Tuple[int, float]]:
        k = self.metric[0]
        return [(r["step"], r[k]) for r in self.records if r.get(k) is not None]

    def final(self) -> Optional[float]:
        e = self.evals()
        return e[-1][1] if e else None

    def totals(self, tag: str) -> Dict[str, int]:
        """dense / packed / held of ``tag`` summed over the logged steps."""
        out = {"dense": 0, "packed": 0, "held": 0}
        for r in self.steps:
            e = r["tags"][tag]
            for k in out:
                out[k] += e[k]
        return out


def load_run(path: str) -> Run:
    """Reads a run directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise RunDirError(f"{path} holds no config.json (not a run directory of smaq-rs train)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    return Run(path, cfg, read_records(path))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: List[Run], path: str) -> None:
    """Training loss and validation metric of every run, one row per model/dataset."""
    plt = _plt()
    groups: Dict[str, List[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4 * len(groups)), squeeze=False)
    for row, (g, rs) in zip(axes, groups.items()):
        win = 1
        for r in rs:
            xs = [s["step"] for s in r.steps]
            ys = [s["loss"] for s in r.steps]
            win = max(1, len(ys) // 30)
            smooth = [sum(ys[max(0, i - win + 1):i + 1]) / (i + 1 - max(0, i - win + 1))
                      for i in range(len(ys))]
            row[0].plot(xs, smooth, lw=1, label=r.label)
            ev = r.evals()
            if ev:
                row[1].plot(*zip(*ev), marker="o", ms=3, label=r.label)
        row[0].set_title(f"{g}: training loss" + (f" (mean of the last {win} steps)"
                                                   if win > 1 else ""))
        row[1].set_title(f"{g}: {rs[0].metric[1]}")
        for ax in row:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory(runs: List[Run], path: str) -> None:
    """Per run: packed bytes per data structure per step, stacked; dense and held totals."""
    plt = _plt()
    n = len(runs)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, r in zip(axes.flat, runs):
        xs = [s["step"] for s in r.steps]
        stacks = [[s["tags"][t]["packed"] / 2**20 for s in r.steps] for t in TAGS]
        ax.stackplot(xs, *stacks, labels=[_TAG_TITLES[t] for t in TAGS], alpha=0.8)
        ax.plot(xs, [sum(s["tags"][t]["dense"] for t in TAGS) / 2**20 for s in r.steps], "k--",
                lw=1, label="dense total")
        ax.plot(xs, [sum(s["tags"][t]["held"] for t in TAGS) / 2**20 for s in r.steps], "k:",
                lw=1, label="held total")
        ax.set_title(f"{r.group} {r.label}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("MiB (packed, stacked)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(runs: List[Run]) -> str:
    """The Table I analogue (Markdown)."""
    head = ("| model / dataset | codec | final metric | vs fp32 | "
            + " | ".join(_TAG_TITLES[t] for t in TAGS)
            + " | all five (packed) | all five (held) | peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base: Dict[str, Run] = {}
    for r in runs:
        if r.config["compress"] == "fp32":
            base.setdefault(r.group, r)
    for r in runs:
        fin = r.final()
        mname = "acc" if r.metric[0] == "val_acc" else "val loss"
        fin_s = "-" if fin is None else (f"{fin:.2f}% acc" if mname == "acc"
                                         else f"{fin:.4f} val loss")
        b = base.get(r.group)
        vs = "-"
        if b is not None and b is not r and fin is not None and b.final() is not None:
            if mname == "acc":
                vs = f"{fin - b.final():+.2f} pt"
            else:
                vs = f"{(fin - b.final()) / b.final() * 100:+.2f}%"
        cells = []
        dense = packed = held = 0
        for t in TAGS:
            s = r.totals(t)
            dense, packed, held = dense + s["dense"], packed + s["packed"], held + s["held"]
            mode = r.steps[-1]["tags"][t]["mode"]
            if not r.steps[-1]["tags"][t]["coded"]:
                cells.append("1.00x (not coded)" if s["dense"] else "-")
            else:
                cells.append(f"{s['dense'] / s['packed']:.2f}x" + (" (sim)" if mode == "sim"
                                                                  else ""))
        rss = max((s.get("rss_peak") or 0) for s in r.steps) / 2**20
        lines.append(f"| {r.group} | {r.label} | {fin_s} | {vs} | " + " | ".join(cells)
                     + f" | {dense / packed:.2f}x | {dense / held:.2f}x | {rss:.0f} |")
    lines.append("")
    lines.append("Reductions are dense bytes / packed bytes summed over the logged steps, from the "
                 "real packed buffers; (sim): coded and decoded at once as in the SmaQ paper "
                 "(held dense), otherwise really held packed. 'held' counts what the process "
                 "really held for the five structures.")
    bn = [r for r in runs if any("bn_feature_maps" in s for s in r.steps)]
    for r in bn:
        d = sum(s["bn_feature_maps"]["dense"] for s in r.steps)
        p = sum(s["bn_feature_maps"]["packed"] for s in r.steps)
        e = sum(s["bn_feature_maps"]["rel_mse"] for s in r.steps) / len(r.steps)
        lines.append(f"\n{r.group} {r.label}: BatchNorm inputs coded BN-aware, {d / p:.2f}x, "
                     f"mean relative squared error {e:.3e}.")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: List[str], out: str) -> Dict[str, str]:
    """Reads the runs and writes curves.png, memory.png and table.md into ``out``; returns
    their paths."""
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f) for k, f in
             (("curves", "curves.png"), ("memory", "memory.png"), ("table", "table.md"))}
    plot_curves(runs, paths["curves"])
    plot_memory(runs, paths["memory"])
    with open(paths["table"], "w") as f:
        f.write(table(runs))
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point (``smaq-rs report``)."""
    ap = argparse.ArgumentParser(prog="smaq-rs report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", default="report", help="output directory (default: report)")
    a = ap.parse_args(argv)
    try:
        paths = write_report(a.runs, a.out)
    except (SmaqError, ValueError, OSError) as e:
        print(f"smaq-rs report: error: {e}", file=sys.stderr)
        return 2
    with open(paths["table"]) as f:
        print(f.read())
    for k in ("curves", "memory"):
        print(f"wrote {paths[k]}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
