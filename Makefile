# Two commands do all the set-up on a fresh machine: `make test` (~17 min on 2 cores) and `make demo` (~13 min)
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

.PHONY: test demo headline install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(BIN)/.installed
	$(BIN)/dgrpo demo --out $(DEMO_DIR) --seed $(SEED) $(if $(CORPUS),--corpus $(CORPUS),)

# The headline experiment: build generator, judges and LM (~24 min on 2 cores), GRPO (at most 15 min), gold
# evaluation (~9 min) (docs/RESULTS.md, "The headline: `make headline` under the default sampler").
headline: $(BIN)/.installed
	$(BIN)/dgrpo pipeline -c configs/headline.yaml --set out=$(HEADLINE_DIR) $(if $(CORPUS),--set corpus.path=$(CORPUS),)

clean:
	rm -rf $(VENV) runs .pytest_cache
