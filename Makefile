# tweed: `make demo` and `make test` each do their own set-up on a fresh Debian machine.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PYTHON    ?= python3
DEB_PKGS  := etcd-server etcd-client iproute2 iptables iputils-ping iperf3 tcpdump traceroute systemd docker.io busybox-static
STAMP     := $(VENV)/.installed

.PHONY: setup packages test unit lint demo bench bench-scale asan soak clean

setup: packages $(STAMP)

# Installed without their recommends: prometheus would bring node-exporter, smartmontools
# and more, none of which the lab test (a Prometheus scraping an agent) needs.
DEB_PKGS_NO_RECOMMENDS := prometheus

# Install only the Debian packages that are missing (apt-get update only when needed).
packages:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	bare=""; for p in $(DEB_PKGS_NO_RECOMMENDS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || bare="$$bare $$p"; \
	done; \
	if [ -n "$$missing$$bare" ]; then \
	  echo "installing Debian packages:$$missing$$bare"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install$$missing$$bare" >&2; exit 1; fi; \
	  apt-get update -qq || exit 1; \
	  if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; fi; \
	  if [ -n "$$bare" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$bare >/dev/null || exit 1; fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# setuptools >= 77 reads the SPDX license string; `make asan` builds with the venv's own.
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77'
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The whole suite, then the C datapath's tests again against its sanitized build.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(MAKE) asan

unit: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# ruff over everything, and the type checker (mypy, settings in pyproject.toml) over the code.
lint: setup
	$(VENV)/bin/ruff check agent backends tests
	$(VENV)/bin/mypy

BACKEND ?= host-gw
demo: setup
	$(PY) -m tests.demo $(BACKEND)

# The plots of both benchmarks need matplotlib: the optional `bench` extra.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Throughput and latency per backend, measured in one run (a command, not a test).
bench: setup $(BENCH_STAMP)
	BENCH_JSON=$(CURDIR)/bench-results.json $(PY) -m tests.bench
	$(PY) -m tests.bench_plot bench-results.json docs/benchmarks.svg

# One agent against N peer leases per backend, with the kernel's own pace (ip -batch) in
# the same run (a command, not a test). SCALE_SIZES="1000 5000" for a quick run (default
# 1000 5000 10000 20000), SCALE_BACKENDS="vxlan host-gw udp"; tests/bench_scale.py says more.
bench-scale: setup $(BENCH_STAMP)
	SCALE_JSON=$(CURDIR)/docs/benchmarks-scale.json SCALE_PLOT=$(CURDIR)/docs/benchmarks-scale.svg \
	  $(PY) -m tests.bench_scale

# A long run under churn (a command, not a test): iperf3 and ping across a three-host lab
# while stand-in peers join and leave every second and etcd restarts every minute; prints
# lost pings, route mismatches against etcd and the agents' memory at start and end.
SOAK_MINUTES ?= 10
soak: setup
	SOAK_MINUTES=$(SOAK_MINUTES) $(PY) -m tests.soak

# The C datapath built with AddressSanitizer and UBSan, and its tests run against that
# build (in a copy of the tree, so the normal build is left alone): the datapath suite (both
# datapaths; the C one is the sanitized build), the C-only tests and the udp lab.
# pyproject.toml (pytest's settings) is copied after the build: setup.py runs on the venv's
# setuptools, which may be older than the one pip builds with and refuse its [project].
ASAN_DIR := build/asan
asan: setup
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	cp -r agent backends tests setup.py pyproject.toml README.md $(ASAN_DIR)/
	find $(ASAN_DIR)/backends -name '*.so' -delete
	cd $(ASAN_DIR) && CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1" \
	  $(CURDIR)/$(PY) setup.py -q build_ext --inplace
	cd $(ASAN_DIR) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0 TWEED_EXPECT_FASTPATH=$(CURDIR)/$(ASAN_DIR)/backends/udp \
	  $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_datapath.py \
	  tests/unit/test_c_datapath.py tests/unit/test_c_segmentation.py tests/unit/test_udp_network.py \
	  tests/lab/test_udp_lab.py tests/lab/test_udp_heal_lab.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
