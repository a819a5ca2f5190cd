# asiffs build and test entry points. CI runs `make -k test` via .ci/run.
#
#   make deps        install system packages and the Python venv (idempotent, stamped)
#   make build       cargo build --release --locked
#   make install     binary, man pages and completions under $(DESTDIR)$(PREFIX)
#   make uninstall   remove what install put there
#   make test        fmt-check + clippy + cargo tests + Python oracle tests
#                    + a short fuzz run of each target + integration/*.sh
#   make bench       bench/run.sh
#   make demo        create, fill and mount a demo image at demo/mnt
#   make clippy      cargo clippy -D warnings, unsafe blocks must say why
#   make model-check the shuttle model checks of the cache and allocator
#   make fuzz        each fuzz target for FUZZ_SECONDS (default 300)
#   make fuzz-seeds  rewrite the seed corpus from the Apple vectors

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

CARGO   ?= cargo
PYTHON3 ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
ASIFFS  := target/release/asiffs

APT_PACKAGES := fuse3 e2fsprogs fio util-linux python3-venv qemu-utils
# NBD clients (nbdinfo, nbdcopy) and certificates for integration/nbd_serve.sh.
APT_PACKAGES += libnbd-bin openssl
DEPS_STAMP   := $(VENV)/.deps-stamp

# Run apt as root, or through sudo when we are not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps apt-deps build test fmt-check clippy unit-test interop-test integration bench demo clean-demo
.PHONY: fuzz-deps fuzz-build fuzz fuzz-test fuzz-seeds model-check

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
	$(VPY) -c 'import pymodi'
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

# `make && sudo make install`: installing builds only when there is no
# binary yet, so that root need not run cargo. The man pages and
# completions come from the binary itself (asiffs manpages / completions).
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR   = $(DESTDIR)$(PREFIX)/bin
MAN1DIR  = $(DESTDIR)$(PREFIX)/share/man/man1
BASHDIR  = $(DESTDIR)$(PREFIX)/share/bash-completion/completions
ZSHDIR   = $(DESTDIR)$(PREFIX)/share/zsh/site-functions
FISHDIR  = $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
.PHONY: install uninstall

$(ASIFFS):
	$(CARGO) build --release --locked

install: $(ASIFFS)
	gen="$$(mktemp -d)"; trap 'rm -rf "$$gen"' EXIT; \
	$(ASIFFS) manpages "$$gen/man"; \
	$(ASIFFS) completions bash >"$$gen/asiffs.bash"; \
	$(ASIFFS) completions zsh >"$$gen/_asiffs"; \
	$(ASIFFS) completions fish >"$$gen/asiffs.fish"; \
	install -d "$(BINDIR)" "$(MAN1DIR)" "$(BASHDIR)" "$(ZSHDIR)" "$(FISHDIR)"; \
	install -m 755 $(ASIFFS) "$(BINDIR)/asiffs"; \
	install -m 644 "$$gen"/man/*.1 "$(MAN1DIR)/"; \
	install -m 644 "$$gen/asiffs.bash" "$(BASHDIR)/asiffs"; \
	install -m 644 "$$gen/_asiffs" "$(ZSHDIR)/_asiffs"; \
	install -m 644 "$$gen/asiffs.fish" "$(FISHDIR)/asiffs.fish"

uninstall:
	rm -f "$(BINDIR)/asiffs" "$(MAN1DIR)/asiffs.1" "$(MAN1DIR)"/asiffs-*.1 \
		"$(BASHDIR)/asiffs" "$(ZSHDIR)/_asiffs" "$(FISHDIR)/asiffs.fish"

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --release --locked --all-targets -- -D warnings -D clippy::undocumented_unsafe_blocks

unit-test: build
	$(CARGO) test --release --locked

# The oracle's own tests: dissect_read.py against Apple's vectors.
interop-test: deps
	$(VPY) -m unittest -v tests/interop/test_oracle.py

integration: deps build uring-on
	integration/run-all.sh

# FUSE over io_uring is off in the kernel until asked (root only); the
# mount then uses it by default (-o uring=auto). Without root or a kernel
# that has it, the mount says why and serves /dev/fuse.
URING_KNOB := /sys/module/fuse/parameters/enable_uring
.PHONY: uring-on
uring-on:
	@if [ -w $(URING_KNOB) ]; then echo 1 > $(URING_KNOB) && echo "uring: FUSE over io_uring enabled"; \
	else echo "uring: $(URING_KNOB) not writable; mounts use /dev/fuse"; fi

# Fuzzing with cargo-fuzz (libFuzzer, debug assertions and overflow
# checks). No sanitizer unless asked (FUZZ_SANITIZER=address): the code
# under test has no unsafe block, and AddressSanitizer made the first build
# take 10 minutes here. There is no nightly toolchain: RUSTC_BOOTSTRAP=1
# lets stable rustc take the flags cargo-fuzz passes. The fuzz crate has
# its own target dir.
FUZZ_TARGETS      := header directory entries metadata image udif_parse udsb_info udsp_parse crypt_header_v2 crypt_key_blob crypt_trailer_v1
FUZZ_SECONDS      ?= 300
FUZZ_TEST_SECONDS ?= 20
.PHONY: $(addprefix fuzz-run-,$(FUZZ_TARGETS)) $(addprefix fuzz-test-,$(FUZZ_TARGETS))
FUZZ_SANITIZER    ?= none
CARGO_FUZZ        := RUSTC_BOOTSTRAP=1 $(CARGO) fuzz
# Largest input per target: a header sector; a directory slice; a group
# and its bitmap bytes; a 64 KiB plist; an image of a few small chunks;
# a small .dmg; a bundle's Info.plist; a .sparseimage of 512-byte bands
# with one index node.
FUZZ_MAX_LEN_header    := 1024
FUZZ_MAX_LEN_directory := 4096
FUZZ_MAX_LEN_entries   := 20000
FUZZ_MAX_LEN_metadata  := 70000
FUZZ_MAX_LEN_image     := 262144
FUZZ_MAX_LEN_udif_parse := 262144
FUZZ_MAX_LEN_udsb_info := 70000
FUZZ_MAX_LEN_udsp_parse := 600000
FUZZ_MAX_LEN_crypt_header_v2 := 4096
FUZZ_MAX_LEN_crypt_key_blob := 1024
FUZZ_MAX_LEN_crypt_trailer_v1 := 1276
# A run fails on a panic, an input slower than 10 s, or more than 2 GiB.
FUZZ_LIMITS := -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10

fuzz-deps:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked

fuzz-build: fuzz-deps
	cd fuzz && $(CARGO_FUZZ) build -s $(FUZZ_SANITIZER)

# New inputs go to a scratch corpus under fuzz/target, so runs leave the
# committed corpus (fuzz/corpus) alone; fuzz/regressions holds inputs
# that once failed, replayed first by every run. One make target per fuzz
# target, so that `make -k` runs them all even when one fails.
# $(1): target, $(2): seconds.
define fuzz_run
	mkdir -p fuzz/target/corpus/$(1)
	cd fuzz && $(CARGO_FUZZ) run -s $(FUZZ_SANITIZER) $(1) target/corpus/$(1) corpus/$(1) \
		$(patsubst fuzz/%,%,$(wildcard fuzz/regressions/$(1))) -- \
		-max_total_time=$(2) -max_len=$(FUZZ_MAX_LEN_$(1)) $(FUZZ_LIMITS)
endef

fuzz: $(addprefix fuzz-run-,$(FUZZ_TARGETS))
fuzz-test: $(addprefix fuzz-test-,$(FUZZ_TARGETS))

$(addprefix fuzz-run-,$(FUZZ_TARGETS)): fuzz-run-%: fuzz-build
	$(call fuzz_run,$*,$(FUZZ_SECONDS))

$(addprefix fuzz-test-,$(FUZZ_TARGETS)): fuzz-test-%: fuzz-build
	$(call fuzz_run,$*,$(FUZZ_TEST_SECONDS))

fuzz-seeds:
	$(PYTHON3) fuzz/seeds.py

# The concurrency core (group cache, I/O gate, chunk reuse) under shuttle's
# schedulers; its own target dir, since --cfg shuttle swaps the locks.
model-check:
	RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle $(CARGO) test --release --locked --lib model_check

# Order matters: integration runs last so its "N passed, N failed" line closes the output.
test: deps fmt-check clippy unit-test model-check interop-test fuzz-test integration

bench: deps build uring-on
	bench/run.sh

demo: deps build
	scripts/demo.sh

clean-demo:
	-$(ASIFFS) umount demo/mnt 2>/dev/null || fusermount3 -u demo/mnt 2>/dev/null || true
	rm -rf demo
