"""The DDP communication hook on real gloo process groups (2 and 4 ranks on CPU, spawned).

Each spawned group runs several checks in one session (a group costs seconds to start) and
writes what it measured to a file; the assertions are made here, against references computed
independently: the exact mean of every rank's tensor, the int codec's documented error bound
(nearest rounding: |error| <= step / 2, step = absmax / (2^(N-1) - 1) per block), packed lengths
of the same data encoded here, and a plain fp32 all_reduce run of the same training.
"""

import os
import pickle

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import smaq_rs  # noqa: E402
from smaq_rs import _bridge  # noqa: E402
from smaq_rs.torch.distributed import (  # noqa: E402
    CompressState, ConfigMismatchError, DecodeFaultError, compress_hook, shard_bounds,
)

N = 5000  # not a multiple of the block size, nor of the world size
BLOCK = 256


def _init(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _gradient(rank):
    """A gradient-like vector whose magnitude changes from block to block."""
    g = torch.Generator().manual_seed(1000 + rank)
    scale = torch.exp(torch.randn(N // 100 + 1, generator=g)).repeat_interleave(100)[:N]
    return (torch.randn(N, generator=g) * scale * 1e-3).float()


def _flip_received(kind):
    """Rank-local sabotage of the bytes a collective delivered: one bit of the first packed
    payload received is flipped after the real collective ran."""
    real = getattr(dist, kind)
    done = []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        target = args[0][0] if kind == "all_gather" else args[0]
        if target.dtype == torch.uint8 and target.numel() > 200 and not done:
            target[target.numel() // 3] ^= 0x10
            done.append(True)
        return out

    setattr(dist, kind, wrapped)
    return lambda: setattr(dist, kind, real)


def _hook_worker(rank, world, store, out_dir):
    _init(rank, world, store)
    res = {"outputs": {}, "history": {}}
    g = _gradient(rank)
    for scheme in ("reduce_scatter", "all_gather"):
        for codec, params in (("int", {"bits": 8}), ("int", {"bits": 4}),
                              ("smaq", {"rounding": "nearest"}), ("s2fp8", {})):
            st = CompressState(codec=codec, start_iter=0, scheme=scheme, error_feedback=False,
                               **params)
            key = f"{scheme}/{codec}{params.get('bits', '')}"
            res["outputs"][key] = st.average(g.clone())
            st.end_step()
            res["history"][key] = st.history[-1]

    st = CompressState(codec="int", bits=8, start_iter=0, error_feedback=False)
    st.average(g.clone())
    res["auto"] = st.end_step()

    # reduce-scatter quantizing per worker only: the averaged shards travel as fp32
    st = CompressState(codec="int", bits=8, start_iter=0, error_feedback=False,
                       scheme="reduce_scatter", aggregation="per_worker")
    res["rs_per_worker"] = st.average(g.clone())

    # error feedback: the residual is what the encoding of g lost; it survives pickling
    st = CompressState(codec="int", bits=4, start_iter=0, scheme="all_gather")
    st.average(g.clone(), key=3)
    res["residual"] = st.residuals[3].clone()
    res["residual_pickled"] = pickle.loads(pickle.dumps(st)).residuals[3]

    # warm-up: plain fp32 all_reduce, counted as a ring all_reduce
    st = CompressState(start_iter=1)
    res["warmup"] = st.average(g.clone())
    res["warmup_record"] = st.end_step()
    res["after_warmup"] = st.average(g.clone())
    res["after_warmup_record"] = st.end_step()

    # a configuration differing on one rank is refused on every rank
    st = CompressState(codec="int", bits=4 if rank == world - 1 else 8, start_iter=0)
    try:
        st.average(g.clone())
        res["mismatch"] = None
    except ConfigMismatchError as e:
        res["mismatch"] = str(e)

    # damaged bytes on one rank raise on every rank (no hang), and the group still works
    res["fault"] = {}
    for scheme, kind in (("reduce_scatter", "all_to_all_single"), ("all_gather", "all_gather")):
        st = CompressState(codec="int", bits=8, start_iter=0, scheme=scheme)
        restore = _flip_received(kind) if rank == 1 else (lambda: None)
        try:
            st.average(g.clone())
            res["fault"][scheme] = None
        except DecodeFaultError as e:
            res["fault"][scheme] = str(e)
        finally:
            restore()
        res["fault_" + scheme + "_then"] = st.average(g.clone())

    # an encoding that fails on one rank raises on every rank too
    res["encode_fault"] = {}
    for scheme in ("reduce_scatter", "all_gather"):
        st = CompressState(codec="int", bits=8, start_iter=0, scheme=scheme)
        real = _bridge.compress
        if rank == 1:
            def failing(*a, **k):
                raise smaq_rs.CodecError("injected encoder failure")
            _bridge.compress = failing
        try:
            st.average(g.clone())
            res["encode_fault"][scheme] = None
        except DecodeFaultError as e:
            res["encode_fault"][scheme] = str(e)
        finally:
            _bridge.compress = real

    # DDP end to end: gradients of a small model against plain all_reduce of the local ones
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    ref_model = pickle.loads(pickle.dumps(model))
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)
    torch.nn.functional.mse_loss(ref_model(x), y).backward()
    local = torch.cat([p.grad.reshape(-1) for p in ref_model.parameters()])
    ref = local.clone()
    dist.all_reduce(ref)
    ref /= world
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    st = CompressState(codec="int", bits=8, start_iter=0, error_feedback=False)
    ddp.register_comm_hook(st, compress_hook)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    res["ddp_grad"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    res["ddp_ref"] = ref
    res["ddp_local"] = local
    res["ddp_history"] = st.history
    torch.save(res, os.path.join(out_dir, f"hook{rank}.pt"))
    dist.destroy_process_group()


def _run(fn, world, tmp_path, *args):
    mp.spawn(fn, args=(world, str(tmp_path / "store"), str(tmp_path), *args), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"{fn.__name__.strip('_').split('_')[0]}{r}.pt",
                       weights_only=False) for r in range(world)]


def _int_step(x, bits):
    """Per value: the step of the absmax block (of BLOCK values) it falls in."""
    qmax = 2 ** (bits - 1) - 1
    pad = (-x.numel()) % BLOCK
    blocks = torch.cat([x.abs(), torch.zeros(pad, dtype=x.dtype)]).reshape(-1, BLOCK)
    return (blocks.amax(1, keepdim=True) / qmax).expand(-1, BLOCK).reshape(-1)[: x.numel()]


def _sharded_step(x, bits, world):
    return torch.cat([_int_step(x[a:b], bits) for a, b in shard_bounds(x.numel(), world, BLOCK)])


@pytest.fixture(scope="module", params=[2, 4])
def hook_results(request, tmp_path_factory):
    world = request.param
    return world, _run(_hook_worker, world, tmp_path_factory.mktemp(f"hook{world}"))


def test_every_rank_gets_the_same_average(hook_results):
    world, res = hook_results
    for key, out in res[0]["outputs"].items():
        for r in range(1, world):
            assert torch.equal(out, res[r]["outputs"][key]), (key, r)


@pytest.mark.parametrize("scheme", ["reduce_scatter", "all_gather"])
@pytest.mark.parametrize("bits", [8, 4])
def test_int_average_within_the_codec_bound(hook_results, scheme, bits):
    world, res = hook_results
    gs = [_gradient(r).double() for r in range(world)]
    mean = sum(gs) / world
    # each rank's values are quantized once (error <= step / 2 of its block) ...
    first = sum(_sharded_step(g, bits, world) / 2 for g in gs) / world
    bound = first
    if scheme == "reduce_scatter":
        # ... and the averaged shard once more, its step taken from the averaged values, which
        # are within `first` of the exact mean
        worst = torch.cat([(mean.abs() + first)[a:b] for a, b in shard_bounds(N, world, BLOCK)])
        bound = first + _sharded_step(worst, bits, world) / 2
    out = res[0]["outputs"][f"{scheme}/int{bits}"].double()
    err = (out - mean).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-12).all(), (err / bound).max()
    # quantization did happen (a plain float all_reduce would be off by rounding only)
    assert err.max() > 1e-3 * bound.max()


def test_per_worker_reduce_scatter_equals_the_all_gather(hook_results):
    """Shards are aligned to the int codec's blocks, so each rank's shard encodings are its
    whole-bucket encoding cut in pieces; with exact (fp32) averaged shards both schemes sum the
    same decoded values in the same order."""
    world, res = hook_results
    assert torch.equal(res[0]["rs_per_worker"], res[0]["outputs"]["all_gather/int8"])


@pytest.mark.parametrize("codec", ["smaq", "s2fp8"])
def test_all_gather_equals_the_mean_of_each_ranks_round_trip(hook_results, codec):
    """Per-worker quantization with a deterministic codec: the result is the rank-order float32
    sum of each rank's decode(encode(g)), divided by W, reproduced here bit for bit."""
    world, res = hook_results
    params = {"rounding": "nearest"} if codec == "smaq" else {}
    total = torch.zeros(N)
    for r in range(world):
        total += torch.from_numpy(smaq_rs.decompress(smaq_rs.compress(_gradient(r), codec,
                                                                      **params).to_bytes()))
    assert torch.equal(res[0]["outputs"][f"all_gather/{codec}"], total / world)
    mean = sum(_gradient(r) for r in range(world)) / world
    rs = res[0]["outputs"][f"reduce_scatter/{codec}"]
    # two quantizations stay within a few times the per-worker one's error
    assert (rs - mean).norm() < 3 * (total / world - mean).norm()


@pytest.mark.parametrize("scheme", ["reduce_scatter", "all_gather"])
def test_bytes_sent_follow_the_collective_rules(hook_results, scheme):
    world, res = hook_results
    w1 = world - 1
    for r in range(world):
        rec = res[r]["history"][f"{scheme}/int8"]
        g = _gradient(r)
        control = w1 * 32 + w1 * 8 + w1 * 8  # config digest, lengths, status
        if scheme == "all_gather":
            lengths = [smaq_rs.compress(_gradient(q), "int", bits=8, block_size=BLOCK,
                                        scheme="absmax").nbytes for q in range(world)]
            payload = w1 * max(lengths)
        else:
            bounds = shard_bounds(N, world, BLOCK)
            mine = sum(smaq_rs.compress(g[a:b].contiguous(), "int", bits=8, block_size=BLOCK,
                                        scheme="absmax").nbytes for a, b in bounds)
            # the averaged shards are int8 too: their lengths depend on the shard size only
            avg = max(smaq_rs.compress(torch.zeros(b - a), "int", bits=8, block_size=BLOCK,
                                       scheme="absmax").nbytes for a, b in bounds)
            payload = mine * w1 // world + w1 * avg
            control = w1 * 32 + 8 * world * w1 // world + w1 * 8 + w1 * 8
        assert rec["payload_bytes"] == payload
        assert rec["control_bytes"] == control
        assert rec["bytes"] == payload + control
        assert rec["fp32_allreduce_bytes"] == 2 * w1 * 4 * N // world
        assert rec["schemes"] == {0: scheme}
        if scheme == "reduce_scatter" or world == 2:
            # int8 moves fewer bytes than the fp32 ring all_reduce by about 3.9x
            assert rec["bytes"] * 3.5 < rec["fp32_allreduce_bytes"]


def test_auto_picks_the_scheme_that_sends_fewer_bytes(hook_results):
    world, res = hook_results
    sent = {s: res[0]["history"][f"{s}/int8"]["bytes"] for s in ("reduce_scatter", "all_gather")}
    assert res[0]["auto"]["schemes"] == {0: min(sent, key=sent.get)}
    assert res[0]["auto"]["bytes"] == min(sent.values())
    # with W = 2 both move about the same payload; with W = 4 reduce-scatter moves half
    assert res[0]["auto"]["schemes"][0] == ("all_gather" if world == 2 else "reduce_scatter")


def test_warmup_is_a_plain_allreduce(hook_results):
    world, res = hook_results
    mean = sum(_gradient(r) for r in range(world)) / world
    torch.testing.assert_close(res[0]["warmup"], mean, rtol=1e-6, atol=1e-9)
    assert res[0]["warmup_record"]["compressed"] is False
    assert res[0]["warmup_record"]["bytes"] == 2 * (world - 1) * 4 * N // world
    assert res[0]["after_warmup_record"]["compressed"] is True
    assert res[0]["after_warmup_record"]["bytes"] < res[0]["warmup_record"]["bytes"] / 3


def test_error_feedback_residual(hook_results):
    world, res = hook_results
    g = _gradient(0)
    sent = torch.from_numpy(smaq_rs.decompress(smaq_rs.compress(
        g, "int", bits=4, block_size=BLOCK, scheme="absmax").to_bytes()))
    assert torch.equal(res[0]["residual"], g - sent)
    assert torch.equal(res[0]["residual_pickled"], res[0]["residual"])


def test_config_mismatch_raises_on_every_rank(hook_results):
    world, res = hook_results
    for r in range(world):
        msg = res[r]["mismatch"]
        assert msg is not None and f"rank {world - 1}" in msg and '"bits": 4' in msg


@pytest.mark.parametrize("scheme", ["reduce_scatter", "all_gather"])
def test_damaged_bytes_raise_on_every_rank(hook_results, scheme):
    world, res = hook_results
    for r in range(world):
        msg = res[r]["fault"][scheme]
        assert msg is not None and "rank(s) [1]" in msg, msg
        # the group is usable afterwards, and the failed exchange left no residual behind
        assert torch.equal(res[r][f"fault_{scheme}_then"], res[r]["outputs"][f"{scheme}/int8"])
    assert "ChecksumError" in res[1]["fault"][scheme]


@pytest.mark.parametrize("scheme", ["reduce_scatter", "all_gather"])
def test_failed_encoding_raises_on_every_rank(hook_results, scheme):
    world, res = hook_results
    for r in range(world):
        msg = res[r]["encode_fault"][scheme]
        assert msg is not None and "rank(s) [1] could not encode" in msg, msg
    assert "injected encoder failure" in res[1]["encode_fault"][scheme]


def test_ddp_gradients_within_bucket_bound(hook_results):
    world, res = hook_results
    qmax = 127
    locals_ = [res[r]["ddp_local"] for r in range(world)]
    ref = res[0]["ddp_ref"]
    # a bound that needs no bucket layout: each block's step is at most the bucket's max / qmax
    first = sum(g.abs().max() for g in locals_) / world / qmax / 2
    bound = first + (ref.abs().max() + first) / qmax / 2
    for r in range(world):
        err = (res[r]["ddp_grad"] - ref).abs().max()
        assert 0 < err <= bound * (1 + 1e-5)
    hist = res[0]["ddp_history"]
    assert len(hist) == 1 and hist[0]["compressed"] and hist[0]["values"] == ref.numel()


# -- a short training run -------------------------------------------------------------------
def _train_worker(rank, world, store, out_dir):
    _init(rank, world, store)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(123)
    xv = torch.randn(512, 16, generator=gen)
    with torch.no_grad():
        yv = teacher(xv)
    torch.manual_seed(1)
    init = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        losses = {"initial": torch.nn.functional.mse_loss(init(xv), yv).item()}
    for name, state in (("allreduce", None),
                        ("int8_ef", CompressState(codec="int", bits=8, start_iter=10))):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        if state is not None:
            ddp.register_comm_hook(state, compress_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(7 + rank)
        for _ in range(150):
            x = torch.randn(32, 16, generator=data)
            with torch.no_grad():
                y = teacher(x)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        with torch.no_grad():
            losses[name] = torch.nn.functional.mse_loss(model(xv), yv).item()
    torch.save(losses, os.path.join(out_dir, f"train{rank}.pt"))
    dist.destroy_process_group()


def test_training_with_error_feedback_matches_allreduce(tmp_path):
    res = _run(_train_worker, 2, tmp_path)
    losses = res[0]
    print(losses)
    assert losses["allreduce"] < 0.2 * losses["initial"]  # it did learn
    assert abs(losses["int8_ef"] - losses["allreduce"]) <= 0.02 * losses["allreduce"], losses
    assert res[1]["int8_ef"] == losses["int8_ef"]  # the replicas hold the same model


# -- configuration errors and helpers (no process group needed) -------------------------------
def test_bad_configuration_is_refused_at_construction():
    with pytest.raises(ValueError, match="scheme must be one of"):
        CompressState(scheme="ring")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        CompressState(aggregation="mean")
    with pytest.raises(ValueError, match="start_iter"):
        CompressState(start_iter=-1)
    with pytest.raises(smaq_rs.CodecError):
        CompressState(codec="no-such-codec")
    with pytest.raises(smaq_rs.CodecError):
        CompressState(codec="int", bits=1)
    with pytest.raises(smaq_rs.CodecError):
        CompressState(codec="smaq", no_such_param=3)


def test_average_refuses_what_a_bucket_cannot_be():
    st = CompressState()
    with pytest.raises(ValueError, match="1-D"):
        st.average(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="floating"):
        st.average(torch.zeros(12, dtype=torch.int32))


@pytest.mark.parametrize("backend,device", [("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"),
                                            ("mpi", None), ("ucc", None)])
def test_the_collectives_run_where_the_backend_needs_them(monkeypatch, backend, device):
    # gloo (alone or beside NCCL) takes CPU tensors; NCCL's CUDA path needs a GPU (not tested
    # here); any other backend is refused by name before a collective starts.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    st = CompressState()
    if device is None:
        with pytest.raises(ValueError, match=f"gloo and NCCL.*{backend}"):
            st._comm()
    else:
        assert st._comm() == torch.device(device)


@pytest.mark.parametrize("n,world,align", [(5000, 2, 256), (5000, 4, 256), (10, 4, 256),
                                           (0, 3, 1), (7, 3, 1)])
def test_shard_bounds_cover_the_bucket_once(n, world, align):
    bounds = shard_bounds(n, world, align)
    assert len(bounds) == world and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a <= b and b == c for (a, b), (c, _) in zip(bounds, bounds[1:]))
    assert all(a % align == 0 for a, b in bounds if a < n)


def test_state_pickles_without_its_process_group():
    st = CompressState(codec="int", bits=4, start_iter=3)
    st.residuals[2] = torch.randn(10)
    st.iter = 5
    back = pickle.loads(pickle.dumps(st))
    assert back.iter == 5 and back.config() == st.config() and back.process_group is None
    assert torch.equal(back.residuals[2], st.residuals[2])
