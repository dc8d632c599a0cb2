# Fresh machine: `make serve` runs the product, `make test` runs the tests. Both first make the
# project virtual environment $(VENV) and install into it with the exact versions of
# constraints.txt; every tool runs from $(VENV)/bin, so the system Python (externally managed,
# PEP 668) is never touched and nothing needs activating. `make test VENV=/tmp/x` uses another.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q --no-compile -c constraints.txt
# buf is an npm package, installed into the venv at this exact version (`make lint`).
BUF_VERSION := 1.75.0
BUF := $(VENV)/buf/node_modules/.bin/buf
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: serve test lint proto openapi descriptors bench lock envoy system-deps compiler

# Debian and Ubuntu split venv support off python3 (python3-venv): install it when missing.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV) && $(APT) update -q && $(APT) install -y -q python3-venv \
	  && $(PYTHON) -m venv $(VENV); }

# The compiled Check path (sidecar/dataplane/_fastcheck.c, docs/performance.md) builds at install
# when a C compiler and this Python's headers exist; install both when missing (without them the
# install still succeeds and the sidecar runs the pure-Python path).
compiler:
	@command -v gcc >/dev/null && $(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || { $(APT) update -q && $(APT) install -y -q gcc python3-dev; }

# Stamps: reinstall only when the project's requirements, the pins or the C sources change (an
# editable install compiles the extensions in place once: a changed .c needs the reinstall).
CSOURCES := $(wildcard sidecar/*/*.c)
$(VENV)/.serve: $(BIN)/python pyproject.toml constraints.txt $(CSOURCES) | compiler
	$(PIP) -e '.[envoy]'
	@touch $@

# xds-protos ships its own, older copy of opentelemetry/proto/…/common_pb2.py: whichever of it
# and opentelemetry-proto pip unpacks last wins, and with xds-protos' copy tracing cannot import
# (InstrumentationScope is missing). Reinstalling opentelemetry-proto last makes its copy win.
$(VENV)/.test: $(BIN)/python pyproject.toml constraints.txt $(CSOURCES) | compiler
	$(PIP) -e '.[test]'
	$(PIP) --force-reinstall --no-deps opentelemetry-proto
	@touch $@

# Only what the bench needs (tests/test_bench_deps.py keeps it that way): no pytest.
$(VENV)/.bench: $(BIN)/python pyproject.toml constraints.txt $(CSOURCES)
	$(PIP) -e '.[bench]'
	@touch $@

$(BUF):
	npm install -s --no-fund --no-audit --prefix $(VENV)/buf @bufbuild/buf@$(BUF_VERSION)

# The tests start their own redis-server and PostgreSQL (from /usr/lib/postgresql/*/bin), h2load
# drives the benchmark smoke test; install each only when missing.
system-deps:
	@command -v redis-server >/dev/null || { $(APT) update -q && $(APT) install -y -q redis-server; }
	@command -v h2load >/dev/null || { $(APT) update -q && $(APT) install -y -q nghttp2-client; }
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { $(APT) update -q && $(APT) install -y -q postgresql; }

# GRPC_EXPERIMENTS: the gRPC server model the bench measures (docs/deployment.md).
serve: $(VENV)/.serve
	GRPC_EXPERIMENTS=-event_engine_listener $(BIN)/spauth serve

# Envoy comes with `make serve` (the envoy extra); this names it for the README's walkthrough.
envoy: $(VENV)/.serve
	@$(BIN)/envoy --version | grep .

# pytest exits 5 when it collected nothing: make treats that as the failure it is.
# Two workers, one test file each at a time (module fixtures are built once): most tests wait on
# real servers starting, so CI's wall time nearly halves even on two cores. TEST_WORKERS=0 runs
# the suite in this one process.
TEST_WORKERS ?= 2
test: $(VENV)/.test system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.test $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@# buf cannot fetch buf.build/googleapis offline, so it lints the image protoc builds with
	@# googleapis' protos from the googleapis-common-protos wheel (only our files: --path).
	$(BIN)/python scripts/genproto.py --descriptor-set .buf-image.binpb --source-info
	$(BUF) lint '.buf-image.binpb#format=binpb' --path statuspulse/auth/v1

proto: $(VENV)/.test
	$(BIN)/python scripts/genproto.py

# docs/openapi.json: the HTTP/JSON admin API, from protos/ (run after `make proto`).
openapi: $(VENV)/.test
	$(BIN)/python -m sidecar.admin.openapi > docs/openapi.json

# The descriptor set Envoy's gRPC-JSON transcoder loads (deploy/envoy/admin-transcoder.yaml).
descriptors: $(VENV)/.test
	$(BIN)/python scripts/genproto.py --descriptor-set deploy/envoy/statuspulse-auth.pb

bench: $(VENV)/.bench system-deps
	$(BIN)/python -m bench

# Re-pin (see README, Development): resolve in a scratch venv and write every version to
# constraints.txt. Existing pins are kept, so adding a dependency adds its pins only;
# UPGRADE=1 re-resolves everything from pyproject.toml's ranges (then `make proto lint test`).
UPGRADE ?=
lock:
	rm -rf $(VENV).lock && $(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/python -m pip install --disable-pip-version-check -q \
	  $(if $(UPGRADE),,-c constraints.txt) '.[test,envoy]'
	{ echo "# Every package we install, exactly (make lock writes this file; see README)."; \
	  $(VENV).lock/bin/python -m pip freeze --exclude-editable --all \
	  | grep -v -e '^statuspulse-auth' -e '^pip==' -e '^setuptools==' -e '^wheel=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(VENV).lock
