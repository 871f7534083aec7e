"""smaq_rs's DCP Writer/Reader with torch.distributed.checkpoint: saved by 2 gloo ranks, loaded
by 1 and by 4 (resharding by DCP's planner), bit-exact under the lossless policy, lossy
policies within their codec's bound, damaged entries named on read."""

import os

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import smaq_rs  # noqa: E402
from smaq_rs.torch.distributed import Reader, StoredItem, Writer  # noqa: E402

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    init_device_mesh = None

# Tests without a process group: DCP says it assumes a single process, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ROWS, COLS = 36, 50  # 36 rows: 18 per rank when saved by 2, 9 per rank when loaded by 4


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.LayerNorm(96),
                            torch.nn.Linear(96, 10))
    with torch.no_grad():
        m[0].weight.mul_(3.0)
    return m


def _table():
    g = torch.Generator().manual_seed(5)
    return torch.randn(ROWS, COLS, generator=g)


def _state():
    """The plain (replicated) part of the state: a model, integer buffers, Python values, and
    one tensor under two names (tied weights)."""
    sd = _model().state_dict()
    return {"model": sd, "tied": sd["2.weight"],
            "counts": torch.arange(3000, dtype=torch.int64) * 7,
            "half": torch.randn(2048, generator=torch.Generator().manual_seed(9)).half(),
            "step": 41, "name": "run-a"}


def _empty_state():
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.LayerNorm(96),
                            torch.nn.Linear(96, 10))
    for p in m.parameters():
        p.data.zero_()
    return {"model": m.state_dict(), "tied": torch.zeros(10, 96),
            "counts": torch.zeros(3000, dtype=torch.int64),
            "half": torch.zeros(2048, dtype=torch.float16), "step": 0, "name": ""}


def _assert_state_equal(got, want):
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(got["counts"], want["counts"])
    assert torch.equal(got["tied"], want["model"]["2.weight"])
    assert torch.equal(got["half"].view(torch.int16), want["half"].view(torch.int16))
    assert got["step"] == want["step"] and got["name"] == want["name"]


def _init(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _save_worker(rank, world, store, ckpt):
    _init(rank, world, store)
    sd = _state()
    if init_device_mesh is not None:
        mesh = init_device_mesh("cpu", (world,))
        sd["table"] = distribute_tensor(_table(), mesh, [Shard(0)])
    dcp.save(sd, storage_writer=Writer(ckpt))
    dist.destroy_process_group()


def _load_worker(rank, world, store, ckpt, out_dir):
    _init(rank, world, store)
    sd = _empty_state()
    if init_device_mesh is not None:
        mesh = init_device_mesh("cpu", (world,))
        sd["table"] = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])
    dcp.load(sd, storage_reader=Reader(ckpt))
    _assert_state_equal(sd, _state())
    if init_device_mesh is not None:
        local = sd["table"].to_local()
        rows = ROWS // world
        assert local.shape == (rows, COLS)
        assert torch.equal(local, _table()[rank * rows:(rank + 1) * rows])
    open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved_by_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp2")
    ckpt = str(tmp / "ckpt")
    mp.spawn(_save_worker, args=(2, str(tmp / "store"), ckpt), nprocs=2, join=True)
    return ckpt


def test_two_ranks_write_smaq_containers(saved_by_two):
    files = sorted(os.listdir(saved_by_two))
    assert ".metadata" in files
    smaq_files = [f for f in files if f.endswith(".smaq")]
    assert smaq_files, files
    meta = Reader(saved_by_two).read_metadata()
    assert all(isinstance(v, StoredItem) for v in meta.storage_data.values())
    # the replicated state is written once; each rank wrote its own rows of the table
    if init_device_mesh is not None:
        table_files = {v.relative_path for k, v in meta.storage_data.items() if k.fqn == "table"}
        assert len(table_files) == 2
    # every entry is in a checksummed container that smaq_rs.open reads on its own
    for f in smaq_files:
        with smaq_rs.open(os.path.join(saved_by_two, f)) as ck:
            assert len(ck) > 0


def test_load_on_one_process(saved_by_two):
    """No process group: DCP's planner reads the 2-rank checkpoint whole, the table included
    (its two row chunks land in one plain tensor)."""
    sd = _empty_state()
    if init_device_mesh is not None:
        sd["table"] = torch.zeros(ROWS, COLS)
    dcp.load(sd, storage_reader=Reader(saved_by_two))
    _assert_state_equal(sd, _state())
    if init_device_mesh is not None:
        assert torch.equal(sd["table"], _table())


def test_load_on_four_ranks(saved_by_two, tmp_path):
    mp.spawn(_load_worker, args=(4, str(tmp_path / "store"), saved_by_two, str(tmp_path)),
             nprocs=4, join=True)
    # each rank checked its state and its 9 rows of the table (in _load_worker) and then left
    # its mark
    assert all((tmp_path / f"ok{r}").exists() for r in range(4))


def test_damaged_entry_is_named(tmp_path):
    sd = _state()
    ckpt = tmp_path / "one"
    dcp.save(sd, storage_writer=Writer(str(ckpt)))
    path = ckpt / "__0_0.smaq"
    with smaq_rs.open(str(path)) as ck:
        e = next(e for e in ck.entries() if e["name"] == "model.0.weight")
    data = bytearray(path.read_bytes())
    data[e["offset"] + e["nbytes"] // 2] ^= 0x04
    path.write_bytes(bytes(data))
    # DCP collects each rank's exception into a CheckpointException
    with pytest.raises(CheckpointException) as info:
        dcp.load(_empty_state(), storage_reader=Reader(str(ckpt)))
    exc, _ = info.value.failures[0]
    assert isinstance(exc, smaq_rs.ChecksumError)
    assert "DCP item 'model.0.weight'" in str(exc) and "__0_0.smaq" in str(exc)


def test_lossy_policy_within_the_int_bound(tmp_path):
    sd = _state()
    policy = smaq_rs.Policy(codec="int", params={"bits": 8, "block_size": 256,
                                                 "scheme": "absmax"}, min_numel=1024)
    w = Writer(str(tmp_path / "lossy"), policy=policy)
    dcp.save(sd, storage_writer=w)
    assert w.summary["entries"]["model.0.weight"][2] == "int"
    assert w.summary["entries"]["model.1.weight"][2] != "int"  # norm layers stay exact
    back = _empty_state()
    dcp.load(back, storage_reader=Reader(str(tmp_path / "lossy")))
    want = _model().state_dict()
    wt = want["0.weight"].reshape(-1)
    got = back["model"]["0.weight"].reshape(-1)
    step = wt.abs().reshape(-1, 256).amax(1).repeat_interleave(256) / 127
    err = (got - wt).abs()
    assert (err <= step / 2 * (1 + 1e-6)).all() and err.max() > 0
    assert torch.equal(back["model"]["1.weight"], want["1.weight"])
    assert torch.equal(back["counts"], sd["counts"])


def test_writer_refuses_stream_extensions(tmp_path):
    with pytest.raises(TypeError, match="_extensions"):
        Writer(str(tmp_path), _extensions=[object()])


def test_reader_refuses_a_plain_dcp_checkpoint(tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter

    dcp.save(_state(), storage_writer=FileSystemWriter(str(tmp_path / "plain")))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_empty_state(), storage_reader=Reader(str(tmp_path / "plain")))
    exc, _ = info.value.failures[0]
    assert isinstance(exc, smaq_rs.FormatError) and "not written by smaq_rs" in str(exc)
