# Two commands for a newcomer: `make demo` (train the tiny model on 2 CPU ranks) and `make test`.
# Each creates .venv and installs what it needs on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/pydocs

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dali]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/triarch prepare --out $(DEMO_DATA) --vocab-size 2048
	$(BIN)/triarch train examples/tiny.yaml --nproc 2 --run-dir runs/tiny-demo checkpoint.interval=150

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs data
