# Two commands do all the set-up: `make test` and `make demo` each create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# OpenMP threads that spin while waiting slow torch down ~100x when other processes share the cores
export OMP_WAIT_POLICY ?= PASSIVE
# torch is pinned here, not in pyproject.toml (which asks for a range): these builds lie on the CI machines' disk.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	touch $@

# LXT (AttnLRP's reference) goes in without its language-model dependencies (transformers, bitsandbytes, ...):
# the tests load only its rule functions
$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e '.[test]' $(TORCH)
	$(PY) -m pip install -q --no-deps lxt==2.1
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e '.[demo]' $(TORCH)
	touch $@

# one pytest worker per core (at most 4: each holds its own models), each with one intra-op thread
# (tests/conftest.py): 4 minutes instead of 8 on 2 cores
test: $(VENV)/.test
	$(PY) -m pytest -n auto --maxprocesses 4

demo: $(VENV)/.demo
	MPLBACKEND=Agg $(PY) examples/demo.py

bench: $(VENV)/.test
	$(PY) benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
