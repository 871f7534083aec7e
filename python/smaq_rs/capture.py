"""Real training tensors, by class, for measuring codecs where they are used.

:func:`capture` trains two small real models for a few steps, from a fixed seed and with data
that ships with Python and scikit-learn (nothing is downloaded), and records one tensor of each
class the SmaQ research compressed:

- GPT-2 (``transformers.GPT2LMHeadModel``: 2 layers, 128 wide, 4 heads, tied embeddings,
  vocabulary 256), byte-level on Python's standard library sources, AdamW: an MLP weight and its
  gradient, GELU activations, attention probabilities, logits, LayerNorm inputs, Adam's
  exp_avg and exp_avg_sq;
- ResNet-18 (``torchvision``, 3x3 stem, no max-pool) on scikit-learn's digits upsampled to
  32x32, SGD with momentum: a convolution's weight and gradient, ReLU activations, the momentum
  buffer.

``python -m smaq_rs bench --source classes`` runs the codec table on each class, with the SmaQ
research algorithm's error and counted bits beside ours; ``--save DIR`` keeps the tensors as
``.npy`` files. Needs torch, transformers, torchvision and scikit-learn.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

# The model and data builders are shared with the training driver.
from .train.data import digits_32, resnet18_small, stdlib_text

__all__ = ["CLASSES", "capture", "digits_32", "resnet18_small", "stdlib_text"]

#: Class name -> whether its values are non-negative by nature (SmaQ's ``all_positive``).
CLASSES: Dict[str, bool] = {
    "gpt2 weight (mlp c_fc)": False,
    "gpt2 gradient (mlp c_fc)": False,
    "gpt2 GELU activations": False,
    "gpt2 attention probabilities": True,
    "gpt2 logits": False,
    "gpt2 LayerNorm input": False,
    "gpt2 Adam exp_avg": False,
    "gpt2 Adam exp_avg_sq": True,
    "resnet18 conv weight (layer2)": False,
    "resnet18 conv gradient (layer2)": False,
    "resnet18 ReLU activations": True,
    "resnet18 SGD momentum": False,
}


def _gpt2(steps: int, seed: int) -> Dict[str, "np.ndarray"]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    seq, batch = 128, 8
    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=seq,
                     tie_word_embeddings=True, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    text = stdlib_text()
    rng = np.random.default_rng(seed)
    fc = model.transformer.h[0].mlp.c_fc
    seen: Dict[str, "torch.Tensor"] = {}
    hooks = [
        model.transformer.h[0].mlp.act.register_forward_hook(
            lambda m, i, o: seen.__setitem__("gelu", o.detach().clone())),
        model.transformer.h[1].ln_1.register_forward_pre_hook(
            lambda m, i: seen.__setitem__("ln_in", i[0].detach().clone())),
    ]
    out = None
    for step in range(steps):
        starts = rng.integers(0, len(text) - seq - 1, size=batch)
        ids = torch.from_numpy(np.stack([text[s:s + seq] for s in starts]).astype(np.int64))
        last = step == steps - 1
        out = model(ids, labels=ids, output_attentions=last)
        out.loss.backward()
        if last:
            grad = fc.weight.grad.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    state = opt.state[fc.weight]
    return {
        "gpt2 weight (mlp c_fc)": fc.weight.detach(),
        "gpt2 gradient (mlp c_fc)": grad,
        "gpt2 GELU activations": seen["gelu"],
        "gpt2 attention probabilities": out.attentions[0].detach(),
        "gpt2 logits": out.logits.detach(),
        "gpt2 LayerNorm input": seen["ln_in"],
        "gpt2 Adam exp_avg": state["exp_avg"],
        "gpt2 Adam exp_avg_sq": state["exp_avg_sq"],
    }


def _resnet(steps: int, seed: int) -> Dict[str, "np.ndarray"]:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(seed)
    x, y = digits_32(seed)
    model = resnet18_small()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    conv = model.layer2[0].conv1
    seen: Dict[str, "torch.Tensor"] = {}

    def relu_hook(m, i, o):
        seen.setdefault("relu", o.detach().clone())

    batch = 32
    for step in range(steps):
        idx = slice(step * batch, (step + 1) * batch)
        last = step == steps - 1
        h = model.layer1[0].relu.register_forward_hook(relu_hook) if last else None
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if last:
            grad = conv.weight.grad.detach().clone()
            h.remove()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "resnet18 conv weight (layer2)": conv.weight.detach(),
        "resnet18 conv gradient (layer2)": grad,
        "resnet18 ReLU activations": seen["relu"],
        "resnet18 SGD momentum": opt.state[conv.weight]["momentum_buffer"],
    }


def capture(steps: int = 20, seed: int = 0) -> Dict[str, Tuple[np.ndarray, bool]]:
    """Every class of :data:`CLASSES`: name -> (float32 values, flattened; all_positive)."""
    import torch

    with torch.random.fork_rng():
        tensors = {**_gpt2(steps, seed), **_resnet(steps, seed)}
    return {name: (np.ascontiguousarray(tensors[name].float().numpy().ravel()), pos)
            for name, pos in CLASSES.items()}
