# The commands people and CI run: `make run` and `make test` (CI runs
# `make test` through .ci/run). Python dependencies live in .venv.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What the pytest suite needs besides the package, in every environment
# that runs it.
TEST_DEPS := "pytest>=8" "pytest-asyncio>=0.23" "pymemcache>=4" "prometheus_client>=0.17"
LOOM_ENV := RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 CARGO_TARGET_DIR=target/loom

.PHONY: run test test-ft develop-ft test-313 develop-313 wheel tools develop load-bin lint lint-rust lint-python test-rust loom test-python test-asyncio-suite miri tsan soak bench bench-rust bench-python bench-scaling bench-net clean

# The main job: the lookup server on one shard per core, driven for a few
# seconds by the load generator, with throughput, latency and per-shard
# counters.
run: develop load-bin
	$(PY) examples/lookup_server.py --demo --seconds 5

test: tools lint-rust test-rust loom develop lint-python test-python test-asyncio-suite

# Debian tools the tests use: memccapable (the memcached protocol's
# conformance test) and, for the benchmarks, memcached and memcaslap.
tools:
	@if ! command -v memccapable >/dev/null || ! command -v memcached >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -qq memcached libmemcached-tools >/dev/null \
			|| { $$SUDO apt-get update -qq && \
			     $$SUDO apt-get install -y -qq memcached libmemcached-tools >/dev/null; }; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.5,<2" "ruff>=0.6" "mypy>=1.10" "uvloop>=0.19" $(TEST_DEPS)
	touch $@

# Builds the extension (release) into the virtual environment.
develop: $(VENV)/.installed
	$(VENV)/bin/maturin develop --release -q

# The load generator, target/release/shardloop-load (rust/load), which
# tools/loadgen.py runs for the examples, tests, benchmarks and scripts (it
# also builds it on first use).
load-bin:
	$(CARGO) build --release -q -p shardloop-load

lint: lint-rust lint-python

lint-rust:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --document-private-items -q

lint-python: develop
	$(VENV)/bin/ruff check python tests scripts examples benches tools
	$(VENV)/bin/ruff format --check python tests scripts examples benches tools
	$(VENV)/bin/mypy python/shardloop
	$(PY) -m mypy.stubtest shardloop._shardloop
	$(PY) scripts/import_cycles.py

test-rust:
	$(CARGO) test --workspace

# The sleep/wake handshake and the ring, model-checked with loom.
loom:
	$(LOOM_ENV) $(CARGO) test --release -p shardloop-core --lib loom_tests

# The pytest suite against the 3.11 release wheel, installed into a fresh
# virtual environment (not editable, and `-P`: no source tree on sys.path),
# so that a file missing from the wheel fails here.
WHEEL_VENV := .venv-wheel
test-python: $(VENV)/.installed load-bin
	rm -rf target/wheel-311 $(WHEEL_VENV)
	$(VENV)/bin/maturin build --release -q --auditwheel check -i $(PY) --out target/wheel-311
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q target/wheel-311/*.whl "uvloop>=0.19" $(TEST_DEPS)
	$(WHEEL_VENV)/bin/python -P -c 'import pathlib, shardloop; \
		where = pathlib.Path(shardloop.__file__).resolve(); \
		assert "site-packages" in where.parts, f"testing {where}, not the wheel"'
	$(WHEEL_VENV)/bin/python -P -m pytest -q tests

# CPython's own asyncio test suite (Lib/test/test_asyncio), every loop a
# shardloop runtime.
test-asyncio-suite: develop
	$(PY) scripts/cpython_asyncio_suite.py

# The whole pytest suite and CPython's asyncio suite on a free-threaded
# CPython 3.13 and on its GIL twin (both built once from Debian's source
# package by scripts/python-from-source.sh, then cached).
FT_VENV := .venv-ft
FT_ENV := VIRTUAL_ENV=$(abspath $(FT_VENV)) CARGO_TARGET_DIR=target/ft

$(FT_VENV)/.installed: pyproject.toml scripts/python-from-source.sh
	FT_PYTHON=$$(scripts/python-from-source.sh --free-threaded) && $$FT_PYTHON -m venv $(FT_VENV)
	$(FT_VENV)/bin/python -m pip install -q "maturin>=1.5,<2" $(TEST_DEPS)
	touch $@

develop-ft: $(FT_VENV)/.installed
	$(FT_ENV) $(FT_VENV)/bin/maturin develop --release -q

test-ft: tools develop-ft load-bin
	$(FT_VENV)/bin/python -c 'import sys, shardloop; assert not sys._is_gil_enabled()'
	$(FT_VENV)/bin/python -m pytest -q tests
	$(FT_VENV)/bin/python scripts/cpython_asyncio_suite.py

GIL313_VENV := .venv-313
GIL313_ENV := VIRTUAL_ENV=$(abspath $(GIL313_VENV)) CARGO_TARGET_DIR=target/313

$(GIL313_VENV)/.installed: pyproject.toml scripts/python-from-source.sh
	PY313=$$(scripts/python-from-source.sh) && $$PY313 -m venv $(GIL313_VENV)
	$(GIL313_VENV)/bin/python -m pip install -q "maturin>=1.5,<2" $(TEST_DEPS)
	touch $@

develop-313: $(GIL313_VENV)/.installed
	$(GIL313_ENV) $(GIL313_VENV)/bin/maturin develop --release -q

test-313: tools develop-313 load-bin
	$(GIL313_VENV)/bin/python -c 'import sys, shardloop; assert sys._is_gil_enabled()'
	$(GIL313_VENV)/bin/python -m pytest -q tests
	$(GIL313_VENV)/bin/python scripts/cpython_asyncio_suite.py

# Release wheels for 3.11, 3.13 and 3.13t (manylinux, checked by maturin's
# audit) and the sdist, into dist/.
wheel: $(VENV)/.installed $(FT_VENV)/.installed $(GIL313_VENV)/.installed
	rm -rf dist
	$(VENV)/bin/maturin build --release -q --auditwheel check -i $(PY) --out dist
	$(GIL313_ENV) $(VENV)/bin/maturin build --release -q --auditwheel check \
		-i $(GIL313_VENV)/bin/python --out dist
	$(FT_ENV) $(VENV)/bin/maturin build --release -q --auditwheel check \
		-i $(FT_VENV)/bin/python --out dist
	$(VENV)/bin/maturin sdist --out dist
	ls -l dist

# The ring's unit tests under miri (scaled down there); needs the nightly
# toolchain's miri component.
miri:
	rustup component add --toolchain nightly miri rust-src
	$(CARGO) +nightly miri test -p shardloop-core --lib ring::

# The core's Rust tests under ThreadSanitizer (nightly, with std rebuilt
# instrumented from the rust-src component, so that its synchronisation is
# seen too). Not part of `make test`.
TSAN_ENV := RUSTFLAGS="-Zsanitizer=thread" RUSTDOCFLAGS="-Zsanitizer=thread" \
	TSAN_OPTIONS="halt_on_error=1" CARGO_TARGET_DIR=target/tsan
tsan:
	rustup component add --toolchain nightly rust-src
	$(TSAN_ENV) $(CARGO) +nightly test -Zbuild-std -p shardloop-core \
		--target x86_64-unknown-linux-gnu --lib --tests

# Ten minutes of load, resets and Ctrl-C against the lookup and memcached
# examples, checking that memory and descriptors stay flat (not in `make test`).
SOAK_MINUTES ?= 10
soak: develop load-bin
	$(PY) scripts/soak.py --minutes $(SOAK_MINUTES)

bench: bench-rust bench-python bench-net

bench-rust:
	$(CARGO) bench -p shardloop-core --bench ring --bench submit_to

bench-python: develop
	$(PY) benches/calls.py

# CPU-bound Python and the lookup server on 1 and 2 shards, on this
# interpreter (for the free-threaded one: $(FT_VENV)/bin/python benches/scaling.py).
bench-scaling: develop load-bin
	$(PY) benches/scaling.py

bench-net: tools develop load-bin
	$(PY) benches/net/run.py
	$(PY) benches/net/memcached.py
	$(PY) benches/net/memcached.py --client shardloop

clean:
	rm -rf target $(VENV)
