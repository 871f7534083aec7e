"""One registry and one API: list_codecs() lists every codec with defaults; config dataclasses;
unknown codecs and invalid parameters raise CodecError naming what is allowed; the bench runs."""

import json
import pickle

import numpy as np
import pytest

import smaq_rs
import smaq_rs.configs as C

FAMILY = ["fp32", "fp16", "bf16", "fp8", "s2fp8", "mantissa", "int", "luq", "nnw_bdi"]


def test_registry_lists_every_codec_with_defaults():
    reg = {c["name"]: c for c in smaq_rs.list_codecs()}
    for name in FAMILY:
        assert name in reg and isinstance(reg[name]["defaults"], dict) and reg[name]["doc"]
    ids = [c["id"] for c in reg.values()]
    assert len(ids) == len(set(ids)) and 16 not in [reg[n]["id"] for n in FAMILY]
    assert reg["int"]["defaults"]["bits"] == 8


def test_codecs_is_a_deprecated_alias_of_list_codecs():
    """smaq_rs.codecs stays the function (no submodule of that name can shadow it), warns, and
    returns what list_codecs() returns."""
    import importlib.util

    assert importlib.util.find_spec("smaq_rs.codecs") is None
    assert callable(smaq_rs.codecs) and not isinstance(smaq_rs.codecs, type(smaq_rs))
    with pytest.warns(DeprecationWarning, match="list_codecs"):
        old = smaq_rs.codecs()
    assert old == smaq_rs.list_codecs()
    assert [c["name"] for c in old] == [c["name"] for c in smaq_rs._core.codecs()]


@pytest.mark.parametrize("name", FAMILY)
def test_config_round_trips_as_plain_data(name):
    cfg = C.get_config(name)
    d = json.loads(json.dumps(cfg.get_config()))
    assert d["id"] == name
    assert C.from_config(d) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    x = np.linspace(-1, 1, 300, dtype=np.float32)
    p = cfg.compress(x)
    back = C.get_config(p)
    assert type(back) is type(cfg)
    assert smaq_rs.decompress(p).shape == x.shape


def test_config_classes_validate():
    cfg = C.IntConfig(bits=4, block_size=64)
    assert cfg.get_config()["bits"] == 4
    with pytest.raises(smaq_rs.CodecError, match="2..=16"):
        C.IntConfig(bits=1)
    with pytest.raises(smaq_rs.CodecError, match="parameters are"):
        C.from_config({"id": "int", "bitz": 3})
    with pytest.raises(smaq_rs.CodecError, match="available"):
        C.from_config({"id": "nope"})


def test_unknown_codec_and_params_name_what_is_allowed():
    x = np.ones(10, np.float32)
    with pytest.raises(smaq_rs.CodecError, match="available: .*nnw_bdi"):
        smaq_rs.compress(x, "zfp")
    with pytest.raises(smaq_rs.CodecError, match="parameters are: .*block_size"):
        smaq_rs.compress(x, "int", blocksize=64)
    with pytest.raises(smaq_rs.CodecError, match="one of"):
        smaq_rs.compress(x, "int", granularity="column")
    with pytest.raises(smaq_rs.CodecError, match="8..=1048576"):
        smaq_rs.compress(x, "int", block_size=4)


def test_bench_runs_on_a_small_tensor(capsys):
    from smaq_rs.bench import main

    assert main(["-n", "4096", "--repeat", "1", "--codecs", "fp16,int,nnw_bdi"]) == 0
    out = capsys.readouterr().out
    assert "| fp16 |" in out and "torch .to(float16)" in out and "nnw_bdi" in out
    assert "torch copy_ into float16" in out
