"""Models and datasets of the training driver: everything ships with Python, scikit-learn,
torchvision and transformers (model definitions only, randomly initialised); nothing is
downloaded.

Datasets (each a :class:`Dataset`: a task kind, a train and a validation split):

- ``digits``: scikit-learn's 8x8 digits, upsampled (bilinear) to ``image_size`` x ``image_size``
  with 3 channels in [-1, 1]; a fixed 25% validation split. Task ``image`` (10 classes).
- ``stdlib-text``: the bytes of Python's standard library sources (``*.py`` of
  ``sysconfig.get_paths()["stdlib"]``, name order); the last 5% held out. Task ``lm`` (next
  byte, vocabulary 256): windows of ``seq`` bytes at positions drawn per step.
- ``source-lang``: which language a line is written in, three classes: ``python`` (lines of the
  standard library's ``*.py``), ``c`` (lines of the C headers in
  ``sysconfig.get_paths()["include"]``, recursively) and ``text`` (lines of the English text
  files shipped in the standard library directory: ``*.txt`` outside ``site-packages`` and test
  directories, i.e. the licence, IDLE's help/news files and lib2to3's grammars). Lines with
  at least 16 non-blank characters, stripped, as bytes cut or zero-padded to ``seq``; the same
  number of lines per class, drawn from a fixed seed; a fixed 20% validation split. Task
  ``seqcls``.

Models (:func:`build_model`): ``resnet18`` / ``resnet34`` (torchvision, 3x3 stride-1 stem, no
max-pool: for small images), ``cnn`` (conv-BN-ReLU blocks, ``width`` channels), ``mlp``
(``layers`` hidden layers of ``width``; on token inputs a byte embedding mean-pooled first),
``gpt2`` (``transformers.GPT2LMHeadModel``, or ``GPT2ForSequenceClassification`` for
``seqcls``), ``bert`` (``transformers.BertForSequenceClassification``). Sizes come from
``layers``, ``width`` and ``heads``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "DATASETS",
    "MODELS",
    "COMPATIBLE",
    "Dataset",
    "build_dataset",
    "build_model",
    "digits_32",
    "digits_split",
    "resnet18_small",
    "resnet_small",
    "source_lang_lines",
    "stdlib_text",
]

#: Dataset name -> task kind.
DATASETS: Dict[str, str] = {"digits": "image", "stdlib-text": "lm", "source-lang": "seqcls"}
#: Model names.
MODELS: Tuple[str, ...] = ("resnet18", "resnet34", "gpt2", "bert", "mlp", "cnn")
#: Task kind -> the models that take it.
COMPATIBLE: Dict[str, Tuple[str, ...]] = {
    "image": ("resnet18", "resnet34", "cnn", "mlp"),
    "lm": ("gpt2",),
    "seqcls": ("bert", "gpt2", "mlp"),
}
#: source-lang class names, in label order.
SOURCE_LANG_CLASSES: Tuple[str, ...] = ("python", "c", "text")


# ------------------------------------------------------------------------------------------------
# raw data
# ------------------------------------------------------------------------------------------------
def stdlib_text() -> np.ndarray:
    """The bytes of Python's standard library sources (``*.py``), concatenated in name order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            parts.append(fh.read())
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def digits_32(seed: int = 0, size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits upsampled to 3 x ``size`` x ``size`` in [-1, 1], shuffled with
    ``seed``: (x, y) tensors."""
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def digits_split(size: int = 32) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits at ``size`` x ``size`` (:func:`digits_32`, seed 0): 75% train, a fixed 25% test:
    (x_train, y_train, x_test, y_test)."""
    x, y = digits_32(0, size)
    n_test = len(y) // 4
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _lines(paths: List[str]) -> List[bytes]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            for line in f.read().splitlines():
                s = line.strip()
                if len(s.replace(b" ", b"").replace(b"\t", b"")) >= 16:
                    out.append(s)
    return out


def source_lang_files() -> Dict[str, List[str]]:
    """The files each source-lang class is read from (sorted paths)."""
    paths = sysconfig.get_paths()
    std = paths["stdlib"]
    py = sorted(glob.glob(os.path.join(std, "*.py")))
    h = sorted(glob.glob(os.path.join(paths["include"], "**", "*.h"), recursive=True))
    txt = sorted(f for f in glob.glob(os.path.join(std, "**", "*.txt"), recursive=True)
                 if "site-packages" not in f and f"{os.sep}test" not in f[len(std):])
    return {"python": py, "c": h, "text": txt}


def source_lang_lines(seed: int = 0) -> Tuple[List[bytes], List[int]]:
    """Balanced (lines, labels) of the source-lang task, shuffled with ``seed``."""
    files = source_lang_files()
    per = {name: _lines(files[name]) for name in SOURCE_LANG_CLASSES}
    empty = [n for n, v in per.items() if not v]
    if empty:
        raise RuntimeError(f"source-lang: no lines found for class(es) {empty} "
                           f"(files: { {n: len(files[n]) for n in empty} })")
    n = min(len(v) for v in per.values())
    rng = np.random.default_rng(seed)
    lines: List[bytes] = []
    labels: List[int] = []
    for label, name in enumerate(SOURCE_LANG_CLASSES):
        pick = rng.choice(len(per[name]), size=n, replace=False)
        lines += [per[name][i] for i in sorted(pick)]
        labels += [label] * n
    order = rng.permutation(len(lines))
    return [lines[i] for i in order], [labels[i] for i in order]


def _encode_lines(lines: List[bytes], seq: int) -> torch.Tensor:
    out = np.zeros((len(lines), seq), dtype=np.int64)
    for i, s in enumerate(lines):
        b = np.frombuffer(s[:seq], dtype=np.uint8)
        out[i, :len(b)] = b
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dataset:
    """A task and its two splits.

    ``image`` / ``seqcls``: ``x_train``, ``y_train``, ``x_val``, ``y_val`` tensors (images or
    byte ids, class labels). ``lm``: ``train`` and ``val`` byte arrays, windows of ``seq``.
    ``num_classes``: classes (``image`` / ``seqcls``) or the vocabulary (``lm``).
    """

    name: str
    task: str
    num_classes: int
    seq: int = 0
    x_train: Optional[torch.Tensor] = None
    y_train: Optional[torch.Tensor] = None
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None
    train: Optional[np.ndarray] = None
    val: Optional[np.ndarray] = None

    @property
    def n_train(self) -> int:
        """Training examples (``lm``: windows that fit in the training text)."""
        if self.task == "lm":
            return len(self.train) - self.seq - 1
        return len(self.y_train)

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training examples at ``idx`` (``lm``: windows starting at ``idx``): (inputs, targets)."""
        if self.task == "lm":
            ids = torch.from_numpy(np.stack([self.train[int(s):int(s) + self.seq]
                                             for s in idx]).astype(np.int64))
            return ids, ids
        return self.x_train[idx], self.y_train[idx]

    def val_batches(self, batch: int, max_examples: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The fixed validation set (at most ``max_examples``), in batches of ``batch``."""
        if self.task == "lm":
            n = min(max_examples, (len(self.val) - 1) // self.seq)
            ids = torch.from_numpy(np.stack([self.val[i * self.seq:(i + 1) * self.seq]
                                             for i in range(n)]).astype(np.int64))
            return [(ids[i:i + batch], ids[i:i + batch]) for i in range(0, n, batch)]
        n = min(max_examples, len(self.y_val))
        return [(self.x_val[i:min(i + batch, n)], self.y_val[i:min(i + batch, n)])
                for i in range(0, n, batch)]


def build_dataset(name: str, image_size: int = 32, seq: int = 64) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if name == "digits":
        if image_size < 8:
            raise ValueError(f"image size must be >= 8, got {image_size}")
        xtr, ytr, xva, yva = digits_split(image_size)
        return Dataset(name, "image", 10, 0, xtr, ytr, xva, yva)
    if seq < 2:
        raise ValueError(f"sequence length must be >= 2, got {seq}")
    if name == "stdlib-text":
        text = stdlib_text()
        split = int(len(text) * 0.95)
        return Dataset(name, "lm", 256, seq, train=text[:split], val=text[split:])
    lines, labels = source_lang_lines(0)
    x = _encode_lines(lines, seq)
    y = torch.tensor(labels)
    n_val = len(y) // 5
    return Dataset(name, "seqcls", len(SOURCE_LANG_CLASSES), seq, x[n_val:], y[n_val:],
                   x[:n_val], y[:n_val])


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def resnet_small(depth: int = 18, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18/34 for small inputs: a 3x3 stride-1 stem and no max-pool."""
    import torchvision

    if depth not in (18, 34):
        raise ValueError(f"ResNet depth must be 18 or 34, got {depth}")
    ctor = torchvision.models.resnet18 if depth == 18 else torchvision.models.resnet34
    model = ctor(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet18_small(num_classes: int = 10) -> nn.Module:
    """:func:`resnet_small` of depth 18."""
    return resnet_small(18, num_classes)


class SmallCNN(nn.Module):
    """``layers`` blocks of conv3x3-BatchNorm-ReLU (width doubling, 2x2 max-pool after each
    block but the first), global average pool, linear classifier."""

    def __init__(self, num_classes: int, width: int = 16, layers: int = 3):
        super().__init__()
        blocks: List[nn.Module] = []
        c_in, c = 3, width
        for i in range(layers):
            blocks += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU()]
            if i:
                blocks.append(nn.MaxPool2d(2))
            c_in, c = c, c * 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class MLP(nn.Module):
    """``layers`` hidden Linear-ReLU layers of ``width``; token inputs (int64) go through a byte
    embedding, mean-pooled over the non-zero positions, first."""

    def __init__(self, in_features: int, num_classes: int, width: int = 64, layers: int = 2,
                 tokens: bool = False):
        super().__init__()
        self.embed = nn.Embedding(256, width) if tokens else None
        dims = [width if tokens else in_features] + [width] * layers
        mods: List[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            mask = (x != 0).unsqueeze(-1).float()
            h = (self.embed(x) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:
            h = x.flatten(1)
        return self.head(self.body(h))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def build_model(name: str, data: Dataset, layers: int = 2, width: int = 64,
                heads: int = 2, image_size: int = 32) -> nn.Module:
    """Model ``name`` for ``data``'s task; the forward takes the dataset's inputs and returns
    logits ((batch, classes) or (batch, seq, vocab) for ``lm``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    allowed = COMPATIBLE[data.task]
    if name not in allowed:
        fits = [d for d, t in DATASETS.items() if name in COMPATIBLE[t]]
        raise ValueError(f"model {name!r} does not take dataset {data.name!r} (task {data.task}); "
                         f"{data.name!r} takes {', '.join(allowed)}; {name!r} takes "
                         f"{', '.join(fits)}")
    if min(layers, width, heads) < 1:
        raise ValueError(f"layers, width and heads must be >= 1, got {layers}, {width}, {heads}")
    if name in ("resnet18", "resnet34"):
        return resnet_small(int(name[6:]), data.num_classes)
    if name == "cnn":
        return SmallCNN(data.num_classes, width, layers)
    if name == "mlp":
        return MLP(3 * image_size * image_size, data.num_classes, width, layers,
                   tokens=data.task == "seqcls")
    if width % heads:
        raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
    _quiet_transformers()
    if name == "gpt2":
        from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=256,
                         n_positions=max(data.seq, 8), tie_word_embeddings=True,
                         num_labels=data.num_classes, pad_token_id=0,
                         attn_implementation="eager")
        if data.task == "lm":
            return _Logits(GPT2LMHeadModel(cfg), mask=False)
        return _Logits(GPT2ForSequenceClassification(cfg), mask=True)
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=256, hidden_size=width, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * width,
                     max_position_embeddings=max(data.seq, 8), num_labels=data.num_classes,
                     pad_token_id=0, attn_implementation="eager")
    return _Logits(BertForSequenceClassification(cfg), mask=True)


class _Logits(nn.Module):
    """A transformers model called on byte ids, returning its logits tensor."""

    def __init__(self, inner: nn.Module, mask: bool):
        super().__init__()
        self.inner = inner
        self.mask = mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mask:
            return self.inner(input_ids=ids, attention_mask=(ids != 0).long()).logits
        return self.inner(input_ids=ids).logits


def layer_types(model: nn.Module) -> Tuple[type, ...]:
    """The module classes whose outputs are this model's feature / gradient maps: convolutions
    and linear layers (transformers' GPT-2 ``Conv1D`` included)."""
    types: List[type] = [nn.Conv2d, nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers absent
        pass
    return tuple(types)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
