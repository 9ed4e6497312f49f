# resource-plane: `make run` (embedded mode) and `make test` (everything) set up what
# they need themselves. CARGO_TARGET_DIR defaults outside the clone so builds are reused.
export CARGO_TARGET_DIR ?= /var/tmp/resource-plane-target
CARGO ?= cargo
# Tools scripts/setup.sh installs outside the clone (moto's virtualenv).
export RP_TOOLS ?= /var/tmp/resource-plane-tools
export PATH := $(RP_TOOLS)/venv/bin:$(PATH)

# `make install` is the seed's name for `make setup`.
.PHONY: setup install build run test lint fmt bench scale soak clean

setup:
	@bash scripts/setup.sh

install: setup

build: setup
	$(CARGO) build --release

run: setup
	$(CARGO) run --release --bin resource-plane

test: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: setup
	bash scripts/bench.sh

scale: setup
	bash scripts/scale.sh

# Nemesis soak (SOAK_SECONDS, default 120): exits non-zero when the checker counts a
# violation. See scripts/soak.sh for the knobs.
soak: setup
	bash scripts/soak.sh

clean:
	$(CARGO) clean
