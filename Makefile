# The commands a person types. `make help` lists them.
#
# `make setup` is idempotent: with nothing changed it finishes in seconds. Debian packages are
# installed only when missing, the venv is rebuilt only when pyproject.toml changes, and the
# control plane is built once per pinned version into $(OUTPOST_CACHE_DIR) (outside the repo).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/pytest
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
export OUTPOST_CACHE_DIR ?= $(HOME)/.cache/outpost

# Debian's own Python (not a pyenv or a hand-built one, which bring their headers) needs its
# -venv package for `python -m venv` and its -dev package (Python.h, libpython) for Nuitka.
PYTHON_DEBS := $(shell $(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; \
	sys.base_prefix == "/usr" and print(f"python{v}-dev python{v}-venv")' 2>/dev/null)
# What the tests and the appliance need from Debian: runc and CNI plugins for pods, mosquitto
# for the eventbus, socat for serial PTY pairs, docker-registry as a local OCI registry,
# iproute2 for network namespaces, libglib2.0-dev to build bluepy; for the native binary
# (`make binary`) a C compiler and libc headers, patchelf and ccache; for the gateway rootfs
# (`make rootfs`) debootstrap and e2fsprogs (mkfs.ext4, e2fsck, debugfs); busybox-static, curl
# and openssl for the installer's test roots.
DEB_PACKAGES := runc containernetworking-plugins mosquitto socat docker-registry iproute2 iptables \
	libglib2.0-dev gcc libc6-dev patchelf ccache ca-certificates busybox-static curl openssl \
	debootstrap e2fsprogs $(PYTHON_DEBS)

# pytest exits 5 when a selection collects no test (say, hw-tests on a machine without
# hardware); that is not a failure of the code under test.
define pytest
	$(PYTEST) $(1) || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest: no tests collected" || exit $$rc; }
endef

.PHONY: help setup deb-packages controlplane demo cluster test test-unit test-integration \
	test-hw lint fmt clean rootfs appliance

help:
	@echo "make setup      install Debian packages, create .venv, build the test control plane"
	@echo "make demo       set up, then run a control plane, outpost-cloud and an edge node with pods"
	@echo "make test       set up, lint, build the binary and the rootfs, run every test (CI)"
	@echo "make test-unit  the fast tier: unit tests only, no control plane"
	@echo "make cluster    run a control plane for kubectl until Ctrl-C"
	@echo "make rootfs     gateway root filesystem (tarball + ext4) with Outpost; cached"
	@echo "make lint       ruff check and format check;  make fmt  rewrites the code"
	@echo "make binary     build the native edge binary (cached; prints its path)"
	@echo "make binary-cross ARCH=arm64|armhf   the same for an ARM gateway, in an emulated chroot"
	@echo "make appliance  the binary, then the rootfs with it (what \`make test\` builds first)"

setup: deb-packages $(VENV)/.installed controlplane

deb-packages:
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' \
			|| echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
			$$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
		|| { echo "Outpost needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cloud,test]'
	touch $@

controlplane: $(VENV)/.installed
	@command -v go >/dev/null || { echo "the Go toolchain (1.26 or newer) is needed on PATH"; exit 1; }
	$(BIN)/python -m tests.cluster build

# The edge node lives in a network namespace and runs its pods on runc: that takes root.
demo: setup
	$(SUDO) $(BIN)/python -m tests.demo

cluster: setup
	$(BIN)/python -m tests.cluster up --kubeconfig-out .demo/admin.kubeconfig

# A Debian gateway root filesystem with the binary (from `make binary`, if built), the unit and
# a first-boot join; cached in $(OUTPOST_CACHE_DIR)/rootfs/ by a hash of its inputs.
rootfs: deb-packages $(VENV)/.installed
	$(SUDO) env OUTPOST_CACHE_DIR=$(OUTPOST_CACHE_DIR) $(BIN)/python -m rootfs.build

# The binary, then the rootfs that carries it (--require-binary: never an image without it).
# Both cached: with nothing changed this takes about a second.
appliance: binary
	$(SUDO) env OUTPOST_CACHE_DIR=$(OUTPOST_CACHE_DIR) $(BIN)/python -m rootfs.build \
		--require-binary

# Every test, the built binary's smoke suite and the rootfs tests included: `appliance` builds
# them first, and OUTPOST_REQUIRE_BINARY=1 makes a test that finds no binary or rootfs for the
# current sources fail instead of skipping (tests/appliance.py).
test: export OUTPOST_REQUIRE_BINARY := 1
test: export OUTPOST_REQUIRE_ROOT := 1
test: setup lint appliance
	$(call pytest,-q)

test-unit: $(VENV)/.installed
	$(call pytest,-q tests/unit)

test-integration: setup
	$(call pytest,-q tests/integration)

test-hw: $(VENV)/.installed
	$(call pytest,-q hw-tests)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The native edge binary (Nuitka onefile, minutes of CPU the first time), cached in
# $(OUTPOST_CACHE_DIR)/binary/<hash of edge/ and pyproject.toml>/outpost; prints its path.
.PHONY: binary
binary: deb-packages $(VENV)/.installed
	@$(BIN)/python build/binary.py

# The edge binary for another CPU (ARCH=arm64 or armhf), built in an emulated Debian chroot;
# long the first time (build/README.md, "Cross builds"). Prints the path of outpost-linux-<arch>.
.PHONY: binary-cross
binary-cross:
	@command -v qemu-aarch64-static >/dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
		qemu-user-static debootstrap git; }
	$(SUDO) env OUTPOST_CACHE_DIR=$(OUTPOST_CACHE_DIR) build/cross.sh $(or $(ARCH),arm64)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .demo
