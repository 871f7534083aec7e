"""Drop-in SGD / Adam / AdamW whose state lives as packed bytes between steps.

During ``step()`` each parameter's state is decoded, updated with the usual formulas, and packed
again. Adam / AdamW on float32 CPU parameters with SmaQ state (the default) run a fused Rust step
piece by piece (64K values per worker), so no slot is ever dense as a whole: the process grows by
about the packed state. Elsewhere (SGD, other codecs, zero-mapped state) the state is decoded into
a reusable scratch buffer, so only one parameter's state is dense at a time.
The fused step needs the new state's statistics before it codes it: it reads the state twice
(statistics, then update and code), or, on parameters of at least 2^17 values whose statistics
have settled (a std between 1% below and 3% above the step before's, a mean within 5% of a
std: the steady state of training), once, coding with the statistics the step before kept and
checking them afterwards (a slot they no longer fit is coded again). ``fused_paths`` counts how the steps ran.
With SmaQ, ``exp_avg_sq`` is packed in the log domain (``log=True``: relative precision at every
magnitude, which Adam's ``1/sqrt(v)`` needs).

Adam's ``exp_avg`` is packed scaled (``scale_exp_avg=True``, the default): divided by
``sqrt(exp_avg_sq)`` and multiplied by the step's bias corrections, ``sqrt(1 - beta2**t) /
(1 - beta1**t)``, which makes it the direction of the update, the quantity the step reads; 0
where exp_avg_sq is 0 (exp_avg is then 0 too). The next step multiplies it back with the square
root of the decoded exp_avg_sq. Packed as is, the elements whose gradients are small next to
the tensor's others would be rounded on a grid set by the large ones, and their updates, which
divide by their own small ``sqrt(exp_avg_sq)``, would take that rounding noise magnified. The
state entry ``exp_avg_scaled`` records the scaling; state saved without it loads as it was
saved. Tensors with fewer than ``min_numel``
elements, and parameter groups with ``compress_state=False``, keep dense state.

Exactness and resuming: zeros in the state decode to exactly 0 (a zero map is stored when the
codec does not guarantee it). Stochastic rounding draws its seed from (group ``seed``, group,
parameter, step, slot), so a run resumed from ``state_dict()`` continues bit for bit like the
uninterrupted one. ``state_dict()`` holds only tensors, ints, floats, bools and strings and
loads with ``torch.load(..., weights_only=True)``.

Adam guard (``guard=True``, the default): with zero-initialised moments and beta1**2 < beta2,
Cauchy-Schwarz gives exp_avg**2 <= exp_avg_sq * (1-beta1)**2 / ((1-beta2)(1-beta1**2/beta2)).
A decoded exp_avg_sq below that bound (quantization error) is raised to it, so a small decoded
exp_avg over a near-zero decoded exp_avg_sq cannot blow a parameter up.

The paper's weight and gradient quantization around the step: ``quantize_grads`` replaces the
gradient by its compressed-decompressed value before the update, ``quantize_weights`` does the
same to the parameter after it (simulation: both stay dense). Both are per-group options, so a
group (e.g. norms and biases) can opt out.
"""

from __future__ import annotations

import collections
import hashlib
import math
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

from .. import _bridge
from . import _store
from ._store import Stored

_COMMON = ("compress_state", "quantize_weights", "quantize_grads", "seed")


#: Elements per float64 piece of :func:`_sqrt` (8 MiB of scratch at a time).
_SQRT_PIECE = 1 << 20


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """The square root correctly rounded, as the fused step takes it (torch's float32 kernel can
    be an ulp off): through float64, whose rounding to float32 is then exact; piece by piece,
    so the float64 scratch stays small."""
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    src, dst = v.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), _SQRT_PIECE):
        dst[i:i + _SQRT_PIECE] = src[i:i + _SQRT_PIECE].double().sqrt_()
    return out


def _scale_factor(beta1: float, beta2: float, step: int) -> float:
    """The factor of a scaled exp_avg stored at step ``step``: sqrt(1 - beta2**step) /
    (1 - beta1**step), Adam's bias corrections, so the scaled values are the update's direction
    (m / bc1) / sqrt(v / bc2) and their spread stays put from step to step."""
    return math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


def _derive_seed(base: int, gi: int, pi: int, step: int, slot: str) -> int:
    h = hashlib.blake2b(f"{base}:{gi}:{pi}:{step}:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


#: The state entry that says a parameter's packed exp_avg is stored scaled (divided by
#: sqrt(exp_avg_sq)); absent in state saved without scaling, which loads as it was saved.
_SCALED = "exp_avg_scaled"

#: Parameters of at least this many values keep their new state's statistics (24 bytes per
#: slot: mean, std, and whether they had settled, i.e. moved within the one pass's tolerance
#: since the step before) for the next fused step, which then codes in one pass over the state
#: where they had; on smaller ones the second pass costs little and the bytes would show in
#: their state's size.
_KEEP_STATS_MIN = 1 << 17


class _PackedStateOptimizer(torch.optim.Optimizer):
    """Shared machinery: decoding/encoding state slots around a per-parameter update."""

    _slots: Tuple[str, ...] = ()

    def __init__(self, params, defaults: Dict[str, Any], codec: str, codec_params, min_numel,
                 compress_state, quantize_weights, quantize_grads, seed):
        defaults.update(compress_state=compress_state, quantize_weights=quantize_weights,
                        quantize_grads=quantize_grads, seed=int(seed))
        super().__init__(params, defaults)
        self.codec = codec
        self.codec_params: Dict[str, Any] = dict(codec_params or {})
        self.codec_params.pop("seed", None)
        self.min_numel = int(min_numel)
        self._scratch: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}
        for slot in self._slots:  # bad codec/params fail here, not in the first step
            _store.roundtrip(torch.arange(1.0, 65.0), codec, self._params_for(slot, 0))

    # -- codec parameters per slot ------------------------------------------------------------
    def _params_for(self, slot: str, seed: int) -> Dict[str, Any]:
        p = dict(self.codec_params)
        if slot == "exp_avg_sq" and self.codec == "smaq" and "log" not in self.codec_params:
            # Coded as ln(v): relative precision at every magnitude. On the linear grid the
            # small entries are rounded by up to half a step of a std set by the large ones, and
            # 1/sqrt(v) turns that noise into a bias toward larger updates (GPT-2: 2.9% below
            # the plain AdamW loss after 25 steps; in the log domain 0.2%, same bytes).
            p["log"] = True
        p["seed"] = seed
        return p

    def _scratch_for(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        key = (slot, like.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(like.numel(), dtype=like.dtype)
            self._scratch[key] = buf
        return buf[: like.numel()].view(like.shape)

    def _load(self, state, slot: str, p: torch.Tensor) -> torch.Tensor:
        v = state[slot]
        if isinstance(v, Stored):
            t = _store.decode(v, out=self._scratch_for(slot, p))
            return t.to(p.device) if p.device.type != "cpu" else t
        return v

    def _save(self, state, slot: str, value: torch.Tensor, packed: bool, seed: int) -> None:
        if packed:
            state[slot] = _store.encode(value, self.codec, self._params_for(slot, seed))
        else:
            state[slot] = value

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            todo = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                fresh = len(state) == 0
                if fresh:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                todo.append((pi, p, state, fresh))
            # Every step count at once (one operator, not one per parameter).
            if todo:
                torch._foreach_add_([t[2]["step"] for t in todo], 1)
            # Dense state that takes the plain update, done together after the loop.
            many = []
            for pi, p, state, fresh in todo:
                g = p.grad
                if group["quantize_grads"]:
                    g = _store.roundtrip(g, self.codec, self._params_for(
                        "grad", _derive_seed(group["seed"], gi, pi, -1, "grad")))
                packed = (group["compress_state"] and p.numel() >= self.min_numel
                          and p.dtype in _store.CODEC_DTYPES)
                step = int(state["step"].item())
                decoded = any(isinstance(state.get(s), Stored) for s in self._slots)
                if (not packed and not fresh and not decoded and self._update_many is not None
                        and not group["quantize_weights"]
                        and all(isinstance(state.get(s), torch.Tensor) for s in self._slots)):
                    many.append((p, g, state, step))
                    continue
                if packed and self._fusable(p, g, group):
                    ins = tuple(self._fused_in(state, s, p) for s in self._slots)
                    seeds = [_derive_seed(group["seed"], gi, pi, step, s) for s in self._slots]
                    outs = self._fused(p, g, ins, group, step, decoded, seeds)
                    for s, res, seed in zip(self._slots, outs, seeds):
                        self._fused_out(state, s, res, p, seed)
                else:
                    bufs = {s: (None if fresh else self._load(state, s, p))
                            for s in self._slots}
                    if not fresh:
                        self._loaded(state, bufs, group, step)
                    bufs = self._update(p, g, bufs, group, step, decoded)
                    for s, v in self._to_store(state, bufs, packed, group, step).items():
                        if v is None:
                            continue
                        if packed:
                            self._save(state, s, v, True,
                                       _derive_seed(group["seed"], gi, pi, step, s))
                        else:  # never keep a view of a scratch buffer as dense state
                            state[s] = v.clone() if isinstance(state.get(s), Stored) else v
                if group["quantize_weights"]:
                    p.copy_(_store.roundtrip(p, self.codec, self._params_for(
                        "weight", _derive_seed(group["seed"], gi, pi, step, "weight"))))
            if many:
                self._update_many(many, group)
        return loss

    def _update(self, p, g, bufs, group, step, decoded):  # pragma: no cover - abstract
        raise NotImplementedError

    #: ``_update_many(items, group)``, where a subclass has it: the plain update of several
    #: parameters whose state is dense tensors (``items``: (param, grad, state, step)), in
    #: place, with multi-tensor operators; the same bits as ``_update`` on each.
    _update_many = None

    def _loaded(self, state, bufs, group, step: int) -> None:
        """Turns the slots as decoded (``bufs``, in place) into the state step ``step`` reads."""

    def _to_store(self, state, bufs, packed: bool, group, step: int):
        """The slots' values as they are stored after step ``step`` (``packed``: as packed
        bytes); records in ``state`` how they were stored."""
        return bufs

    # -- the fused step (src/optim.rs): decode, update and re-encode in one Rust call ----------
    #: Set to False to force the per-operation torch path (tests compare the two).
    fused = True

    def _fusable(self, p, g, group) -> bool:
        return (self.fused and bool(self._slots) and self.codec == "smaq"
                and p.dtype == torch.float32 and g.dtype == torch.float32
                and p.device.type == "cpu" and g.device.type == "cpu"
                and p.is_contiguous() and g.is_contiguous() and p.numel() > 0
                and g.shape == p.shape)

    def _fused_in(self, state, slot: str, p: torch.Tensor):
        """A slot's state as the fused step takes it; values not passed as packed bytes are
        put in the slot's scratch buffer."""
        v = state.get(slot)
        if v is None:
            return None
        if isinstance(v, Stored) and v.mask is None and v.packed is not None:
            z = None if v.zidx is None else np.ascontiguousarray(v.zidx, dtype=np.int64)
            r = None if v.range is None else (float(v.range[0]), float(v.range[1]))
            # The kept statistics go in only once they have settled (a rejected one-pass try
            # costs more than the two passes: see _fused_out).
            s = None if v.stats is None or not v.stats[2] else (float(v.stats[0]),
                                                                  float(v.stats[1]))
            return (_bridge.core_of(v.packed), r, z, s)
        buf = self._scratch_for(slot, p)
        if isinstance(v, Stored):
            _store.decode(v, out=buf)
        else:
            buf.copy_(v)
        return (None, None, None, None)

    def _fused_out(self, state, slot: str, res, p: torch.Tensor, seed: int) -> None:
        if res is None:  # needs a zero map: the new values are in the scratch buffer
            state[slot] = _store.encode(self._scratch_for(slot, p), self.codec,
                                        self._params_for(slot, seed))
            return
        if isinstance(res, np.ndarray):  # needs a zero map: these are the new values
            state[slot] = _store.encode(torch.from_numpy(res).view(p.shape), self.codec,
                                        self._params_for(slot, seed))
            return
        core, zidx, rng, stats = res
        if p.numel() < _KEEP_STATS_MIN:
            stats = None
        if stats is not None:
            # Settled: the statistics kept from the step before still stand for these.
            old = state.get(slot)
            kept = old.stats if isinstance(old, Stored) else None
            settled = kept is not None and _bridge.adam_stats_settled(
                (float(kept[0]), float(kept[1])), stats)
            stats = (stats[0], stats[1], float(settled))
        if zidx is not None:
            zidx = zidx.astype(np.int32 if p.numel() < 2**31 else np.int64)
        state[slot] = Stored(_bridge.pack(core), None, p.shape, p.dtype, zidx,
                             None if rng is None else np.array(rng, dtype=np.float64),
                             None if stats is None else np.array(stats, dtype=np.float64))

    def _fused_common(self, p, g):
        arrays = (p.detach().numpy(), g.detach().numpy())
        bufs = tuple(self._scratch_for(s, p).numpy() for s in self._slots)
        return arrays, bufs

    def _fused(self, p, g, ins, group, step, decoded, seeds):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- state_dict ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = {k: {n: (v.to_state() if isinstance(v, Stored) else v)
                           for n, v in st.items()} for k, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch's loader casts every non-"step" state tensor to the parameter's dtype, which
        # would turn packed bytes into floats: take them out, load the rest, put them back.
        packed: Dict[Any, Dict[str, Any]] = {}
        plain: Dict[Any, Dict[str, Any]] = {}
        for k, st in state_dict["state"].items():
            plain[k] = {n: v for n, v in st.items() if not _store.is_stored_state(v)}
            packed[k] = {n: v for n, v in st.items() if _store.is_stored_state(v)}
        super().load_state_dict({**state_dict, "state": plain})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        for k, entries in packed.items():
            if not entries:
                continue
            p = id_map[k]
            for n, v in entries.items():
                self.state[p][n] = Stored.from_state(v, p.shape, p.dtype)

    # -- accounting ---------------------------------------------------------------------------
    def state_nbytes(self) -> Tuple[int, int]:
        """(dense bytes the state would take, bytes actually held), from the real buffers."""
        return state_nbytes(self)


def state_nbytes(optimizer: torch.optim.Optimizer) -> Tuple[int, int]:
    """(dense, held) bytes of any optimizer's state: packed entries count their real bytes."""
    dense = held = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, Stored):
                dense += v.dense_nbytes
                held += v.nbytes
            elif isinstance(v, torch.Tensor):
                n = v.numel() * v.element_size()
                dense += n
                held += n
    return dense, held


class SGD(_PackedStateOptimizer):
    """torch.optim.SGD with the momentum buffer packed between steps."""

    _slots = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, *, codec: str = "smaq",
                 codec_params: Optional[Dict[str, Any]] = None, min_numel: int = 4096,
                 compress_state: bool = True, quantize_weights: bool = False,
                 quantize_grads: bool = False, seed: int = 0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if momentum == 0:
            self._slots = ()
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize),
                         codec, codec_params, min_numel, compress_state, quantize_weights,
                         quantize_grads, seed)

    def _update(self, p, g, bufs, group, step, decoded):
        if group["maximize"]:
            g = -g
        if group["weight_decay"]:
            g = g.add(p, alpha=group["weight_decay"])
        mom = group["momentum"]
        if mom:
            buf = bufs.get("momentum_buffer")
            if buf is None:
                buf = g.detach().clone()
            else:
                buf.mul_(mom).add_(g, alpha=1 - group["dampening"])
            bufs["momentum_buffer"] = buf
            g = g.add(buf, alpha=mom) if group["nesterov"] else buf
        p.add_(g, alpha=-group["lr"])
        return bufs

    def _fused(self, p, g, ins, group, step, decoded, seeds):
        (pa, ga), (buf,) = self._fused_common(p, g)
        params = self._params_for("momentum_buffer", seeds[0])
        return (_bridge.sgd_step(
            pa, ga, buf, ins[0], lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], maximize=group["maximize"], codec=self.codec,
            params=params, keeps_zeros=_store.codec_keeps_zeros(self.codec, params),
            sparse_fraction=_store.SPARSE_FRACTION),)


class Adam(_PackedStateOptimizer):
    """torch.optim.Adam (``decoupled=False``) / AdamW with exp_avg, exp_avg_sq packed."""

    _slots = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False, *, guard: bool = True, scale_exp_avg: bool = True,
                 codec: str = "smaq", codec_params: Optional[Dict[str, Any]] = None,
                 min_numel: int = 4096, compress_state: bool = True,
                 quantize_weights: bool = False, quantize_grads: bool = False, seed: int = 0):
        if amsgrad:
            raise ValueError(f"{type(self).__name__}: amsgrad is not supported")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas {betas}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, maximize=maximize,
                                      guard=guard),
                         codec, codec_params, min_numel, compress_state, quantize_weights,
                         quantize_grads, seed)
        #: Pack exp_avg divided by sqrt(exp_avg_sq) (see the module doc).
        self.scale_exp_avg = bool(scale_exp_avg)
        #: How the fused steps ran, per parameter step (src/optim.rs, ``StepPath``): "one-pass"
        #: (the steady state: coded with the statistics kept from the step before), "sampled"
        #: (a parameter of 1M values or more without kept statistics: sampled from every few
        #: pieces first), "exp_avg-first" (exp_avg's statistics gathered first), "redone-*"
        #: (the statistics were rejected for a slot, which was coded again), "two-pass" (no
        #: statistics kept yet, or L2 weight decay), "whole" (on whole buffers).
        self.fused_paths: collections.Counter = collections.Counter()

    def _update(self, p, g, bufs, group, step, decoded):
        b1, b2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        if group["maximize"]:
            g = -g
        if wd:
            if self._decoupled:
                p.mul_(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
        if m is None:
            m = torch.zeros_like(p, memory_format=torch.contiguous_format)
            v = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif decoded and group["guard"] and b1 * b1 < b2:
            c = (1 - b2) * (1 - b1 * b1 / b2) / ((1 - b1) ** 2)
            torch.maximum(v, m * m * c, out=v)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1 = 1 - b1 ** step
        bc2 = 1 - b2 ** step
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
        bufs["exp_avg"], bufs["exp_avg_sq"] = m, v
        return bufs

    def _update_many(self, items, group) -> None:
        b1, b2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        ps = [it[0] for it in items]
        gs = [it[1] for it in items]
        ms = [it[2]["exp_avg"] for it in items]
        vs = [it[2]["exp_avg_sq"] for it in items]
        steps = [it[3] for it in items]
        if group["maximize"]:
            gs = torch._foreach_neg(gs)
        if wd:
            if self._decoupled:
                torch._foreach_mul_(ps, 1 - lr * wd)
            else:
                gs = torch._foreach_add(gs, ps, alpha=wd)
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1 - b2 ** s) for s in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - b1 ** s) for s in steps])

    def _loaded(self, state, bufs, group, step: int) -> None:
        # A scaled exp_avg, stored by the step before: exp_avg = scaled * sqrt(exp_avg_sq) / k.
        if state.get(_SCALED):
            m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
            kinv = 1.0 / _scale_factor(*group["betas"], step - 1)
            m.copy_(torch.where(torch.isfinite(v), m * _sqrt(v) * kinv, m))

    def _to_store(self, state, bufs, packed: bool, group, step: int):
        scaled = packed and self.scale_exp_avg and bufs.get("exp_avg") is not None
        state.pop(_SCALED, None)
        if not scaled:
            return bufs
        state[_SCALED] = True
        m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
        k = _scale_factor(*group["betas"], step)
        ok = (v > 0) & (v < math.inf)
        ms = torch.where(ok, m / _sqrt(v) * k, torch.where(v == 0, 0.0, m))
        return {**bufs, "exp_avg": ms}

    def _fused(self, p, g, ins, group, step, decoded, seeds):
        if any(i is not None and i[0] is None for i in ins):
            # a slot was put in its scratch buffer (zero-mapped or dense state): whole buffers
            (pa, ga), (m, v) = self._fused_common(p, g)
        else:
            # fresh or packed state: the step works piece by piece, no whole-parameter scratch
            pa, ga = p.detach().numpy(), g.detach().numpy()
            m = v = None
        b1, b2 = group["betas"]
        pm = self._params_for("exp_avg", seeds[0])
        pv = self._params_for("exp_avg_sq", seeds[1])
        m_out, v_out, path = _bridge.adam_step(
            pa, ga, m, v, ins, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=self._decoupled,
            maximize=group["maximize"], guard=group["guard"], decoded=decoded, step=step,
            codec=self.codec, params=(pm, pv),
            keeps_zeros=(_store.codec_keeps_zeros(self.codec, pm),
                         _store.codec_keeps_zeros(self.codec, pv)),
            sparse_fraction=_store.SPARSE_FRACTION,
            scaled=(bool(self.state[p].get(_SCALED)), self.scale_exp_avg))
        self.state[p].pop(_SCALED, None)
        if self.scale_exp_avg:
            self.state[p][_SCALED] = True
        self.fused_paths[path] += 1
        return m_out, v_out


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) with packed state."""

    _decoupled = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **kwargs: Any):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **kwargs)
