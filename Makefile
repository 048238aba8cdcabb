# The commands people and CI run. `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
LOOM_ENV := RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 CARGO_TARGET_DIR=target/loom

.PHONY: test test-rust lint-rust loom miri bench-rust

test: lint-rust test-rust loom

lint-rust:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust:
	$(CARGO) test --workspace

# The sleep/wake handshake and the ring, model-checked with loom.
loom:
	$(LOOM_ENV) $(CARGO) test --release -p shardloop-core --test loom_wake

# The ring's unit tests under miri (scaled down there); needs the nightly
# toolchain's miri component.
miri:
	rustup component add --toolchain nightly miri rust-src
	$(CARGO) +nightly miri test -p shardloop-core --lib ring::

bench-rust:
	$(CARGO) bench -p shardloop-core --bench ring --bench submit_to
