"""The SmaQ paper's experiment on this machine: a grid of codecs x {ResNet-18 + digits, GPT-2 +
stdlib text}, every data structure coded, then the Table I analogue and the plots.

    python benches/paper_grid.py --out docs/paper           # the grid of `make paper` (~30 min)
    python benches/paper_grid.py --out docs/paper --large   # larger inputs and models (hours)

Each run is one ``python -m smaq_rs.train`` process (its own peak RSS) writing a run directory
under ``--runs`` (default bench-out/paper-runs); ``smaq_rs.train.report`` then writes
``OUT/table.md``, ``OUT/curves.png`` and ``OUT/memory.png``, and ``OUT/README.md`` records
the commands, the settings, the CPU and the wall time. Codecs: fp32 (uncoded baseline), bf16, fp16, fp8 (e4m3), s2fp8, SmaQ 6/8, int8
(blockwise affine).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List

from smaq_rs.bench import cpu_name

CODECS: Dict[str, List[str]] = {
    "fp32": ["--compress", "fp32"],
    "bf16": ["--compress", "bf16"],
    "fp16": ["--compress", "fp16"],
    "fp8": ["--compress", "fp8"],
    "s2fp8": ["--compress", "s2fp8"],
    "smaq68": ["--compress", "smaq", "--bits-main", "6", "--bits-outlier", "8"],
    "int8": ["--compress", "int8"],
}

#: `make paper`: sized to run in about 30 minutes on a 2-core CPU.
GRID = {
    "resnet18": ["--model", "resnet18", "--dataset", "digits", "--image-size", "16",
                 "--batch-size", "32", "--epochs", "2", "--eval-every", "14"],
    "gpt2": ["--model", "gpt2", "--dataset", "stdlib-text", "--layers", "2", "--width", "128",
             "--heads", "4", "--seq", "64", "--batch-size", "16", "--steps", "300",
             "--eval-every", "50"],
}
#: `--large`: the digits at 32x32 and the GPT-2 of benches/fidelity.py (several times longer).
LARGE = {
    "resnet18": ["--model", "resnet18", "--dataset", "digits", "--image-size", "32",
                 "--batch-size", "64", "--epochs", "3", "--eval-every", "21"],
    "gpt2": ["--model", "gpt2", "--dataset", "stdlib-text", "--layers", "4", "--width", "256",
             "--heads", "4", "--seq", "256", "--batch-size", "16", "--steps", "300",
             "--eval-every", "25"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/paper")
    ap.add_argument("--large", action="store_true",
                    help="larger inputs and models (see LARGE in this file; hours, not minutes)")
    ap.add_argument("--runs", default="bench-out/paper-runs",
                    help="where the run directories (with their checkpoints) go")
    ap.add_argument("--models", default="resnet18,gpt2")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    grid = LARGE if a.large else GRID
    models = [m for m in a.models.split(",") if m]
    codecs = [c for c in a.codecs.split(",") if c]
    bad = [m for m in models if m not in grid] + [c for c in codecs if c not in CODECS]
    if bad:
        ap.error(f"unknown models/codecs {bad}; models: {list(grid)}, codecs: {list(CODECS)}")
    runs_dir = a.runs
    os.makedirs(runs_dir, exist_ok=True)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores", flush=True)
    commands, dirs = [], []
    t_all = time.perf_counter()
    for m in models:
        for c in codecs:
            d = os.path.join(runs_dir, f"{m}-{c}")
            cmd = ([sys.executable, "-m", "smaq_rs.train"] + grid[m] + CODECS[c]
                   + ["--run-dir", d, "--overwrite", "--quiet"]
                   + (["--threads", str(a.threads)] if a.threads else []))
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            dt = time.perf_counter() - t0
            shown = "python -m smaq_rs.train " + " ".join(shlex.quote(x) for x in cmd[3:])
            commands.append(f"{shown}   # {dt:.0f} s")
            dirs.append(d)
            print(f"{m} {c}: {dt:.0f} s", flush=True)
    wall = time.perf_counter() - t_all
    from smaq_rs.train.report import write_report

    paths = write_report(dirs, a.out)
    with open(paths["table"]) as f:
        tbl = f.read()
    mode = "large grid (--large)" if a.large else "grid of `make paper`"
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write(f"# The SmaQ experiment: {mode}\n\n")
        f.write(f"Written by `python benches/paper_grid.py --out {a.out}"
                f"{' --large' if a.large else ''}` on {cpu_name()} "
                f"({os.cpu_count()} cores), {wall / 60:.1f} min in all.\n\n")
        f.write("Settings per model: " + "; ".join(f"{m}: `{' '.join(grid[m])}`"
                                                    for m in models) + ".\n\n")
        if not a.large:
            f.write("`--large` uses: " + "; ".join(
                f"{m}: `{' '.join(LARGE[m])}`" for m in models) + " (the GPT-2 of "
                "`benches/fidelity.py`); it was not run for this page.\n\n")
        f.write(tbl + "\n![curves](curves.png)\n\n![memory](memory.png)\n\n## Commands\n\n")
        f.write("```\n" + "\n".join(commands) + "\n```\n")
    print(tbl)
    print(f"wrote {a.out}/README.md, table.md, curves.png, memory.png ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
