# cxrfed — the two commands are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum requirements-dev.txt | cut -c1-16)
CARGO ?= cargo

# LibTorch comes from the virtualenv's torch wheel (used by the model crate; see README).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test venv build bench lint clean-venv

$(STAMP): requirements-dev.txt
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --progress-bar off -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

build: venv
	$(CARGO) build --locked -p cxrfed --bins

demo: build
	bash scripts/demo.sh

test: build
	$(CARGO) test --locked --workspace --no-fail-fast

bench: venv
	$(CARGO) build --locked --release -p cxrfed --bins
	$(PYTHON) bench/imaging.py --bin target/release/cxrfed-bench --out docs/bench/imaging.md

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

clean-venv:
	rm -rf $(VENV)
