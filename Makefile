# Every target creates .venv and installs the lab on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False

.PHONY: lab app book test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

lab: $(STAMP)  ## JupyterLab on notebooks/
	$(BIN)/jupyter lab notebooks

app: $(STAMP)  ## the classroom demo (every method, one tab each) on the embedded default
	$(BIN)/labkit app

book: $(STAMP)  ## notebooks 00-05 executed (full mode; LABKIT_FAST=1 for fast) as an HTML lab book in build/book/
	$(BIN)/python scripts/build_book.py

test: $(STAMP)  ## everything CI runs: lint, unit tests, every notebook in fast mode
	$(BIN)/ruff check labkit app tests scripts
	LABKIT_FAST=1 MPLBACKEND=Agg $(BIN)/pytest --nbmake tests notebooks

lint: $(STAMP)
	$(BIN)/ruff check labkit app tests scripts

clean:
	rm -rf $(VENV) runs test-artifacts
