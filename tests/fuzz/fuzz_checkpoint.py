"""Atheris fuzz target for the checkpoint reader: any bytes must give a checkpoint or a typed
smaq_rs error (never a crash, never another exception).

    .venv/bin/python tests/fuzz/fuzz_checkpoint.py tests/fuzz/corpus -max_total_time=600

The corpus is seeded with the committed fixtures (tests/fixtures/ckpt_*.smaq). Not run by pytest.
"""

import glob
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import smaq_rs
    from smaq_rs import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.mkdtemp(prefix="smaq-fuzz-")
PATH = os.path.join(TMP, "x.smaq")


def one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        with checkpoint.open(PATH) as ck:
            for e in ck.entries():
                ck.codec_info(e["name"])
            ck.load()
            ck.metadata
    except smaq_rs.SmaqError:
        pass


def main() -> None:
    corpus = os.path.join(HERE, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for fx in glob.glob(os.path.join(HERE, "..", "fixtures", "ckpt_*.smaq")):
        dst = os.path.join(corpus, os.path.basename(fx))
        if not os.path.exists(dst):
            with open(fx, "rb") as a, open(dst, "wb") as b:
                b.write(a.read())
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
