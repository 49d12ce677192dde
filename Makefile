# mcp-authz: everything a fresh machine needs goes through these targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STAMP := $(VENV)/.installed

.PHONY: install proto lint test run bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Regenerate authz/pb from proto/ (the generated code is committed; a test checks it is fresh).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto -I$(SITE) --python_out=. \
	  proto/authz/pb/core.proto proto/authz/pb/http_status.proto
	$(BIN)/python -m grpc_tools.protoc -Iproto -I$(SITE) --python_out=. \
	  --grpc_python_out=. proto/authz/pb/external_auth.proto

lint: $(STAMP)
	$(BIN)/ruff check authz tests examples
	$(BIN)/ruff format --check authz tests examples
	$(BIN)/mypy authz

test: lint
	$(BIN)/pytest -q

run: $(STAMP)
	$(BIN)/python examples/run_stack.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
