# Fresh machine: `make serve` runs the product, `make test` runs the tests. Both install what
# they need first (pip packages, and for tests redis-server/PostgreSQL/buf when missing).
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup setup-test system-deps serve test lint proto bench

setup:
	$(PIP) -e .

setup-test:
	$(PIP) -e '.[test]'

system-deps:
	@command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }
	@command -v h2load >/dev/null || { apt-get update -q && apt-get install -y -q nghttp2-client; }
	@# The tests run their own server from /usr/lib/postgresql/*/bin (the package's cluster is unused).
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }
	@command -v buf >/dev/null || npm install -g -s @bufbuild/buf

serve: setup
	spauth serve

test: setup-test system-deps
	$(PY) -m pytest

lint: setup-test system-deps
	ruff check .
	ruff format --check .
	mypy
	lint-imports
	buf lint

proto:
	$(PY) scripts/genproto.py

bench: setup-test system-deps
	$(PY) -m bench
