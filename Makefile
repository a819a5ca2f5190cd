# asiffs build and test entry points. CI runs `make -k test` via .ci/run.
#
#   make deps        install system packages and the Python venv (idempotent, stamped)
#   make build       cargo build --release --locked
#   make test        fmt-check + cargo tests + Python oracle tests + integration/*.sh
#   make bench       bench/run.sh
#   make demo        create, fill and mount a demo image at demo/mnt
#   make clippy      cargo clippy -D warnings (not part of test)

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

CARGO   ?= cargo
PYTHON3 ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
ASIFFS  := target/release/asiffs

APT_PACKAGES := fuse3 e2fsprogs fio util-linux python3-venv qemu-utils
DEPS_STAMP   := $(VENV)/.deps-stamp

# Run apt as root, or through sudo when we are not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps apt-deps build test fmt-check clippy unit-test interop-test integration bench demo clean-demo

deps: apt-deps $(DEPS_STAMP)

# The venv: rebuilt when the requirement list changes; otherwise a no-op.
# (apt-deps is always checked: dpkg-query is cheap and a machine may be new.)
$(DEPS_STAMP): tests/interop/requirements.txt Makefile
	@if [ ! -x $(VPY) ]; then \
		echo "deps: creating $(VENV)"; \
		$(PYTHON3) -m venv $(VENV); \
	fi
	$(VPY) -m pip install --disable-pip-version-check -q -r tests/interop/requirements.txt
	$(VPY) -c 'from dissect.hypervisor.disk.asif import ASIF'
	@touch $@

# Install the Debian packages only when one is missing (apt-get update only then).
apt-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else \
		echo "deps: system packages present"; \
	fi

build:
	$(CARGO) build --release --locked

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

unit-test: build
	$(CARGO) test --release --locked

# The oracle's own tests: dissect_read.py against Apple's vectors.
interop-test: deps
	$(VPY) -m unittest -v tests/interop/test_oracle.py

integration: deps build
	integration/run-all.sh

# Order matters: integration runs last so its "N passed, N failed" line closes the output.
test: deps fmt-check unit-test interop-test integration

bench: deps build
	bench/run.sh

demo: deps build
	scripts/demo.sh

clean-demo:
	-$(ASIFFS) umount demo/mnt 2>/dev/null || fusermount3 -u demo/mnt 2>/dev/null || true
	rm -rf demo
