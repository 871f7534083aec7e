"""MemoryMeter: what a training step really holds, per tag, from real buffers."""

from __future__ import annotations

import resource
from typing import Any, Callable, Dict, List, Optional

import torch

from .optim import state_nbytes

TAGS = ("weights", "gradients", "activations", "optimizer")


def _storage_bytes(tensors) -> int:
    """Sum of the distinct storages' nbytes (a storage shared by several tensors counts once)."""
    seen = set()
    total = 0
    for t in tensors:
        if t is None or t.layout != torch.strided:
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def _proc_status() -> Dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes of this process since start or the last :func:`reset_peak_rss`."""
    st = _proc_status()
    if "VmHWM" in st:
        return st["VmHWM"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    return _proc_status().get("VmRSS", 0)


class MemoryMeter:
    """Per-step memory report of a plain training loop.

    >>> acts = smaq_rs.torch.compressed_activations(rounding="nearest")
    >>> meter = MemoryMeter(model, optimizer, activations=acts)
    >>> for x, y in batches:
    ...     with acts:
    ...         loss = loss_fn(model(x), y)
    ...     loss.backward(); optimizer.step()
    ...     meter.step()            # records this step (call it before zero_grad)
    ...     optimizer.zero_grad()
    >>> print(meter.table())

    Per step and tag ("weights", "gradients", "activations", "optimizer") a record holds
    ``dense`` (bytes the data takes uncompressed) and ``held`` (bytes actually held) and their
    ``ratio``: weights and gradients from their storages' nbytes; activations from the
    ``compressed_activations`` context (its peak since the previous ``step()``: dense bytes of
    everything saved for backward vs packed bytes held, pass-through tensors in both); optimizer
    state from the real tensors and packed buffers in ``optimizer.state``. Also
    ``peak_activation_store`` (packed bytes), ``rss_peak`` (the process's peak resident bytes
    during the step, from /proc/self/status VmHWM, reset after each step) and ``rss``.
    ``log(tag, dense, held)`` accumulates extra tags (``wrap_model``'s simulated
    feature/gradient maps). ``callback(record)`` is called after each step (for loggers).
    """

    def __init__(self, model: Optional[torch.nn.Module] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, activations=None,
                 callback: Optional[Callable[[Dict[str, Any]], None]] = None,
                 track_rss: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.activations = activations
        self.callback = callback
        self.records: List[Dict[str, Any]] = []
        self._extra: Dict[str, List[int]] = {}
        self.track_rss = track_rss and reset_peak_rss()
        if activations is not None:
            activations.reset_peak()

    def log(self, tag: str, dense: int, held: int) -> None:
        acc = self._extra.setdefault(tag, [0, 0])
        acc[0] += int(dense)
        acc[1] += int(held)

    def snapshot(self) -> Dict[str, Any]:
        """The figures now, without recording a step."""
        rec: Dict[str, Any] = {"step": len(self.records)}
        if self.model is not None:
            w = _storage_bytes(list(self.model.parameters()) + list(self.model.buffers()))
            g = _storage_bytes(p.grad for p in self.model.parameters())
            rec["weights"] = _entry(w, w)
            rec["gradients"] = _entry(g, g)
        if self.activations is not None:
            a = self.activations
            rec["activations"] = _entry(a.peak_dense_bytes, a.peak_held_bytes)
            rec["peak_activation_store"] = a.peak_held_bytes
        if self.optimizer is not None:
            d, h = state_nbytes(self.optimizer)
            rec["optimizer"] = _entry(d, h)
        for tag, (d, h) in self._extra.items():
            rec[tag] = _entry(d, h)
        rec["rss_peak"] = peak_rss()
        rec["rss"] = current_rss()
        return rec

    def step(self) -> Dict[str, Any]:
        """Records the step that just ran and starts the next one."""
        rec = self.snapshot()
        self.records.append(rec)
        self._extra = {}
        if self.activations is not None:
            self.activations.reset_peak()
        if self.track_rss:
            reset_peak_rss()
        if self.callback is not None:
            self.callback(rec)
        return rec

    def as_dict(self) -> Dict[str, Any]:
        """{"steps": records, "last": last record, "max": per-tag maxima over the steps}."""
        mx: Dict[str, Any] = {}
        for r in self.records:
            for k, v in r.items():
                if isinstance(v, dict):
                    cur = mx.get(k)
                    if cur is None or v["held"] > cur["held"]:
                        mx[k] = v
                elif k != "step":
                    mx[k] = max(mx.get(k, 0), v)
        return {"steps": list(self.records), "last": self.records[-1] if self.records else {},
                "max": mx}

    def table(self, record: Optional[Dict[str, Any]] = None) -> str:
        """A printed table of one record (default: the step with the highest peak RSS)."""
        if record is None:
            if not self.records:
                record = self.snapshot()
            else:
                record = max(self.records, key=lambda r: r.get("rss_peak", 0))
        return format_table({"": record})


def _entry(dense: int, held: int) -> Dict[str, Any]:
    return {"dense": int(dense), "held": int(held),
            "ratio": (dense / held) if held else (float("inf") if dense else 1.0)}


def _mib(n: int) -> str:
    return f"{n / 2**20:10.3f}"


def format_table(records: Dict[str, Dict[str, Any]]) -> str:
    """Side-by-side table of several named records (e.g. {"plain": r1, "smaq": r2})."""
    names = list(records)
    tags = [t for t in TAGS if any(t in r for r in records.values())]
    tags += sorted({k for r in records.values() for k, v in r.items()
                    if isinstance(v, dict) and k not in tags})
    head = f"{'tag':<22}" + "".join(
        f"{(n + ' ' if n else '') + 'dense MiB':>16}{'held MiB':>12}{'ratio':>8}" for n in names)
    lines = [head, "-" * len(head)]
    for t in tags:
        row = f"{t:<22}"
        for n in names:
            e = records[n].get(t)
            row += (f"{_mib(e['dense']):>16}{_mib(e['held']):>12}{e['ratio']:>8.2f}"
                    if e else f"{'-':>16}{'-':>12}{'-':>8}")
        lines.append(row)
    for k in ("peak_activation_store", "rss_peak"):
        if any(k in r for r in records.values()):
            row = f"{k + ' MiB':<22}"
            for n in names:
                v = records[n].get(k)
                row += f"{(_mib(v) if v is not None else '-'):>16}{'':>12}{'':>8}"
            lines.append(row)
    return "\n".join(lines)
