"""Sparse Linear layers on the CPU: the weight in CSR, forward and backward in the Rust core.

:class:`SparseLinear` keeps only the non-zeros of a pruned ``nn.Linear`` (float32 values, column
indices of 2 bytes when ``in_features <= 65536``) and trains them: the input gradient, the
gradient of the non-zero values (the pruned weights stay zero and cost nothing) and the bias
gradient come from the core's kernels, which run with the batch innermost so that every inner
loop is a vector over the batch.

:class:`SparseConv2d` runs the same kernels over the unfolded input (stride, padding, dilation;
``groups=1``). :func:`swap_modules_with_sparse` replaces the ``nn.Linear`` / ``nn.Conv2d`` layers
of a model that are sparse enough *and* measured faster as sparse layers on the model's real
input shapes, and says what it did and why.

Example::

    layer = SparseLinear.from_dense(pruned_linear)       # refuses a layer that is not sparse
    y = layer(x); y.sum().backward()                     # layer.values.grad: one per non-zero
    report = swap_modules_with_sparse(model, (64, 784))  # times both, swaps the faster
"""

from __future__ import annotations

import threading

import copy
import dataclasses
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import _bridge
from .._bridge import DtypeError, LayoutError, SmaqError

__all__ = [
    "SparseConv2d", "SparseLinear", "SparsityError", "SwapEntry", "SwapReport", "sparsity_of",
    "swap_modules_with_sparse",
]


class SparsityError(SmaqError):
    """A weight handed to the sparse kernels is not sparse enough (the message gives the
    measured sparsity and the minimum)."""


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of the entries of ``weight`` that are exactly zero."""
    n = weight.numel()
    return 0.0 if n == 0 else float((weight == 0).sum().item()) / n


def _view(t: torch.Tensor, what: str) -> Any:
    return _bridge.torch_as_numpy(t, what)[0]


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if x.device.type != "cpu":
        raise LayoutError(f"SparseLinear input is on {x.device}; the sparse kernels run on the CPU")
    if x.dtype != torch.float32:
        raise DtypeError(f"SparseLinear input must be float32, found {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise LayoutError(
            f"SparseLinear input must have in_features = {in_features} as its last dimension, "
            f"found shape {tuple(x.shape)}"
        )


class _Workspace:
    """Scratch buffers a layer reuses from call to call (the batch-innermost copies of a chunk's
    input, output and gradients): a fresh buffer costs its page faults at every step. Each is
    used only inside one forward or backward call and never returned; ``lock`` is held for the
    whole call, so a layer called from two threads at once runs one call after the other."""

    def __init__(self) -> None:
        self.buffers: Dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def get(self, key: str, rows: int, cols: int) -> torch.Tensor:
        b = self.buffers.get(key)
        if b is None or b.shape != (rows, cols):
            b = torch.empty(rows, cols, dtype=torch.float32)
            self.buffers[key] = b
        return b


#: Samples per kernel call: a batch is cut into chunks of this many (a multiple of the kernels'
#: 128-wide batch tile, so the weight gradient sums in the same order as in one call), whose
#: batch-innermost copies stay in L2 and whose layout changes are made in cache.
CHUNK = 256


class _SparseLinearFunction(torch.autograd.Function):
    """Y = X W^T + b with W given by its pattern and non-zero values; gradients for X, the
    values and b from the core, chunk by chunk of the batch."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        values: torch.Tensor,
        bias: Optional[torch.Tensor],
        pattern: Any,
        work: _Workspace,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, pattern.cols).contiguous()
        n = x2.shape[0]
        y = torch.empty(n, pattern.rows, dtype=torch.float32)
        vals = values.detach().contiguous()
        b = None if bias is None else _view(bias.detach().contiguous(), "bias")
        v = _view(vals, "values")
        ld = _bridge.sparse_padded_ld(min(n, CHUNK))
        with work.lock:
            x_t = work.get("x_t", pattern.cols, ld)
            y_t = work.get("y_t", pattern.rows, ld)
            for c0 in range(0, n, CHUNK):
                m = min(CHUNK, n - c0)
                # Batch innermost (features x m), rows a padded stride apart (sparse_padded_ld).
                _bridge.sparse_transpose(_view(x2[c0:c0 + m], "input"), _view(x_t, "input"))
                _bridge.sparse_linear_forward(pattern, v, _view(x_t, "input"), b,
                                              _view(y_t, "output"), batch=m)
                _bridge.sparse_transpose(_view(y_t, "output"), _view(y[c0:c0 + m], "output"),
                                         cols=m)
        ctx.save_for_backward(x2, vals)
        ctx.pattern = pattern
        ctx.work = work
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*lead, pattern.rows)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        x2, vals = ctx.saved_tensors
        pattern, work = ctx.pattern, ctx.work
        n = x2.shape[0]
        gy2 = gy.reshape(n, pattern.rows).contiguous()
        if gy2.dtype != torch.float32:
            gy2 = gy2.float()
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        want_b = want_b and ctx.has_bias
        dx = torch.empty(n, pattern.cols, dtype=torch.float32) if want_x else None
        # An empty batch runs no chunk: its gradients are zeros.
        dw = (torch.empty if n else torch.zeros)(pattern.nnz) if want_w else None
        db = (torch.empty if n else torch.zeros)(pattern.rows) if want_b else None
        v = _view(vals, "values")
        ld = _bridge.sparse_padded_ld(min(n, CHUNK))
        with work.lock:
            x_t = work.get("x_t", pattern.cols, ld)
            dy_t = work.get("dy_t", pattern.rows, ld)
            dx_t = work.get("dx_t", pattern.cols, ld) if want_x else None
            for c0 in range(0, n, CHUNK):
                m = min(CHUNK, n - c0)
                if want_w:
                    _bridge.sparse_transpose(_view(x2[c0:c0 + m], "input"), _view(x_t, "input"))
                _bridge.sparse_transpose(_view(gy2[c0:c0 + m], "output gradient"),
                                         _view(dy_t, "output gradient"))
                _bridge.sparse_linear_backward(
                    pattern, v, _view(x_t, "input"), _view(dy_t, "output gradient"),
                    None if dx_t is None else _view(dx_t, "input gradient"),
                    None if dw is None else _view(dw, "weight gradient"),
                    None if db is None else _view(db, "bias gradient"),
                    batch=m, accumulate=c0 > 0,
                )
                if dx is not None:
                    _bridge.sparse_transpose(_view(dx_t, "input gradient"),
                                             _view(dx[c0:c0 + m], "input gradient"), cols=m)
        dxr = None if dx is None else dx.reshape(ctx.x_shape)
        return dxr, dw, db, None, None


class SparseLinear(nn.Module):
    """A Linear layer whose weight is stored and trained as its non-zeros only (CSR).

    ``values`` (a Parameter, one float32 per non-zero in row-major order) is what an optimizer
    updates; the pattern (``row_ptr``, ``col_idx`` buffers) is fixed, so pruned weights stay
    zero. ``weight`` gives the dense matrix (a fresh tensor) for inspection.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        row_ptr: torch.Tensor,
        col_idx: torch.Tensor,
        values: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        row_ptr = row_ptr.detach().to(torch.int64).contiguous()
        col_idx = col_idx.detach().to(torch.int64).contiguous()
        self.pattern = _bridge.CsrPattern(
            self.out_features, self.in_features, row_ptr.numpy(), col_idx.numpy()
        )
        if values.shape != (self.pattern.nnz,):
            raise LayoutError(
                f"values must have shape ({self.pattern.nnz},), one per non-zero; "
                f"found {tuple(values.shape)}"
            )
        self._work = _Workspace()
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.values = nn.Parameter(values.detach().to(torch.float32).clone())
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise LayoutError(
                    f"bias must have shape ({self.out_features},), found {tuple(bias.shape)}"
                )
            self.bias: Optional[nn.Parameter] = nn.Parameter(bias.detach().float().clone())
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, quantize: Optional[str] = None, min_sparsity: float = 0.5
    ) -> "SparseLinear":
        """The SparseLinear holding the non-zeros of ``linear.weight`` (and its bias).

        Raises :class:`SparsityError` (with the measured sparsity) when fewer than
        ``min_sparsity`` of the weights are zero: the sparse kernels are slower than dense ones
        on such a layer. ``quantize`` (int8 inputs and gradients) is not available yet: any
        value other than None raises ``SmaqError``.
        """
        if quantize is not None:
            raise SmaqError(
                f"quantize={quantize!r}: quantized sparse kernels are not available; "
                "pass quantize=None"
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.device.type != "cpu" or w.dtype != torch.float32:
            raise DtypeError(
                f"SparseLinear needs a float32 CPU weight, found {w.dtype} on {w.device}"
            )
        s = sparsity_of(w)
        if s < min_sparsity:
            raise SparsityError(
                f"weight of shape {tuple(w.shape)} is {s:.1%} sparse; the sparse kernels need "
                f"at least {min_sparsity:.1%} zeros (prune it first)"
            )
        with warnings.catch_warnings():  # torch calls its CSR tensors beta
            warnings.simplefilter("ignore", UserWarning)
            csr = w.to_sparse_csr()
        return cls(
            linear.in_features, linear.out_features, csr.crow_indices(), csr.col_indices(),
            csr.values(), None if linear.bias is None else linear.bias,
        )

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        # The kernels read the core's copy of the pattern: rebuild it from the loaded buffers.
        self.pattern = _bridge.CsrPattern(
            self.out_features, self.in_features, self.row_ptr.numpy(), self.col_idx.numpy()
        )

    @property
    def nnz(self) -> int:
        """Number of stored weights."""
        return int(self.pattern.nnz)

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weight's entries that are not stored."""
        total = self.in_features * self.out_features
        return 0.0 if total == 0 else 1.0 - self.nnz / total

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out x in) weight, zeros where nothing is stored (a new tensor)."""
        w = torch.zeros(self.out_features, self.in_features)
        rows = torch.repeat_interleave(
            torch.arange(self.out_features), self.row_ptr[1:] - self.row_ptr[:-1]
        )
        w[rows, self.col_idx] = self.values.detach()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` computed from the non-zeros."""
        _check_input(x, self.in_features)
        return _SparseLinearFunction.apply(x, self.values, self.bias, self.pattern, self._work)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, sparsity={self.sparsity:.3f}, bias={self.bias is not None}"
        )


def _pair(v: Any) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SparseConv2d(nn.Module):
    """A Conv2d whose weight is stored and trained as its non-zeros (CSR over the flattened
    ``out x (in * kh * kw)`` weight), computed as the sparse Linear kernels over the unfolded
    input (``F.unfold``: one row per output position, so the kernels' batch runs over samples x
    positions). Stride, padding and dilation as ``nn.Conv2d``; ``groups=1`` and zero padding
    only. The gradient of the input goes back through ``F.unfold``'s own backward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, *, row_ptr: torch.Tensor,
                 col_idx: torch.Tensor, values: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        kh, kw = self.kernel_size
        self.linear = SparseLinear(self.in_channels * kh * kw, self.out_channels, row_ptr,
                                   col_idx, values, bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, quantize: Optional[str] = None,
                   min_sparsity: float = 0.5) -> "SparseConv2d":
        """The SparseConv2d holding the non-zeros of ``conv.weight`` (and its bias); refusals
        as :meth:`SparseLinear.from_dense` (SparsityError with the measured sparsity)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise SmaqError(
                f"SparseConv2d supports groups=1, numeric zero padding; found groups={conv.groups}, "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        flat = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            flat.weight.copy_(conv.weight.detach().reshape(conv.out_channels, -1))
            if conv.bias is not None:
                flat.bias.copy_(conv.bias.detach())
        lin = SparseLinear.from_dense(flat, quantize=quantize, min_sparsity=min_sparsity)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, row_ptr=lin.row_ptr, col_idx=lin.col_idx,
                   values=lin.values.detach(), bias=lin.bias)

    @property
    def values(self) -> nn.Parameter:
        """The stored weights (one per non-zero)."""
        return self.linear.values

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in, kh, kw) weight, zeros where nothing is stored (a new tensor)."""
        return self.linear.weight.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.conv2d(x, weight, bias, stride, padding, dilation)`` from the non-zeros."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise LayoutError(
                f"SparseConv2d input must be (N, {self.in_channels}, H, W), found shape "
                f"{tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = torch.nn.functional.unfold(x, self.kernel_size, self.dilation, self.padding,
                                          self.stride)  # (n, in * kh * kw, ho * wo)
        rows = cols.transpose(1, 2).reshape(n * ho * wo, -1)
        y = self.linear(rows)  # (n * ho * wo, out)
        return y.reshape(n, ho * wo, self.out_channels).transpose(1, 2).reshape(
            n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"nnz={self.linear.nnz}, sparsity={self.linear.sparsity:.3f}")


@dataclasses.dataclass
class SwapEntry:
    """What :func:`swap_modules_with_sparse` did with one ``nn.Linear`` or ``nn.Conv2d``."""

    name: str
    input_shape: Optional[Tuple[int, ...]]
    sparsity: float
    dense_ms: Optional[float]
    sparse_ms: Optional[float]
    swapped: bool
    reason: str


@dataclasses.dataclass
class SwapReport:
    """Every layer the swap looked at, in module order."""

    entries: List[SwapEntry]

    @property
    def swapped(self) -> List[str]:
        """Names of the layers replaced by sparse ones."""
        return [e.name for e in self.entries if e.swapped]

    def __str__(self) -> str:
        def ms(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.2f}"

        lines = [f"{'layer':<24} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9}  action"]
        for e in self.entries:
            act = "swapped" if e.swapped else "kept"
            lines.append(
                f"{e.name:<24} {e.sparsity:>8.3f} {ms(e.dense_ms):>9} {ms(e.sparse_ms):>9}  "
                f"{act}: {e.reason}"
            )
        return "\n".join(lines)


def _time_fwd_bwd(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of forward + backward (gradients returned, not accumulated)."""
    params = [p for p in module.parameters() if p.requires_grad]
    xs = x.detach().requires_grad_(True)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        y = module(xs)
        torch.autograd.grad(y, [xs] + params, torch.ones_like(y))
        if i > 0:  # the first call warms caches and allocations
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _input_shapes(model: nn.Module, input_shape: Sequence[int]) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            def hook(mod: nn.Module, args: Tuple[Any, ...], name: str = name) -> None:
                shapes.setdefault(name, tuple(args[0].shape))
            hooks.append(m.register_forward_pre_hook(hook))
    # The probe runs in eval mode: in training mode it would move BatchNorm's running
    # statistics towards the random batch (the shapes are the same in both modes).
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(*input_shape))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def swap_modules_with_sparse(
    model: nn.Module,
    input_shape: Sequence[int],
    min_sparsity: float = 0.8,
    verbose: bool = True,
    repeats: int = 3,
) -> SwapReport:
    """Replaces, in place, each ``nn.Linear`` (``nn.Conv2d``) of ``model`` that is at least
    ``min_sparsity`` sparse and whose forward + backward is measured faster as a
    :class:`SparseLinear` (:class:`SparseConv2d`) on the
    input it receives when ``model`` runs on a ``torch.randn(*input_shape)`` batch (median of
    ``repeats`` timed runs of each). The probing batch runs in eval mode, so BatchNorm running
    statistics are left as they were; every module's training flag is restored. Returns the report
    of every Linear and Conv2d seen (printed when ``verbose``); a layer the model never called
    is kept and said so.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], found {min_sparsity}")
    shapes = _input_shapes(model, input_shape)
    entries: List[SwapEntry] = []
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name, lin in targets:
        s = sparsity_of(lin.weight.detach())
        shape = shapes.get(name)

        def entry(reason: str, dense: Optional[float] = None,
                  sparse: Optional[float] = None, swapped: bool = False) -> None:
            entries.append(SwapEntry(name, shape, s, dense, sparse, swapped, reason))

        if s < min_sparsity:
            entry(f"sparsity {s:.3f} below the minimum {min_sparsity:.3f}")
            continue
        if shape is None:
            entry("not called on the example input")
            continue
        if lin.weight.device.type != "cpu" or lin.weight.dtype != torch.float32:
            entry(f"weight is {lin.weight.dtype} on {lin.weight.device}; needs float32 on CPU")
            continue
        if isinstance(lin, nn.Conv2d) and (lin.groups != 1 or lin.padding_mode != "zeros"
                                           or isinstance(lin.padding, str)):
            entry("SparseConv2d needs groups=1 and numeric zero padding")
            continue
        sparse: nn.Module = (SparseLinear.from_dense(lin, min_sparsity=min_sparsity)
                             if isinstance(lin, nn.Linear)
                             else SparseConv2d.from_dense(lin, min_sparsity=min_sparsity))
        x = torch.randn(*shape)
        dense_ms = _time_fwd_bwd(copy.deepcopy(lin), x, repeats)
        sparse_ms = _time_fwd_bwd(sparse, x, repeats)
        if sparse_ms < dense_ms:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            sparse.train(lin.training)
            setattr(parent, attr, sparse)
            entry(f"{dense_ms / sparse_ms:.2f}x faster", dense_ms, sparse_ms, True)
        else:
            entry(f"sparse not faster ({dense_ms / sparse_ms:.2f}x)", dense_ms, sparse_ms)
    report = SwapReport(entries)
    if verbose:
        print(report)
    return report
