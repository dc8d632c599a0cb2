# Fresh machine: `make serve` runs the product, `make test` runs the tests. Both install what
# they need first (pip packages, and for tests redis-server/PostgreSQL/buf when missing).
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup setup-test setup-bench system-deps serve test lint proto openapi descriptors bench

setup:
	$(PIP) -e .

setup-test:
	$(PIP) -e '.[test]'

# Only what the bench needs (tests/test_bench_deps.py keeps it that way): no pytest.
setup-bench:
	$(PIP) -e '.[bench]'

system-deps:
	@command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }
	@command -v h2load >/dev/null || { apt-get update -q && apt-get install -y -q nghttp2-client; }
	@# The tests run their own server from /usr/lib/postgresql/*/bin (the package's cluster is unused).
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }
	@command -v buf >/dev/null || npm install -g -s @bufbuild/buf

# GRPC_EXPERIMENTS: the gRPC server model the bench measures (docs/deployment.md).
serve: setup
	GRPC_EXPERIMENTS=-event_engine_listener spauth serve

test: setup-test system-deps
	$(PY) -m pytest

lint: setup-test system-deps
	ruff check .
	ruff format --check .
	mypy
	lint-imports
	@# buf cannot fetch buf.build/googleapis offline, so it lints the image protoc builds with
	@# googleapis' protos from the googleapis-common-protos wheel (only our files: --path).
	$(PY) scripts/genproto.py --descriptor-set .buf-image.binpb --source-info
	buf lint '.buf-image.binpb#format=binpb' --path statuspulse/auth/v1

proto:
	$(PY) scripts/genproto.py

# docs/openapi.json: the HTTP/JSON admin API, from protos/ (run after `make proto`).
openapi:
	$(PY) -m sidecar.admin.openapi > docs/openapi.json

# The descriptor set Envoy's gRPC-JSON transcoder loads (deploy/envoy/admin-transcoder.yaml).
descriptors:
	$(PY) scripts/genproto.py --descriptor-set deploy/envoy/statuspulse-auth.pb

bench: setup-bench system-deps
	$(PY) -m bench
