# Jennah developer targets. Every target that needs Python creates .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv run test lint layers typecheck pytest proto proto-check bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## Start the gateway (127.0.0.1:8080) and two workers on SQLite + the local provider.
run: venv
	JENNAH_DEV_MODE=1 $(BIN)/jennah dev

## ruff, the import contracts, mypy, the generated-code check, then pytest.
test: venv proto-check lint layers typecheck pytest

lint: venv
	$(BIN)/ruff check .

## The layering of docs/design.md §13 ([tool.importlinter] in pyproject.toml).
layers: venv
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Regenerate jennah/v1 from proto/ (offline: grpc_tools' protoc + protoc-gen-connectrpc).
proto: venv
	$(BIN)/buf generate proto --template buf.gen.yaml

## Fails when jennah/v1 is not what `make proto` would write.
proto-check: venv
	@tmp=$$(mktemp -d) && \
	$(BIN)/buf generate proto --template buf.gen.yaml -o $$tmp && \
	diff -r -x __init__.py -x __pycache__ -x py.typed $$tmp/jennah/v1 jennah/v1 \
	  || { echo "jennah/v1 is out of date with proto/: run 'make proto' and commit"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp

## The two images, built offline: a Debian base (debootstrap) and a wheelhouse built here,
## both cached in .cache/images/; starts dockerd (and stops it) when none runs.
images: venv
	$(BIN)/python deploy/images/build.py images

## `images`, then tests/images/ with real containers of them (time-bounded; CI=true: no
## engine fails).
image-test: venv
	$(BIN)/python deploy/images/build.py test

.PHONY: images image-test

## All benchmarks (< 10 min on 2 cores) → docs/benchmarks.md. Needs wrk (Debian: apt-get install wrk).
bench: venv
	@command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null 2>&1 || \
	  { echo "bench needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
