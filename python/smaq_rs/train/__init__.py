"""The SmaQ experiment as a program: a training driver that codes the five data structures
(weights, gradients, activations, gradient maps, optimizer state) and logs their real packed
bytes per step, and reports that draw the runs and tabulate them as the SmaQ paper's Table I.

    smaq-rs train --model resnet18 --dataset digits --compress smaq --steps 200
    smaq-rs report runs/* --out report/

- :mod:`.data`: models and datasets (all offline);
- :mod:`.driver`: :func:`run` / :func:`main`, the run directory and its logs;
- :mod:`.report`: plots and the table;
- :mod:`.bn`: BN-aware SmaQ for feature maps that feed a BatchNorm.
"""

from .bn import BNAwareFeatureMaps, bn_roundtrip
from .data import COMPATIBLE, DATASETS, MODELS, build_dataset, build_model
from .driver import COMPRESS, TAGS, RunDirError, codec_spec, main, read_records, run

__all__ = [
    "BNAwareFeatureMaps",
    "COMPATIBLE",
    "COMPRESS",
    "DATASETS",
    "MODELS",
    "RunDirError",
    "TAGS",
    "bn_roundtrip",
    "build_dataset",
    "build_model",
    "codec_spec",
    "main",
    "read_records",
    "run",
]
