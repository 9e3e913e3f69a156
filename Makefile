# cxrfed — the two commands are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum requirements-dev.txt | cut -c1-16)
CARGO ?= cargo

# LibTorch comes from the virtualenv's torch wheel (used by the model crate; see README).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# A fresh clone gains nothing from incremental compilation, and its caches cost gigabytes of
# the CI machine's disk.
ifeq ($(CI),true)
export CARGO_INCREMENTAL := 0
endif

.PHONY: ui-assets test-deps demo test fuzz fuzz-smoke check-layers venv sdk build bench bench-imaging bench-model bench-txrv bench-tls bench-dicom bench-research bench-privacy bench-federation bench-training bench-footprint model lint clean-venv

$(STAMP): requirements-dev.txt
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --progress-bar off -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# The Python SDK (clients/python): stubs generated from proto/ with grpcio-tools, installed
# into the virtualenv in editable mode. Regenerated when the protos change.
SDK_STAMP := clients/python/cxrfed/.generated-$(shell cat proto/cxrfed/v1/*.proto | sha256sum | cut -c1-16)
$(SDK_STAMP): $(STAMP) $(wildcard proto/cxrfed/v1/*.proto)
	rm -rf clients/python/cxrfed && mkdir -p clients/python/cxrfed
	$(PYTHON) -m grpc_tools.protoc -Iproto --python_out=clients/python --grpc_python_out=clients/python proto/cxrfed/v1/*.proto
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e clients/python
	touch $@

sdk: $(SDK_STAMP)

# The three binaries by role (cxrfed, cxrfed-node, cxrfed-coordinator) and the benchmark driver.
BINS := -p cxrfed -p cxrfed-node -p cxrfed-coordinator -p cxrfed-bench

build: venv sdk
	$(CARGO) build --locked $(BINS) --bins

demo: build
	bash scripts/demo.sh

# Debian packages of the real clients the suite drives (dcmtk), installed when missing.
test-deps:
	bash scripts/test-deps.sh

test: build check-layers test-deps
	$(CARGO) test --locked --workspace --no-fail-fast
	$(MAKE) fuzz-smoke

# cargo-fuzz targets (fuzz/): the DICOM path, the query parser, every RPC's protobuf messages.
# `make fuzz` runs each for FUZZ_SECONDS (default 600); the suite runs a short smoke.
FUZZ_SECONDS ?= 600
fuzz: build
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

fuzz-smoke: build
	bash scripts/fuzz.sh 5

# Architecture invariants: the coordinator and the CLI never depend on tch/torch-sys, and their
# binaries load no libtorch (cxrfed-fl links neither torch nor tonic).
check-layers: build
	@for p in cxrfed-coordinator cxrfed cxrfed-fl; do \
	  if $(CARGO) tree --locked -p $$p -e normal --prefix none | grep -Eq '^(tch|torch-sys) '; then \
	    echo "error: $$p depends on tch/torch-sys"; exit 1; fi; done
	@for p in cxrfed-fl cxrfed-dicom; do \
	  if $(CARGO) tree --locked -p $$p -e normal --prefix none | grep -Eq '^(tonic|prost|tch|torch-sys|sled) '; then \
	    echo "error: $$p depends on tonic/prost/tch/sled"; exit 1; fi; done
	@for b in cxrfed cxrfed-coordinator; do \
	  if readelf -d target/debug/$$b | grep -q torch; then \
	    echo "error: target/debug/$$b links libtorch"; exit 1; fi; done
	@echo "layers: cxrfed, cxrfed-coordinator and cxrfed-fl are torch-free; cxrfed-fl and cxrfed-dicom are tonic-, torch- and sled-free"

bench: bench-imaging bench-model bench-txrv bench-tls bench-dicom bench-research bench-privacy bench-federation bench-training bench-footprint

bench-imaging: venv
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/imaging.py --bin target/release/cxrfed-bench --out docs/bench/imaging.md

bench-model: venv
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/model.py --bin target/release/cxrfed-bench --cxrfed target/release/cxrfed --out docs/bench/model.md

# TorchXRayVision DenseNet-121 through the node against TXRV's own pipeline (docs/bench/txrv.md).
bench-txrv: venv
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/txrv.py --bin target/release/cxrfed-bench --cxrfed target/release/cxrfed --out docs/bench/txrv.md

bench-tls: venv
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/tls.py --cxrfed target/release/cxrfed --bin target/release/cxrfed-bench --out docs/bench/tls.md

# The peer, OpenDP's Python bindings, is installed for this benchmark only.
# OpenDP's Polars API pins its own Polars (1.36), so it gets its own package path.
OPENDP_POLARS := .cxrfed/opendp-polars
bench-privacy: venv
	$(PYTHON) -m pip install --quiet --disable-pip-version-check opendp==0.16.0
	test -d $(OPENDP_POLARS)/opendp || $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(OPENDP_POLARS) "opendp[polars]==0.16.0"
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/privacy.py --bin target/release/cxrfed-bench --opendp-polars $(OPENDP_POLARS) --out docs/bench/privacy.md

bench-federation: venv
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/federation.py --bin target/release/cxrfed-bench --out docs/bench/federation.md

# The peer, Flower, goes into its own folder (its protobuf pin differs from grpcio-tools'); only
# the Flower processes of this benchmark put it on their path.
FLOWER := .cxrfed/flower
bench-training: venv
	test -d $(FLOWER)/flwr || $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(FLOWER) flwr==1.41.0
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/training.py --cxrfed target/release/cxrfed --bin target/release/cxrfed-bench --flower-path $(FLOWER) --out docs/bench/training.md

# Footprint by role: CLI start-up, coordinator idle and DenseNet-121 round memory. With
# BEFORE=DIR (a folder holding the previous single `cxrfed` binary) both builds side by side.
bench-footprint: venv
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/footprint.py --after target/release $(if $(BEFORE),--before $(BEFORE)) --out docs/bench/footprint.md

bench-dicom: venv test-deps
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/dicom.py --cxrfed target/release/cxrfed --out docs/bench/dicom.md

bench-research: venv
	$(PYTHON) -m pip install --quiet --disable-pip-version-check polars==2.1.0 duckdb==2.0.0
	$(CARGO) build --locked --release $(BINS) --bins
	$(PYTHON) bench/research.py --cxrfed target/release/cxrfed --bin target/release/cxrfed-bench --out docs/bench/research.md

# Reproduces the bundled model (models/tiny-phantom-v1): 3000 phantoms of seed 1 from the
# university, community and icu profiles (capped at 768 px), 50 epochs of the tiny
# architecture on CPU (about 15 minutes on 2 cores). The screening profile is held out.
MODEL_DATA := .cxrfed/train-phantoms
model: build
	target/debug/cxrfed phantom --out $(MODEL_DATA) --count 3000 --seed 1 --site university,community,icu --max-size 768
	target/debug/cxrfed model train --data $(MODEL_DATA) --arch tiny --epochs 50 --batch-size 32 --lr 0.002 \
		--validation 0.1 --seed 1 --device cpu --model-id cxrfed-tiny-phantom-v1 --out models/tiny-phantom-v1

# The console's front-end dependency (htmx), from npm against crates/cxrfed/ui's lockfile,
# copied into the assets the binary embeds. Run after changing its version; commit the result.
ui-assets:
	npm ci --prefix crates/cxrfed/ui --no-audit --no-fund --loglevel=error
	cp crates/cxrfed/ui/node_modules/htmx.org/dist/htmx.min.js crates/cxrfed/ui/assets/htmx.min.js
	cp crates/cxrfed/ui/node_modules/htmx.org/LICENSE crates/cxrfed/ui/assets/htmx.LICENSE

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

clean-venv:
	rm -rf $(VENV)
