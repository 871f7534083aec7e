"""The torch layer reaches the Rust core through one internal module, smaq_rs._bridge: it imports
nothing else of the package's internals and reads no private attribute of another module."""

import ast
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")

import smaq_rs  # noqa: E402
import smaq_rs.configs  # noqa: E402,F401
from smaq_rs import _bridge  # noqa: E402
from smaq_rs.torch import _store  # noqa: E402

TORCH_DIR = pathlib.Path(smaq_rs.__file__).parent / "torch"
TORCH_LAYER = sorted(TORCH_DIR.rglob("*.py"))
#: Private names of other modules the torch layer used to reach into.
FORBIDDEN_ATTRS = {"_packed", "_torch_as_numpy", "_core", "_api"}


def _package_imports(tree: ast.AST, root_level: int = 2):
    """(module, names) of every import of the smaq_rs package from a torch-layer module
    (``root_level``: the relative-import level that names the package root from that module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            level0 = node.level == 0 and (node.module or "").startswith("smaq_rs")
            if node.level == root_level or level0:
                mod = (node.module or "") if node.level else node.module[len("smaq_rs."):]
                yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("smaq_rs"):
                    yield a.name[len("smaq_rs."):], []


@pytest.mark.parametrize("path", TORCH_LAYER, ids=lambda p: str(p.relative_to(TORCH_DIR)))
def test_torch_layer_imports_only_the_bridge(path):
    tree = ast.parse(path.read_text(), str(path))
    root_level = len(path.relative_to(TORCH_DIR).parts) + 1
    for mod, names in _package_imports(tree, root_level):
        assert mod == "_bridge" or (mod == "" and names == ["_bridge"]), (path.name, mod, names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in FORBIDDEN_ATTRS, (path.name, node.lineno, node.attr)
        if isinstance(node, ast.Name):
            assert node.id not in FORBIDDEN_ATTRS, (path.name, node.lineno, node.id)


def test_the_torch_layer_is_checked():
    names = {p.name for p in TORCH_LAYER}
    assert {"_store.py", "optim.py", "_hooks.py", "_autograd.py"} <= names


def test_bridge_round_trips_a_core_record():
    torch = pytest.importorskip("torch")
    t = torch.linspace(-1, 1, 300)
    arr, name = _bridge.torch_as_numpy(t, "t")
    assert name == "float32" and arr.ctypes.data == t.data_ptr()  # a view, not a copy
    p = smaq_rs.compress(t, "fp16")
    q = _bridge.pack(_bridge.core_of(p))
    assert isinstance(q, smaq_rs.PackedTensor) and q.to_bytes() == p.to_bytes()
    assert _bridge.core_of(None) is None
    assert _bridge.registry() == smaq_rs.list_codecs()


KEEPS_ZEROS = [
    ("fp16", {}, True), ("bf16", {"rounding": "stochastic"}, True), ("fp8", {}, True),
    ("int", {}, False), ("int", {"scheme": "absmax"}, True),
    ("int", {"scheme": "absmax", "rounding": "dithered"}, False), ("smaq", {}, True),
    ("smaq", {"log": True}, True), ("nnw_bdi", {}, True), ("luq", {}, True),
    ("fp32", {"seed": 3}, True), ("lossless", {}, True), ("sign", {}, False),
]


def _round_trip_keeps_zeros(codec: str, params: dict) -> bool:
    """Round trips of a sample holding zeros next to values of several magnitudes, under a few
    seeds (stochastic codecs): whether every zero came back as exactly 0."""
    params = {k: v for k, v in params.items() if k != "seed"}
    base = np.array([0.0, 1.5, -2.0, 0.0, 0.3, -0.7, 0.0, 4.0, 0.01, 0.0, -0.01, 3.0],
                    dtype=np.float32)
    seeded = "seed" in smaq_rs.configs.config_class(codec)().params()
    for shift in (0.0, 0.37, -1.3):
        x = np.tile(base + np.float32(shift) * (base != 0), 16)
        for seed in range(4 if seeded else 1):
            kw = {"seed": seed} if seeded else {}
            y = smaq_rs.decompress(smaq_rs.compress(x, codec, **kw, **params))
            if not np.all(y[x == 0] == 0):
                return False
    return True


@pytest.mark.parametrize("codec,params,keeps", KEEPS_ZEROS)
def test_keeps_zeros_known_answers(codec, params, keeps):
    assert _store.codec_keeps_zeros(codec, params) is keeps
    assert _bridge.registry_keeps_zeros(codec, params) is keeps
    # The registry's answer agrees with round trips of a sample.
    assert _round_trip_keeps_zeros(codec, params) is keeps


def test_keeps_zeros_rejects_what_the_encoder_rejects():
    with pytest.raises(smaq_rs.CodecError):
        _bridge.registry_keeps_zeros("int", {"bits": 99})
    with pytest.raises(smaq_rs.CodecError):
        _bridge.registry_keeps_zeros("no_such_codec", {})
