# Two commands do all the set-up on a fresh machine: `make test` and `make demo` (~13 min on 2 cores)
# (docs/RESULTS.md, "Tests and CI" and "`make demo`: three seeds").
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned first so that a CPU machine never pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The demo downloads tiny Shakespeare unless CORPUS names a local copy.
CORPUS ?= $(firstword $(wildcard ../shared/data/tinyshakespeare.txt))
DEMO_DIR ?= runs/demo
SEED ?= 0
HEADLINE_DIR ?= runs/headline

# Test files run this many at a time (pytest-xdist): most of a test's time is Ray actors starting and waiting
TEST_WORKERS ?= 3

.PHONY: test test-cluster demo headline install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The suite in two tiers; CI (.ci/run) runs both. `make test`: every test but those that start clusters or
# servers of their own, TEST_WORKERS files at a time. `make test-cluster`: those, one at a time.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not soak and not cluster"

test-cluster: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "cluster and not soak"

demo: $(BIN)/.installed
	$(BIN)/dgrpo demo --out $(DEMO_DIR) --seed $(SEED) $(if $(CORPUS),--corpus $(CORPUS),)

# The headline experiment: build generator, judges and LM (~24 min on 2 cores), GRPO (at most 15 min), gold
# evaluation (~9 min) (docs/RESULTS.md, "The headline: `make headline` under the default sampler").
headline: $(BIN)/.installed
	$(BIN)/dgrpo pipeline -c configs/headline.yaml --set out=$(HEADLINE_DIR) $(if $(CORPUS),--set corpus.path=$(CORPUS),)

clean:
	rm -rf $(VENV) runs .pytest_cache
