"""Compressed gradient averaging for ``DistributedDataParallel``: packed bytes on the wire.

:class:`CompressState` holds the configuration, the per-bucket error-feedback residuals and the
byte counts; :func:`compress_hook` is the function ``register_comm_hook`` takes. The exchange
itself is :meth:`CompressState.average`, usable outside DDP on any 1-D tensor.

Two schemes (world size W, bucket of N values):

- ``"reduce_scatter"``: the bucket is split into W shards (aligned to the codec's block), each
  shard is encoded and shard j is sent to rank j by ``all_to_all_single`` of the packed bytes;
  rank j decodes the W shards it received, sums them in float32, divides by W, encodes the
  result (``aggregation="hsum"``: with the global codec; ``"per_worker"``: exactly, as fp32) and
  an ``all_gather`` brings every averaged shard to every rank.
- ``"all_gather"``: every rank's whole packed bucket goes to every rank, which decodes and sums
  them in rank order (identical on every rank); each value is quantized once.

Every collective's input length is known, so the bytes each rank sends are counted with the
rules: ``all_to_all`` (W-1)/W of its input, ``all_gather`` (W-1) times its input, ring
``all_reduce`` 2(W-1)/W of its input.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ... import _bridge

__all__ = [
    "AGGREGATIONS",
    "SCHEMES",
    "CompressState",
    "ConfigMismatchError",
    "DecodeFaultError",
    "compress_hook",
    "shard_bounds",
]

#: The exchange schemes ``CompressState(scheme=...)`` accepts.
SCHEMES = ("auto", "reduce_scatter", "all_gather")
#: The aggregation options: quantize each worker's sum and the global sum ("hsum", QML's
#: HsumAccumulator), or each worker's sum only ("per_worker").
AGGREGATIONS = ("hsum", "per_worker")

#: Codecs whose parameters include ``bits`` / ``block_size`` (the constructor's arguments).
_BITS_CODECS = ("int", "luq", "nnw_bdi")
_BLOCK_CODECS = ("int", "sign")


class DecodeFaultError(_bridge.SmaqError):
    """A rank could not encode or decode its part of a bucket exchange (a checksum or format
    error in the packed bytes). Raised on every rank of the group, naming the failing ranks."""


class ConfigMismatchError(_bridge.SmaqError):
    """The ranks of a process group were given different compression configurations."""


def shard_bounds(n: int, world: int, align: int = 1) -> List[Tuple[int, int]]:
    """The contiguous ``[start, end)`` shard of each of ``world`` ranks over ``n`` values: equal
    shards of ``ceil(n / world)`` values rounded up to a multiple of ``align`` (so a blockwise
    codec's blocks fall where they would in the whole bucket); the last shards may be short or
    empty."""
    if world < 1 or align < 1 or n < 0:
        raise ValueError(f"expected n >= 0, world >= 1, align >= 1; got n={n}, world={world}, "
                         f"align={align}")
    per = -(-n // world)
    per = -(-per // align) * align
    return [(min(r * per, n), min((r + 1) * per, n)) for r in range(world)]


def _as_u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.empty(0, dtype=torch.uint8)


def _decode(buf: torch.Tensor) -> torch.Tensor:
    """A float32 tensor from the packed bytes in a uint8 tensor (FormatError/ChecksumError on
    damaged bytes)."""
    arr = _bridge.decompress(memoryview(buf.numpy()))
    t = torch.from_numpy(arr)
    if t.dtype != torch.float32:
        t = t.float()
    return t.reshape(-1)


def _decode_from(buf: torch.Tensor, numel: int, what: str, errors: List[str]
                 ) -> Optional[torch.Tensor]:
    """:func:`_decode` of ``what`` (e.g. "rank 1's shard"), which must hold ``numel`` values;
    None, with the reason appended to ``errors``, when it does not decode or has another
    length (the caller announces the failure to the other ranks instead of raising alone)."""
    try:
        d = _decode(buf)
        if d.numel() != numel:
            raise _bridge.FormatError(f"{what} holds {d.numel()} values, expected {numel}")
        return d
    except _bridge.SmaqError as e:
        errors.append(f"{what}: {type(e).__name__}: {e}")
        return None


class CompressState:
    """Configuration and state of :func:`compress_hook`.

    Args:
        process_group: the group to average over (None: the default group).
        codec: any codec of ``smaq_rs.list_codecs()`` for float tensors: ``"int"`` (blockwise
            int-N, the default; symmetric absmax unless ``codec_params={"scheme": "affine"}``),
            ``"s2fp8"`` (fp8 with a per-tensor shift and squeeze, which keeps small gradients;
            plain ``"fp8"`` e4m3 flushes values under about 2^-9 to zero), ``"smaq"``, ...
        bits, block_size: passed to codecs that take them (``int``: both; ``sign``: block_size).
        error_feedback: add each rank's compression residual of a bucket to its next gradient
            (EF-SGD): the encoded quantity is ``g_t + e_{t-1}``, ``e_t`` what its encoding lost.
        start_iter: steps averaged by a plain fp32 ``all_reduce`` before compression starts
            (as PowerSGD's ``start_powerSGD_iter``).
        scheme: ``"reduce_scatter"``, ``"all_gather"`` or ``"auto"`` (per bucket, the one that
            sends fewer bytes by the size model in :meth:`estimate_bytes`; the choice is
            recorded in ``schemes`` and in each step's history).
        aggregation: ``"hsum"`` (the averaged shards of the reduce-scatter scheme are encoded
            again with ``global_codec``/``global_params``, default the local codec) or
            ``"per_worker"`` (only each worker's gradient is quantized; averaged shards travel
            as fp32). The all-gather scheme always quantizes per worker only.
        global_codec, global_params: the second quantizer of ``"hsum"``.
        codec_params, **params: further codec parameters (``rounding=``, ``format=``,
            ``bits_main=`` ...); ``codec_params`` for names this constructor takes itself
            (the int codec's ``scheme``).

    After each step (the last bucket of a backward pass): ``bytes_sent`` is the bytes this
    rank sent in that step, ``history`` a list of per-step records (``step``, ``bytes``,
    ``payload_bytes``, ``control_bytes``, ``fp32_allreduce_bytes``, ``compressed``,
    ``schemes``), ``total_bytes_sent`` the running total. ``__getstate__``/``__setstate__``
    keep the configuration, step count, residuals and chosen schemes (not the process group),
    so the state can go into a checkpoint.
    """

    def __init__(
        self,
        process_group: Optional[Any] = None,
        codec: str = "int",
        bits: int = 8,
        block_size: int = 256,
        error_feedback: bool = True,
        start_iter: int = 10,
        scheme: str = "auto",
        aggregation: str = "hsum",
        global_codec: Optional[str] = None,
        global_params: Optional[Dict[str, Any]] = None,
        codec_params: Optional[Dict[str, Any]] = None,
        **params: Any,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        self.process_group = process_group
        self.codec = codec
        self.params: Dict[str, Any] = {}
        if codec in _BITS_CODECS:
            self.params["bits"] = bits
        if codec in _BLOCK_CODECS:
            self.params["block_size"] = block_size
        if codec == "int":
            self.params["scheme"] = "absmax"
        self.params.update(params)
        self.params.update(codec_params or {})
        self.global_codec = global_codec if global_codec is not None else codec
        self.global_params = dict(global_params) if global_params is not None else (
            dict(self.params) if global_codec is None else {})
        if aggregation == "per_worker":
            self.global_codec, self.global_params = "fp32", {}
        self.align = int(self.params.get("block_size", 1)) if codec in _BLOCK_CODECS else 1
        self.error_feedback = bool(error_feedback)
        self.start_iter = start_iter
        self.scheme = scheme
        self.aggregation = aggregation
        # Fail at construction on an unknown codec or invalid parameters (CodecError).
        probe = torch.linspace(-1.0, 1.0, 64)
        _bridge.compress(probe, self.codec, **self.params)
        _bridge.compress(probe, self.global_codec, **self.global_params)

        self.iter = 0
        self.residuals: Dict[int, torch.Tensor] = {}
        self.schemes: Dict[int, str] = {}
        self._scheme_sizes: Dict[int, int] = {}
        self.bytes_sent = 0
        self.total_bytes_sent = 0
        self.history: List[Dict[str, Any]] = []
        self._checked = False
        self._device: Optional[torch.device] = None
        self._step = self._new_step()

    # -- configuration ----------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """The settings every rank of the group must share (compared at the first compressed
        step)."""
        return {
            "codec": self.codec, "params": self.params, "global_codec": self.global_codec,
            "global_params": self.global_params, "scheme": self.scheme,
            "aggregation": self.aggregation, "error_feedback": self.error_feedback,
            "start_iter": self.start_iter,
        }

    def _config_text(self) -> str:
        return json.dumps(self.config(), sort_keys=True, default=str)

    def __getstate__(self) -> Dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("process_group", "_step", "_device")}
        state["residuals"] = {k: v.clone() for k, v in self.residuals.items()}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self._checked = False
        self._device = None
        self._step = self._new_step()

    def __repr__(self) -> str:
        return (f"CompressState(codec={self.codec!r}, params={self.params}, scheme={self.scheme!r}"
                f", aggregation={self.aggregation!r}, error_feedback={self.error_feedback}, "
                f"start_iter={self.start_iter}, iter={self.iter})")

    # -- byte accounting --------------------------------------------------------------------
    @staticmethod
    def _new_step() -> Dict[str, Any]:
        return {"payload_bytes": 0, "control_bytes": 0, "fp32_allreduce_bytes": 0,
                "values": 0, "compressed": False, "schemes": {}}

    def _count(self, kind: str, nbytes: int, world: int, payload: bool = True) -> None:
        if kind == "all_to_all":
            sent = nbytes * (world - 1) // world
        elif kind == "all_gather":
            sent = nbytes * (world - 1)
        elif kind == "all_reduce":
            sent = 2 * (world - 1) * nbytes // world
        else:  # pragma: no cover - internal
            raise ValueError(kind)
        self._step["payload_bytes" if payload else "control_bytes"] += sent

    def end_step(self) -> Dict[str, Any]:
        """Closes the current step's byte record (the hook calls it after the last bucket) and
        returns it."""
        rec = dict(self._step, step=self.iter)
        rec["bytes"] = rec["payload_bytes"] + rec["control_bytes"]
        self.history.append(rec)
        self.bytes_sent = rec["bytes"]
        self.total_bytes_sent += rec["bytes"]
        self.iter += 1
        self._step = self._new_step()
        return rec

    # -- collectives ------------------------------------------------------------------------
    def _world(self) -> Tuple[int, int]:
        return (dist.get_world_size(self.process_group), dist.get_rank(self.process_group))

    def _comm(self) -> torch.device:
        """Where the tensors handed to the collectives live: the CPU for gloo (and a
        ``"cpu:gloo,cuda:nccl"`` group), the current CUDA device for NCCL. Encoding and decoding
        always run on the CPU; only the packed bytes and small control tensors move."""
        if self._device is None:
            backend = str(dist.get_backend(self.process_group)).lower()
            if "gloo" in backend:
                self._device = torch.device("cpu")
            elif backend == "nccl":
                self._device = torch.device("cuda", torch.cuda.current_device())
            else:
                raise ValueError(
                    "compress_hook runs on gloo and NCCL process groups; got backend "
                    f"{backend!r}")
        return self._device

    def _check_config(self, world: int) -> None:
        """All ranks' configuration digests compared once; a clear error on every rank when
        they differ."""
        text = self._config_text()
        digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8,
                              device=self._comm())
        got = [torch.empty_like(digest) for _ in range(world)]
        dist.all_gather(got, digest, group=self.process_group)
        self._count("all_gather", digest.numel(), world, payload=False)
        if any(not torch.equal(g, got[0]) for g in got):
            texts: List[Optional[str]] = [None] * world
            dist.all_gather_object(texts, text, group=self.process_group)
            lines = "\n".join(f"  rank {r}: {t}" for r, t in enumerate(texts))
            raise ConfigMismatchError(
                "the ranks of the process group use different compression configurations; "
                f"every rank must construct CompressState with the same settings:\n{lines}")
        self._checked = True

    def _gather_lengths(self, n: int, world: int) -> List[int]:
        mine = torch.tensor([n], dtype=torch.int64, device=self._comm())
        got = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(got, mine, group=self.process_group)
        self._count("all_gather", 8, world, payload=False)
        return torch.cat(got).tolist()

    def _gather_padded(self, buf: torch.Tensor, lengths: List[int], world: int
                       ) -> List[torch.Tensor]:
        width = max(lengths)
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[: buf.numel()] = buf
        padded = padded.to(self._comm())
        got = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(got, padded, group=self.process_group)
        self._count("all_gather", width, world)
        return [g[:n].cpu() for g, n in zip(got, lengths)]

    def _raise_if_failed(self, status: List[int], what: str, errors: List[str],
                         failure: str = "could not decode the packed bytes they received "
                                        "(checksum or format error)") -> None:
        bad = [r for r, s in enumerate(status) if s != 0]
        if bad:
            mine = f"; on this rank: {errors[0]}" if errors else ""
            raise DecodeFaultError(f"{what}: rank(s) {bad} {failure}{mine}")

    def _try_encode(self, x: torch.Tensor, errors: List[str], global_stage: bool = False
                    ) -> torch.Tensor:
        """The packed bytes of ``x``, or an empty tensor with the error noted in ``errors``
        (announced to the other ranks by the caller instead of raised here, where they would
        wait for this rank in the next collective)."""
        try:
            return self._encode(x, global_stage)
        except _bridge.SmaqError as e:
            errors.append(f"encoding: {type(e).__name__}: {e}")
            return torch.empty(0, dtype=torch.uint8)

    def _final_status(self, failed: bool, world: int, errors: List[str], what: str) -> None:
        """Every rank learns whether any rank failed to decode (a status all_gather), so all
        raise together instead of one raising and the others waiting in the next collective."""
        status = self._gather_lengths(1 if failed else 0, world)
        self._raise_if_failed(status, what, errors)

    # -- the exchange -----------------------------------------------------------------------
    def estimate_bytes(self, n: int, world: int) -> Dict[str, int]:
        """Bytes per rank of each scheme for a bucket of ``n`` values, from the packed lengths
        of a fixed probe (uniform in [-1, 1], the same on every rank) encoded as the schemes
        would encode it."""
        probe = torch.linspace(-1.0, 1.0, max(n, 1))[:n].contiguous()
        full = _bridge.compress(probe, self.codec, **self.params).nbytes
        bounds = shard_bounds(n, world, self.align)
        shards = [_bridge.compress(probe[a:b].contiguous(), self.codec, **self.params).nbytes
                  for a, b in bounds]
        glob = max(_bridge.compress(probe[a:b].contiguous(), self.global_codec,
                                    **self.global_params).nbytes for a, b in bounds)
        return {
            "all_gather": (world - 1) * full,
            "reduce_scatter": sum(shards) * (world - 1) // world + (world - 1) * glob,
        }

    def _choose(self, key: int, n: int, world: int) -> str:
        # Decided again when a bucket changes size (DDP rebuilds its buckets after the first
        # iteration, keeping their indices).
        if key not in self.schemes or self._scheme_sizes.get(key) != n:
            self._scheme_sizes[key] = n
            if self.scheme != "auto":
                self.schemes[key] = self.scheme
            else:
                est = self.estimate_bytes(n, world)
                self.schemes[key] = ("all_gather" if est["all_gather"] <= est["reduce_scatter"]
                                     else "reduce_scatter")
        return self.schemes[key]

    def average(self, tensor: torch.Tensor, key: int = 0) -> torch.Tensor:
        """The mean of ``tensor`` (1-D, same length on every rank) over the group, exchanged as
        packed bytes (or, during warm-up, a plain fp32 all_reduce). ``key`` names the residual
        slot (the bucket index). Returns a new float tensor of ``tensor``'s dtype; collective:
        every rank must call it in the same order."""
        if tensor.dim() != 1:
            raise ValueError(f"expected a 1-D tensor, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"expected a floating tensor, got {tensor.dtype}")
        world, _ = self._world()
        n = tensor.numel()
        self._step["values"] += n
        self._step["fp32_allreduce_bytes"] += 2 * (world - 1) * 4 * n // world
        device = tensor.device
        if world == 1:
            return tensor.clone()
        if self.iter < self.start_iter:
            y = tensor.detach().to(self._comm(), torch.float32, copy=True)
            dist.all_reduce(y, group=self.process_group)
            self._count("all_reduce", 4 * n, world)
            return y.div_(world).to(device, tensor.dtype)
        if not self._checked:
            self._check_config(world)
        x = tensor.detach().to("cpu", torch.float32).contiguous()
        self._step["compressed"] = True
        if self.error_feedback and key in self.residuals and self.residuals[key].numel() == n:
            x = x + self.residuals[key]
        scheme = self._choose(key, n, world)
        self._step["schemes"][key] = scheme
        if scheme == "all_gather":
            out, sent_decoded = self._all_gather(x, world)
        else:
            out, sent_decoded = self._reduce_scatter(x, world)
        if self.error_feedback:
            self.residuals[key] = x - sent_decoded
        return out.to(device, tensor.dtype)

    def _encode(self, x: torch.Tensor, global_stage: bool = False) -> torch.Tensor:
        if global_stage:
            return _as_u8(_bridge.compress(x, self.global_codec, **self.global_params).to_bytes())
        return _as_u8(_bridge.compress(x, self.codec, **self.params).to_bytes())

    def _all_gather(self, x: torch.Tensor, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
        _, rank = self._world()
        errors: List[str] = []
        mine = self._try_encode(x, errors)
        lengths = self._gather_lengths(-1 if errors else mine.numel(), world)
        self._raise_if_failed([1 if v < 0 else 0 for v in lengths], "all_gather of packed buckets",
                              errors, "could not encode their bucket")
        received = self._gather_padded(mine, lengths, world)
        total = torch.zeros_like(x)
        own = x
        for r, buf in enumerate(received):
            d = _decode_from(buf, x.numel(), f"rank {r}'s bucket", errors)
            if d is None:
                continue
            total += d
            if r == rank:
                own = d
        self._final_status(bool(errors), world, errors, "all_gather of packed buckets")
        return total.div_(world), own

    def _reduce_scatter(self, x: torch.Tensor, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
        _, rank = self._world()
        n = x.numel()
        bounds = shard_bounds(n, world, self.align)
        errors: List[str] = []
        parts = [self._try_encode(x[a:b], errors) for a, b in bounds]
        in_splits = [-1] * world if errors else [p.numel() for p in parts]
        dev = self._comm()
        sizes_in = torch.tensor(in_splits, dtype=torch.int64, device=dev)
        sizes_out = torch.empty(world, dtype=torch.int64, device=dev)
        dist.all_to_all_single(sizes_out, sizes_in, group=self.process_group)
        self._count("all_to_all", 8 * world, world, payload=False)
        out_splits = sizes_out.tolist()
        # every rank receives every rank's lengths: a -1 (an encoding failure) stops them all
        self._raise_if_failed([1 if v < 0 else 0 for v in out_splits],
                              "reduce-scatter of packed shards", errors,
                              "could not encode their shards")
        own = torch.cat([_decode(p) for p in parts]) if self.error_feedback else x
        send = torch.cat(parts).to(dev)
        recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=dev)
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.process_group)
        self._count("all_to_all", send.numel(), world)
        recv = recv.cpu()

        a, b = bounds[rank]
        shard = torch.zeros(b - a)
        offset = 0
        for r, size in enumerate(out_splits):
            buf = recv[offset: offset + size]
            offset += size
            d = _decode_from(buf, b - a, f"rank {r}'s shard", errors)
            if d is not None:
                shard += d
        # A rank that failed sends the length -1 instead of its averaged shard: every rank
        # sees it in the length exchange and raises there.
        if not errors:
            mine = self._try_encode(shard.div_(world), errors, global_stage=True)
        lengths = self._gather_lengths(-1 if errors else mine.numel(), world)
        self._raise_if_failed([1 if v < 0 else 0 for v in lengths],
                              "reduce-scatter of packed shards", errors,
                              "could not decode the shards they received (checksum or format "
                              "error) or encode their averaged shard")
        received = self._gather_padded(mine, lengths, world)
        out = torch.empty(n)
        for r, buf in enumerate(received):
            a, b = bounds[r]
            d = _decode_from(buf, b - a, f"rank {r}'s averaged shard", errors)
            if d is not None:
                out[a:b] = d
        self._final_status(bool(errors), world, errors, "all_gather of averaged shards")
        return out, own


def compress_hook(state: CompressState, bucket: "dist.GradBucket"
                  ) -> "torch.futures.Future[torch.Tensor]":
    """DDP communication hook: averages the bucket with :meth:`CompressState.average` and
    returns a completed future holding the averaged gradients.

    >>> ddp.register_comm_hook(CompressState(codec="int", bits=8), compress_hook)
    """
    buf = bucket.buffer()
    out = state.average(buf, bucket.index())
    buf.copy_(out)
    if bucket.is_last():
        state.end_step()
    fut: "torch.futures.Future[torch.Tensor]" = torch.futures.Future()
    fut.set_result(buf)
    return fut


# DDP compares the annotations themselves (not their text) with dist.GradBucket and
# Future[Tensor]; this module's postponed annotations are strings, so set the real objects.
compress_hook.__annotations__.update(
    {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]})
