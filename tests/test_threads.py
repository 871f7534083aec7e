"""Where the codecs' parallel loops run: the host's OpenMP team (torch's) or smaq_rs's own pool.

The same bytes come out either way, and a forked child (a DataLoader worker) never touches the
parent's OpenMP team, which does not survive fork().
"""

import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest

import smaq_rs

torch = pytest.importorskip("torch")

# Encodes and decodes a few tensors through the paths the training hooks use (plain, zero map,
# zero list, log domain, half types, other codecs) and prints a digest of every byte and value.
_PROBE = r"""
import hashlib, json, sys
import numpy as np
import torch
import smaq_rs
from smaq_rs.torch import _store

rng = np.random.default_rng(5)
x = rng.standard_normal(700_001).astype(np.float32)
x[::997] *= 40.0
relu = np.maximum(x, 0)
few = x.copy(); few[::50] = 0
h = hashlib.sha256()
for arr, codec, params in [(x, "smaq", {"seed": 3}), (x, "smaq", {"rounding": "nearest", "seed": 2}),
                           (np.abs(x) + 1e-3, "smaq", {"log": True, "seed": 4}),
                           (x.astype(np.float16), "smaq", {"seed": 5}), (x, "lossless", {}),
                           (x.astype(np.float16), "lossless", {"chunk_size": 65536}),
                           (x, "int", {"bits": 8, "block_size": 64})]:
    p = smaq_rs.compress(arr, codec, **params)
    h.update(p.to_bytes())
    h.update(np.ascontiguousarray(smaq_rs.decompress(p)).tobytes())
for arr in (x, relu, few):
    s = _store.encode(torch.from_numpy(arr), "smaq", {"seed": 6})
    h.update(s.packed.to_bytes())
    for extra in (s.mask, s.zidx, s.range):
        if extra is not None:
            h.update(np.ascontiguousarray(extra).tobytes())
    h.update(_store.decode(s).numpy().tobytes())
print(json.dumps({"backend": smaq_rs.thread_backend(), "digest": h.hexdigest()}))
"""


def _probe(env_extra):
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_process_runs_on_its_openmp_team():
    assert smaq_rs.thread_backend() == "openmp"


def test_both_backends_write_the_same_bytes():
    team = _probe({"SMAQ_RS_NUM_THREADS": "2"})
    own = _probe({"SMAQ_RS_NUM_THREADS": "2", "SMAQ_RS_THREADS": "rayon"})
    serial = _probe({"SMAQ_RS_NUM_THREADS": "1"})
    assert team["backend"] == "openmp"
    assert own["backend"] == "rayon"
    assert team["digest"] == own["digest"] == serial["digest"]


def _child_encode(arr):
    p = smaq_rs.compress(arr, "smaq", seed=9)
    return smaq_rs.thread_backend(), p.to_bytes(), smaq_rs.decompress(p)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_uses_its_own_pool():
    x = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)
    # The parent's team has run parallel regions before the fork.
    parent = smaq_rs.compress(x, "smaq", seed=9)
    assert smaq_rs.thread_backend() == "openmp"
    with mp.get_context("fork").Pool(1) as pool:
        backend, data, y = pool.apply_async(_child_encode, (x,)).get(timeout=120)
    assert backend == "rayon"
    assert data == parent.to_bytes()
    np.testing.assert_array_equal(y, smaq_rs.decompress(parent))


def test_zero_count_errors_are_typed():
    from smaq_rs import _core

    raw = np.arange(12, dtype=np.uint8)
    assert _core.count_nonzero_bits(raw, 4) == 3
    with pytest.raises(smaq_rs.LayoutError):
        _core.count_nonzero_bits(raw[:7], 4)  # not whole elements
    with pytest.raises(smaq_rs.LayoutError):
        _core.count_nonzero_bits(raw, 3)  # no float has 3 bytes
    with pytest.raises(smaq_rs.LayoutError):
        _core.count_nonzero_bits(raw[::2], 2)  # not contiguous
    assert _core.count_nonzero_bits(raw[:0], 2) == 0


def test_zero_count_limit_and_parallel_checksums():
    from smaq_rs import _core

    rng = np.random.default_rng(3)
    x = rng.standard_normal(1 << 20).astype(np.float32)
    x[rng.random(x.size) < 0.3] = 0.0
    raw = x.view(np.uint8)
    want = int(np.count_nonzero(x))
    assert _core.count_nonzero_bits(raw, 4, want) == want
    k = _core.count_nonzero_bits(raw, 4, want // 3)
    assert want // 3 < k <= want
    # The parallel hashes are the single-buffer ones, in the order given.
    bufs = [raw, raw[:0], x[:1000].view(np.uint8), np.arange(7, dtype=np.uint8)]
    assert _core.checksums(bufs) == [_core.checksum(b) for b in bufs]
    assert _core.checksums([]) == []
    with pytest.raises(smaq_rs.LayoutError):
        _core.checksums([raw[::2]])
