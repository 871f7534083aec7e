"""Gradual pruning of Linear and Conv2d weights: scores, sparsity patterns, schedules, callbacks.

- Scores: ``"magnitude"`` (``|w|``) or ``"snip_momentum"`` (``|w * m|``, ``m`` an exponential
  moving average of the gradient, ``m = beta * m + (1 - beta) * g``).
- Patterns: ``"unstructured"``; ``"N:M"`` (``"2:4"``, ``"4:8"``, ``"1:4"``...: in every group of
  ``M`` consecutive weights along the reduced dimension, the input dimension of a Linear and
  in x kh x kw of a Conv2d, at most ``N`` are kept); ``"NxM"`` blocks (``"4x1"``, ``"1x4"``,
  ``"2x2"``: ``N`` output rows by ``M`` reduced columns, scored by their sum, pruned whole).
- Schedule: sparsity ``s(t)`` rises from 0 at ``start_step`` to ``target_sparsity`` at
  ``end_step``, ``"cubic"``: ``target * (1 - (1 - f)^3)`` or ``"exp"``: ``1 - (1 - target)^f``
  with ``f = (t - start) / (end - start)``; masks are recomputed every ``frequency`` steps (and
  at ``end_step``) and applied to the weights after every optimizer step, so pruned weights stay
  zero whatever the optimizer does.

An N:M pattern reaches at most ``1 - N/M``; below that, ``s(t)`` is met by applying N:M to the
groups whose pruned weights score lowest, so at the target (by default ``1 - N/M``) every group
holds exactly ``N`` non-zeros (when the weights have no other zeros).

The configuration is plain data (JSON-able), with overrides per module-name pattern::

    pruner = Pruner(model, {
        "target_sparsity": 0.9, "pattern": "unstructured", "method": "magnitude",
        "schedule": "cubic", "start_step": 0, "end_step": 1000, "frequency": 50,
        "overrides": [{"modules": ["layer4.*"], "pattern": "2:4", "target_sparsity": 0.5}],
    })
    for batch in data:                                  # callbacks, or one pruner.step()
        pruner.on_step_begin()
        loss(model(batch)).backward()
        pruner.on_before_optimizer_step(); opt.step(); pruner.on_after_optimizer_step()
"""

from __future__ import annotations

import copy
import fnmatch
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "DEFAULTS", "PatternError", "Pruner", "compute_mask", "parse_pattern", "sparsity_at",
]

#: Every configuration key and its default.
DEFAULTS: Dict[str, Any] = {
    "target_sparsity": 0.9,
    "pattern": "unstructured",
    "method": "magnitude",
    "schedule": "cubic",
    "start_step": 0,
    "end_step": 0,
    "frequency": 1,
    "momentum": 0.9,
    "modules": ["*"],
    "excluded": [],
}
_OVERRIDE_KEYS = set(DEFAULTS) - {"modules", "excluded"}


class PatternError(ValueError):
    """A sparsity pattern that is malformed or does not fit a weight's shape."""


def parse_pattern(pattern: str) -> Tuple[str, int, int]:
    """``("unstructured", 1, 1)``, ``("n:m", N, M)`` or ``("block", N, M)`` for a pattern
    string (``"unstructured"``, ``"2:4"``, ``"4x1"``); PatternError otherwise."""
    if pattern == "unstructured":
        return ("unstructured", 1, 1)
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise PatternError(f"N:M pattern {pattern!r} needs 0 < N < M")
        return ("n:m", n, mm)
    m = re.fullmatch(r"(\d+)x(\d+)", pattern)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if a < 1 or b < 1:
            raise PatternError(f"block pattern {pattern!r} needs positive sizes")
        return ("block", a, b)
    raise PatternError(
        f"unknown sparsity pattern {pattern!r}; expected 'unstructured', 'N:M' (like '2:4') "
        "or 'NxM' blocks (like '4x1')"
    )


def max_sparsity(pattern: str) -> float:
    """The highest sparsity ``pattern`` can express (``1 - N/M`` for N:M, else 1)."""
    kind, n, m = parse_pattern(pattern)
    return 1.0 - n / m if kind == "n:m" else 1.0


def sparsity_at(step: int, start: int, end: int, target: float, schedule: str = "cubic") -> float:
    """The scheduled sparsity at ``step``: 0 before ``start``, ``target`` from ``end`` on,
    cubic ``target * (1 - (1 - f)^3)`` or exponential ``1 - (1 - target)^f`` in between,
    ``f = (step - start) / (end - start)``."""
    if schedule not in ("cubic", "exp"):
        raise ValueError(f"schedule must be 'cubic' or 'exp', found {schedule!r}")
    if step < start:
        return 0.0
    if step >= end:
        return float(target)
    f = (step - start) / (end - start)
    if schedule == "cubic":
        return float(target * (1.0 - (1.0 - f) ** 3))
    return float(1.0 - (1.0 - target) ** f)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """(out, reduced): a Linear weight as it is, a Conv2d weight as out x (in * kh * kw)."""
    return t.reshape(t.shape[0], -1)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries with the lowest scores (ties by position)."""
    flat = scores.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        out[order[:k]] = True
    return out.reshape(scores.shape)


def compute_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                 name: str = "weight") -> torch.Tensor:
    """The keep-mask (bool, shape of ``scores``) for ``sparsity`` under ``pattern``: the
    lowest-scoring weights, N:M groups or blocks are pruned (unstructured: the
    ``round(sparsity * scores.numel())`` lowest, Python's rounding). PatternError when the pattern
    does not divide the weight (``name`` is used in the message) or cannot reach ``sparsity``."""
    kind, n, m = parse_pattern(pattern)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], found {sparsity}")
    s2 = _as_2d(scores.detach().float())
    rows, red = s2.shape
    if kind == "unstructured":
        k = round(sparsity * s2.numel())
        return (~_lowest(s2, k)).reshape(scores.shape)
    if kind == "n:m":
        if red % m:
            raise PatternError(
                f"pattern {pattern!r} on {name}: M = {m} does not divide the reduced dimension "
                f"{red} (weight shape {tuple(scores.shape)})"
            )
        top = 1.0 - n / m
        if sparsity > top + 1e-9:
            raise PatternError(
                f"pattern {pattern!r} on {name} reaches at most {top:.3f} sparsity; "
                f"{sparsity:.3f} was asked"
            )
        groups = s2.reshape(rows, red // m, m)
        # In each group, the M - N lowest scores are the ones N:M would remove.
        order = torch.argsort(groups, dim=-1, stable=True)
        drop = torch.zeros_like(groups, dtype=torch.bool)
        drop.scatter_(-1, order[..., : m - n], True)
        cost = (groups * drop).sum(-1)
        g = round(sparsity / top * cost.numel()) if top > 0 else 0
        chosen = _lowest(cost, min(g, cost.numel()))
        pruned = drop & chosen.unsqueeze(-1)
        return (~pruned).reshape(scores.shape)
    if rows % n or red % m:
        raise PatternError(
            f"block pattern {pattern!r} on {name}: the weight's {rows} x {red} (out x reduced) "
            f"is not a whole number of {n} x {m} blocks"
        )
    blocks = s2.reshape(rows // n, n, red // m, m).sum(dim=(1, 3))
    k = round(sparsity * blocks.numel())
    pruned = _lowest(blocks, k)
    full = pruned[:, None, :, None].expand(rows // n, n, red // m, m)
    return (~full).reshape(scores.shape)


class _Target:
    """One pruned module and its resolved settings."""

    def __init__(self, name: str, module: nn.Module, cfg: Dict[str, Any]) -> None:
        self.name = name
        self.module = module
        self.cfg = cfg
        self.mask = torch.ones_like(module.weight, dtype=torch.bool)
        self.momentum: Optional[torch.Tensor] = None


class Pruner:
    """Prunes the Linear and Conv2d weights of ``model`` on a schedule (see the module doc).

    ``config`` is a dict of the keys in :data:`DEFAULTS` plus ``"overrides"``: a list of dicts,
    each with ``"modules"`` (fnmatch patterns of module names) and any of the other keys, the
    later ones winning; keyword arguments replace top-level keys. Bad keys, patterns that do
    not fit a weight (naming it) and unreachable targets are refused here, before training.
    """

    def __init__(self, model: nn.Module, config: Optional[Mapping[str, Any]] = None,
                 **kwargs: Any) -> None:
        cfg = dict(DEFAULTS)
        given = dict(config or {})
        given.update(kwargs)
        overrides = list(given.pop("overrides", []))
        unknown = set(given) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown pruning option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        cfg.update(given)
        for o in overrides:
            bad = set(o) - _OVERRIDE_KEYS - {"modules"}
            if "modules" not in o or bad:
                raise ValueError(
                    f"an override needs 'modules' and only the keys {sorted(_OVERRIDE_KEYS)}; "
                    f"found {sorted(o)}"
                )
        self.model = model
        self.config = copy.deepcopy(cfg)
        self.config["overrides"] = copy.deepcopy(overrides)
        self.step_count = 0
        self.targets: List[_Target] = []
        for name, mod in model.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            if not any(fnmatch.fnmatchcase(name, p) for p in cfg["modules"]):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in cfg["excluded"]):
                continue
            mc = {k: v for k, v in cfg.items() if k not in ("modules", "excluded")}
            for o in overrides:
                if any(fnmatch.fnmatchcase(name, p) for p in o["modules"]):
                    mc.update({k: v for k, v in o.items() if k != "modules"})
            self._validate(name, mod, mc)
            self.targets.append(_Target(name, mod, mc))

    @staticmethod
    def _validate(name: str, mod: nn.Module, c: Dict[str, Any]) -> None:
        if c["method"] not in ("magnitude", "snip_momentum"):
            raise ValueError(f"{name}: method must be 'magnitude' or 'snip_momentum', "
                             f"found {c['method']!r}")
        if c["schedule"] not in ("cubic", "exp"):
            raise ValueError(f"{name}: schedule must be 'cubic' or 'exp', found {c['schedule']!r}")
        if not (0 <= c["start_step"] <= c["end_step"]) or int(c["frequency"]) < 1:
            raise ValueError(
                f"{name}: need 0 <= start_step <= end_step and frequency >= 1; found "
                f"{c['start_step']}, {c['end_step']}, {c['frequency']}"
            )
        if not 0.0 <= c["target_sparsity"] < 1.0:
            raise ValueError(f"{name}: target_sparsity must be in [0, 1), "
                             f"found {c['target_sparsity']}")
        # Shape fit and reachability, checked on the real weight shape.
        compute_mask(torch.zeros_like(mod.weight), c["target_sparsity"], c["pattern"], name)

    # -- what the schedule says --------------------------------------------------------------
    def target_at(self, name: str, step: Optional[int] = None) -> float:
        """The scheduled sparsity of module ``name`` at ``step`` (default: the current step)."""
        t = self._target(name)
        c = t.cfg
        return sparsity_at(self.step_count if step is None else step, c["start_step"],
                           c["end_step"], c["target_sparsity"], c["schedule"])

    def _target(self, name: str) -> _Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(f"{name!r} is not pruned; pruned modules: {[t.name for t in self.targets]}")

    def _due(self, t: _Target, step: int) -> bool:
        c = t.cfg
        if step < c["start_step"] or step > c["end_step"]:
            return False
        return (step - c["start_step"]) % int(c["frequency"]) == 0 or step == c["end_step"]

    def masks(self) -> Dict[str, torch.Tensor]:
        """The current keep-masks by module name (bool, the weights' shapes)."""
        return {t.name: t.mask for t in self.targets}

    def sparsity(self) -> Dict[str, float]:
        """Measured fraction of exact zeros in each pruned weight."""
        return {t.name: float((t.module.weight == 0).float().mean()) for t in self.targets}

    # -- work --------------------------------------------------------------------------------
    @torch.no_grad()
    def update_masks(self) -> None:
        """Recomputes every mask due at the current step from the scores and applies it."""
        for t in self.targets:
            if not self._due(t, self.step_count):
                continue
            w = t.module.weight
            if t.cfg["method"] == "snip_momentum" and t.momentum is not None:
                scores = (w * t.momentum).abs()
            else:
                scores = w.abs()
            # Pruned weights stay pruned: they are zero, so they score lowest anyway; they are
            # forced lowest so that ties with other zeros cannot bring them back.
            scores = torch.where(t.mask, scores, torch.full_like(scores, -1.0))
            t.mask = compute_mask(scores, self.target_at(t.name), t.cfg["pattern"], t.name) & t.mask
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zeroes the pruned weights."""
        for t in self.targets:
            t.module.weight.masked_fill_(~t.mask, 0.0)

    @torch.no_grad()
    def _update_momentum(self) -> None:
        for t in self.targets:
            g = t.module.weight.grad
            if t.cfg["method"] != "snip_momentum" or g is None:
                continue
            beta = float(t.cfg["momentum"])
            if t.momentum is None:
                t.momentum = (1.0 - beta) * g.detach().clone()
            else:
                t.momentum.mul_(beta).add_(g, alpha=1.0 - beta)

    # -- callbacks ---------------------------------------------------------------------------
    def on_train_begin(self) -> None:
        """Starts at step 0 with nothing pruned (masks of ones), then prunes what is due."""
        self.step_count = 0
        for t in self.targets:
            t.mask = torch.ones_like(t.module.weight, dtype=torch.bool)
            t.momentum = None
        self.update_masks()

    def on_step_begin(self) -> None:
        """Recomputes the masks due at this step and applies them."""
        self.update_masks()

    def on_before_optimizer_step(self) -> None:
        """Updates the gradient moving average (snip_momentum) and zeroes the gradients of
        pruned weights."""
        self._update_momentum()
        with torch.no_grad():
            for t in self.targets:
                if t.module.weight.grad is not None:
                    t.module.weight.grad.masked_fill_(~t.mask, 0.0)

    def on_after_optimizer_step(self) -> None:
        """Re-applies the masks (momentum or weight decay may have moved pruned weights) and
        advances the step."""
        self.apply_masks()
        self.step_count += 1

    def on_train_end(self) -> Dict[str, float]:
        """Applies the masks a last time; returns the measured sparsity of each weight."""
        self.apply_masks()
        return self.sparsity()

    def step(self) -> None:
        """Everything for one training step in one call, after ``optimizer.step()``: the
        gradient average, the masks due at this step, their application, the step count."""
        self._update_momentum()
        self.update_masks()
        self.apply_masks()
        self.step_count += 1
