# Everything runs in a local virtual environment, .venv, created on first use and
# reinstalled only when pyproject.toml changes (the stamp file), so re-runs start at once.
#   make demo [TIME=10m | EPOCHS=2]   train `fast` on CIFAR-10 (digits offline) for a 5-minute
#                          budget (or TIME / EPOCHS) and print the results
#   make test              the full test suite (slow tests included) + ruff check, as CI
#   make lint              ruff check + ruff format --check
#   make bench [BENCH_ARGS=--quick]   data-pipeline numbers (docs/benchmarks.md)
#   make clean             build and tool caches (keeps .venv, runs/ and datasets)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARCHIVE := ../shared/data/cifar10-train-jpg.tar.gz
EPOCHS ?=
TIME ?=
BENCH_ARGS ?=

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/imgclf demo $(if $(wildcard $(ARCHIVE)),--archive $(ARCHIVE)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(TIME),--time $(TIME))

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py $(BENCH_ARGS)

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
